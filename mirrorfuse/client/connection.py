"""A pipelined client connection to one server.

Requests are written as soon as they are made and matched to replies by
request id. A server is declared down when the connection is refused or
reset, or when requests are outstanding and nothing at all has arrived for
``timeout`` seconds (a hung or stopped process). A busy server that keeps
answering is never declared down, however long its queue.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.errors import MirrorfsError, ServerError
from mirrorfuse.wire.frames import Frame, FrameDecoder, ProtocolError, encode

MAX_IN_FLIGHT = 32


class ServerDown(MirrorfsError):
    """The server cannot be reached or stopped answering."""

    def __init__(self, server: int, address: Address, reason: str) -> None:
        super().__init__(f"server {server} ({address}) {reason}")
        self.server = server
        self.address = address
        self.reason = reason


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.last_rx = time.monotonic()
        self.decoder.buffer_updated(nbytes)
        try:
            while (frame := self.decoder.next_frame()) is not None:
                self.conn._deliver(frame)
        except ProtocolError as exc:
            self.conn._abort(f"sent a malformed frame ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
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
        self.on_gen = on_gen
        self.last_rx = time.monotonic()
        self._busy_since = 0.0
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._proto: _Protocol | None = None
        self._closed: str | None = None
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        server: int,
        address: Address,
        timeout: float,
        on_gen: Callable[[int, int], None] | None = None,
    ) -> Connection:
        conn = cls(server, address, timeout, on_gen)
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(conn), address.host, address.port),
                timeout,
            )
        except TimeoutError:
            raise ServerDown(
                server, address, f"did not accept a connection within {timeout:g}s"
            ) from None
        except OSError as exc:
            # asyncio's own text is "Connect call failed (...)": the errno says it better
            reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
            raise ServerDown(server, address, f"is not reachable: {reason.lower()}") from None
        conn._proto = proto
        conn._watchdog = asyncio.ensure_future(conn._watch())
        return conn

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def request(
        self, type_: int, body: dict[str, Any] | None = None, payload: bytes = b"", flags: int = 0
    ) -> Frame:
        """Send one request and wait for its reply; error replies raise ServerError."""
        async with self._slots:
            if self._closed is not None:
                raise ServerDown(self.server, self.address, self._closed)
            proto = self._proto
            assert proto is not None and proto.transport is not None
            if not proto.writable.is_set():
                await proto.writable.wait()
            req_id = next(self._ids)
            fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
            if not self._pending:
                self._busy_since = time.monotonic()
            self._pending[req_id] = fut
            proto.transport.writelines(encode(type_, req_id, body, payload, flags))
            try:
                frame = await fut
            finally:
                self._pending.pop(req_id, None)
        if frame.is_error:
            raise ServerError(
                str(frame.body.get("code", "ERROR")),
                str(frame.body.get("msg", "")),
                self.server,
                frame.body,
            )
        return frame

    def _deliver(self, frame: Frame) -> None:
        if not frame.is_reply:
            return
        if frame.defect:
            self._abort(f"sent a malformed reply ({frame.defect})")
            return
        if frame.req_id == 0 and frame.is_error:  # the server gave up on this connection
            self._abort(f"refused the connection: {frame.body.get('msg')}")
            return
        gen = frame.body.get("gen")
        if self.on_gen is not None and isinstance(gen, int):
            self.on_gen(self.server, gen)
        fut = self._pending.pop(frame.req_id, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)

    def _abort(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ServerDown(self.server, self.address, self._closed))
        self._pending.clear()
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abort()
        self._proto and self._proto.writable.set()
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()

    async def _watch(self) -> None:
        tick = min(self.timeout / 4, 0.5)
        while self._closed is None:
            await asyncio.sleep(tick)
            if self._pending:
                quiet = time.monotonic() - max(self.last_rx, self._busy_since)
                if quiet > self.timeout:
                    self._abort(f"did not answer within {self.timeout:g}s")

    def close(self) -> None:
        self._abort("connection closed by client")


async def request_once(
    address: Address, type_: int, body: dict[str, Any], timeout: float, connect: float = 3.0
) -> Frame:
    """Connect, ask one question, close: for peers asked now and then, not kept open."""
    conn = await Connection.open(0, address, connect)
    try:
        return await asyncio.wait_for(conn.request(type_, body), timeout)
    finally:
        conn.close()
