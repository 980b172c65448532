"""Blocking fetches of byte ranges from a file server, one connection per worker thread.

Why threads and not the event loop: a segment's bytes go from the socket to
the output file inside the kernel (``splice`` through a pipe), so no Python
object is made for them, and the fetches of several sources run on several
cores at once while the loop only hands out segments. Where splice is not
available the bytes are received into one buffer per worker, reused.

The protocol is the one every daemon speaks (``wire.frames``), with the key
handshake of ``wire.auth`` when the server has a key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

import xxhash

from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import REPLY_SIZE, ClientHandshake, KeyLookup
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.frames import HEADER, HEADER_SIZE, MAGIC, MAX_BODY, VERSION, Flag
from mirrorfuse.wire.messages import (
    BadMessage,
    FileRead,
    FileReadReply,
    decode,
    decode_error,
    encode_request,
)

from .output import OutputError

T = TypeVar("T")
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size: a segment in few splices


class FetchFailed(Exception):
    """The source failed this fetch (unreachable, refused, damaged, too slow)."""


class FetchPaused(Exception):
    """The source is paused: it answers, but serves no bytes for now."""


class Splicer:
    """What a blocking fetcher needs: whole sends and receives on a socket whose calls the
    kernel bounds (SO_RCVTIMEO), and a socket's bytes into a file at an offset through
    a pipe of its own."""

    timeout: float

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self._pipe: tuple[int, int] | None = None
        self._buf = bytearray()
        self._closing = False  # the server closes the connection after this reply
        self._lock = threading.Lock()
        self._aborted = False
        self.received = 0  # bytes read on any connection (tells a stale one, see first)

    def first(self, ask: Callable[[socket.socket], T], connect: Callable[[], socket.socket]) -> T:
        """``ask`` on the kept connection; once more on a new one when the kept one proves
        closed before a byte of the answer came (servers close idle connections: nginx
        after 75 s, ours after 600), which is no failure of the source."""
        reused = self.sock is not None
        sock = connect()
        before = self.received
        try:
            return ask(sock)
        except FetchFailed:
            if not reused or self.received != before or self._aborted:
                raise
        self.close()
        return ask(connect())

    def open_tcp(self, host: str, port: int) -> socket.socket:
        """A connected socket, adopted before it connects so abort() ends the connect
        too (create_connection's socket is out of reach until it returns)."""
        err: OSError | None = None
        for family, kind, proto, _, addr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            sock = self.adopt(socket.socket(family, kind, proto))
            try:
                sock.settimeout(self.timeout)
                sock.connect(addr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                err = exc
                self.close()
                if self._aborted:
                    break
        raise err if err is not None else OSError(f"no address for {host}")

    def adopt(self, sock: socket.socket) -> socket.socket:
        """A new connection becomes this fetcher's, unless it was stopped meanwhile."""
        with self._lock:
            if self._aborted:
                sock.close()
                raise FetchFailed("stopped")
            self.sock = sock
        return sock

    def abort(self) -> None:
        """Stop the fetch running in another thread now (its blocking calls return)."""
        with self._lock:
            self._aborted = True
            sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.drop_pipe()

    @staticmethod
    def bound(sock: socket.socket, timeout: float) -> None:
        """Blocking calls (splice ignores Python's timeouts), each bounded by the kernel."""
        sock.settimeout(None)
        whole, frac = divmod(timeout, 1)
        limit = struct.pack("ll", int(whole), int(frac * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)

    def send_all(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError as exc:
            raise FetchFailed(f"closed the connection ({reason(exc)})") from None

    def recv_some(self, sock: socket.socket, most: int) -> bytes:
        try:
            data = sock.recv(most)
        except OSError as exc:
            raise FetchFailed(self.lost(exc)) from None
        if not data:
            raise FetchFailed("closed the connection")
        self.received += len(data)
        return data

    def recv_into(self, sock: socket.socket, view: memoryview) -> None:
        while view:
            try:
                n = sock.recv_into(view)
            except OSError as exc:
                raise FetchFailed(self.lost(exc)) from None
            if n == 0:
                raise FetchFailed("closed the connection")
            self.received += n
            view = view[n:]

    def recv_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into(sock, memoryview(buf))
        return bytes(buf)

    def buffer(self, length: int) -> memoryview:
        """This fetcher's buffer, reused from segment to segment."""
        if len(self._buf) < length:
            self._buf = bytearray(length)
        return memoryview(self._buf)[:length]

    def lost(self, exc: OSError) -> str:
        if isinstance(exc, TimeoutError) or exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return f"no answer in {self.timeout:g}s"
        return f"closed the connection ({reason(exc)})"

    def splice_into(self, sock: socket.socket, fd: int, start: int, length: int) -> None:
        """``length`` bytes from the socket to ``fd`` at ``start``, through a pipe."""
        if self._pipe is None:
            r, w = os.pipe()
            with contextlib.suppress(OSError):  # a smaller pipe: more calls, same bytes
                fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
            self._pipe = (r, w)
        r, w = self._pipe
        pos, end = start, start + length
        while pos < end:
            try:
                n = os.splice(sock.fileno(), w, end - pos)
            except OSError as exc:
                self.drop_pipe()
                raise FetchFailed(self.lost(exc)) from None
            if n == 0:
                self.drop_pipe()
                raise FetchFailed("closed the connection")
            while n:
                try:
                    m = os.splice(r, fd, n, offset_dst=pos)
                except OSError as exc:  # the output file's (a full disk): not the source's
                    self.drop_pipe()
                    raise OutputError(exc) from None
                pos += m
                n -= m

    def drop_pipe(self) -> None:
        """A pipe may hold bytes of a failed segment: never reused."""
        if self._pipe is not None:
            for p in self._pipe:
                os.close(p)
            self._pipe = None


class Fetcher(Splicer):
    """One connection to one source (a file server), used by one thread at a time."""

    def __init__(
        self,
        address: Address,
        file: str | None,
        keys: KeyLookup | None,
        timeout: float,
        view: Callable[[int, int], memoryview] | None = None,
    ) -> None:
        """``view(start, end)``: the output file's bytes there (a mapping), to check what
        was spliced into it; None: no splicing, every segment comes through a buffer."""
        super().__init__()
        self.address = address
        self.file = file
        self.keys = keys
        self.timeout = timeout
        self.view = view
        self._ids = itertools.count(1)

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        try:
            sock = self.open_tcp(self.address.host, self.address.port)
        except OSError as exc:
            raise FetchFailed(f"is not reachable: {reason(exc)}") from None
        self.bound(sock, self.timeout)
        if self.keys is not None:
            self._handshake(sock, self.keys)
        return sock

    def _handshake(self, sock: socket.socket, keys: KeyLookup) -> None:
        hs = ClientHandshake(keys)
        self.send_all(sock, hs.hello())
        first = self.recv_exact(sock, len(MAGIC) + 1)
        if first == MAGIC + bytes([VERSION]):  # refused with an error frame instead
            self._error_frame(sock, first)
        try:
            proof = hs.receive(first + self.recv_exact(sock, REPLY_SIZE - len(first)))
        except MirrorfsError as exc:
            raise FetchFailed(str(exc)) from None
        self.send_all(sock, proof)

    def _error_frame(self, sock: socket.socket, start: bytes) -> None:
        head = start + self.recv_exact(sock, HEADER_SIZE - len(start))
        body_len, payload_len = HEADER.unpack(head)[5:]
        if body_len > MAX_BODY or payload_len:
            raise FetchFailed("sent a malformed frame")
        err = decode_error(self.recv_exact(sock, body_len))
        raise FetchFailed(f"refused the connection: {err.msg}")

    # -- I/O -----------------------------------------------------------------------------

    # -- a segment -----------------------------------------------------------------------

    def fetch(self, start: int, length: int, fd: int | None) -> memoryview | None:
        """The bytes [start, start+length): with ``fd``, spliced into it at ``start`` and
        checked there (None returned); without, checked in this fetcher's buffer (returned,
        valid until its next fetch). FetchFailed or FetchPaused when the source cannot."""
        try:
            return self._fetch(start, length, fd)
        except BaseException:
            self.close()  # what is left of the reply stays unread: a new connection next
            raise

    def _fetch(self, start: int, length: int, fd: int | None) -> memoryview | None:
        req_id = next(self._ids)
        req = FileRead(offset=start, length=length, name=self.file)

        def ask(sock: socket.socket) -> bytes:
            self.send_all(sock, b"".join(encode_request(req_id, req)))
            return self.recv_exact(sock, HEADER_SIZE)

        head = self.first(ask, self._connect)
        sock = self._connect()
        magic, version, _, rid, flags, body_len, payload_len = HEADER.unpack(head)
        if magic != MAGIC or version != VERSION or rid not in (req_id, 0) or body_len > MAX_BODY:
            raise FetchFailed("sent a malformed frame")
        body = self.recv_exact(sock, body_len)
        if flags & Flag.ERROR:
            err = decode_error(body)
            if err.code == "PAUSED":
                raise FetchPaused(err.msg)
            raise FetchFailed(err.msg)
        try:
            checksum = decode(FileReadReply, body).checksum
        except BadMessage as exc:
            raise FetchFailed(f"sent a reply this client cannot read ({exc})") from None
        if payload_len != length:
            raise FetchFailed(f"sent {payload_len} bytes for {length}")
        if fd is not None and self.view is not None:
            self.splice_into(sock, fd, start, length)
            if xxhash.xxh3_64_intdigest(self.view(start, start + length)) != checksum:
                raise FetchFailed("a segment arrived damaged")
            return None
        view = self.buffer(length)
        self.recv_into(sock, view)
        if xxhash.xxh3_64_intdigest(view) != checksum:
            raise FetchFailed("a segment arrived damaged")
        return view


def reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__).lower()
