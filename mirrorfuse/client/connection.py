"""A pipelined client connection to one server.

Requests are written as soon as they are made and matched to replies by
request id. A server is declared down when the connection is refused or
reset, or when requests are outstanding and nothing at all has arrived for
``timeout`` seconds (a hung or stopped process). A busy server that keeps
answering is never declared down, however long its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import REPLY_SIZE, ClientHandshake, KeyLookup, fingerprint
from mirrorfuse.wire.errors import MirrorfsError, ServerError
from mirrorfuse.wire.frames import MAGIC, VERSION, Frame, FrameDecoder, ProtocolError
from mirrorfuse.wire.messages import (
    BadMessage,
    Message,
    Reply,
    Request,
    decode,
    decode_error,
    encode_request,
)

R = TypeVar("R", bound=Message)

MAX_IN_FLIGHT = 32
KEEPALIVE = 60.0  # seconds of quiet before a kept connection asks something (servers: 600)
FRAME_MAGIC = MAGIC + bytes([VERSION])  # what a frame starts with, unlike a handshake


class ServerDown(MirrorfsError):
    """The server cannot be reached or stopped answering (``hung``: it went silent, as a
    stopped or wedged process does, rather than refusing or closing)."""

    def __init__(self, server: int, address: Address, reason: str, hung: bool = False) -> None:
        super().__init__(f"server {server} ({address}) {reason}")
        self.server = server
        self.address = address
        self.reason = reason
        self.hung = hung


class WrongDirectory(ServerDown):
    """The server answers, but from a data directory other than the one the volume's
    failure table counts for it (another one, or an older copy)."""


class KeyRefused(ServerDown):
    """The server and this client do not share the volume's key (or it has none here)."""


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, conn: Connection, keys: KeyLookup | None) -> None:
        self.conn = conn
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.keys = keys
        self.handshake: ClientHandshake | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hs_buf = bytearray(REPLY_SIZE)
        self._early: bytearray | None = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.keys is None:
            self.ready.set_result(None)
            return
        binding = b""
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            binding = fingerprint(ssl_object.getpeercert(binary_form=True) or b"")
        self.handshake = ClientHandshake(self.keys, binding)
        self.transport.write(self.handshake.hello())

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self.ready.done():
            return memoryview(self._hs_buf)
        return self.decoder.get_buffer(sizehint)

    def _handshake(self, data: bytes) -> None:
        hs = self.handshake
        assert hs is not None and self.transport is not None
        if self._early is not None:  # the first bytes: a handshake, or an error frame?
            self._early += data
            if len(self._early) < len(FRAME_MAGIC):
                return
            data, self._early = bytes(self._early), None
            if data.startswith(FRAME_MAGIC):  # refused before the handshake (busy, too old)
                self.ready.set_result(None)
                self.decoder.feed(data)
                self._deliver()
                return
        try:
            proof = hs.receive(data)
        except MirrorfsError as exc:  # no key for it here, or it did not prove the key
            self.ready.set_result(None)
            self.conn._abort(str(exc), refused_key=True)
            return
        if hs.done:
            self.transport.write(proof)
            self.ready.set_result(None)
            if hs.rest:
                self.decoder.feed(hs.rest)
                self._deliver()

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.last_rx = time.monotonic()
        if not self.ready.done():
            if self.handshake is not None:
                self._handshake(bytes(self._hs_buf[:nbytes]))
            return
        self.decoder.buffer_updated(nbytes)
        self._deliver()

    def _deliver(self) -> None:
        try:
            while (frame := self.decoder.next_frame()) is not None:
                self.conn._deliver(frame)
        except ProtocolError as exc:
            self.conn._abort(f"sent a malformed frame ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
            if self.handshake is not None and exc is None:
                self.conn._abort(
                    "closed the connection before the key handshake (does it use --tls?)"
                )
        self.conn._abort(
            "closed the connection" if exc is None else f"reset the connection ({exc})"
        )

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class Connection:
    """One persistent connection; create with ``await Connection.open(...)``."""

    def __init__(
        self,
        server: int,
        address: Address,
        timeout: float,
        on_gen: Callable[[int, int], None] | None = None,
    ) -> None:
        self.server = server
        self.address = address
        self.timeout = timeout
        self.on_gen = on_gen  # told the table generation every reply carries
        self.last_rx = time.monotonic()
        self._busy_since = 0.0
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._proto: _Protocol | None = None
        self._closed: str | None = None
        self._hung = False  # closed because the server went silent
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._watchdog: asyncio.Task[None] | None = None
        self._key_refused = False
        self.keepalive: Request[Any] | None = None  # asked when idle, to stay open
        self._keepalive: asyncio.Future[None] | None = None
        self.keyed = False  # the server proved the key (False: it has none yet)
        self.volume: str | None = None  # as the server named it in the handshake

    @classmethod
    async def open(
        cls,
        server: int,
        address: Address,
        timeout: float,
        on_gen: Callable[[int, int], None] | None = None,
        keys: KeyLookup | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Connection:
        """Connect and, when ``keys`` is given, prove the key and check the server's proof."""
        conn = cls(server, address, timeout, on_gen)
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(conn, keys), address.host, address.port, ssl=tls
                ),
                timeout,
            )
            conn._proto = proto
            await asyncio.wait_for(asyncio.shield(proto.ready), timeout)
        except TimeoutError:
            conn._abort("did not answer the key handshake in time", hung=True)
            raise ServerDown(
                server, address, f"did not accept a connection within {timeout:g}s", hung=True
            ) from None
        except OSError as exc:
            # asyncio's own text is "Connect call failed (...)": the errno says it better
            reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
            raise ServerDown(server, address, f"is not reachable: {reason.lower()}") from None
        if conn._closed is not None:
            raise conn._down()
        if proto.handshake is not None:
            conn.keyed, conn.volume = proto.handshake.keyed, proto.handshake.volume
        conn._watchdog = asyncio.ensure_future(conn._watch())
        return conn

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def call(
        self, req: Request[R], payload: bytes | bytearray | memoryview = b"", flags: int = 0
    ) -> Reply[R]:
        """Send one request and wait for its typed reply; error replies raise ServerError."""
        frame = await self._roundtrip(req, payload, flags)
        if frame.is_error:
            err = decode_error(frame.body)
            raise ServerError(err.code, err.msg, self.server, err.last)
        try:
            body: Any = decode(type(req).REPLY, frame.body)
        except BadMessage as exc:
            self._abort(f"sent a reply this client cannot read ({exc})")
            raise self._down() from None
        gen = getattr(body, "gen", None)
        if self.on_gen is not None and isinstance(gen, int):
            self.on_gen(self.server, gen)
        return Reply(body, frame.payload)

    async def _roundtrip(
        self, req: Request[Any], payload: bytes | bytearray | memoryview, flags: int
    ) -> Frame:
        async with self._slots:
            if self._closed is not None:
                raise self._down()
            proto = self._proto
            assert proto is not None and proto.transport is not None
            if not proto.writable.is_set():
                await proto.writable.wait()
                if self._closed is not None:  # it went away while we waited to write
                    raise self._down()
            req_id = next(self._ids)
            fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
            if not self._pending:
                self._busy_since = time.monotonic()
            self._pending[req_id] = fut
            try:
                proto.transport.writelines(encode_request(req_id, req, payload, flags))
            except (RuntimeError, OSError) as exc:  # a transport closing under us
                self._abort(f"closed the connection ({exc})")
            try:
                return await fut
            finally:
                self._pending.pop(req_id, None)

    def _deliver(self, frame: Frame) -> None:
        if not frame.is_reply:
            return
        if frame.req_id == 0 and frame.is_error:  # the server gave up on this connection
            err = decode_error(frame.body)
            self._abort(f"refused the connection: {err.msg}", refused_key=err.code == "AUTH")
            return
        fut = self._pending.pop(frame.req_id, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)

    def _down(self) -> ServerDown:
        kind = KeyRefused if self._key_refused else ServerDown
        return kind(self.server, self.address, str(self._closed), self._hung)

    def _abort(self, reason: str, hung: bool = False, refused_key: bool = False) -> None:
        if self._closed is None:
            self._closed = reason
            self._hung = hung
            self._key_refused = refused_key
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(self._down())
        self._pending.clear()
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abort()
        if self._proto is not None:
            self._proto.writable.set()
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()

    async def _watch(self) -> None:
        tick = min(self.timeout / 4, 0.5)
        while self._closed is None:
            await asyncio.sleep(tick)
            if self._pending:
                quiet = time.monotonic() - max(self.last_rx, self._busy_since)
                if quiet > self.timeout:
                    self._abort(f"did not answer within {self.timeout:g}s", hung=True)
            elif self.keepalive is not None and time.monotonic() - self.last_rx > KEEPALIVE:
                # servers close connections idle for long; this one must stay (a mount's
                # lease lives on it), and a server that hung meanwhile is found out
                self._busy_since = time.monotonic()
                self._keepalive = asyncio.ensure_future(self._ping(self.keepalive))

    async def _ping(self, req: Request[Any]) -> None:
        with contextlib.suppress(MirrorfsError):
            await self.call(req)

    def close(self) -> None:
        self._abort("connection closed by client")


async def request_once(
    address: Address,
    req: Request[R],
    timeout: float,
    connect: float = 3.0,
    payload: bytes = b"",
    keys: KeyLookup | None = None,
) -> Reply[R]:
    """Connect, ask one question, close: for peers asked now and then, not kept open."""
    conn = await Connection.open(0, address, connect, keys=keys)
    try:
        return await asyncio.wait_for(conn.call(req, payload), timeout)
    finally:
        conn.close()
