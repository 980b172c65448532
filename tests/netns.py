"""Multicast tests run in a private network namespace: its setup, and running a scenario in one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def setup_lo() -> None:
    """Inside ``unshare -n``: loopback up, with multicast and a route for 224.0.0.0/4."""
    for cmd in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "set", "lo", "multicast", "on"],
        ["ip", "route", "add", "224.0.0.0/4", "dev", "lo"],
    ):
        subprocess.run(cmd, check=True)


def run_scenario(script: Path) -> dict[str, Any]:
    """Run a scenario script under 'unshare -n'; its last output line is its JSON result."""
    if shutil.which("unshare") is None:
        raise AssertionError("unshare (util-linux) is needed to test multicast in a namespace")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    res = subprocess.run(
        ["unshare", "-n", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def stop(p: subprocess.Popen) -> None:
    """End a process we started, by its pid: SIGTERM, then SIGKILL after 10 s."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start(cmd: list[str], marker: str) -> tuple[subprocess.Popen, str]:
    """Start a daemon and wait for its first line, which must hold ``marker``."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if marker not in line:
        stop(p)
        raise AssertionError(f"{cmd[0]} did not start: {line!r} {p.stderr.read()}")
    return p, line


def wait(pred, timeout: float = 30.0) -> bool:
    """Poll until ``pred()`` holds; an error from it (a group in transition) counts as no."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return True
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.3)
    return False
