"""Run inside a private network namespace (see test_index_offline.py): prints one JSON result.

A large index handed to a late replica by TCP, a killed peer removed
everywhere, share/unshare of single files, then every replica killed:
peers serve their cached index, exchange peer lists, fetch from each
other, and register again when a replica restarts from its --data dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
from netns import setup_lo, start, stop, wait

from mirrorfuse.index.client import BlockingIndexClient as IndexClient

GROUP, PORT = "235.1.1.3", 55557
BIN = Path(sys.executable).parent
BULK = 1000  # enough entries that a snapshot and a listing are larger than a datagram


class Procs:
    def __init__(self) -> None:
        self.all: dict[str, subprocess.Popen] = {}

    def start(self, key: str, cmd: list[str], marker: str) -> str:
        self.all[key], line = start(cmd, marker)
        return line

    def replica(self, rid: int, *extra: str) -> str:
        cmd = [str(BIN / "mirrorfs-index"), GROUP, str(PORT), "--id", str(rid), *extra]
        return self.start(f"r{rid}", cmd, "mirrorfs-index replica")

    def peer(self, name: str, share: Path, *extra: str) -> str:
        cmd = [str(BIN / "mirrorfs-peer"), "--index", f"{GROUP}:{PORT}", "--share", str(share)]
        line = self.start(name, [*cmd, "--id", name, "--interval", "0.5", *extra], "serving")
        return line.split(" on ")[1].split()[0]  # its address

    def kill(self, key: str) -> None:
        p = self.all.pop(key)
        p.kill()
        p.wait()

    def stop_all(self) -> None:
        for p in self.all.values():
            stop(p)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mirrorfs-cli"), "index", GROUP, str(PORT), *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def agreed(c: IndexClient, n: int) -> bool:
    status = c.query_all("status", wait=1.0)
    return len(status) == n and len({(s.seq, s.digest) for s in status}) == 1


def main() -> None:
    setup_lo()
    tmp = Path(tempfile.mkdtemp())
    dirs = {n: tmp / n for n in ("a", "b", "c", "d", "x", "data")}
    for d in dirs.values():
        d.mkdir()
    shared = os.urandom(2 << 20)
    for n in ("a", "b"):
        (dirs[n] / "shared.bin").write_bytes(shared)
    (dirs["c"] / "only-c.txt").write_text("c")
    (dirs["d"] / "only-d.bin").write_bytes(os.urandom(1 << 20))
    (dirs["x"] / "extra.bin").write_bytes(os.urandom(300_000))
    (dirs["x"] / "other.bin").write_bytes(b"not the shared content")
    procs = Procs()
    out: dict = {}
    try:
        keep = ["--log-keep", "500"]  # so that the late replica needs a snapshot
        procs.replica(1, "--data", str(dirs["data"]), *keep)
        procs.replica(2, *keep)
        addr = {n: procs.peer(n, dirs[n[1]]) for n in ("pa", "pb", "pc")}
        c = IndexClient(GROUP, PORT)
        assert wait(lambda: len(c.query_pages("files")) == 2)

        # a big index: the late replica gets it by TCP, under a stream of updates
        assert c.request("register", {"peer": "bulk", "addr": "127.0.0.1:9", "interval": 900}).ok
        for i in range(BULK):
            assert c.request(
                "advertise", {"peer": "bulk", "name": f"bulk-{i:05}", "size": i, "checksum": i}
            ).ok
        procs.replica(3)
        for i in range(40):  # updates keep coming while it catches up
            c.request("advertise", {"peer": "bulk", "name": f"late-{i}", "size": 1, "checksum": 1})
            time.sleep(0.05)
        out["caught_up"] = wait(lambda: agreed(c, 3), 30)
        status = c.query_all("status", wait=1.0)
        out["status_files"] = sorted(s.files for s in status)
        out["tcp_snapshots"] = {s.replica: s.tcp_snapshots for s in status}
        out["paged"] = len(c.query_pages("search", pattern="bulk-*"))

        # share and unshare single files through the running peer pa
        pa = ["--peer", addr["pa"]]
        res = cli("share", str(dirs["x"] / "extra.bin"), "--name", "renamed.bin", *pa)
        out["share"] = (res.returncode, res.stdout + res.stderr)
        out["shared_holders"] = msgspec.to_builtins(c.query_pages("search", pattern="renamed.bin"))
        res = cli("share", str(dirs["x"] / "other.bin"), "--name", "only-c.txt", *pa)
        out["share_taken"] = (res.returncode, res.stdout + res.stderr)
        res = cli("fetch", "renamed.bin", "-o", str(tmp / "renamed.got"))
        out["renamed_same"] = res.returncode == 0 and sha(tmp / "renamed.got") == sha(
            dirs["x"] / "extra.bin"
        )
        res = cli("unshare", "renamed.bin", *pa)
        out["unshare"] = (res.returncode, res.stdout + res.stderr)
        out["unshared"] = "renamed.bin" not in c.query_pages("files")
        res = cli("unshare", "shared.bin", *pa)  # a file of the shared directory
        out["unshare_dir_file"] = (res.returncode, res.stdout + res.stderr)
        # a peer killed: removed, with its files, by every replica
        procs.kill("pc")
        out["pc_removed"] = wait(
            lambda: (
                "pc" not in c.query_pages("peers")
                and "only-c.txt" not in c.query_pages("search", pattern="only-*")
            ),
            20,
        )
        out["agree_after_removal"] = wait(lambda: agreed(c, 3), 10)

        time.sleep(6)  # let the peers' cached copies take the latest index

        # every replica gone: the peers carry on
        for r in ("r1", "r2", "r3"):
            procs.kill(r)
        res = cli("search", "shared*", "--peer", addr["pb"])
        out["offline_search"] = (res.returncode, res.stdout + res.stderr)
        res = cli("fetch", "shared.bin", "-o", str(tmp / "got.bin"), "--peer", addr["pb"])
        out["offline_fetch"] = (res.returncode, res.stdout + res.stderr)
        out["offline_same"] = res.returncode == 0 and sha(tmp / "got.bin") == sha(
            dirs["a"] / "shared.bin"
        )
        # a new peer that knows only pa: its files reach pb through the exchanges
        addr["pd"] = procs.peer("pd", dirs["d"], "--peers", addr["pa"])

        def pb_knows_pd() -> bool:
            res = cli("files", "--peer", addr["pb"])
            return "only-d.bin" in res.stdout and "held by pd" in res.stdout

        out["pd_known_to_pb"] = wait(pb_knows_pd, 40)
        res = cli("peers", "--peer", addr["pb"])
        out["pb_peers"] = res.stdout
        res = cli("fetch", "only-d.bin", "-o", str(tmp / "d.got"), "--peer", addr["pb"])
        out["pd_fetch_same"] = res.returncode == 0 and sha(tmp / "d.got") == sha(
            dirs["d"] / "only-d.bin"
        )

        # pa's own list follows its directory: a file added is listed and fetched from
        # it, one removed goes
        (dirs["a"] / "new-offline.bin").write_bytes(os.urandom(200_000))

        def pa_lists(name: str) -> bool:
            return f"{name}  " in cli("files", "--peer", addr["pa"]).stdout

        out["pa_lists_new"] = wait(lambda: pa_lists("new-offline.bin"), 20)
        res = cli("fetch", "new-offline.bin", "-o", str(tmp / "new.got"), "--peer", addr["pa"])
        out["pa_new_fetched"] = res.returncode == 0 and sha(tmp / "new.got") == sha(
            dirs["a"] / "new-offline.bin"
        )
        (dirs["a"] / "new-offline.bin").unlink()
        out["pa_drops_removed"] = wait(lambda: not pa_lists("new-offline.bin"), 20)

        # a replica comes back with its saved state; the peers register again
        line = procs.replica(1, "--data", str(dirs["data"]))
        out["restart_line"] = line
        out["reregistered"] = wait(
            lambda: (
                {"pa", "pb", "pd"} <= set(c.query_pages("peers"))
                and "only-d.bin" in c.query_pages("files")
            ),
            40,
        )
        files = c.query_pages("files")
        out["bulk_after_restart"] = sum(1 for n in files if n.startswith("bulk-"))
        shared = files.get("shared.bin")
        out["shared_holders_after"] = sorted(shared.holders) if shared else []
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
