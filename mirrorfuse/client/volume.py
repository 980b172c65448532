"""The mirrored block volume: parallel mirrored writes, balanced reads, failure table.

Every server keeps a copy of the failure table (a state per server and a
generation). A client marks a replica failed when it refuses, resets, errors
or stops answering, and persists the new table on the survivors before going
on, so every later client knows. Writes carry the client's table generation;
a server with a newer table refuses them (STALE), the client reloads the table
and retries. That is what lets a rebuild add a replica under a live mount: no
client can go on writing to one replica only once the rebuild has started.

The last live replica of a pair is never marked failed: while it is out of
reach, operations on that pair fail with EIO and are retried on later calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import xxhash

from mirrorfuse.client.connection import Connection, ServerDown
from mirrorfuse.core.layout import Layout
from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.errors import MirrorfsError, ServerError, VolumeIOError
from mirrorfuse.wire.frames import Flag, Frame, Msg

T = TypeVar("T")

ALIVE, FAILED, REBUILDING = "alive", "failed", "rebuilding"
DEFAULT_TIMEOUT = 3.0
DEFAULT_CONCURRENCY = 64
LAST_COPY_TRIES = 3  # attempts on the last live copy of a pair before EIO


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where available: it writes frames with writev instead of joining buffers."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def checksum(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


class NoSpace(MirrorfsError):
    errno = errno.ENOSPC


class Fenced(MirrorfsError):
    """Another client took the volume over: this one must stop changing it."""

    errno = errno.EROFS


@dataclass
class ClientStats:
    """What this client saw, per server: reads served to it, bad copies found."""

    reads: list[int] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)


def _also_failing(
    change: Callable[[list[str]], list[str]],
    servers: list[int],
    may_fail: Callable[[list[str], int], bool],
) -> Callable[[list[str]], list[str]]:
    """A table change that also marks ``servers`` failed (those found unreachable on the way)."""

    def changed(states: list[str]) -> list[str]:
        states = change(states)
        for s in servers:
            if may_fail(states, s):
                states[s] = FAILED
        return states

    return changed


class Volume:
    """An open mirrored volume; every method runs on one asyncio event loop."""

    def __init__(self, spec: ClusterSpec, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.spec = spec
        self.timeout = timeout
        self.layout = Layout(spec.count)
        self.volume_id: str | None = None
        self.block_size = 0
        self.gen = 0
        self.states: list[str] = [ALIVE] * spec.count
        self.stats = ClientStats([0] * spec.count, [0] * spec.count, [0] * spec.count)
        self.on_failure: Callable[[int, str], None] | None = None
        self._conns: dict[int, Connection] = {}
        self._connecting: dict[int, asyncio.Future[Connection]] = {}
        self._rr = [0] * self.layout.pairs
        self._table_lock = asyncio.Lock()
        self._refresh: asyncio.Task[None] | None = None
        self._announced: set[int] = set()
        self._strikes: dict[int, int] = {}  # failed attempts on a pair's last live copy
        # Set by the mount once it holds the lease: every change carries its
        # epoch so the servers can fence it if another client takes over.
        self.lease: dict[str, Any] | None = None

    # -- connections --------------------------------------------------------------

    async def _conn(self, server: int) -> Connection:
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
        conn = await Connection.open(
            server, self.spec.addresses[server], self.timeout, self._saw_gen
        )
        body = {"volume": self.volume_id} if self.volume_id else {}
        try:
            hello = await conn.request(Msg.HELLO, body)
        except ServerError as exc:
            conn.close()
            raise ServerDown(server, conn.address, f"refused: {exc}") from None
        got = hello.body.get("server")
        if got != server:
            conn.close()
            raise MirrorfsError(
                f"{conn.address} answers as server {got}, expected server {server} "
                "(servers must be given in id order)"
            )
        if self.lease is not None and hello.body.get("formatted"):
            # a new connection: tell the server this is still the lease holder
            try:
                await conn.request(Msg.LEASE, dict(self.lease))
            except ServerError as exc:
                conn.close()
                raise ServerDown(server, conn.address, f"refused the lease: {exc}") from None
        self._conns[server] = conn
        return conn

    async def _send(
        self, server: int, type_: int, body: dict[str, Any], payload: bytes = b"", flags: int = 0
    ) -> Frame:
        conn = await self._conn(server)
        reply = await conn.request(type_, body, payload, flags)
        if self._strikes:
            self._strikes.pop(server, None)
        return reply

    def _saw_gen(self, server: int, gen: int) -> None:
        if gen > self.gen and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.ensure_future(self.refresh_table())

    # -- opening ------------------------------------------------------------------

    async def open(self) -> None:
        """Connect to every server, check they form one volume, load the newest table."""
        results = await asyncio.gather(
            *(self._conn(i) for i in range(self.spec.count)), return_exceptions=True
        )
        hellos: dict[int, dict[str, Any]] = {}
        down: dict[int, str] = {}
        for i, res in enumerate(results):
            if isinstance(res, ServerDown):
                down[i] = res.reason
            elif isinstance(res, BaseException):
                raise res
            else:
                hellos[i] = (await res.request(Msg.STAT)).body
        formatted = {i: h for i, h in hellos.items() if h.get("formatted")}
        if not formatted:
            if hellos:
                raise MirrorfsError("the volume is not formatted (run: mirrorfs-cli format ...)")
            raise MirrorfsError("no server of the cluster is reachable")
        newest = max(formatted.values(), key=lambda h: h["table"]["gen"])
        self.volume_id = newest["volume"]
        for i, h in formatted.items():
            if h["volume"] != self.volume_id:
                raise MirrorfsError(
                    f"server {i} ({self.spec.addresses[i]}) belongs to volume {h['volume']}, "
                    f"not {self.volume_id}"
                )
            if h["count"] != self.spec.count:
                raise MirrorfsError(
                    f"the volume has {h['count']} servers but {self.spec.count} were named"
                )
        self.block_size = int(newest["block_size"])
        self.gen = int(newest["table"]["gen"])
        self.states = list(newest["table"]["states"])
        for i in hellos.keys() - formatted.keys():
            if self.states[i] == ALIVE:
                raise MirrorfsError(
                    f"server {i} ({self.spec.addresses[i]}) is not formatted but the volume "
                    "counts it alive"
                )
        for pair in range(self.layout.pairs):
            live = [s for s in self.layout.replicas(pair) if self.states[s] == ALIVE]
            if not any(s in hellos for s in live):
                detail = "; ".join(f"server {s} {down.get(s, self.states[s])}" for s in live)
                raise VolumeIOError(f"mirror pair {pair} has no live server ({detail or 'failed'})")
        for i, reason in down.items():
            if self.states[i] != FAILED:
                await self.fail(i, reason)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    # -- the failure table ----------------------------------------------------------

    def readable(self, pair: int) -> list[int]:
        return [s for s in self.layout.replicas(pair) if self.states[s] == ALIVE]

    def writable(self, pair: int) -> list[int]:
        return [s for s in self.layout.replicas(pair) if self.states[s] in (ALIVE, REBUILDING)]

    async def refresh_table(self) -> None:
        """Adopt the newest table held by any reachable, non-failed server."""
        targets = [s for s in range(self.spec.count) if self.states[s] != FAILED]
        replies = await asyncio.gather(
            *(self._send(s, Msg.GET_TABLE, {}) for s in targets), return_exceptions=True
        )
        for reply in replies:
            if isinstance(reply, Frame) and reply.body["gen"] > self.gen:
                self.gen = reply.body["gen"]
                self.states = list(reply.body["states"])

    async def update_table(self, change: Callable[[list[str]], list[str]]) -> None:
        """Apply ``change`` to the newest table and persist it on every non-failed server."""
        async with self._table_lock:
            for _ in range(10):
                new = change(list(self.states))
                if new == self.states:
                    return
                gen = self.gen + 1
                targets = [s for s in range(self.spec.count) if new[s] != FAILED]
                body: dict[str, Any] = {"gen": gen, "states": new}
                if self.lease is not None:
                    body["epoch"] = self.lease["epoch"]
                replies = await asyncio.gather(
                    *(self._send(s, Msg.SET_TABLE, body) for s in targets), return_exceptions=True
                )
                frames = [r for r in replies if isinstance(r, Frame)]
                rejected = [r.body for r in frames if not r.body["accepted"]]
                if len(rejected) < len(frames):
                    self.gen, self.states = gen, new
                for other in rejected:  # another client moved the table on: merge, go again
                    if other["gen"] >= self.gen:
                        self.gen, self.states = other["gen"], list(other["states"])
                unreachable = [
                    s
                    for s, r in zip(targets, replies, strict=True)
                    if not isinstance(r, Frame) and self._may_fail(new, s)
                ]
                if not rejected and not unreachable:
                    return
                if unreachable:
                    change = _also_failing(change, unreachable, self._may_fail)
            raise MirrorfsError("could not persist the failure table (it keeps changing)")

    def _may_fail(self, states: list[str], server: int) -> bool:
        """A server may be marked failed unless it is the last live copy of its pair."""
        if states[server] == REBUILDING:
            return True
        return states[server] == ALIVE and states[self.layout.mirror_of(server)] == ALIVE

    async def fail(self, server: int, reason: str) -> None:
        """Mark a replica failed (persisted); raise EIO when it was the last of its pair."""
        if self.states[server] == FAILED:
            return
        if not self._may_fail(self.states, server):
            # the last copy of its pair: a slow server (its writes throttled by the
            # kernel, say) gets a few more tries before the operation fails with EIO
            self._strikes[server] = self._strikes.get(server, 0) + 1
            conn = self._conns.pop(server, None)
            if conn is not None:
                conn.close()
            if self._strikes[server] < LAST_COPY_TRIES:
                await asyncio.sleep(0.2 * self._strikes[server])
                return
            self._strikes.pop(server, None)
            raise VolumeIOError(
                f"mirror pair {server // 2} has no live server left: server {server} {reason}"
            )
        conn = self._conns.pop(server, None)
        if conn is not None:
            conn.close()

        def mark(states: list[str]) -> list[str]:
            if self._may_fail(states, server):
                states[server] = FAILED
            return states

        await self.update_table(mark)
        if self.states[server] == FAILED and server not in self._announced:
            self._announced.add(server)
            if self.on_failure is not None:
                self.on_failure(server, reason)

    def _stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        """Add the table generation (and the mount epoch) that fence stale writers."""
        body["gen"] = self.gen
        if self.lease is not None:
            body["epoch"] = self.lease["epoch"]
        return body

    async def handle_error(self, server: int, exc: BaseException) -> bool:
        """Deal with a replica's failure; True when the caller should reload and retry."""
        return await self._handle(server, exc)

    async def _handle(self, server: int, exc: BaseException) -> bool:
        if isinstance(exc, ServerDown):
            await self.fail(server, exc.reason)
            return False
        if isinstance(exc, ServerError):
            if exc.code == "STALE":
                await self.refresh_table()
                return True
            if exc.code == "ENOSPC":
                raise NoSpace(f"no space left on server {server}")
            if exc.code == "FENCED":
                raise Fenced(f"server {server} fenced this client: {exc}")
            await self.fail(server, f"answered with an error: {exc}")
            return False
        raise exc

    # -- blocks ---------------------------------------------------------------------

    async def write(self, block: int, data: bytes, *, repair_of: int | None = None) -> int:
        """Write one block to every writable replica of its pair; returns its checksum."""
        if len(data) > self.block_size:
            raise ValueError(f"{len(data)} bytes exceed the block size {self.block_size}")
        pair, slot, _ = self.layout.place(block)
        csum = checksum(data)
        while True:
            targets = self.writable(pair)
            if not targets:
                raise VolumeIOError(f"mirror pair {pair} has no live server")
            body = self._stamp({"slot": slot, "checksum": csum})
            results = await asyncio.gather(
                *(self._send(s, Msg.WRITE, body, data) for s in targets), return_exceptions=True
            )
            retry = False
            written = 0
            for s, res in zip(targets, results, strict=True):
                if isinstance(res, BaseException):
                    retry |= await self._handle(s, res)
                else:
                    written += 1
            if not retry and written:
                return csum
            if not retry and not self.writable(pair):
                raise VolumeIOError(f"mirror pair {pair} has no live server")

    async def write_replica(self, block: int, data: bytes, server: int) -> int:
        """Write one block to one replica only (the shell's step-by-step writes).

        Raises ServerDown or ServerError as they come; the caller decides to
        ``fail`` the server. Returns the block's checksum.
        """
        csum = checksum(data)
        body = self._stamp({"slot": self.layout.slot_of(block), "checksum": csum})
        await self._send(server, Msg.WRITE, body, data)
        return csum

    async def trim(self, block: int) -> None:
        """Forget a block on every replica (its space goes back to the servers)."""
        pair, slot, _ = self.layout.place(block)
        while True:
            targets = self.writable(pair)
            results = await asyncio.gather(
                *(self._send(s, Msg.TRIM, self._stamp({"slot": slot})) for s in targets),
                return_exceptions=True,
            )
            retry = False
            for s, res in zip(targets, results, strict=True):
                if isinstance(res, BaseException):
                    retry |= await self._handle(s, res)
            if not retry:
                return

    def _next_reader(self, pair: int, tried: set[int]) -> int | None:
        live = [s for s in self.readable(pair) if s not in tried]
        if not live:
            return None
        idx = self._rr[pair]
        self._rr[pair] = idx + 1
        return live[idx % len(live)]

    async def read_from(self, block: int, expected: int | None = None) -> tuple[bytes, int]:
        """Read a block, alternating replicas; returns the data and the server that served it.

        A copy that does not match ``expected`` (or, without it, the checksum the
        server stored) is bad: the mirror serves the read and the bad copy is
        rewritten from it. A block never written reads as b"".
        """
        pair, slot, _ = self.layout.place(block)
        tried: set[int] = set()
        bad: list[int] = []
        while True:
            server = self._next_reader(pair, tried)
            if server is None:
                if bad:
                    raise VolumeIOError(f"block {block}: every copy is damaged (servers {bad})")
                raise VolumeIOError(f"mirror pair {pair} has no live server")
            tried.add(server)
            try:
                frame = await self._send(server, Msg.READ, {"slot": slot})
            except (ServerDown, ServerError) as exc:
                await self._handle(server, exc)
                if self.states[server] == ALIVE and server not in bad:
                    tried.discard(server)  # the last copy, not given up on yet: again
                continue
            data = frame.payload
            actual = checksum(data)
            stored = actual if frame.body.get("absent") else frame.body.get("checksum")
            want = stored if expected is None else expected
            if actual != want or stored != actual:
                self.stats.bad[server] += 1
                bad.append(server)
                continue
            self.stats.reads[server] += 1
            for b in bad:
                await self._repair(b, block, data)
            return data, server

    async def read_via(self, block: int, expected: int, server: int) -> bytes:
        """Read a block from the server a scheduler chose; anything wrong: the normal path."""
        if self.states[server] == ALIVE:
            try:
                frame = await self._send(server, Msg.READ, {"slot": self.layout.slot_of(block)})
                if checksum(frame.payload) == expected:
                    self.stats.reads[server] += 1
                    return frame.payload
            except (ServerDown, ServerError):
                pass
        return await self.read(block, expected)  # fails over, repairs, raises EIO

    async def read(self, block: int, expected: int | None = None) -> bytes:
        return (await self.read_from(block, expected))[0]

    async def _repair(self, server: int, block: int, data: bytes) -> None:
        slot = self.layout.slot_of(block)
        body = self._stamp({"slot": slot, "checksum": checksum(data)})
        try:
            if data:
                await self._send(server, Msg.WRITE, body, data, Flag.REPAIR)
            else:
                await self._send(server, Msg.TRIM, body, flags=Flag.REPAIR)
            self.stats.repaired[server] += 1
        except (ServerDown, ServerError) as exc:
            with contextlib.suppress(VolumeIOError):
                await self._handle(server, exc)

    async def sync(self) -> None:
        """Return when everything written so far is on stable storage of every live replica."""
        while True:
            targets = [s for s in range(self.spec.count) if self.states[s] in (ALIVE, REBUILDING)]
            results = await asyncio.gather(
                *(self._send(s, Msg.SYNC, {}) for s in targets), return_exceptions=True
            )
            failed = [
                (s, r)
                for s, r in zip(targets, results, strict=True)
                if isinstance(r, BaseException)
            ]
            for s, exc in failed:
                await self._handle(s, exc)
            if not failed:
                return

    # -- batches --------------------------------------------------------------------

    async def _bounded(
        self, jobs: Iterable[Callable[[], Awaitable[T]]], concurrency: int
    ) -> list[T]:
        sem = asyncio.Semaphore(concurrency)

        async def run(job: Callable[[], Awaitable[T]]) -> T:
            async with sem:
                return await job()

        return await asyncio.gather(*(run(j) for j in jobs))

    async def write_many(
        self, items: Iterable[tuple[int, bytes]], concurrency: int = DEFAULT_CONCURRENCY
    ) -> list[int]:
        return await self._bounded(
            ((lambda b=b, d=d: self.write(b, d)) for b, d in items), concurrency
        )

    async def read_many(
        self,
        blocks: Sequence[int],
        expected: Sequence[int | None] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> list[bytes]:
        sums = expected if expected is not None else [None] * len(blocks)
        return await self._bounded(
            ((lambda b=b, c=c: self.read(b, c)) for b, c in zip(blocks, sums, strict=True)),
            concurrency,
        )

    async def trim_many(
        self, blocks: Iterable[int], concurrency: int = DEFAULT_CONCURRENCY
    ) -> None:
        await self._bounded(((lambda b=b: self.trim(b)) for b in blocks), concurrency)


class BlockingVolume:
    """A Volume driven from ordinary threads (the FUSE driver, the CLI).

    The volume lives on a private event loop in a daemon thread; each call
    hands a coroutine to it and waits for the result.
    """

    def __init__(self, spec: ClusterSpec, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="volume")
        self._thread.start()
        self.volume = Volume(spec, timeout)
        try:
            self.call(self.volume.open())
        except BaseException:
            self.close()
            raise

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start a coroutine on the volume's loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _shutdown(self) -> None:
        await self.volume.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def write(self, block: int, data: bytes) -> int:
        return self.call(self.volume.write(block, data))

    def read(self, block: int, expected: int | None = None) -> bytes:
        return self.call(self.volume.read(block, expected))

    def trim(self, block: int) -> None:
        self.call(self.volume.trim(block))

    def write_many(self, items: Iterable[tuple[int, bytes]]) -> list[int]:
        return self.call(self.volume.write_many(list(items)))

    def read_many(
        self, blocks: Sequence[int], expected: Sequence[int | None] | None = None
    ) -> list[bytes]:
        return self.call(self.volume.read_many(blocks, expected))

    def sync(self) -> None:
        self.call(self.volume.sync())

    def close(self) -> None:
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                self.call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> BlockingVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
