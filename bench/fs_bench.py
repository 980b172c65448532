#!/usr/bin/env python3
"""The mounted file system against a plain local directory, measured in the same run.

    .venv/bin/python bench/fs_bench.py [--size 1G] [--servers 4] [--files 2000]

Sequential write and read (dd, 1 MiB blocks; caches dropped before reads),
4 KiB random reads and writes, creating / listing / removing small files,
and untarring a source tree (this repository's Python files, copied 20 times).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirrorfuse.tools.spawn import LocalCluster  # noqa: E402
from mirrorfuse.wire.sizes import human, parse_size  # noqa: E402

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


COLD = {"ok": True}


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        COLD["ok"] = False  # not root: the table says the read was warm


def timed(func) -> float:
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


def dd(args: list[str]) -> None:
    subprocess.run(["dd", *args, "bs=1M", "status=none"], check=True)


def run_suite(root: Path, size: int, files: int, tarball: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    big = root / "big"
    mib = size >> 20
    t = timed(lambda: dd(["if=/dev/zero", f"of={big}", f"count={mib}", "conv=fsync"]))
    out["seq write (MiB/s)"] = f"{mib / t:.0f}"
    drop_caches()
    t = timed(lambda: dd([f"if={big}", "of=/dev/null"]))
    out["seq read (MiB/s)"] = f"{mib / t:.0f}"

    rng = random.Random(1)
    nblocks = size // 4096
    lat_r, lat_w = [], []
    fd = os.open(big, os.O_RDWR)
    try:
        for _ in range(2000):
            off = rng.randrange(nblocks) * 4096
            t0 = time.perf_counter()
            os.pread(fd, 4096, off)
            lat_r.append(time.perf_counter() - t0)
        payload = os.urandom(4096)
        for _ in range(2000):
            off = rng.randrange(nblocks) * 4096
            t0 = time.perf_counter()
            os.pwrite(fd, payload, off)
            lat_w.append(time.perf_counter() - t0)
        t = timed(lambda: os.fsync(fd))
    finally:
        os.close(fd)
    out["4K random read (ops/s)"] = f"{len(lat_r) / sum(lat_r):.0f}"
    out["4K random read p50/p99 (ms)"] = (
        f"{statistics.median(lat_r) * 1e3:.2f}/{sorted(lat_r)[int(len(lat_r) * 0.99)] * 1e3:.2f}"
    )
    out["4K random write (ops/s)"] = f"{len(lat_w) / (sum(lat_w) + t):.0f}"
    big.unlink()

    d = root / "small"
    d.mkdir()
    t = timed(lambda: [(d / f"f{i}").write_bytes(b"x" * 100) for i in range(files)])
    out[f"create {files} files (s)"] = f"{t:.2f}"
    t = timed(lambda: os.listdir(d) and [os.stat(d / n) for n in os.listdir(d)])
    out[f"list+stat {files} files (s)"] = f"{t:.2f}"
    t = timed(lambda: [os.unlink(d / f"f{i}") for i in range(files)])
    out[f"remove {files} files (s)"] = f"{t:.2f}"
    src = root / "src"
    src.mkdir()
    t = timed(lambda: subprocess.run(["tar", "-C", str(src), "-xf", str(tarball)], check=True))
    out["untar source tree (s)"] = f"{t:.2f}"
    shutil.rmtree(src)
    return out


def make_tarball(path: Path) -> int:
    count = 0
    with tarfile.open(path, "w") as tar:
        for copy in range(20):
            for f in sorted(REPO.glob("**/*.py")):
                if ".venv" in f.parts:
                    continue
                tar.add(f, arcname=f"copy{copy}/{f.relative_to(REPO)}")
                count += 1
    return count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--servers", type=int, default=4)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--block-size", default="1M")
    args = p.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="mfs-fsbench-") as tmp:
        tmp = Path(tmp)
        tarball = tmp / "tree.tar"
        nfiles = make_tarball(tarball)
        local = tmp / "local"
        local.mkdir()
        base = run_suite(local, size, args.files, tarball)
        cluster = LocalCluster(tmp / "cluster", args.servers)
        mnt = tmp / "mnt"
        mnt.mkdir()
        try:
            subprocess.run(
                [BIN / "mirrorfs-cli", "format", *cluster.args, "--block-size", args.block_size],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [BIN / "mirrorfs-mount", *cluster.args, str(mnt)], check=True, capture_output=True
            )
            ours = run_suite(mnt, size, args.files, tarball)
            # the same sequential read, block by block (no read-ahead), for comparison
            dd(["if=/dev/zero", f"of={mnt}/ra", f"count={size >> 20}", "conv=fsync"])
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
            time.sleep(1)
            env = {**os.environ, "MIRRORFS_READAHEAD": "0"}
            subprocess.run(
                [BIN / "mirrorfs-mount", *cluster.args, str(mnt)],
                check=True,
                capture_output=True,
                env=env,
            )
            drop_caches()
            t = timed(lambda: dd([f"if={mnt}/ra", "of=/dev/null"]))
            no_ra = f"{(size >> 20) / t:.0f}"
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            time.sleep(1)
            cluster.close()
    print(
        f"mirrorfs ({args.servers} local servers, block {args.block_size}) vs a local "
        f"directory; {human(size)} sequential, untar of {nfiles} files"
    )
    if not COLD["ok"]:
        print("(page cache not dropped, not root: sequential reads are warm)")
    print(f"{'measure':32} {'local dir':>12} {'mirrorfs':>12}")
    for key in base:
        print(f"{key:32} {base[key]:>12} {ours[key]:>12}")
    print(f"{'seq read, block by block (MiB/s)':32} {'':>12} {no_ra:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
