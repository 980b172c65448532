"""Run inside a private network namespace (see test_index_attacks.py): prints one JSON result.

Three replicas with --data, a short --log-keep (a replica behind catches up by snapshot)
and a key file of their own; a client registers a peer and advertises files, enough that a
snapshot goes by TCP. Then, as user nobody: forged orders, heartbeats and snapshots
(unsealed, or sealed with another key), every datagram of the group captured and sent
again, and a snapshot offered by token read without the key. As a holder of the key (a
bug, or an insider): a malformed snapshot. Then a replica is killed and restarted from its
--data, and another one's --data file is damaged before its restart. After each step: what
every replica's status says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
from netns import setup_lo, start, stop, wait

from mirrorfuse.core.indexstate import IndexState
from mirrorfuse.index.client import BlockingIndexClient
from mirrorfuse.index.keys import group_key
from mirrorfuse.wire import datagrams as dg
from mirrorfuse.wire.datagrams import FileEntry, Sealer, pack

GROUP, PORT = "235.1.1.6", 55560
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
ATTACK = Path(__file__).with_name("index_attack.py")
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
IDS = [1, 2, 3]


class Group:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key_file = tmp / "keys" / "index.key"
        self.data = tmp / "data"
        self.procs: dict[int, subprocess.Popen] = {}
        self.stderr: dict[int, list[str]] = {}

    def start(self, rid: int) -> str:
        cmd = [str(BIN / "mirrorfs-index"), GROUP, str(PORT), "--id", str(rid)]
        cmd += ["--data", str(self.data), "--key-file", str(self.key_file), "--log-keep", "5"]
        self.procs[rid], line = start(cmd, "mirrorfs-index replica")
        return line

    def kill(self, rid: int) -> str:
        p = self.procs.pop(rid)
        p.send_signal(signal.SIGKILL)
        p.wait()
        err = p.stderr.read()
        self.stderr.setdefault(rid, []).append(err)
        return err

    def close(self) -> None:
        for rid in list(self.procs):
            p = self.procs.pop(rid)
            stop(p)
            self.stderr.setdefault(rid, []).append(p.stderr.read())


def status(c: BlockingIndexClient) -> dict[int, dict]:
    return {s.replica: msgspec.to_builtins(s) for s in c.query_all("status", wait=0.6)}


def agreed(c: BlockingIndexClient, n: int = 3) -> bool:
    st = status(c)
    return (
        len(st) == n
        and all(s["ready"] for s in st.values())
        and (len({(s["seq"], s["digest"]) for s in st.values()}) == 1)
    )


def as_nobody(*args: str) -> subprocess.Popen:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": "/nonexistent"}
    cmd = [*AS_NOBODY, sys.executable, str(ATTACK), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def udp_binds(port: int) -> list[str]:
    """The local addresses of the UDP sockets on ``port`` (what /proc/net/udp lists)."""
    found = []
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        host, hport = line.split()[1].split(":")
        if int(hport, 16) == port:
            found.append(".".join(str(b) for b in reversed(bytes.fromhex(host))))
    return sorted(found)


def main() -> None:
    setup_lo()
    tmp = Path(tempfile.mkdtemp())  # mode 0700: nobody cannot read the key in it
    g = Group(tmp)
    out: dict = {}
    c: BlockingIndexClient | None = None
    try:
        out["first_start"] = g.start(1)
        for rid in IDS[1:]:
            g.start(rid)
        key = group_key(g.key_file)
        out["key_mode"] = oct(g.key_file.stat().st_mode & 0o777)
        c = BlockingIndexClient(GROUP, PORT, key=key)
        assert wait(lambda: agreed(c), 20)
        assert c.request("register", {"peer": "p", "addr": "127.0.0.1:1", "interval": 3600}).ok
        for i in range(20):
            args = {"peer": "p", "name": f"f{i}", "size": i, "checksum": "c"}
            assert c.request("advertise", args).ok
        for i in range(400):  # long names: the index outgrows a datagram (snapshots by TCP)
            args = {"peer": "p", "name": f"long-{i:03}-" + "x" * 120, "size": i, "checksum": "c"}
            assert c.request("advertise", args).ok
        assert wait(lambda: agreed(c), 20)
        out["before"] = status(c)
        out["udp_binds"] = udp_binds(PORT)

        # 1. forgeries, as nobody
        seq = max(s["seq"] for s in out["before"].values())
        out["forge"] = result(as_nobody("forge", GROUP, str(PORT), str(seq), "1,2,3"))
        time.sleep(1.5)
        out["after_forge"] = status(c)
        out["files_after_forge"] = sorted(c.query_pages("files"))
        out["peers_after_forge"] = sorted(c.query_pages("peers"))

        # 2. every datagram of the group heard, and sent again, as nobody
        spy = as_nobody("replay", GROUP, str(PORT), "3")
        assert spy.stdout is not None and spy.stdout.readline().strip() == "listening"
        args = {"peer": "p", "name": "gone", "size": 1, "checksum": "c"}
        assert c.request("advertise", args).ok
        assert c.request("revoke", {"peer": "p", "name": "gone"}).ok
        assert c.request("heartbeat", {"peer": "p"}).ok
        assert wait(lambda: agreed(c), 10)
        out["before_replay"] = status(c)
        out["replay"] = result(spy)
        time.sleep(1.5)
        out["after_replay"] = status(c)
        out["files_after_replay"] = sorted(c.query_pages("files"))

        # 2b. a snapshot offered by token, read over TCP without the key, as nobody
        offer = c.query("snapshot")
        out["offer"] = [offer.blob is None, offer.host, offer.port]
        out["blob_attack"] = result(as_nobody("blob", offer.host, str(offer.port), offer.token))
        out["blob_with_key"] = c.snapshot().seq

        # 3. a malformed snapshot sealed with the key (a bug, or an insider), to replica 3
        bad = IndexState(seq=seq + 500)
        bad.files["x"] = FileEntry("ghost", 1, 1, ["ghost"])
        insider = Sealer(key, os.urandom(8))
        for blob in (bad.snapshot(), b"\xc1 garbage"):
            snap = dg.Snap(to=3, seq=seq + 500, blob=blob)
            c.send_raw(insider.seal(pack(snap), time.time()))
        time.sleep(1.5)
        out["after_bad_snap"] = status(c)
        saved = (g.data / "replica-3.snapshot").read_bytes()
        out["saved_3"] = IndexState.from_snapshot(saved).seq  # still a good state

        # 4. replica 3 killed and restarted from its --data: it comes up, catches up
        out["stderr_3"] = g.kill(3)
        out["restart_3"] = g.start(3)
        out["agreed_after_restart"] = wait(lambda: agreed(c), 30)

        # 5. replica 2's --data damaged while it is down: one clear line, it rejoins empty
        out["stderr_2"] = g.kill(2)
        (g.data / "replica-2.snapshot").write_bytes(b"\x93\x01\xc1 torn" * 10)
        out["restart_2"] = g.start(2)
        out["agreed_after_damage"] = wait(lambda: agreed(c), 30)
        out["bad_kept"] = (g.data / "replica-2.snapshot.bad").exists()
        out["final"] = status(c)
        cli = [str(BIN / "mirrorfs-cli"), "index", GROUP, str(PORT), "status"]
        res = subprocess.run([*cli, "--key-file", str(g.key_file)], capture_output=True, text=True)
        out["cli_status"] = res.stdout + res.stderr
        wrong = tmp / "other.key"
        wrong.write_text(os.urandom(32).hex() + "\n")
        wrong.chmod(0o600)
        res = subprocess.run([*cli, "--key-file", str(wrong)], capture_output=True, text=True)
        out["cli_wrong_key"] = [res.returncode, res.stdout + res.stderr]
    finally:
        if c is not None:
            c.close()
        g.close()
        out["stderr"] = {rid: "".join(errs) for rid, errs in g.stderr.items()}
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
