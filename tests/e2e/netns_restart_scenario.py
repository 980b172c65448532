"""Run inside a private network namespace (see test_index_restart.py): prints one JSON result.

Three replicas with --data; a client keeps registering and advertising with
the client's own retry rules. Every replica in turn is killed with -9 and
started again under its old id, with its --data directory or without it,
and the next one goes once the restarted one says it has caught up.
Meanwhile a watcher asks every replica for the file list, to catch one that
answers from a half-filled index, and a listener counts the datagrams the
replicas send each other.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
from netns import setup_lo, start, stop, wait

from mirrorfuse.index.client import BlockingIndexClient as IndexClient
from mirrorfuse.index.keys import group_key
from mirrorfuse.wire.datagrams import BadDatagram, Opener, unpack

GROUP, PORT = "235.1.1.4", 55558
BIN = Path(sys.executable).parent
# (replica, restarted with its --data directory)
RESTARTS = [(1, True), (2, False), (3, True), (1, False), (2, True), (3, False)]


class Counter(threading.Thread):
    """Counts the group's datagrams by kind (a member of the group that says nothing)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.kinds: dict[str, int] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind(("", PORT))
        mreq = struct.pack("4sl", socket.inet_aton(GROUP), socket.INADDR_ANY)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        self.sock.settimeout(0.5)
        self.done = False
        self.opener: Opener | None = None  # the group's key exists once a replica started

    def run(self) -> None:
        while not self.done:
            try:
                data = self.sock.recv(65536)
                self.opener = self.opener or Opener(group_key())
                kind = type(unpack(self.opener.open(data, time.time()))).__name__
            except (TimeoutError, BadDatagram):
                continue
            self.kinds[kind] = self.kinds.get(kind, 0) + 1


class Load(threading.Thread):
    """Updates one after another, each tried as long as the client's rules say."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.acked: list[str] = []
        self.failed: list[str] = []
        self.done = False

    def run(self) -> None:
        c = IndexClient(GROUP, PORT)
        try:
            c.request("register", {"peer": "load", "addr": "127.0.0.1:1", "interval": 600})
            i = 0
            while not self.done:
                name = f"n{i:05}"
                try:
                    args = {"peer": "load", "name": name, "size": i, "checksum": "c"}
                    reply = c.request("advertise", args)
                    (self.acked if reply.ok else self.failed).append(f"{name} {reply.error}")
                except Exception as exc:  # noqa: BLE001 (reported, the test fails on it)
                    self.failed.append(f"{name}: {exc}")
                i += 1
                time.sleep(0.02)
        finally:
            c.close()


def replica(rid: int, data: Path | None) -> subprocess.Popen:
    cmd = [str(BIN / "mirrorfs-index"), GROUP, str(PORT), "--id", str(rid)]
    cmd += ["--data", str(data)] if data is not None else []
    return start(cmd, "mirrorfs-index replica")[0]


def main() -> None:
    setup_lo()
    tmp = Path(tempfile.mkdtemp())
    counter = Counter()
    counter.start()
    procs = {rid: replica(rid, tmp) for rid in (1, 2, 3)}
    c = IndexClient(GROUP, PORT)
    out: dict = {"half_answers": [], "restarts": []}
    load = Load()
    try:
        assert wait(lambda: len([s for s in c.query_all("status") if s.ready]) == 3, 20)
        load.start()
        assert wait(lambda: len(load.acked) >= 100, 30)
        for rid, keep in RESTARTS:
            before = len(load.acked)
            procs[rid].kill()  # kill -9
            procs[rid].wait()
            time.sleep(0.3)
            procs[rid] = replica(rid, tmp if keep else None)
            began = time.monotonic()

            def caught_up(rid: int = rid, before: int = before) -> bool:
                # every replica's first page of files: none may be half-filled
                for page in c.query_all("files", wait=0.2):
                    if len(page.files) < min(before // 2, 200):  # a page holds more
                        out["half_answers"].append([rid, len(page.files), before])
                status = {s.replica: s for s in c.query_all("status", wait=0.3)}
                return rid in status and status[rid].ready and len(status) == 3

            ok = wait(caught_up, 30)
            out["restarts"].append([rid, keep, ok, round(time.monotonic() - began, 1)])
        load.done = True
        load.join(30)

        def agreed() -> bool:
            status = c.query_all("status", wait=0.5)
            return len(status) == 3 and len({(s.seq, s.digest) for s in status}) == 1

        out["agreed"] = wait(agreed, 20)
        status = c.query_all("status", wait=0.5)
        out["status"] = msgspec.to_builtins(status)
        files = c.query_pages("search", pattern="n*")
        out["missing"] = [a.split()[0] for a in load.acked if a.split()[0] not in files]
        out["acked"] = len(load.acked)
        out["failed"] = load.failed
        out["answers"] = c.request(
            "advertise", {"peer": "load", "name": "end", "size": 1, "checksum": 1}
        ).ok
        out["kinds"] = dict(counter.kinds)
        out["seq"] = max(s.seq for s in status) if status else 0
    finally:
        load.done = True
        counter.done = True
        c.close()
        for p in procs.values():
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
