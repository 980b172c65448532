#!/usr/bin/env python3
"""Healing: a server back after CHANGED bytes of its pair were rewritten, healed by
catching up (only what changed) against a full rebuild of it; and the longest stall a
hung (SIGSTOPped) server costs a sequential reader and a writer.

    .venv/bin/python bench/heal_bench.py [--size 4G] [--changed 1G] [--block-size 1M]

Baselines measured in the same run: cp of a file as large as what each heal copies
(the disk's own speed for that much data, once; a heal reads it on one server and
writes it on another of the same disk). Servers keep their data under --dir (default:
a temporary directory on the same disk as /tmp).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirrorfuse.client.blocking import BlockingVolume  # noqa: E402
from mirrorfuse.client.heal import heal  # noqa: E402
from mirrorfuse.tools.spawn import LocalCluster  # noqa: E402
from mirrorfuse.wire.sizes import human, parse_size  # noqa: E402

CLI = str(Path(sys.executable).parent / "mirrorfs-cli")
BATCH = 32


def blocks_of_pair(vol: BlockingVolume, pair: int, count: int) -> list[int]:
    out: list[int] = []
    b = 0
    while len(out) < count:
        if vol.volume.layout.pair_of(b) == pair:
            out.append(b)
        b += 1
    return out


def write(vol: BlockingVolume, blocks: list[int], pool: bytes, bs: int, salt: int) -> None:
    for i in range(0, len(blocks), BATCH):
        items = []
        for b in blocks[i : i + BATCH]:
            off = ((b * 7919 + salt) * 4096) % (len(pool) - bs)
            items.append((b, pool[off : off + bs]))
        vol.write_many(items)


def cp_baseline(root: Path, size: int) -> float:
    src, dst = root / "cp-src", root / "cp-dst"
    with open(src, "wb") as f:
        chunk = os.urandom(8 << 20)
        for _ in range(size // len(chunk) or 1):
            f.write(chunk)
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    os.sync()
    took = time.perf_counter() - t0
    src.unlink()
    dst.unlink()
    return took


def timed_heal(vol: BlockingVolume, full: bool) -> tuple[float, int]:
    os.sync()
    t0 = time.perf_counter()
    copied = vol.run(heal(vol.volume, 1, full=full))
    os.sync()
    return time.perf_counter() - t0, copied


def longest_stall(
    cluster: LocalCluster, vol: BlockingVolume, blocks: list[int], bs: int
) -> tuple[float, float]:
    """Read, then write, block by block while server 0 is SIGSTOPped a moment in: the
    longest single call, each time (the cost of a hang; the mirror carries on)."""
    worst = []
    for writing in (False, True):
        if vol.volume.states[0] != "alive":  # the last phase left it failed
            cluster.start(0)
            vol.run(heal(vol.volume, 0))
        longest = 0.0
        for k, b in enumerate(blocks[:400]):
            if k == 50:
                cluster.stop(0)
            t0 = time.perf_counter()
            if writing:
                vol.write_many([(b, bytes([k % 256]) * bs)])
            else:
                vol.read_many([b])
            longest = max(longest, time.perf_counter() - t0)
        cluster.kill(0)  # (SIGCONT, then SIGKILL)
        worst.append(longest)
    return worst[0], worst[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="4G", help="data written to the volume first (4G)")
    p.add_argument("--changed", default="1G", help="rewritten on the pair while down (1G)")
    p.add_argument("--block-size", default="1M")
    p.add_argument("--timeout", type=float, default=3.0, help="the client's hang timeout (3)")
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    size, changed, bs = parse_size(args.size), parse_size(args.changed), parse_size(args.block_size)
    pair_blocks = size // bs // 2
    if changed // bs > pair_blocks:
        raise SystemExit("--changed must be at most half of --size (one pair's share)")
    root = Path(tempfile.mkdtemp(prefix="heal-bench-", dir=args.dir))
    cluster = LocalCluster(root / "c", 4)
    try:
        subprocess.run(
            [CLI, "format", *cluster.args, "--block-size", str(bs)], check=True, capture_output=True
        )
        pool = os.urandom(64 << 20)
        with BlockingVolume(cluster.spec, timeout=args.timeout, writer="bench") as vol:
            print(f"writing {human(size)} ({human(size // 2)} on each pair)...", flush=True)
            write(vol, list(range(size // bs)), pool, bs, 1)
            cluster.kill(1)
            mine = blocks_of_pair(vol, 0, pair_blocks)
            print(f"server 1 down; rewriting {human(changed)} of its pair...", flush=True)
            write(vol, mine[: changed // bs], pool, bs, 2)
            cluster.start(1)
            catch_up, copied = timed_heal(vol, full=False)
            cluster.kill(1)  # and back on an empty directory: everything is copied
            cluster.start(1, root / "empty-1")
            vol.run(vol.volume.fail(1, "restarted on an empty directory"))
            full, copied_full = timed_heal(vol, full=True)
            stall_read, stall_write = longest_stall(cluster, vol, mine, bs)
        cp_changed = cp_baseline(root, changed)
        cp_full = cp_baseline(root, pair_blocks * bs)
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        ("heal (catch-up)", copied * bs, catch_up, cp_changed),
        ("full rebuild", copied_full * bs, full, cp_full),
    ]
    print()
    print(f"{'what':<18}{'copied':>10}{'time s':>9}{'MiB/s':>9}{'cp same s':>11}")
    for what, nbytes, secs, base in rows:
        rate = nbytes / secs / (1 << 20)
        print(f"{what:<18}{human(nbytes):>10}{secs:>9.1f}{rate:>9.0f}{base:>11.1f}")
    print(f"catch-up vs full rebuild: {full / catch_up:.1f}x faster")
    print(
        f"longest stall with one server hung (timeout {args.timeout:g} s): "
        f"read {stall_read:.2f} s, write {stall_write:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
