"""Virtual file servers: N of them, one per port, each serving one file (serve-file), and
the same server for each file a peer shares.

A console controls them: ``1`` pauses server 1, ``r1`` resumes it, ``e1``
ends a paused server. A paused server answers reads with PAUSED, so a
downloader knows to wait or hand its segments to others; an ended one closes
its port and its connections.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

from mirrorfuse.core.scheduler import ALIVE, DEAD, PAUSED
from mirrorfuse.wire.frames import MAX_PAYLOAD, Frame, Msg
from mirrorfuse.wire.messages import (
    BadMessage,
    FileInfo,
    FileInfoReply,
    FileRead,
    FileReadReply,
)

from .net import Answer, FrameServer, Handler, Limits, ListenError, Out, Refused, dispatch

READ_LIMIT = 8 << 20
MAX_DELAYED = 4  # replies one connection may have waiting for their turn under --rate
assert READ_LIMIT <= MAX_PAYLOAD  # a read must fit in one frame


def file_checksum(path: Path) -> int:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.intdigest()


class VirtualServer:
    def __init__(
        self,
        number: int,
        port: int,
        path: Path,
        size: int,
        checksum: int,
        rate: float = 0,
        fd: int | None = None,  # already open (a peer's checked open): served, then closed
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
        self.last_read = 0
        self.fd = os.open(path, os.O_RDONLY) if fd is None else fd
        self.listener: asyncio.AbstractServer | None = None
        self.conns: set[FileConnection] = set()
        self.limits = Limits(max_payload=0)  # its requests carry no payload
        self.handlers: dict[type, Handler] = {FileInfo: self.info, FileRead: self.read}

    def info(self, req: FileInfo, payload: bytes | bytearray, flags: int) -> Answer:
        reply = FileInfoReply(
            size=self.size, checksum=self.checksum, state=self.state, name=self.path.name
        )
        return reply, b""

    def read(self, req: FileRead, payload: bytes | bytearray, flags: int) -> Answer:
        if self.state == PAUSED:
            raise Refused("PAUSED", f"server {self.number} is paused")
        if req.length > READ_LIMIT or req.offset + req.length > self.size:
            raise BadMessage(f"range {req.offset}+{req.length} is outside the file")
        data = os.pread(self.fd, req.length, req.offset)
        self.sent += len(data)
        self.last_read = req.offset  # where its payload lies in the file (sendfile)
        return FileReadReply(checksum=xxhash.xxh3_64_intdigest(data)), data

    def send_reply(self, conn: FrameServer, out: Out) -> None:
        """The answer to a read of this file (read just now): its payload sent from the
        file (sendfile); an error as it is."""
        if len(out) == 2 and isinstance(out[1], bytes):
            conn.send_from_file(out[0], self.fd, self.last_read, out[1])
        else:
            conn.send(out)

    def handle(self, frame: Frame) -> Out:
        return dispatch(frame, self.handlers)

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

    def close(self) -> None:
        os.close(self.fd)


class FileConnection(FrameServer):
    def __init__(self, server: VirtualServer) -> None:
        super().__init__(limits=server.limits)
        self.server = server
        self.delayed = 0  # replies held back by --rate, each up to READ_LIMIT bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.conns.discard(self)

    def on_frame(self, frame: Frame) -> None:
        out = self.server.handle(frame)
        delay = self.server.delay_for(len(out[-1])) if frame.type == Msg.FILE_READ else 0
        if delay > 0:
            self.delayed += 1
            if self.delayed >= MAX_DELAYED:
                self.hold("rate")
            asyncio.get_running_loop().call_later(delay, self._send_late, out)
        elif frame.type == Msg.FILE_READ:
            self.server.send_reply(self, out)
        else:
            self.send(out)

    def _send_late(self, out: Out) -> None:
        self.delayed -= 1
        self.send(out)
        if self.delayed < MAX_DELAYED:
            self.unhold("rate")


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
        if srv.state == PAUSED:
            return f"server {srv.number} is already paused (r{srv.number} resumes it)"
        srv.state = PAUSED
        return f"server {srv.number} paused"
    if action == "r":
        if srv.state != PAUSED:
            return f"server {srv.number} is not paused: nothing to resume"
        srv.state = ALIVE
        return f"server {srv.number} resumed"
    if action == "e":
        if srv.state != PAUSED:
            return f"pause server {srv.number} first (enter {srv.number}), then e{srv.number}"
        srv.end()
        return f"server {srv.number} ended"
    return f"unknown command {line!r}: N pauses server N, rN resumes it, eN ends a paused one"


async def listen(servers: list[VirtualServer], host: str) -> None:
    """Every virtual server on its port; ListenError (closing the ones opened) if one cannot."""
    loop = asyncio.get_running_loop()

    def connection_to(srv: VirtualServer) -> Callable[[], FileConnection]:
        return lambda: FileConnection(srv)

    for srv in servers:
        try:
            srv.listener = await loop.create_server(
                connection_to(srv), host, srv.port, reuse_address=True
            )
        except OSError as exc:
            for s in servers:
                if s.listener is not None:
                    s.listener.close()
            raise ListenError(f"cannot listen on {host}:{srv.port}: {exc.strerror}") from None
