#!/usr/bin/env python3
"""Segmented download of one file from 1, 2, 4 and 8 sources on loopback, against aria2c.

    .venv/bin/python bench/fetch_bench.py [--size 512M] [--sources 1,2,4,8] [--rounds 3]

Needs nginx and aria2c (Debian: apt-get install nginx-light aria2). One nginx
listens on 8 ports (8 "mirrors" of the same file); mirrorfs-cli serve-file
runs 8 virtual servers of it. Measured in the same run: our downloader over
its own protocol and over HTTP, aria2c over the same HTTP mirrors, and the
single-stream baselines (curl from nginx, cp of the file). Every command is
timed whole (start-up included) and writes a new file into an empty
directory on the same disk, after a sync, so no tool pays for another's
writeback; the tools take turns within a round, and the table shows the
median of the rounds (this machine's memory and disk vary from run to run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mirrors import fresh, make_file, missing, nginx, timed  # noqa: E402

from mirrorfuse.tools.spawn import free_base_port  # noqa: E402
from mirrorfuse.wire.sizes import human, parse_size  # noqa: E402

CLI = str(Path(sys.executable).parent / "mirrorfs-cli")


def run(out: Path, cmd: list[str]) -> float:
    fresh(out)
    os.sync()
    return timed(cmd)


def one_round(out: Path, src: Path, urls: list[str], own: list[int], counts: list[int]) -> dict:
    t: dict = {"cp": run(out, ["cp", str(src), str(out / "cp.bin")])}
    t["curl"] = run(out, ["curl", "-s", "-o", str(out / "curl.bin"), urls[0]])
    for n in counts:
        ports = [str(p) for p in own[:n]]
        dl = [CLI, "download", "-i", "3600", "-o"]
        t[n, "proto"] = run(out, [*dl, str(out / "a"), "-p", *ports])
        t[n, "http"] = run(out, [*dl, str(out / "b"), *urls[:n]])
        aria = ["aria2c", "-q", "--allow-overwrite=true", "-x1", f"-s{n}", "-k1M"]
        aria += ["--file-allocation=none", "-d", str(out), "-o", "c", *urls[:n]]
        t[n, "aria2c"] = run(out, aria)
    return t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="512M")
    p.add_argument("--sources", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the table shows medians")
    args = p.parse_args()
    size = parse_size(args.size)
    counts = [int(x) for x in args.sources.split(",")]
    most = max(counts)
    if gone := missing("nginx", "aria2c", "curl"):
        need = "apt-get install nginx-light aria2 curl"
        print(f"{', '.join(gone)} missing ({need})", file=sys.stderr)
        return 1
    # the commands start as a user's do: from compiled modules (see bootstrap.sh)
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(root / "mirrorfuse"), str(root / "servers")],
        capture_output=True,
    )
    rounds = []
    with tempfile.TemporaryDirectory(prefix="mfs-fetchbench-") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)  # nginx's workers run unprivileged
        (tmp / "www").mkdir()
        src = tmp / "www" / "file.bin"
        make_file(src, size)
        base = free_base_port(2 * most)  # distinct ports: separate draws can repeat one
        http_ports = list(range(base, base + most))
        own = list(range(base + most, base + 2 * most))
        serve = subprocess.Popen(
            [CLI, "serve-file", "-i", "3600", "-f", str(src), "-p", *map(str, own)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            with nginx(tmp, http_ports) as urls:
                while "serving" not in serve.stdout.readline():
                    pass
                time.sleep(0.5)
                out = tmp / "out"
                out.mkdir()
                for r in range(args.rounds):
                    rounds.append(one_round(out, src, urls, own, counts))
                    print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
                fresh(out)
        finally:
            serve.kill()
            serve.wait()
    t = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    mb = size / 1e6
    print(f"one {human(size)} file on loopback, MB/s (higher is better), median of {args.rounds}")
    print(f"single stream: cp {mb / t['cp']:.0f}, curl from nginx {mb / t['curl']:.0f}")
    print(
        f"{'sources':>7} {'mirrorfs proto':>15} {'mirrorfs HTTP':>14} {'aria2c HTTP':>12} "
        f"{'HTTP ours/aria2c':>17} {'proto ours/curl':>16}"
    )
    for n in counts:
        proto, http, aria = t[n, "proto"], t[n, "http"], t[n, "aria2c"]
        print(
            f"{n:>7} {mb / proto:15.0f} {mb / http:14.0f} {mb / aria:12.0f} "
            f"{aria / http:17.2f} {t['curl'] / proto:16.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
