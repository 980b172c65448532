"""A hand-written HTTP mirror for the Range client's tests: it answers each request as
the test says (the range, kept alive, by default) and records what it was asked."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fakes import TcpServer

# what a mirror's connection does once it sent its answer
KEEP, CLOSE, STALL = "keep", "close", "stall"  # STALL: nothing more until the test ends


@dataclass
class Request:
    line: str
    headers: dict[str, str]
    start: int
    end: int  # inclusive, as the Range header says
    conn: int  # which connection of the mirror (from 1)
    number: int  # which request on it (from 1)


# a mirror's answer to one request: the bytes to send, then KEEP, CLOSE or STALL
Respond = Callable[[Request], tuple[bytes, str]]


def read_request(conn: socket.socket) -> tuple[str, dict[str, str]] | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert not rest  # the client asks for one range at a time
    line, *fields = head.decode("latin-1").split("\r\n")
    return line, {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}


def partial(data: bytes, req: Request, version: str = "HTTP/1.1", extra: str = "") -> bytes:
    """A 206 with the range asked, as a mirror sends it (``extra``: more header lines)."""
    end = min(req.end, len(data) - 1)
    payload = data[req.start : end + 1]
    head = (
        f"{version} 206 Partial Content\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Range: bytes {req.start}-{end}/{len(data)}\r\n"
        f"Content-Length: {len(payload)}\r\n{extra}\r\n"
    )
    return head.encode() + payload


class Mirror(TcpServer):
    """An HTTP server: ``respond`` answers each request (default: the range, kept alive)."""

    def __init__(self, data: bytes, respond: Respond | None = None) -> None:
        self.data = data
        self.respond = respond or (lambda req: (partial(data, req), KEEP))
        self.requests: list[Request] = []
        self.stalled = threading.Event()
        super().__init__(Mirror._handle)

    def _handle(self, conn: socket.socket, number: int) -> None:
        for n in range(1, 1 << 30):
            got = read_request(conn)
            if got is None:
                return
            line, headers = got
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("range", ""))
            assert m, headers
            req = Request(line, headers, int(m[1]), int(m[2]), number, n)
            self.requests.append(req)
            out, then = self.respond(req)
            conn.sendall(out)
            if then == STALL:
                self.stalled.set()
                self.stopped.wait()
            if then != KEEP:
                return

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/files/the%20file.bin"
