"""Connections to every server of one volume, opened on first use and again after a loss.

A new connection says HELLO (the server refuses one of another volume and
must answer as the server id it was named for) and, when this client holds
the mount lease, presents it again: the server ties the lease to a live
connection, which is how it knows the mount is still there.

A server that went silent (a stopped or wedged process) is waited for once:
from then on a call to it fails at once, and a probe in the background asks
it again every timeout until it answers. So one hang costs one timeout, not
one per request or per reconnection (its port still accepts connections).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from mirrorfuse.core.stats import OpStats
from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.errors import MirrorfsError, ServerError
from mirrorfuse.wire.messages import Hello, Identity, Lease, Message, Reply, Request

from .connection import Connection, ServerDown, WrongDirectory
from .keys import Keyring, open_server

R = TypeVar("R", bound=Message)


class Cluster:
    def __init__(
        self,
        spec: ClusterSpec,
        timeout: float,
        on_gen: Callable[[int, int], None] | None = None,
    ) -> None:
        self.spec = spec
        self.keys = Keyring(spec.key_file)
        self.timeout = timeout
        self.on_gen = on_gen
        self.volume_id: str | None = None  # once known, HELLO refuses other volumes
        self.lease: Lease | None = None  # set by the mount once it holds the lease
        # says why a server that answers HELLO must not be used (its directory), or None
        self.check: Callable[[int, Identity], str | None] | None = None
        self._conns: dict[int, Connection] = {}
        self._connecting: dict[int, asyncio.Future[Connection]] = {}
        self.hung: dict[int, ServerDown] = {}  # server -> how it went silent
        self.hangs = [0] * spec.count  # times each server was found silent
        self.stats = OpStats()  # requests by message type (metrics)
        self._probes: dict[int, asyncio.Task[None]] = {}

    async def connection(self, server: int) -> Connection:
        conn = self._conns.get(server)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(server)
        if pending is None:
            pending = asyncio.ensure_future(self._connect(server))
            self._connecting[server] = pending
            pending.add_done_callback(lambda _f: self._connecting.pop(server, None))
        return await asyncio.shield(pending)

    async def _connect(self, server: int) -> Connection:
        conn = await open_server(self.spec, server, self.timeout, self.on_gen, self.keys)
        try:
            hello = (await conn.call(Hello(volume=self.volume_id))).body
        except ServerError as exc:
            conn.close()
            raise ServerDown(server, conn.address, f"refused: {exc}") from None
        if hello.server != server:
            conn.close()
            raise MirrorfsError(
                f"{conn.address} answers as server {hello.server}, expected server {server} "
                "(servers must be given in id order)"
            )
        misfit = self.check(server, hello) if self.check is not None else None
        if misfit:
            conn.close()
            raise WrongDirectory(server, conn.address, misfit)
        if self.lease is not None and hello.formatted:
            # a new connection: tell the server this is still the lease holder
            try:
                await conn.call(self.lease)
            except ServerError as exc:
                conn.close()
                raise ServerDown(server, conn.address, f"refused the lease: {exc}") from None
        conn.keepalive = Hello(volume=self.volume_id)
        self._conns[server] = conn
        return conn

    async def call(
        self,
        server: int,
        req: Request[R],
        payload: bytes | bytearray | memoryview = b"",
        flags: int = 0,
    ) -> Reply[R]:
        """One request to one server (connecting first if needed)."""
        silent = self.hung.get(server)
        if silent is not None:
            raise ServerDown(server, silent.address, f"{silent.reason} (still silent)", True)
        start = time.perf_counter()
        try:
            conn = await self.connection(server)
            reply = await conn.call(req, payload, flags)
        except ServerDown as exc:
            self.stats.failed(req.TYPE, "DOWN", time.perf_counter() - start)
            if exc.hung:
                self._went_silent(server, exc)
            raise
        except ServerError as exc:
            self.stats.failed(req.TYPE, exc.code, time.perf_counter() - start)
            raise
        self.stats.of(req.TYPE).record(
            time.perf_counter() - start, len(payload), len(reply.payload)
        )
        return reply

    def _went_silent(self, server: int, exc: ServerDown) -> None:
        if server in self.hung:
            return
        self.hung[server] = exc
        self.hangs[server] += 1
        self.drop(server)
        self._probes[server] = asyncio.ensure_future(self._probe(server))

    async def _probe(self, server: int) -> None:
        """Every timeout, until the silent server answers HELLO again."""
        while True:
            await asyncio.sleep(self.timeout)
            try:
                conn = await self._connect(server)
            except MirrorfsError:
                continue
            self._conns[server] = conn
            self.hung.pop(server, None)
            self._probes.pop(server, None)
            return

    def revived(self, server: int) -> None:
        """A server found silent answered on another connection (a healer's): use it again
        at once, on a new connection."""
        self.hung.pop(server, None)
        probe = self._probes.pop(server, None)
        if probe is not None:
            probe.cancel()
        self.drop(server)

    def drop(self, server: int) -> None:
        """Close the connection to a server given up on (a later call connects anew)."""
        conn = self._conns.pop(server, None)
        if conn is not None:
            conn.close()

    async def close(self) -> None:
        for probe in self._probes.values():
            probe.cancel()
        self._probes.clear()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
