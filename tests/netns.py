"""Multicast tests run in a private network namespace: its setup, and running a scenario in one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from mirrorfuse.netns import setup_lo  # noqa: F401 - the scenarios import it from here


def run_scenario(script: Path) -> dict[str, Any]:
    """Run a scenario script under 'unshare -n'; its last output line is its JSON result."""
    if shutil.which("unshare") is None:
        raise AssertionError("unshare (util-linux) is needed to test multicast in a namespace")
    res = subprocess.run(
        ["unshare", "-n", sys.executable, str(script)], capture_output=True, text=True, timeout=180
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
