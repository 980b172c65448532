#!/usr/bin/env python3
"""mirrorfs against GlusterFS and a local directory, measured in the same run: one table.

    .venv/bin/python bench/fs_bench.py [--systems mirrorfs,gluster,local] [--quick]

mirrorfs: 4 local block servers (two mirror pairs) and its FUSE mount.
GlusterFS: a 2 x 2 distributed-replicated volume on loopback and its FUSE
client, set up and removed by bench/gluster.py (installed from Debian's
archive when missing). local: a directory on the disk all of them store on.

Rows (fs_jobs.py): fio with 1 job, psync, buffered, a 256 MiB file, 8 s
time-based, writes ending with fsync (fio drops the file from the page cache
before each pass, its default, so every pass reaches the file system);
create / stat / remove of small files in a Python loop; cp of a file in (then
fsync) and out with a cold cache; SQLite inserts each committed; ls -l of a
big directory; untar of a source tree. "Cold" is a fresh mount of the system
plus dropped kernel caches, so no cache of a FUSE client's own survives
either. The ratio column is mirrorfs/GlusterFS, above 1 when mirrorfs does
better (for times, GlusterFS's time over mirrorfs's).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fs_jobs as jobs  # noqa: E402  (bench/ is this script's folder)
from gluster import GlusterVolume, ensure_packages  # noqa: E402

from mirrorfuse.tools.spawn import LocalCluster  # noqa: E402

BIN = Path(sys.executable).parent
SYSTEMS = ("mirrorfs", "gluster", "local")
TITLES = {"mirrorfs": "mirrorfs", "gluster": "GlusterFS", "local": "local dir"}


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(") ", 1)[-1].startswith("Z")


class Local:
    """A directory of the local disk: the baseline."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "local"

    def __enter__(self) -> Path:
        self.root.mkdir()
        return self.root

    def cold(self) -> None:
        jobs.drop_caches()

    def abort(self) -> None:
        pass  # the kernel's own file system does not hang on us

    def alive(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class Mirrorfs:
    """A LocalCluster of block servers, formatted, and mirrorfs-mount on it."""

    def __init__(self, tmp: Path, servers: int, block_size: str) -> None:
        self.tmp = tmp
        self.servers = servers
        self.block_size = block_size
        self.mnt = tmp / "mirrorfs"
        self.log = tmp / "mirrorfs-mount.log"
        self.cluster: LocalCluster | None = None
        self.pid: int | None = None

    def __enter__(self) -> Path:
        self.mnt.mkdir()
        self.cluster = LocalCluster(self.tmp / "cluster", self.servers)
        try:
            fmt = [BIN / "mirrorfs-cli", "format", *self.cluster.args]
            done = subprocess.run(
                [*fmt, "--block-size", self.block_size], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise RuntimeError(f"format: {done.stderr.strip()}")
            self._mount()
        except BaseException:
            self.__exit__()
            raise
        return self.mnt

    def _mount(self) -> None:
        assert self.cluster is not None
        cmd = [BIN / "mirrorfs-mount", *self.cluster.args, "--log", self.log, self.mnt]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mirrorfs-mount: {done.stderr.strip() or done.stdout.strip()}")
        found = re.search(r"pid (\d+)", done.stdout)
        self.pid = int(found.group(1)) if found else None

    def _unmount(self) -> None:
        """Unmount and wait for the mount process to end (it gives the lease back)."""
        subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (self.pid is None or _gone(self.pid)) and not os.path.ismount(self.mnt):
                break
            time.sleep(0.1)
        self.pid = None

    def cold(self) -> None:
        self._unmount()
        jobs.drop_caches()
        self._mount()

    def alive(self) -> bool:
        return os.path.ismount(self.mnt)

    def abort(self) -> None:
        """End the mount process: whatever waits on the mount gets ENOTCONN and returns."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._unmount()
        if self.cluster is not None:
            self.cluster.close()


class Gluster:
    """bench/gluster.py's volume, under this run's temporary directory."""

    def __init__(self, tmp: Path) -> None:
        self.volume = GlusterVolume(tmp / "gluster")

    def __enter__(self) -> Path:
        return self.volume.start()

    def cold(self) -> None:
        self.volume.unmount()
        jobs.drop_caches()
        self.volume.mount()

    def abort(self) -> None:
        self.volume.kill_client()

    def alive(self) -> bool:
        return os.path.ismount(self.volume.mnt)

    def __exit__(self, *exc: object) -> None:
        self.volume.stop()


class StepHung(Exception):
    """A step outlived its limit: its mount was ended so that the run goes on."""


def guarded(step: Callable[[], dict[str, float]], limit: float, abort: Callable[[], None]):
    """Run step; past ``limit`` seconds, abort() (hung calls then fail) and raise StepHung."""
    hung = threading.Event()

    def fire() -> None:
        hung.set()
        abort()

    timer = threading.Timer(limit, fire)
    timer.start()
    try:
        result = step()
    except Exception:
        if hung.is_set():
            raise StepHung() from None
        raise
    finally:
        timer.cancel()
    if hung.is_set():
        raise StepHung()
    return result


def steps(p: jobs.Params, source: Path, tarball: Path, scratch: Path) -> list:
    """(name, function of a root and its system) for every job, in the order they run."""
    return [
        ("fio", lambda root, system: jobs.fio_rows(root, p, system.cold)),
        ("small files", lambda root, system: jobs.small_files(root, p)),
        ("cp", lambda root, system: jobs.copies(root, source, scratch, system.cold)),
        ("sqlite", lambda root, system: jobs.sqlite_inserts(root, p)),
        ("ls -l", lambda root, system: jobs.listing(root, p)),
        ("untar", lambda root, system: jobs.untar(root, tarball)),
    ]


def run_all(systems: dict, p: jobs.Params, jobs_list: list, rounds: int):
    """Every job on every system, the systems taking turns job by job (so a machine that
    gets busier for a while weighs on all of them alike); the median of the rounds.

    A job that fails leaves its rows empty and says why; a job that hangs ends that
    system's mount, and a system whose mount is gone sits out the rest of the run.
    """
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in systems}
    errors: dict[str, list[str]] = {n: [] for n in systems}
    roots: dict[str, Path] = {}
    entered = []
    try:
        for name, system in systems.items():
            print(f"[{name}] setting up", file=sys.stderr, flush=True)
            try:
                roots[name] = system.__enter__()
                entered.append((name, system))
            except Exception as exc:
                errors[name].append(f"setup: {_why(exc)}")
        for rnd in range(rounds):
            for what, job in jobs_list:
                for name, root in list(roots.items()):
                    system = systems[name]
                    if not system.alive():  # never measure the empty directory below a mount
                        errors[name].append(f"{what}: {root} is not mounted any more")
                        del roots[name]
                        continue
                    tag = f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""
                    print(f"[{name}] {what}{tag}", file=sys.stderr, flush=True)
                    try:
                        res = guarded(partial(job, root, system), p.step_limit, system.abort)
                    except StepHung:
                        errors[name].append(f"{what}: no answer in {p.step_limit:.0f} s, ended")
                        del roots[name]
                        continue
                    except Exception as exc:
                        errors[name].append(f"{what}: {_why(exc)}")
                        continue
                    for key, value in res.items():
                        samples[name].setdefault(key, []).append(value)
    finally:
        for name, system in reversed(entered):
            print(f"[{name}] tearing down", file=sys.stderr, flush=True)
            try:
                system.__exit__(None, None, None)
            except Exception as exc:
                errors[name].append(f"teardown: {_why(exc)}")
    results = {n: {k: statistics.median(v) for k, v in rows.items()} for n, rows in samples.items()}
    return results, errors


def _why(exc: Exception) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        err = exc.stderr if isinstance(exc.stderr, str) else ""
        return f"{exc.cmd[0]} exited {exc.returncode}: {err.strip()[-300:]}"
    return traceback.format_exception_only(exc)[-1].strip()


def fmt(row: jobs.Row, value: float | None) -> str:
    if value is None:
        return "-"
    if row.higher_better:
        return f"{value:,.0f}"
    return f"{value:.3f}" if value < 0.1 else f"{value:.2f}"


def table(p: jobs.Params, chosen: list[str], results: dict[str, dict[str, float]], tree: int):
    """A markdown table: the two systems, their ratio, then the local baseline."""
    head = (
        f"job (fio: 1 job, psync, buffered, {p.size_mib} MiB file, {p.runtime} s "
        "time-based; writes end with fsync)"
    )
    cols = [s for s in ("mirrorfs", "gluster") if s in chosen]
    ratio = len(cols) == 2
    names = [TITLES[s] for s in cols] + (["mirrorfs/GlusterFS"] if ratio else [])
    names += [TITLES["local"]] if "local" in chosen else []
    lines = [f"| {head} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in jobs.rows(p, tree):
        vals = [results[s].get(row.key) for s in cols]
        cells = [fmt(row, v) for v in vals]
        if ratio:
            m, g = vals
            cells.append(f"{row.ratio(m, g):.2f}x" if m and g else "-")
        if "local" in chosen:
            cells.append(fmt(row, results["local"].get(row.key)))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gluster_version() -> str:
    with contextlib.suppress(OSError):
        out = subprocess.run(["glusterfs", "--version"], capture_output=True, text=True).stdout
        return out.split("\n", 1)[0]
    return "GlusterFS (version unknown)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help="any of mirrorfs,gluster,local")
    p.add_argument("--quick", action="store_true", help="64 MiB, 3 s fio jobs, fewer files")
    p.add_argument("--servers", type=int, default=4, help="mirrorfs block servers (4)")
    p.add_argument("--block-size", default="1M", help="mirrorfs block size (1M)")
    p.add_argument(
        "--cold-fio", action="store_true", help="remount and drop caches before fio reads"
    )
    p.add_argument("--rounds", type=int, default=1, help="run every job N times, show medians")
    args = p.parse_args()
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not chosen or set(chosen) - set(SYSTEMS):
        p.error(f"--systems: choose from {','.join(SYSTEMS)}")
    params = jobs.QUICK if args.quick else jobs.Params()
    if args.cold_fio:
        params = jobs.Params(**{**params.__dict__, "cold_fio": True})
    ensure_packages({"fio": "fio"})
    with tempfile.TemporaryDirectory(prefix="mfs-fsbench-") as tmpdir:
        tmp = Path(tmpdir)
        scratch = tmp / "scratch"
        scratch.mkdir()
        tarball = scratch / "tree.tar"
        tree = jobs.make_tarball(tarball, params.tree_copies)
        source = scratch / "source.dat"
        jobs.make_source(source, params)
        systems = {
            name: {
                "mirrorfs": lambda: Mirrorfs(tmp, args.servers, args.block_size),
                "gluster": lambda: Gluster(tmp),
                "local": lambda: Local(tmp),
            }[name]()
            for name in chosen
        }
        jobs_list = steps(params, source, tarball, scratch)
        results, errors = run_all(systems, params, jobs_list, args.rounds)
    print(
        f"\n{os.cpu_count()} cores, Linux {platform.release()}; mirrorfs: {args.servers} "
        f"local servers, block {args.block_size}; {gluster_version()}: 2 x 2 replica 2, "
        "bricks on loopback; all on one disk"
    )
    if not jobs.COLD["ok"]:
        print("(not root: caches could not be dropped, 'cold' reads were warm)")
    if params.cold_fio:
        print("(fio read jobs started on a fresh mount with dropped caches)")
    if args.rounds > 1:
        print(f"(median of {args.rounds} rounds)")
    print()
    print(table(params, chosen, results, tree))
    for name in chosen:
        for line in errors[name]:
            print(f"{TITLES[name]}: {line}")
    return 1 if any(errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
