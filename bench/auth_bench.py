#!/usr/bin/env python3
"""What the key handshake and TLS cost: connection setup, one request, and throughput.

    .venv/bin/python bench/auth_bench.py [--size 512M] [--conns 300]

Two local clusters of 4 servers are started one after the other, one plain and
one with --tls, each formatted with a new key kept in a temporary MIRRORFS_KEYS
directory. Against server 0 of each: --conns connections opened and closed one
after another (baseline: a bare TCP connect and close of the same port, on the
same event loop), and 2000 HELLO round trips on one open connection. Then
--size written and read back in 1 MiB blocks through the block volume API
(baseline: the plain cluster). One Keyring and one TLS context serve every
connection, as in a client that opens many. Servers keep their data under
--dir (default: a temporary directory on the same disk as /tmp).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from volume_bench import write_then_read  # noqa: E402  (bench/ is this script's folder)

from mirrorfuse.client.blocking import BlockingVolume, run_async  # noqa: E402
from mirrorfuse.client.connection import Connection  # noqa: E402
from mirrorfuse.client.keys import Keyring, client_tls  # noqa: E402
from mirrorfuse.tools.admin import format_volume  # noqa: E402
from mirrorfuse.tools.spawn import LocalCluster  # noqa: E402
from mirrorfuse.wire.addresses import ClusterSpec  # noqa: E402
from mirrorfuse.wire.messages import Hello  # noqa: E402
from mirrorfuse.wire.sizes import human, parse_size  # noqa: E402

BLOCK = 1 << 20
BATCH = 64  # blocks handed to the volume at once
REQUESTS = 2000
WARMUP = 20  # connections or requests before the timed ones
TIMEOUT = 10.0


@dataclass
class Results:
    """What one cluster measured (seconds; bytes per second)."""

    opens: list[float]
    requests: list[float]
    write: float
    read: float
    bare: list[float] = field(default_factory=list)  # the plain cluster's only


def stats(samples: list[float]) -> tuple[float, float]:
    """Median and 99th percentile, in microseconds."""
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98]
    return statistics.median(samples) * 1e6, p99 * 1e6


async def connect_times(spec: ClusterSpec, count: int, bare: bool) -> list[float]:
    """Open and close ``count`` connections to server 0: bare TCP, or Connection.open."""
    addr = spec.addresses[0]
    loop = asyncio.get_running_loop()
    keys = Keyring()
    tls = client_tls() if spec.tls else None
    out = []
    for i in range(WARMUP + count):
        t0 = time.perf_counter()
        if bare:
            transport, _ = await loop.create_connection(asyncio.Protocol, addr.host, addr.port)
            transport.abort()
        else:
            conn = await Connection.open(0, addr, TIMEOUT, keys=keys, tls=tls)
            conn.close()
        if i >= WARMUP:
            out.append(time.perf_counter() - t0)
    return out


async def request_times(spec: ClusterSpec, count: int) -> list[float]:
    """``count`` HELLO round trips, one at a time, on one open connection to server 0."""
    tls = client_tls() if spec.tls else None
    conn = await Connection.open(0, spec.addresses[0], TIMEOUT, keys=Keyring(), tls=tls)
    out = []
    try:
        for i in range(WARMUP + count):
            t0 = time.perf_counter()
            await conn.call(Hello())
            if i >= WARMUP:
                out.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return out


def throughput(spec: ClusterSpec, total: int) -> tuple[float, float]:
    """Write then read ``total`` bytes in 1 MiB blocks: bytes per second of each."""
    pool = os.urandom(64 << 20)  # blocks cut from it: no RNG cost in the timing
    blocks = total // BLOCK

    def block(b: int) -> bytes:
        off = (b * BLOCK) % (len(pool) - BLOCK + 1)
        return pool[off : off + BLOCK]

    with BlockingVolume(spec, TIMEOUT, writer="bench") as vol:
        return write_then_read(vol, blocks, BATCH, block)


def measure(root: Path, tls: bool, conns: int, total: int) -> Results:
    """Everything measured on one cluster, plain or --tls; removed afterwards."""
    name = "tls" if tls else "plain"
    cluster = LocalCluster(root / name, 4, server_args=("--tls",) if tls else ())
    try:
        spec = replace(cluster.spec, tls=tls)
        run_async(format_volume(spec, BLOCK))
        print(f"{name}: connections...", file=sys.stderr, flush=True)
        bare = [] if tls else run_async(connect_times(spec, conns, bare=True))
        opens = run_async(connect_times(spec, conns, bare=False))
        requests = run_async(request_times(spec, REQUESTS))
        print(f"{name}: writing and reading {human(total)}...", file=sys.stderr, flush=True)
        write, read = throughput(spec, total)
        return Results(opens, requests, write, read, bare)
    finally:
        cluster.close()
        shutil.rmtree(cluster.root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="512M", help="written and read on each cluster (512M)")
    p.add_argument("--conns", type=int, default=300, help="connections timed per kind (300)")
    p.add_argument("--dir", type=Path, default=None)
    args = p.parse_args()
    total = parse_size(args.size) // BLOCK * BLOCK
    if total == 0 or args.conns < 2:
        p.error("--size must be at least 1M and --conns at least 2")
    root = Path(tempfile.mkdtemp(prefix="auth-bench-", dir=args.dir))
    saved = os.environ.get("MIRRORFS_KEYS")
    os.environ["MIRRORFS_KEYS"] = str(root / "keys")  # not the user's key directory
    try:
        plain = measure(root, False, args.conns, total)
        tls = measure(root, True, args.conns, total)
    finally:
        if saved is None:
            os.environ.pop("MIRRORFS_KEYS", None)
        else:
            os.environ["MIRRORFS_KEYS"] = saved
        shutil.rmtree(root, ignore_errors=True)

    def latency_rows(title: str, rows: list[tuple[str, list[float]]]) -> None:
        print(f"{title:44}{'median us':>11}{'p99 us':>10}{'ratio':>7}")
        base = stats(rows[0][1])[0]
        for what, samples in rows:
            med, p99 = stats(samples)
            print(f"{what:44}{med:11.0f}{p99:10.0f}{med / base:7.2f}")

    print()
    latency_rows(
        f"connection setup, {args.conns} to one server",
        [
            ("TCP connect + close (baseline)", plain.bare),
            ("Connection.open, key handshake", plain.opens),
            ("Connection.open, TLS + key handshake", tls.opens),
        ],
    )
    print()
    latency_rows(
        f"HELLO round trip, {REQUESTS} on one connection",
        [("plain (baseline)", plain.requests), ("TLS", tls.requests)],
    )
    print()
    pw, pr, tw, tr = plain.write, plain.read, tls.write, tls.read
    mib = 1 << 20
    print(f"{f'block volume API, 4 servers, {human(total)}':44}", end="")
    print(f"{'write MiB/s':>12}{'ratio':>7}{'read MiB/s':>12}{'ratio':>7}")
    print(f"{'without TLS (baseline)':44}{pw / mib:12.0f}{1:7.2f}{pr / mib:12.0f}{1:7.2f}")
    print(f"{'with TLS':44}{tw / mib:12.0f}{tw / pw:7.2f}{tr / mib:12.0f}{tr / pr:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
