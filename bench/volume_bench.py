#!/usr/bin/env python3
"""Sequential write and read through the volume API against a local-file baseline.

    .venv/bin/python bench/volume_bench.py [--size 1G] [--servers 4,8,16] [--block-size 1M]

The baseline, measured in the same run, writes the same bytes twice into two
local files (what a mirror must do) and reads one back. Every timed phase
starts after a sync, so dirty pages left by the previous phase do not
throttle it. Servers keep their data under --dir (default: a temporary
directory on the same disk as /tmp).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirrorfuse.client.blocking import BlockingVolume  # noqa: E402
from mirrorfuse.tools.spawn import LocalCluster  # noqa: E402
from mirrorfuse.wire.sizes import human, parse_size  # noqa: E402

CLI = str(Path(sys.executable).parent / "mirrorfs-cli")


def pattern(total: int, block: int):
    """Yield ``total`` bytes as blocks cut from one random buffer (no RNG cost in the timing)."""
    pool = os.urandom(64 << 20)
    for i in range(total // block):
        off = (i * block) % (len(pool) - block + 1)
        yield pool[off : off + block]


def baseline(root: Path, total: int, block: int) -> tuple[float, float]:
    a, b = root / "copy-a", root / "copy-b"
    os.sync()
    t0 = time.perf_counter()
    with open(a, "wb", buffering=0) as fa, open(b, "wb", buffering=0) as fb:
        for chunk in pattern(total, block):
            fa.write(chunk)
            fb.write(chunk)
    write = total / (time.perf_counter() - t0)
    os.sync()
    t0 = time.perf_counter()
    with open(a, "rb", buffering=0) as f:
        while f.read(block):
            pass
    read = total / (time.perf_counter() - t0)
    a.unlink()
    b.unlink()
    return write, read


def write_then_read(
    vol: BlockingVolume, blocks: int, batch: int, data_of: Callable[[int], bytes]
) -> tuple[float, float]:
    """Write blocks 0..blocks-1 (``data_of`` each, in order), then read them back, in
    batches: bytes per second of each, every dirty page flushed before each is timed."""
    total = 0
    os.sync()
    t0 = time.perf_counter()
    for start in range(0, blocks, batch):
        items = [(b, data_of(b)) for b in range(start, min(start + batch, blocks))]
        total += sum(len(d) for _, d in items)
        vol.write_many(items)
    write = total / (time.perf_counter() - t0)
    os.sync()
    t0 = time.perf_counter()
    for start in range(0, blocks, batch):
        vol.read_many(range(start, min(start + batch, blocks)))
    read = total / (time.perf_counter() - t0)
    return write, read


def volume_run(root: Path, servers: int, total: int, block: int, batch: int) -> tuple[float, float]:
    cluster = LocalCluster(root / f"c{servers}", servers)
    try:
        subprocess.run(
            [CLI, "format", *cluster.args, "--block-size", str(block)],
            check=True,
            capture_output=True,
        )
        with BlockingVolume(cluster.spec, writer="bench") as vol:
            gen = pattern(total, block)
            return write_then_read(vol, total // block, batch, lambda _b: next(gen))
    finally:
        cluster.close()
        shutil.rmtree(cluster.root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--servers", default="4,8,16")
    p.add_argument("--block-size", default="1M")
    p.add_argument("--batch", type=int, default=64, help="blocks handed to the volume at once")
    p.add_argument("--dir", type=Path, default=None)
    args = p.parse_args()
    total, block = parse_size(args.size), parse_size(args.block_size)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="mfs-bench-") as tmp:
        root = Path(tmp)
        base_w, base_r = baseline(root, total, block)
        rows = [("local files (write x2, read x1)", base_w, base_r)]
        for n in (int(x) for x in args.servers.split(",")):
            w, r = volume_run(root, n, total, block, args.batch)
            rows.append((f"volume, {n} servers", w, r))
    print(f"sequential {human(total)} in {human(block)} blocks, MB/s (ratio to local baseline)")
    print(f"{'setup':34} {'write MB/s':>12} {'ratio':>6} {'read MB/s':>12} {'ratio':>6}")
    for name, w, r in rows:
        print(f"{name:34} {w / 1e6:12.0f} {w / base_w:6.2f} {r / 1e6:12.0f} {r / base_r:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
