"""Block servers started on this machine: the one way mount.sh, the benchmarks and the
tests start them.

Each server is a separate ``mirrorfs-server`` process with its log beside its
data directory; it is ready when it has printed its "listening" line, and it
is ended by its pid.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mirrorfuse.wire.addresses import ClusterSpec, from_base_port
from mirrorfuse.wire.errors import MirrorfsError

SERVER = str(Path(sys.executable).parent / "mirrorfs-server")


class SpawnError(MirrorfsError):
    """A server did not start; the message is the last line of its log."""


def free_base_port(count: int, low: int = 20000, high: int = 60000) -> int:
    """A base port with ``count`` consecutive free loopback ports after it."""
    for _ in range(200):
        base = random.randrange(low, high - count)
        socks = []
        try:
            for i in range(count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free range of ports on 127.0.0.1")


@dataclass(frozen=True)
class Running:
    """A mirrorfs-server process of this machine, as its command line started it."""

    id: int
    data: Path


def running_server(pid: int | None) -> Running | None:
    """The server ``pid`` is, read from /proc; None when it is no (longer a) mirrorfs-server.

    A recorded pid may have been reused by another process since: only this tells.
    """
    if not pid:
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(") ")[2][:1] == "Z":
                return None
    except OSError:
        return None
    if not any(Path(a).name == "mirrorfs-server" for a in argv[:2]):
        return None
    opts = dict(zip(argv, argv[1:], strict=False))
    try:
        server, data = int(opts["--id"]), opts["--data"]
    except (KeyError, ValueError):
        return None
    if not os.path.isabs(data):
        try:
            data = os.path.join(os.readlink(f"/proc/{pid}/cwd"), data)
        except OSError:
            return None
    return Running(server, Path(os.path.realpath(data)))


class ServerProc:
    """One mirrorfs-server process, its log beside its data directory."""

    def __init__(
        self,
        server_id: int,
        port: int,
        data: Path,
        host: str = "127.0.0.1",
        extra: tuple[str, ...] = (),
        wait: bool = True,
        wrap: tuple[str, ...] = (),
    ) -> None:
        """Start it; with ``wait`` (the default) return once it listens. ``wrap`` goes
        before the command and must exec it (the tests' ``nsenter --net=...``, so the
        pid is still the server's)."""
        self.id = server_id
        self.port = port
        self.data = data
        self.log = data.parent / f"server{server_id}.log"
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *wrap,
                    SERVER,
                    "--id",
                    str(server_id),
                    "--port",
                    str(port),
                    "--data",
                    str(data),
                    "--host",
                    host,
                    *extra,
                ],  # fmt: skip
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        self.ready_line = ""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until it printed its "listening" line; SpawnError with its last log line if not."""
        assert self.proc.stdout is not None
        self.ready_line = self.proc.stdout.readline()
        if "listening" not in self.ready_line:
            self.proc.wait(timeout=10)
            why = self.log.read_text().strip().splitlines()
            raise SpawnError(why[-1] if why else f"server {self.id} did not start")

    def detach(self) -> None:
        """Stop reading its output: it runs on by itself (mount.sh's servers)."""
        if self.proc.stdout is not None:
            self.proc.stdout.close()

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

    def terminate(self, timeout: float = 10) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


class LocalCluster:
    """N servers with data directories ``root/d<i>``; server i on ``base + i``."""

    def __init__(
        self, root: Path, count: int, base: int | None = None, server_args: tuple[str, ...] = ()
    ) -> None:
        self.root = root
        self.server_args = server_args
        self.count = count
        self.base = base if base is not None else free_base_port(count)
        self.servers: list[ServerProc] = []
        try:
            for i in range(count):  # all at once: each takes a moment to start
                self.servers.append(self._spawn(i, self.data_dir(i), wait=False))
            for s in self.servers:
                s.wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def spec(self) -> ClusterSpec:
        return from_base_port(self.base, self.count)

    @property
    def args(self) -> list[str]:
        return ["--base-port", str(self.base), "--count", str(self.count)]

    def data_dir(self, i: int) -> Path:
        return self.root / f"d{i}"

    def _spawn(self, i: int, data: Path, wait: bool = True) -> ServerProc:
        return ServerProc(i, self.base + i, data, extra=self.server_args, wait=wait)

    def start(self, i: int, data: Path | None = None) -> ServerProc:
        """(Re)start server i, on its own data directory or another one."""
        if self.servers[i].running:
            self.servers[i].kill()
        self.servers[i] = self._spawn(i, data or self.data_dir(i))
        return self.servers[i]

    def kill(self, i: int) -> None:
        self.servers[i].kill()

    def stop(self, i: int) -> None:
        self.servers[i].signal(signal.SIGSTOP)

    def close(self) -> None:
        for s in self.servers:
            if s.running:
                s.kill()
