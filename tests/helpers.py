"""Real processes for tests: block servers on loopback, ended by pid."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from mirrorfuse.localcluster import LocalCluster, ServerProc, free_base_port

__all__ = ["Cluster", "ServerProc", "cli", "free_base_port", "run", "wait_for"]

BIN = Path(sys.executable).parent
SERVER = str(BIN / "mirrorfs-server")
CLI = str(BIN / "mirrorfs-cli")


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run([CLI, *args], timeout=timeout)


class Cluster(LocalCluster):
    """A LocalCluster with the CLI views tests assert on."""

    def format(self, *extra: str) -> str:
        res = cli("format", *self.args, *extra)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def status(self) -> dict:
        res = cli("status", *self.args, "--json")
        st = json.loads(res.stdout)
        assert res.returncode == (0 if st["volume"] else 1), res.stderr
        return st

    def states(self) -> list[str]:
        return [r["state"] for r in self.status()["rows"]]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
