#!/usr/bin/env python3
"""Segmented download of one file from 1, 2, 4 and 8 sources on loopback, against aria2c.

    .venv/bin/python bench/fetch_bench.py [--size 1G] [--sources 1,2,4,8]

Needs nginx and aria2c (Debian: apt-get install nginx-light aria2). One nginx
listens on 8 ports (8 "mirrors" of the same file); mirrorfs-cli serve-file
runs 8 virtual servers of it. Measured in the same run: our downloader over
its own protocol and over HTTP, aria2c over the same HTTP mirrors, and the
single-stream baselines (curl from nginx, cp of the file).
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

from mirrorfuse.tools.spawn import free_base_port  # noqa: E402
from mirrorfuse.wire.sizes import human, parse_size  # noqa: E402

CLI = str(Path(sys.executable).parent / "mirrorfs-cli")

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  client_body_temp_path {tmp}/nginx-body;
  server {{
{listens}
    root {tmp}/www;
  }}
}}
"""


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{res.stdout}{res.stderr}")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--sources", default="1,2,4,8")
    args = p.parse_args()
    size = parse_size(args.size)
    counts = [int(x) for x in args.sources.split(",")]
    most = max(counts)
    for tool in ("nginx", "aria2c", "curl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is missing (apt-get install nginx-light aria2 curl)", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="mfs-fetchbench-") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)  # nginx's workers run unprivileged
        (tmp / "www").mkdir()
        src = tmp / "www" / "file.bin"
        with open(src, "wb") as f:
            chunk = os.urandom(64 << 20)
            for i in range(size // len(chunk)):
                f.write(bytes([i % 256]) + chunk[1:])
        base = free_base_port(2 * most)  # distinct ports: separate draws can repeat one
        http_ports = list(range(base, base + most))
        own_ports = list(range(base + most, base + 2 * most))
        listens = "\n".join(f"    listen 127.0.0.1:{port};" for port in http_ports)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, listens=listens))
        nginx = subprocess.Popen(
            ["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], stderr=subprocess.DEVNULL
        )
        serve = subprocess.Popen(
            [CLI, "serve-file", "-i", "3600", "-f", str(src), "-p", *map(str, own_ports)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        rows = []
        try:
            while "serving" not in serve.stdout.readline():
                pass
            time.sleep(0.5)
            urls = [f"http://127.0.0.1:{port}/file.bin" for port in http_ports]
            out = tmp / "out"
            out.mkdir()
            t_cp = timed(["cp", str(src), str(out / "cp.bin")])
            t_curl = timed(["curl", "-s", "-o", str(out / "curl.bin"), urls[0]])
            for n in counts:
                for f in out.iterdir():
                    f.unlink()
                ours = timed(
                    [
                        CLI,
                        "download",
                        "-i",
                        "3600",
                        "-o",
                        str(out / "a.bin"),
                        "-p",
                        *map(str, own_ports[:n]),
                    ]
                )
                ours_http = timed(
                    [CLI, "download", "-i", "3600", "-o", str(out / "b.bin"), *urls[:n]]
                )
                aria = timed(
                    [
                        "aria2c",
                        "-q",
                        "--allow-overwrite=true",
                        "-x1",
                        f"-s{n}",
                        "-k1M",
                        "--file-allocation=none",
                        "-d",
                        str(out),
                        "-o",
                        "c.bin",
                        *urls[:n],
                    ]
                )
                rows.append((n, ours, ours_http, aria))
        finally:
            serve.kill()
            nginx.terminate()
            nginx.wait(10)
    mb = size / 1e6
    print(f"one {human(size)} file on loopback, MB/s (higher is better)")
    print(f"single stream: cp {mb / t_cp:.0f}, curl from nginx {mb / t_curl:.0f}")
    print(
        f"{'sources':>7} {'mirrorfs proto':>15} {'mirrorfs HTTP':>14} {'aria2c HTTP':>12} "
        f"{'ours/aria2c':>12} {'ours/curl':>10}"
    )
    for n, ours, ours_http, aria in rows:
        print(
            f"{n:>7} {mb / ours:15.0f} {mb / ours_http:14.0f} {mb / aria:12.0f} "
            f"{aria / ours_http:12.2f} {t_curl / ours:10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
