#!/usr/bin/env python3
"""The P2P index group: request rates, master failover, catch-up of a new replica.

    .venv/bin/python bench/index_bench.py [--requests 2000] [--runs 20] [--entries 100000]

Runs itself inside a private network namespace (``unshare -n``, needs root),
so the multicast stays off the host network. Prints three tables:

1. advertise and search requests per second, one client with one request
   outstanding (as seed 002's client), with 1, 3 and 5 replicas; baselines
   in the same run: a UDP echo server on the same loopback (the floor of a
   round trip) and the state machine applying the same requests in process;
2. time from SIGKILL of the master to the next acknowledged update, over
   ``--runs`` kills (a fresh replica replaces each killed one);
3. time for a replica started late to catch up with ``--entries`` entries
   (snapshot by TCP), and the snapshot's size.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # netns

import msgpack  # noqa: E402
from netns import setup_lo  # noqa: E402

from mirrorfuse.core.group import IndexState, Order, Request  # noqa: E402
from mirrorfuse.index.client import BlockingIndexClient as IndexClient  # noqa: E402

GROUP, PORT = "235.1.1.9", 55599
INDEX = str(Path(sys.executable).parent / "mirrorfs-index")
INSIDE = "MIRRORFS_BENCH_NETNS"


class Group:
    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, rid: int, *extra: str) -> None:
        p = subprocess.Popen(
            [INDEX, GROUP, str(PORT), "--id", str(rid), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert "mirrorfs-index replica" in p.stdout.readline()
        self.procs[rid] = p

    def kill(self, rid: int) -> float:
        p = self.procs.pop(rid)
        t = time.perf_counter()
        p.send_signal(signal.SIGKILL)
        p.wait()
        return t

    def stop(self) -> None:
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            p.wait(10)
        self.procs.clear()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def wait_master(c: IndexClient, n: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = c.query_all("status", wait=0.5)
        masters = {s.master for s in status}
        if len(status) == n and len(masters) == 1 and None not in masters:
            return
        time.sleep(0.2)
    raise SystemExit(f"the group of {n} did not settle on a master")


def rates(n: int, requests: int) -> tuple[float, float, float, float]:
    """advertise req/s, its p99 ms, search req/s, its p99 ms with n replicas."""
    g = Group()
    try:
        for rid in range(1, n + 1):
            g.start(rid)
        c = IndexClient(GROUP, PORT)
        wait_master(c, n)
        c.request("register", {"peer": "bench", "addr": "127.0.0.1:9", "interval": 3600})
        lat: list[float] = []
        t0 = time.perf_counter()
        for i in range(requests):
            t = time.perf_counter()
            r = c.request("advertise", {"peer": "bench", "name": f"f{i}", "size": i, "checksum": i})
            lat.append(time.perf_counter() - t)
            if not r.ok:
                raise SystemExit(f"advertise refused: {r}")
        adv = requests / (time.perf_counter() - t0)
        slat: list[float] = []
        t0 = time.perf_counter()
        for i in range(requests):
            t = time.perf_counter()
            r = c.query("search", pattern=f"f{i}*")
            slat.append(time.perf_counter() - t)
            if f"f{i}" not in r.files:
                raise SystemExit(f"search f{i}* did not find f{i}: {r}")
        srch = requests / (time.perf_counter() - t0)
        c.close()
        return adv, pct(lat, 0.99) * 1e3, srch, pct(slat, 0.99) * 1e3
    finally:
        g.stop()


def echo_rate(requests: int) -> tuple[float, float]:
    """A UDP echo server in another process: one round trip after another."""
    code = (
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.bind(('127.0.0.1',0))\nprint(s.getsockname()[1],flush=True)\n"
        "while True:\n d,a=s.recvfrom(65536)\n s.sendto(d,a)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    msg = msgpack.packb({"t": "req", "client": "x", "req": 1, "op": "advertise", "args": {}})
    lat = []
    t0 = time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        s.sendto(msg, ("127.0.0.1", port))
        s.recvfrom(65536)
        lat.append(time.perf_counter() - t)
    rate = requests / (time.perf_counter() - t0)
    p.kill()
    p.wait()
    return rate, pct(lat, 0.99) * 1e3


def apply_rate(requests: int) -> float:
    st = IndexState()
    st.apply(Order(1, 1, Request("c", 1, "register", {"peer": "p", "addr": "a:1"}), 0.0))
    t0 = time.perf_counter()
    for i in range(requests):
        args = {"peer": "p", "name": f"f{i}", "size": i, "checksum": i}
        st.apply(Order(i + 2, 1, Request("c", i + 2, "advertise", args), 0.0))
    return requests / (time.perf_counter() - t0)


def failover(runs: int) -> list[float]:
    """Seconds from SIGKILL of the master to the next acknowledged update."""
    g = Group()
    out = []
    try:
        for rid in (1, 2, 3):
            g.start(rid)
        c = IndexClient(GROUP, PORT)
        wait_master(c, 3)
        c.request("register", {"peer": "bench", "addr": "127.0.0.1:9", "interval": 3600})
        nxt = 4
        for run in range(runs):
            master = min(g.procs)
            c.request("advertise", {"peer": "bench", "name": f"r{run}a", "size": 1, "checksum": 1})
            t_kill = g.kill(master)
            c.request(
                "advertise",
                {"peer": "bench", "name": f"r{run}b", "size": 1, "checksum": 1},
                timeout=0.1,
                tries=1000,
            )
            out.append(time.perf_counter() - t_kill)
            print(f"  run {run + 1}: {out[-1]:.2f} s", flush=True)
            g.start(nxt)  # keep three replicas
            nxt += 1
            wait_master(c, 3)
        c.close()
        return out
    finally:
        g.stop()


def load(entries: int, window: int = 64) -> None:
    """Advertise ``entries`` names with ``window`` requests in flight (first reply each)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sent = 0
    acked: set[int] = set()
    base = 1000
    while len(acked) < entries:
        while sent < entries and sent - len(acked) < window:
            args = {"peer": "bench", "name": f"e{sent:06}", "size": sent, "checksum": sent}
            msg = {"t": "req", "client": "bench-loader", "req": base + sent, "op": "advertise"}
            sock.sendto(msgpack.packb({**msg, "args": args}), (GROUP, PORT))
            sent += 1
        sock.settimeout(2.0)
        try:
            data, _ = sock.recvfrom(65536)
        except TimeoutError:
            raise SystemExit(f"loading stalled at {len(acked)} of {entries}") from None
        m = msgpack.unpackb(data, strict_map_key=False)
        acked.add(m["req"] - base)
    sock.close()


def catch_up(entries: int) -> tuple[float, int, float]:
    """Seconds for a new replica to equal the others' state, snapshot bytes, load seconds."""
    g = Group()
    try:
        g.start(1)
        c = IndexClient(GROUP, PORT)
        wait_master(c, 1)
        c.request("register", {"peer": "bench", "addr": "127.0.0.1:9", "interval": 36000})
        t0 = time.perf_counter()
        load(entries)
        loaded = time.perf_counter() - t0
        status = c.query_all("status", wait=0.5)[0]
        t0 = time.perf_counter()
        g.start(2)
        while True:
            got = {s.replica: s for s in c.query_all("status", wait=0.2)}
            if 2 in got and (got[2].seq, got[2].digest) == (status.seq, status.digest):
                break
            if time.perf_counter() - t0 > 120:
                raise SystemExit("the new replica did not catch up in 120 s")
        took = time.perf_counter() - t0
        size = len(c.snapshot().snapshot())
        c.close()
        return took, size, loaded
    finally:
        g.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--replicas", default="1,3,5")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--entries", type=int, default=100_000)
    args = p.parse_args()
    if os.environ.get(INSIDE) != "1":
        if os.geteuid() != 0:
            raise SystemExit("index_bench: needs root to make a private network namespace")
        env = {**os.environ, INSIDE: "1"}
        return subprocess.call(["unshare", "-n", sys.executable, *sys.argv], env=env)
    setup_lo()
    print(f"index benchmark, {os.cpu_count()} cores, {args.requests} requests per row\n")
    echo, echo_p99 = echo_rate(args.requests)
    print(f"{'setup':<30}{'advertise/s':>12}{'p99 ms':>8}{'search/s':>10}{'p99 ms':>8}")
    print(f"{'baseline: UDP echo round trip':<30}{echo:>12.0f}{echo_p99:>8.2f}")
    print(f"{'baseline: state machine only':<30}{apply_rate(args.requests):>12.0f}")
    for n in (int(x) for x in args.replicas.split(",")):
        adv, adv99, srch, srch99 = rates(n, args.requests)
        row = f"{n} replica{'s' if n > 1 else ''}"
        print(f"{row:<30}{adv:>12.0f}{adv99:>8.2f}{srch:>10.0f}{srch99:>8.2f}", flush=True)
    print(f"\nmaster killed -> next acknowledged update, {args.runs} runs, 3 replicas:")
    times = failover(args.runs)
    print(
        f"{'median':>10}{statistics.median(times):>8.2f} s   {'worst':>6}{max(times):>8.2f} s"
        f"   (a replica counts as gone after 3 s of silence)"
    )
    print(f"\ncatch-up of a new replica with {args.entries} entries:")
    took, size, loaded = catch_up(args.entries)
    print(
        f"  loaded in {loaded:.1f} s ({args.entries / loaded:.0f} advertise/s, 64 in flight); "
        f"snapshot {size / 1e6:.1f} MB; new replica equal after {took:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
