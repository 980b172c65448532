"""The mirrored block volume: parallel mirrored writes, balanced reads, repairs.

This is the client's public API to a volume. It stands on two parts with one
job each: ``Cluster`` (the connections) and ``FailureTable`` (which replicas
may be read and written). Writes go to every writable replica of a block's
pair at once; reads alternate between the live ones, and a copy whose
checksum is wrong is read from the mirror and rewritten (read repair). A byte
range moves and checks only the chunks it touches (``wire.checksums``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from mirrorfuse.core import failures
from mirrorfuse.core.failures import Event
from mirrorfuse.core.layout import Layout
from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.checksums import WHOLE, Checked, block_checksum, check_read
from mirrorfuse.wire.errors import MirrorfsError, ServerError, VolumeIOError
from mirrorfuse.wire.frames import Flag
from mirrorfuse.wire.messages import (
    Lease,
    Message,
    Read,
    Reply,
    Request,
    Stat,
    State,
    StatReply,
    Sync,
    Trim,
    Write,
)

from .batches import bounded
from .cluster import Cluster
from .connection import KeyRefused, ServerDown
from .retry import TryAgain, retry
from .table import FailureTable

T = TypeVar("T")
R = TypeVar("R", bound=Message)

DEFAULT_TIMEOUT = 3.0
DEFAULT_CONCURRENCY = 64
Buffer = bytes | bytearray | memoryview  # block data as it comes


@dataclass
class ClientStats:
    """What this client saw, per server: reads served to it, bad copies found, block bytes
    received for reads."""

    reads: list[int] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)


class Volume:
    """An open mirrored volume; every method runs on one asyncio event loop."""

    def __init__(self, spec: ClusterSpec, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.spec = spec
        self.timeout = timeout
        self.layout = Layout(spec.count)
        self.block_size = 0
        self.chunk = WHOLE  # the volume's checksum scheme (learned at open): wire.checksums
        self.cluster = Cluster(spec, timeout)
        self.table = FailureTable(self.cluster)
        self.cluster.on_gen = self.table.saw_gen
        self.cluster.check = self.table.misfit
        self.stats = ClientStats(*([0] * spec.count for _ in range(4)))
        self._rr = [0] * self.layout.pairs

    # -- the parts, as callers use them -------------------------------------------------

    @property
    def volume_id(self) -> str | None:
        return self.cluster.volume_id

    @property
    def gen(self) -> int:
        return self.table.gen

    @property
    def states(self) -> tuple[State, ...]:
        return self.table.states

    @property
    def on_failure(self) -> Callable[[int, str], None] | None:
        return self.table.on_failure

    @on_failure.setter
    def on_failure(self, callback: Callable[[int, str], None] | None) -> None:
        self.table.on_failure = callback

    def checksum(self, data: bytes | bytearray | memoryview) -> int:
        """A block's checksum in this volume's scheme (what the block map holds)."""
        return block_checksum(data, self.chunk)

    def readable(self, pair: int) -> list[int]:
        return self.table.readable(pair)

    def writable(self, pair: int) -> list[int]:
        return self.table.writable(pair)

    def pair_usable(self, pair: int) -> bool:
        """A server of the pair takes writes and has not just been found out of reach."""
        return any(
            s not in self.cluster.hung and not self.table.struck(s) for s in self.writable(pair)
        )

    def hold_lease(self, lease: Lease) -> None:
        """From now on every change carries this mount's epoch (the servers fence older ones)."""
        self.cluster.lease = Lease(epoch=lease.epoch, holder=lease.holder)
        self.table.epoch = lease.epoch

    async def call(
        self,
        server: int,
        req: Request[R],
        payload: bytes | bytearray | memoryview = b"",
        flags: int = 0,
    ) -> Reply[R]:
        """One request to one server; failures are the caller's to hand to ``handle_error``."""
        reply = await self.cluster.call(server, req, payload, flags)
        self.table.succeeded(server)
        return reply

    async def handle_error(self, server: int, exc: BaseException) -> bool:
        """A server's request failed: mark it failed or reload the table. True: try again."""
        return await self.table.handle(server, exc)

    async def fail(self, server: int, reason: str) -> None:
        await self.table.fail(server, reason)

    async def update_table(
        self, server: int, event: Event, ident: str = "", full: bool = False
    ) -> None:
        await self.table.update(server, event, ident, full)

    async def refresh_table(self) -> None:
        await self.table.refresh()

    # -- opening --------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect to every server, check they form one volume, load the newest table."""
        results = await asyncio.gather(
            *(self.cluster.call(i, Stat()) for i in range(self.spec.count)),
            return_exceptions=True,
        )
        stats: dict[int, StatReply] = {}
        down: dict[int, str] = {}
        for i, res in enumerate(results):
            if isinstance(res, ServerDown):
                down[i] = res.reason
            elif isinstance(res, BaseException):
                raise res
            else:
                stats[i] = res.body
        formatted = {i: s for i, s in stats.items() if s.formatted and s.table is not None}
        if not formatted:
            if stats:
                raise MirrorfsError("the volume is not formatted (run: mirrorfs-cli format ...)")
            keyless = [r for r in results if isinstance(r, KeyRefused)]
            if keyless:  # the same for every server: say it once
                raise MirrorfsError(f"cannot prove the volume's key: {keyless[0]}")
            raise MirrorfsError("no server of the cluster is reachable")
        newest = max(formatted.values(), key=lambda s: s.table.gen if s.table else 0)
        self.cluster.volume_id = newest.volume
        for i, s in formatted.items():
            if s.volume != newest.volume:
                raise MirrorfsError(
                    f"server {i} ({self.spec.addresses[i]}) belongs to volume {s.volume}, "
                    f"not {newest.volume}"
                )
            if s.count != self.spec.count:
                raise MirrorfsError(
                    f"the volume has {s.count} servers but {self.spec.count} were named"
                )
        self.block_size = int(newest.block_size or 0)
        self.chunk = newest.chunk
        self.table.adopt(newest.table)
        await self._check_directories(formatted)
        for i in sorted(stats.keys() - formatted.keys()):
            if self.states[i] == State.ALIVE:  # an empty directory: healed in full
                await self.table.stale(i, "holds an empty data directory")
        for pair in range(self.layout.pairs):
            live = self.readable(pair)
            if not any(s in stats for s in live):
                detail = "; ".join(f"server {s} {down.get(s, self.states[s])}" for s in live)
                raise VolumeIOError(f"mirror pair {pair} has no live server ({detail or 'failed'})")
        for i, reason in down.items():
            if self.states[i] != State.FAILED:
                await self.fail(i, reason)

    async def _check_directories(self, found: dict[int, StatReply]) -> None:
        """Every server the table counts alive holds the directory it should, as new as the
        table: a table one generation behind is an update a client did not finish (it is
        brought up to date); further behind, or another directory, is stale."""
        table = self.table.table
        learn, behind = {}, False
        for s, st in found.items():
            if table.states[s] != State.ALIVE:
                continue
            gen = st.table.gen if st.table else 0
            why = failures.misfit(table, s, st.ident, gen + 1)
            if st.chunk != self.chunk:
                why = f"formatted with another checksum scheme (chunk {st.chunk})"
            if why:
                await self.table.stale(s, why)
                continue
            behind |= gen < table.gen
            if not table.idents[s]:
                learn[s] = st.ident  # a table from before identities: note them now
        if learn or behind:
            await self.table.learn(learn)

    async def close(self) -> None:
        self.table.close()
        await self.cluster.close()

    async def capacity_blocks(self) -> int:
        """Logical blocks the volume can hold: every pair as large as its smallest live server."""
        live = [s for s in range(self.spec.count) if self.states[s] == State.ALIVE]
        replies = await asyncio.gather(
            *(self.call(s, Stat()) for s in live), return_exceptions=True
        )
        slots = [r.body.capacity_slots for r in replies if not isinstance(r, BaseException)]
        if not slots:
            raise MirrorfsError("no live server reports its capacity")
        return min(slots) * self.layout.pairs

    # -- sending to several replicas at once ----------------------------------------------

    async def each(
        self,
        targets: Sequence[int],
        send: Callable[[int], Awaitable[T]],
    ) -> tuple[dict[int, T], bool]:
        """``send`` to every target at once. Failed servers are dealt with (marked failed,
        or the table reloaded); returns the answers and whether the table was stale."""
        results = await asyncio.gather(*(send(s) for s in targets), return_exceptions=True)
        answers: dict[int, T] = {}
        stale = False
        for s, res in zip(targets, results, strict=True):
            if isinstance(res, BaseException):
                stale |= await self.handle_error(s, res)
            else:
                answers[s] = res
        return answers, stale

    def _raced(self, gen: int, done: Sequence[int] | dict[int, Any], targets: list[int]) -> bool:
        """A change that reached only some replicas under a table since replaced (one of
        them failed on the way): sent again under the new one, so the survivor notes it
        for the failed one's heal."""
        return len(done) < len(targets) and self.gen != gen

    @staticmethod
    def _degraded(targets: list[int]) -> int:
        """A change that leaves a replica of the pair out: the others note it for its heal
        (whatever their own copy of the table says)."""
        return Flag.DEGRADED if len(targets) < 2 else 0

    def _stamp(self) -> dict[str, Any]:
        """The table generation and mount epoch that fence stale writers."""
        return {"gen": self.gen, "epoch": self.table.epoch}

    stamp = _stamp

    # -- blocks -----------------------------------------------------------------------------

    async def write(self, block: int, data: Buffer) -> int:
        """Write one block to every writable replica of its pair; returns its checksum."""
        if len(data) > self.block_size:
            raise ValueError(f"{len(data)} bytes exceed the block size {self.block_size}")
        pair, slot, _ = self.layout.place(block)
        csum = self.checksum(data)

        async def attempt() -> int:
            targets = self.writable(pair)
            if not targets:
                raise VolumeIOError(f"mirror pair {pair} has no live server")
            req = Write(slot=slot, checksum=csum, **self._stamp())
            flags = self._degraded(targets)
            written, stale = await self.each(targets, lambda s: self.call(s, req, data, flags))
            if written and not stale and not self._raced(req.gen, written, targets):
                return csum
            if not stale and not self.writable(pair):
                raise VolumeIOError(f"mirror pair {pair} has no live server")
            raise TryAgain

        return await retry(attempt, f"writing block {block}: the failure table kept changing")

    async def write_replica(self, block: int, data: bytes, server: int) -> int:
        """Write one block to one replica only (the shell's step-by-step writes).

        Raises ServerDown or ServerError as they come; the caller decides to
        ``fail`` the server. Returns the block's checksum.
        """
        csum = self.checksum(data)
        req = Write(slot=self.layout.slot_of(block), checksum=csum, **self._stamp())
        await self.call(
            server, req, data, self._degraded(self.writable(self.layout.pair_of(block)))
        )
        return csum

    async def trim(self, block: int) -> None:
        """Forget a block on every replica (its space goes back to the servers)."""
        pair, slot, _ = self.layout.place(block)

        async def attempt() -> None:
            req = Trim(slot=slot, **self._stamp())
            targets = self.writable(pair)
            flags = self._degraded(targets)
            done, stale = await self.each(targets, lambda s: self.call(s, req, flags=flags))
            if stale or self._raced(req.gen, done, targets):
                raise TryAgain

        await retry(attempt, f"trimming block {block}: the failure table kept changing")

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
        return await self._read(block, expected)

    async def read_range(self, block: int, expected: int | None, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of a block (fewer where it ends), read as by
        ``read_from`` (failover, read repair) but moving only the chunks they touch and the
        block's sums, checked end to end. Whole-block checksums: the block, sliced."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        length = min(length, self.block_size - offset)
        if length <= 0:
            return b""
        if self.chunk == WHOLE:
            return (await self.read(block, expected))[offset : offset + length]
        return (await self._read(block, expected, (offset, length)))[0]

    async def _read(
        self, block: int, expected: int | None, want: tuple[int, int] | None = None
    ) -> tuple[bytes, int]:
        """A block, or the bytes ``want`` = (offset, length) of it, and who served them."""
        pair, slot, _ = self.layout.place(block)
        req = Read(slot=slot) if want is None else Read(slot=slot, offset=want[0], length=want[1])
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
                reply = await self.call(server, req)
            except (ServerDown, ServerError) as exc:
                await self.handle_error(server, exc)
                if self.states[server] == State.ALIVE and server not in bad:
                    tried.discard(server)  # the last copy, not given up on yet: again
                continue
            good = check_read(reply.body, reply.payload, expected, self.chunk, want)
            if good is None:
                self.stats.bad[server] += 1
                bad.append(server)
                continue
            self.stats.reads[server] += 1
            self.stats.received[server] += len(reply.payload)
            if bad:
                await self._repair_from(server, block, good, bad)
            return good.data, server

    async def _repair_from(self, server: int, block: int, good: Checked, bad: list[int]) -> None:
        """Rewrite the bad copies from the good one, whole: fetched from its server when only
        chunks came (a failure meanwhile leaves them to another read)."""
        whole = good.block
        if whole is None:
            try:
                reply = await self.call(server, Read(slot=self.layout.slot_of(block)))
            except (ServerDown, ServerError) as exc:
                with contextlib.suppress(VolumeIOError):
                    await self.handle_error(server, exc)
                return
            self.stats.received[server] += len(reply.payload)
            again = check_read(reply.body, reply.payload, good.checksum, self.chunk)
            if again is None:
                return
            whole = again.data
        for b in bad:
            await self.repair(b, block, whole)

    async def read_via(self, block: int, expected: int, server: int) -> bytes:
        """Read a block from the server a scheduler chose; anything wrong: the normal path
        (which fails over and repairs), after the server's failure is dealt with."""
        if self.states[server] == State.ALIVE:
            try:
                reply = await self.call(server, Read(slot=self.layout.slot_of(block)))
                good = check_read(reply.body, reply.payload, expected, self.chunk)
                if good is not None:
                    self.stats.reads[server] += 1
                    self.stats.received[server] += len(reply.payload)
                    return good.data
            except (ServerDown, ServerError) as exc:
                with contextlib.suppress(VolumeIOError):  # the normal path says EIO
                    await self.handle_error(server, exc)
        return await self.read(block, expected)

    async def read(self, block: int, expected: int | None = None) -> bytes:
        return (await self.read_from(block, expected))[0]

    async def repair(self, server: int, block: int, data: bytes) -> bool:
        """Rewrite a copy found bad from a good one; False: the server failed instead (or
        this client holds no lease, so may change nothing: the next mount repairs it)."""
        if self.table.epoch is None:
            return False
        slot = self.layout.slot_of(block)
        try:
            if data:
                req = Write(slot=slot, checksum=self.checksum(data), **self._stamp())
                await self.call(server, req, data, Flag.REPAIR)
            else:
                await self.call(server, Trim(slot=slot, **self._stamp()), flags=Flag.REPAIR)
            self.stats.repaired[server] += 1
            return True
        except (ServerDown, ServerError) as exc:
            with contextlib.suppress(VolumeIOError):
                await self.handle_error(server, exc)
            return False

    async def sync(self, pairs: Iterable[int] = ()) -> None:
        """Return when everything written so far is on stable storage of every live replica.

        A pair lost whole (its last copy given up on) fails the sync only when it is one
        of ``pairs`` (those holding what the caller needs synced); the metadata, on
        every server, is synced on the others.
        """
        needed = set(pairs)

        async def attempt() -> None:
            targets = self.table.holders()
            results = await asyncio.gather(
                *(self.call(s, Sync()) for s in targets), return_exceptions=True
            )
            again = False
            for s, res in zip(targets, results, strict=True):
                if not isinstance(res, BaseException):
                    continue
                try:
                    await self.handle_error(s, res)
                except VolumeIOError:
                    if self.layout.pair_of_server(s) in needed:
                        raise
                    continue
                again = True  # failed now: synced by the survivors, or by it next time
            if again:
                raise TryAgain

        await retry(attempt, "syncing: the failure table kept changing")

    # -- batches ----------------------------------------------------------------------------

    async def write_many(
        self, items: Iterable[tuple[int, Buffer]], concurrency: int = DEFAULT_CONCURRENCY
    ) -> list[int]:
        return await bounded((partial(self.write, b, d) for b, d in items), concurrency)

    async def read_many(
        self,
        blocks: Sequence[int],
        expected: Sequence[int | None] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> list[bytes]:
        sums = expected if expected is not None else [None] * len(blocks)
        pairs = zip(blocks, sums, strict=True)
        return await bounded((partial(self.read, b, c) for b, c in pairs), concurrency)

    async def trim_many(
        self, blocks: Iterable[int], concurrency: int = DEFAULT_CONCURRENCY
    ) -> None:
        await bounded((partial(self.trim, b) for b in blocks), concurrency)
