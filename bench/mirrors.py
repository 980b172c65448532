"""What the download benchmarks share: a test file, nginx serving it on N ports (N HTTP
"mirrors" of it), and timing a command."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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


def missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]


def make_file(path: Path, size: int) -> None:
    """``size`` bytes that no two 64 MiB pieces of share (so a misplaced piece shows)."""
    chunk = os.urandom(64 << 20)
    with open(path, "wb") as f:
        for i in range(size // len(chunk)):
            f.write(bytes([i % 256]) + chunk[1:])
        f.write(chunk[: size % len(chunk)])


@contextlib.contextmanager
def nginx(tmp: Path, ports: list[int]) -> Iterator[list[str]]:
    """nginx serving ``tmp``/www on every port: yields the URLs of ``tmp``/www/file.bin."""
    listens = "\n".join(f"    listen 127.0.0.1:{port};" for port in ports)
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, listens=listens))
    proc = subprocess.Popen(
        ["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], stderr=subprocess.DEVNULL
    )
    try:
        yield [f"http://127.0.0.1:{port}/file.bin" for port in ports]
    finally:
        proc.terminate()
        proc.wait(10)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{res.stdout}{res.stderr}")
    return time.perf_counter() - t0


def fresh(out: Path) -> None:
    """An empty output directory: every tool writes a new file, none replaces an old one."""
    for f in out.iterdir():
        f.unlink()
