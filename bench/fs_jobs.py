"""The rows of fs_bench: each job runs in one directory of the file system measured.

Kept apart from the systems (fs_bench.py) so that every system runs exactly the
same code with the same parameters; a job returns one number per row it fills.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Params:
    """Sizes of one run; --quick shrinks them all."""

    size_mib: int = 256  # the fio file and the cp file
    runtime: int = 8  # seconds per fio job
    files: int = 2000  # create / stat / remove
    sqlite_rows: int = 300
    dir_entries: int = 10_000  # ls -l
    tree_copies: int = 20  # untar: this repository's .py files, copied this many times
    cold_fio: bool = False  # fio read jobs start on a remounted, dropped cache
    step_limit: float = 900  # seconds a step may take before its mount is ended (a hang)


QUICK = Params(
    size_mib=64,
    runtime=3,
    files=500,
    sqlite_rows=100,
    dir_entries=2000,
    tree_copies=5,
    step_limit=300,
)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    higher_better: bool  # MiB/s and IOPS; times are lower-better

    def ratio(self, ours: float, theirs: float) -> float:
        """Above 1 when mirrorfs does better."""
        return ours / theirs if self.higher_better else theirs / ours


def rows(p: Params, tree_files: int) -> list[Row]:
    mib, n = p.size_mib, p.files
    return [
        Row("seq_write", "sequential write, 1 MiB (MiB/s)", True),
        Row("seq_read", "sequential read, 1 MiB (MiB/s)", True),
        Row("rand_read", "random read, 4 KiB (IOPS)", True),
        Row("rand_read_p99", "random read, 4 KiB, p99 latency (ms)", False),
        Row("rand_write", "random write, 4 KiB (IOPS)", True),
        Row("create", f"create {n} files of 100 bytes (Python loop, s)", False),
        Row("stat", f"stat {n} files (s)", False),
        Row("remove", f"remove {n} files (s)", False),
        Row("cp_in", f"cp of {mib} MiB in, then sync (s)", False),
        Row("cp_out", f"cp of {mib} MiB out, cold cache (s)", False),
        Row("sqlite", f"SQLite, {p.sqlite_rows} inserts each committed (s)", False),
        Row("ls", f"ls -l of a {p.dir_entries:,}-entry directory (s)", False),
        Row("untar", f"untar a source tree of {tree_files:,} files (s)", False),
    ]


COLD = {"ok": True}


def drop_caches() -> None:
    """Write back, then drop the kernel's page cache, dentries and inodes."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        COLD["ok"] = False  # not root: the table says the reads were warm


def timed(func: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


# -- fio -------------------------------------------------------------------------------------------


def fio(path: Path, p: Params, rw: str, bs: str) -> dict:
    """One fio job as the issue states it; its json result for the one direction."""
    cmd = [
        "fio",
        f"--name={rw}",
        f"--filename={path}",
        "--ioengine=psync",
        "--direct=0",
        "--numjobs=1",
        f"--size={p.size_mib}M",
        f"--runtime={p.runtime}",
        "--time_based",
        f"--rw={rw}",
        f"--bs={bs}",
        "--output-format=json",
    ]
    if "write" in rw:
        cmd.append("--end_fsync=1")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]
    return job["write" if "write" in rw else "read"]


def lay_out(path: Path, size: int) -> None:
    """Make the file whole, real data to its end, so reads never read a hole."""
    have = path.stat().st_size if path.exists() else 0
    if have >= size:
        return
    chunk = os.urandom(1 << 20)
    with open(path, "ab") as f:
        while have < size:
            have += f.write(chunk[: size - have])
        f.flush()
        os.fsync(f.fileno())


def fio_rows(root: Path, p: Params, cold: Callable[[], None]) -> dict[str, float]:
    """Sequential write (which lays the file out), then reads, then random writes."""
    out: dict[str, float] = {}
    path = root / "fio.dat"
    out["seq_write"] = fio(path, p, "write", "1M")["bw_bytes"] / 2**20
    lay_out(path, p.size_mib << 20)
    if p.cold_fio:
        cold()
    out["seq_read"] = fio(path, p, "read", "1M")["bw_bytes"] / 2**20
    if p.cold_fio:
        cold()
    res = fio(path, p, "randread", "4k")
    out["rand_read"] = res["iops"]
    out["rand_read_p99"] = res["clat_ns"]["percentile"]["99.000000"] / 1e6
    out["rand_write"] = fio(path, p, "randwrite", "4k")["iops"]
    path.unlink()
    return out


# -- everything else ----------------------------------------------------------------------------


def small_files(root: Path, p: Params) -> dict[str, float]:
    d = root / "small"
    d.mkdir()
    names = [d / f"f{i}" for i in range(p.files)]
    payload = b"x" * 100

    def create() -> None:
        for n in names:
            with open(n, "wb") as f:
                f.write(payload)

    out = {"create": timed(create)}
    out["stat"] = timed(lambda: [os.stat(n) for n in names])
    out["remove"] = timed(lambda: [os.unlink(n) for n in names])
    d.rmdir()
    return out


def make_source(path: Path, p: Params) -> None:
    """The file copied in and out: random bytes, so no layer can compress it."""
    lay_out(path, p.size_mib << 20)
    with open(path, "rb") as f:  # in the page cache: cp in measures the target only
        while f.read(1 << 20):
            pass


def copies(root: Path, src: Path, scratch: Path, cold: Callable[[], None]) -> dict[str, float]:
    """cp in then sync of the copy (fsync: durable on every system); cp out after cold()."""
    dst = root / "cp.dat"
    os.sync()  # nothing else waits to be written while we time the copy
    out = {
        "cp_in": timed(
            lambda: (
                subprocess.run(["cp", str(src), str(dst)], check=True),
                subprocess.run(["sync", str(dst)], check=True),
            )
        )
    }
    cold()
    back = scratch / "cp.out"
    out["cp_out"] = timed(lambda: subprocess.run(["cp", str(dst), str(back)], check=True))
    back.unlink()
    dst.unlink()
    return out


def sqlite_inserts(root: Path, p: Params) -> dict[str, float]:
    """Default journal (rollback, synchronous=FULL): each commit syncs the file system."""
    path = root / "bench.db"
    db = sqlite3.connect(path)
    try:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
        db.commit()

        def inserts() -> None:
            for i in range(p.sqlite_rows):
                db.execute("INSERT INTO t (body) VALUES (?)", (f"row {i} " + "y" * 90,))
                db.commit()

        t = timed(inserts)
    finally:
        db.close()
    for suffix in ("", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return {"sqlite": t}


def listing(root: Path, p: Params) -> dict[str, float]:
    """ls -l of a directory just filled (untimed) with empty files."""
    d = root / "many"
    d.mkdir()
    for i in range(p.dir_entries):
        os.close(os.open(d / f"entry{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    cmd = ["ls", "-l", str(d)]
    t = timed(lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))
    shutil.rmtree(d)
    return {"ls": t}


def make_tarball(path: Path, copies: int) -> int:
    count = 0
    with tarfile.open(path, "w") as tar:
        for copy in range(copies):
            for f in sorted(REPO.glob("**/*.py")):
                if ".venv" in f.parts:
                    continue
                tar.add(f, arcname=f"copy{copy}/{f.relative_to(REPO)}")
                count += 1
    return count


def untar(root: Path, tarball: Path) -> dict[str, float]:
    src = root / "src"
    src.mkdir()
    t = timed(lambda: subprocess.run(["tar", "-C", str(src), "-xf", str(tarball)], check=True))
    shutil.rmtree(src)
    return {"untar": t}
