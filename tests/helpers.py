"""Real processes for tests: block servers on loopback, ended by pid."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mirrorfuse.tools.admin import format_volume
from mirrorfuse.tools.spawn import LocalCluster, ServerProc, free_base_port
from mirrorfuse.wire.auth import KEY_NAME, REPLY_SIZE, ClientHandshake
from mirrorfuse.wire.sizes import parse_size
from servers.files import read_key

__all__ = [
    "Cluster",
    "Mount",
    "ServerProc",
    "cli",
    "mount_sh",
    "free_base_port",
    "free_ports",
    "run",
    "sha",
    "wait_for",
]
MOUNT = str(Path(sys.executable).parent / "mirrorfs-mount")

BIN = Path(sys.executable).parent
SERVER = str(BIN / "mirrorfs-server")
CLI = str(BIN / "mirrorfs-cli")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (separate draws can repeat one)."""
    base = free_base_port(count)
    return list(range(base, base + count))


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run([CLI, *args], timeout=timeout)


REPO = Path(__file__).resolve().parents[1]


def mount_sh(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    """./mount.sh as a user runs it."""
    return run([str(REPO / "mount.sh"), *args], timeout=180, **kw)


def prove(s: socket.socket, key: bytes) -> None:
    """The client's side of the key handshake, by hand on a plain socket."""
    hs = ClientHandshake(lambda _v: key)
    s.sendall(hs.hello())
    reply = b""
    while len(reply) < REPLY_SIZE:
        chunk = s.recv(REPLY_SIZE - len(reply))
        assert chunk, "the daemon hung up during the handshake"
        reply += chunk
    s.sendall(hs.receive(reply))


class Cluster(LocalCluster):
    """A LocalCluster with the CLI views tests assert on."""

    def format(self, *extra: str) -> str:
        """A new volume, made in this process (mirrorfs-cli format has tests of its own)."""
        opts = argparse.ArgumentParser()
        opts.add_argument("--block-size", default="1M")
        opts.add_argument("--force", action="store_true")
        args = opts.parse_args(extra)
        size = parse_size(args.block_size)
        return asyncio.run(format_volume(self.spec, size, args.force))

    def key(self) -> bytes:
        """The volume's key, as server 0 keeps it."""
        return read_key(self.data_dir(0) / KEY_NAME)

    def status(self) -> dict:
        res = cli("status", *self.args, "--json")
        st = json.loads(res.stdout)
        assert res.returncode == (0 if st["volume"] else 1), res.stderr
        return st

    def states(self) -> list[str]:
        return [r["state"] for r in self.status()["rows"]]


class Mount:
    """A mirrorfs-mount process serving ``path``; unmounted and ended by pid on close."""

    def __init__(self, cluster: Cluster, path: Path, *extra: str) -> None:
        self.cluster = cluster
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        res = run([MOUNT, *cluster.args, str(path), "--timeout", "2", *extra], timeout=60)
        self.result = res
        self.pid: int | None = None
        if res.returncode == 0:
            self.pid = int(res.stdout.split("(pid ")[1].split(",")[0])

    @property
    def ok(self) -> bool:
        return self.pid is not None

    def mounted(self) -> bool:
        real = os.path.realpath(self.path)
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == real for line in f)

    def kill(self) -> None:
        """SIGKILL the mount process (a crash), then clear the dead mount."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            wait_for(lambda: not _alive(self.pid), 10)
        subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        self.pid = None

    def close(self) -> None:
        if self.mounted():
            res = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        if self.pid is not None and not wait_for(lambda: not _alive(self.pid), 30):
            self.kill()
        self.pid = None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def drop_caches() -> None:
    """Forget the kernel's cached pages, so that reads reach the mount (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sha(path: Path) -> str:
    """sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
