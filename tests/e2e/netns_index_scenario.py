"""Run inside a private network namespace (see test_index.py): prints one JSON result."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import netns
from netns import setup_lo, stop

from mirrorfuse.index.client import BlockingIndexClient as IndexClient
from mirrorfuse.wire.datagrams import Req, pack

GROUP, PORT = "235.1.1.1", 55555
INDEX = str(Path(sys.executable).parent / "mirrorfs-index")


def start(rid: int) -> subprocess.Popen:
    return netns.start([INDEX, GROUP, str(PORT), "--id", str(rid)], "mirrorfs-index replica")[0]


def main() -> None:
    setup_lo()
    procs = {i: start(i) for i in (1, 2, 3)}
    out: dict = {}
    try:
        time.sleep(1.5)
        c = IndexClient(GROUP, PORT)
        acked = []
        assert c.request("register", {"peer": "p", "addr": "127.0.0.1:1"}).ok
        for i in range(60):
            if i == 25:  # kill the master while the client keeps advertising
                procs[1].send_signal(signal.SIGKILL)
                procs[1].wait()
                del procs[1]
            if i == 40:
                procs[4] = start(4)  # a replica joins under load
            if i % 5 == 0:  # the peer stays alive: a silent one is dropped with its files
                c.request("heartbeat", {"peer": "p"}, timeout=1.0, tries=10)
            reply = c.request(
                "advertise",
                {"peer": "p", "name": f"f{i}", "size": i, "checksum": "c"},
                timeout=1.0,
                tries=10,
            )
            if reply.ok:
                acked.append(f"f{i}")
            else:
                out.setdefault("refused", []).append([i, reply.error])
        # a malformed datagram and an oversized one: dropped, nobody dies or diverges
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"\xc1garbage", (GROUP, PORT))
        s.sendto(b"\x00" * 65000, (GROUP, PORT))
        # two clients advertise one name with different content at once
        a, b = IndexClient(GROUP, PORT), IndexClient(GROUP, PORT)
        a.request("register", {"peer": "a", "addr": "127.0.0.1:2"})
        b.request("register", {"peer": "b", "addr": "127.0.0.1:3"})
        for who, peer, csum in ((a, "a", "A"), (b, "b", "B")):  # sent: both in flight at once
            args = {"peer": peer, "name": "same", "size": 1, "checksum": csum}
            who.send(pack(Req(client=who.client, req=99, op="advertise", args=args)))
        time.sleep(2.5)  # the late joiner catches up on heartbeats
        status = msgspec.to_builtins(c.query_all("status", wait=1.5))
        cli = str(Path(sys.executable).parent / "mirrorfs-cli")
        out["cli_search"] = subprocess.run(
            [cli, "index", GROUP, str(PORT), "search", "f1*"], capture_output=True, text=True
        ).stdout
        out["cli_shell"] = subprocess.run(
            [cli, "index-shell", GROUP, str(PORT)],
            input="status\nnonsense\npeers\nquit\n",
            capture_output=True,
            text=True,
        ).stdout
        files = msgspec.to_builtins(c.query("files").files)
        out["states"] = msgspec.to_builtins(c.query_all("state", wait=1.0))
        out.update(
            {
                "acked": acked,
                "files": sorted(files),
                "same_owner": files.get("same", {}).get("owner"),
                "status": status,
                "ignored": c.ignored,
                "alive": sorted(i for i, p in procs.items() if p.poll() is None),
            }
        )
    finally:
        for p in procs.values():
            stop(p)
    print(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
