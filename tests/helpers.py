"""Real processes for tests: block servers on loopback, ended by pid."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mirrorfuse.cluster import ClusterSpec, from_base_port

BIN = Path(sys.executable).parent
SERVER = str(BIN / "mirrorfs-server")
CLI = str(BIN / "mirrorfs-cli")


def free_base_port(count: int) -> int:
    """A base port with ``count`` consecutive free loopback ports after it."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        socks = []
        try:
            for i in range(count):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run([CLI, *args], timeout=timeout)


class ServerProc:
    def __init__(self, server_id: int, port: int, data: Path, extra: list[str] | None = None):
        self.id = server_id
        self.port = port
        self.data = data
        self.log = data.parent / f"server{server_id}.log"
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    SERVER,
                    "--id",
                    str(server_id),
                    "--port",
                    str(port),
                    "--data",
                    str(data),
                    *(extra or []),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.ready_line = self.proc.stdout.readline()
        if "listening" not in self.ready_line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"server {server_id} did not start: {self.log.read_text()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


class Cluster:
    """N block servers with data directories under ``root``; server i on base+i."""

    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        self.count = count
        self.base = free_base_port(count)
        self.servers: list[ServerProc | None] = [None] * count
        for i in range(count):
            self.start(i)

    @property
    def spec(self) -> ClusterSpec:
        return from_base_port(self.base, self.count)

    @property
    def args(self) -> list[str]:
        return ["--base-port", str(self.base), "--count", str(self.count)]

    def data_dir(self, i: int) -> Path:
        return self.root / f"d{i}"

    def start(self, i: int, data: Path | None = None) -> ServerProc:
        old = self.servers[i]
        if old is not None and old.running:
            old.kill()
        self.servers[i] = ServerProc(i, self.base + i, data or self.data_dir(i))
        return self.servers[i]

    def kill(self, i: int) -> None:
        self.servers[i].kill()

    def stop(self, i: int) -> None:
        self.servers[i].signal(signal.SIGSTOP)

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

    def close(self) -> None:
        for s in self.servers:
            if s is not None and s.running:
                s.kill()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
