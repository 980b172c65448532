"""mirrorfs-cli serve-file: N virtual file servers, one per port, each serving one file.

The console controls them as seed 003 says: ``1`` pauses server 1, ``r1``
resumes it, ``e1`` ends a paused server. A paused server answers reads with
PAUSED, so a downloader knows to wait or hand its segments to others; an
ended one closes its port and its connections.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import xxhash

from mirrorfuse.core.scheduler import ALIVE, DEAD, PAUSED
from mirrorfuse.wire.addresses import check_port
from mirrorfuse.wire.errors import UsageError
from mirrorfuse.wire.frames import (
    MAX_PAYLOAD,
    BadRequest,
    Flag,
    Frame,
    FrameServer,
    Msg,
    encode,
    encode_error,
    need,
)
from mirrorfuse.wire.sizes import human

READ_LIMIT = 8 << 20
assert READ_LIMIT <= MAX_PAYLOAD  # a read must fit in one frame


def file_checksum(path: Path) -> int:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.intdigest()


class VirtualServer:
    def __init__(
        self, number: int, port: int, path: Path, size: int, checksum: int, rate: float = 0
    ) -> None:
        self.rate = rate  # bytes per second, 0: as fast as it goes
        self._free_at = 0.0
        self.number = number  # 1-based, as the console names it
        self.port = port
        self.path = path
        self.size = size
        self.checksum = checksum
        self.state = ALIVE
        self.sent = 0
        self.fd = os.open(path, os.O_RDONLY)
        self.listener: asyncio.AbstractServer | None = None
        self.conns: set[_Conn] = set()

    def handle(self, frame: Frame) -> list[bytes]:
        if frame.defect or frame.is_reply:
            return encode_error(frame.req_id, frame.type, "BAD_REQUEST", frame.defect or "reply")
        try:
            if frame.type == Msg.FILE_INFO:
                body = {
                    "size": self.size,
                    "checksum": self.checksum,
                    "state": self.state,
                    "name": self.path.name,
                }
                return encode(Msg.FILE_INFO, frame.req_id, body, flags=Flag.REPLY)
            if frame.type != Msg.FILE_READ:
                return encode_error(
                    frame.req_id, frame.type, "UNKNOWN_TYPE", f"unknown message type {frame.type}"
                )
            if self.state == PAUSED:
                return encode_error(
                    frame.req_id, frame.type, "PAUSED", f"server {self.number} is paused"
                )
            offset = need(frame.body, "offset", int)
            length = need(frame.body, "length", int)
            if offset < 0 or length < 0 or length > READ_LIMIT or offset + length > self.size:
                raise BadRequest(f"range {offset}+{length} is outside the file")
        except BadRequest as exc:
            return encode_error(frame.req_id, frame.type, "BAD_REQUEST", str(exc))
        data = os.pread(self.fd, length, offset)
        self.sent += len(data)
        body = {"checksum": xxhash.xxh3_64_intdigest(data)}
        return encode(Msg.FILE_READ, frame.req_id, body, data, Flag.REPLY)

    def delay_for(self, nbytes: int) -> float:
        """Seconds to hold a reply so this server sends at most ``rate`` bytes a second."""
        if not self.rate:
            return 0.0
        now = time.monotonic()
        start = max(now, self._free_at)
        self._free_at = start + nbytes / self.rate
        return self._free_at - now

    def end(self) -> None:
        self.state = DEAD
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()


class _Conn(FrameServer):
    def __init__(self, server: VirtualServer) -> None:
        super().__init__()
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)

    def on_frame(self, frame: Frame) -> None:
        out = self.server.handle(frame)
        delay = self.server.delay_for(len(out[-1])) if frame.type == Msg.FILE_READ else 0
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self.send, out)
        else:
            self.send(out)


def console_command(servers: list[VirtualServer], line: str) -> str:
    """Apply one console command (1, r1, e1); returns what to print."""
    line = line.strip().lower()
    if not line:
        return ""
    action, num = ("pause", line) if line[0].isdigit() else (line[0], line[1:])
    if not num.isdigit() or not 1 <= int(num) <= len(servers):
        return f"unknown command {line!r}: N pauses server N, rN resumes it, eN ends a paused one"
    srv = servers[int(num) - 1]
    if srv.state == DEAD:
        return f"server {srv.number} has ended"
    if action == "pause":
        srv.state = PAUSED
        return f"server {srv.number} paused"
    if action == "r":
        srv.state = ALIVE
        return f"server {srv.number} resumed"
    if action == "e":
        if srv.state != PAUSED:
            return f"pause server {srv.number} first (enter {srv.number}), then e{srv.number}"
        srv.end()
        return f"server {srv.number} ended"
    return f"unknown command {line!r}: N pauses server N, rN resumes it, eN ends a paused one"


async def serve(args: argparse.Namespace) -> int:
    path = Path(args.file)
    size = path.stat().st_size
    print(f"computing the checksum of {path} ({human(size)})...", flush=True)
    checksum = await asyncio.get_running_loop().run_in_executor(None, file_checksum, path)
    rate = (args.rate or 0) * (1 << 20)
    servers = [
        VirtualServer(i + 1, p, path, size, checksum, rate) for i, p in enumerate(args.ports)
    ]
    loop = asyncio.get_running_loop()
    for srv in servers:
        try:
            srv.listener = await loop.create_server(
                lambda srv=srv: _Conn(srv), args.address, srv.port, reuse_address=True
            )
        except OSError as exc:
            for s in servers:
                if s.listener is not None:
                    s.listener.close()
            print(
                f"mirrorfs-cli: error: cannot listen on {args.address}:{srv.port}: {exc.strerror}",
                file=sys.stderr,
            )
            return 1
    print(
        f"serving {path.name} ({human(size)}) from {len(servers)} servers on "
        f"{args.address}:{','.join(map(str, args.ports))} (pid {os.getpid()})",
        flush=True,
    )
    print("console: N pauses server N, rN resumes it, eN ends a paused server", flush=True)

    async def report() -> None:
        while True:
            await asyncio.sleep(args.interval)
            line = "; ".join(
                f"server {s.number} ({s.port}): {s.state}, {human(s.sent)} sent" for s in servers
            )
            print(line, flush=True)

    reporter = asyncio.ensure_future(report())
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            msg = console_command(servers, line.decode(errors="replace"))
            if msg:
                print(msg, flush=True)
        # console closed: keep serving until killed
        await asyncio.Event().wait()
    finally:
        reporter.cancel()
    return 0


def check_args(args: argparse.Namespace) -> None:
    for p in args.ports:
        check_port(p)
    if len(set(args.ports)) != len(args.ports):
        raise UsageError("a port is listed twice")
    if args.count is not None and args.count != len(args.ports):
        raise UsageError(f"-n {args.count} but {len(args.ports)} ports were given")
    if args.interval <= 0:
        raise UsageError("-i must be a positive number of seconds")
    if not Path(args.file).is_file():
        raise UsageError(f"file {args.file} does not exist (or is not a regular file)")
    if Path(args.file).stat().st_size > (1 << 48):
        raise UsageError(f"file {args.file} is too large")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i", dest="interval", type=float, required=True, help="seconds between status lines"
    )
    p.add_argument("-f", dest="file", required=True, help="the file to serve")
    p.add_argument("-n", dest="count", type=int, help="number of servers (must match -p)")
    p.add_argument("-a", dest="address", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "-p",
        dest="ports",
        type=int,
        nargs="+",
        required=True,
        help="one port per server (1024-65535)",
    )
    p.add_argument(
        "--rate",
        type=float,
        help="limit each server to this many MiB/s (to watch a transfer, pause and resume it)",
    )


def main(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0
