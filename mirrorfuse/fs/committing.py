"""Changes as journal records, and the blocks they free reused only once durable.

Every change is encoded, applied to the namespace and queued for the journal
in one step of the event loop, so journal order is apply order. Blocks a
record frees are trimmed and handed out again only after a sync made that
record durable on every live server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from typing import TYPE_CHECKING

from mirrorfuse.client.journal import Journal, JournalBroken
from mirrorfuse.client.table import Fenced, NoSpace
from mirrorfuse.client.volume import Volume
from mirrorfuse.core.namespace import Namespace
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.records import AnyRecord, encode_record

from .base import FsError
from .cache import Allocator

FREE_EVERY = 0.5  # seconds between the syncs that make freed blocks reusable


class Committer:
    volume: Volume
    ns: Namespace
    alloc: Allocator
    journal: Journal
    readonly: str | None
    _pending_free: list[tuple[int, list[int]]]  # (record, blocks it freed)
    _journaled: int  # records up to here are on every live server
    _freer: asyncio.Task[None] | None
    _free_round_lock: asyncio.Lock

    if TYPE_CHECKING:  # provided by OpenFiles

        async def sync(self, pairs: set[int] | None = None) -> None: ...

    def _commit(self, rec: AnyRecord) -> int:
        """Encode and apply a record, then queue it for the journal: one that cannot be
        encoded, or that the namespace refuses, changes nothing and is never journaled,
        where it would break every later replay."""
        if self.readonly is not None:
            raise FsError(errno.EROFS, self.readonly)
        data = encode_record(rec)
        freed = self.ns.apply(rec)
        try:
            seq = self.journal.add(data)
        except JournalBroken as exc:
            self._go_readonly(str(exc))
            raise FsError(errno.EIO) from None
        if freed:
            self._pending_free.append((seq, freed))
        if self.journal.needs_checkpoint():
            self.journal.add_checkpoint(self.ns.seq, self.ns.snapshot())
        return seq

    def _committed(self, seq: int) -> None:
        """Records up to ``seq`` are on every live server."""
        self._journaled = seq
        if self._pending_free and (self._freer is None or self._freer.done()):
            self._freer = asyncio.get_running_loop().create_task(self._free_when_durable())

    async def _free_when_durable(self) -> None:
        while await self._free_round():
            await asyncio.sleep(FREE_EVERY)  # deletions in a row share one sync

    async def _free_round(self) -> bool:
        """The blocks freed by journaled records, once a sync made those records durable on
        every live server: trimmed, then reused. (Reused before, a crash could bring back
        a record's old block map over a block that holds other data.) False: none left."""
        async with self._free_round_lock:
            upto = self._journaled
            ready = [b for s, blocks in self._pending_free if s <= upto for b in blocks]
            if not ready:
                return False
            try:
                await self.volume.sync()
            except MirrorfsError:
                return True  # not durable yet: they stay pending, tried again later
            self._pending_free = [(s, b) for s, b in self._pending_free if s > upto]
            with contextlib.suppress(MirrorfsError):  # untrimmed: wasted space until reused
                await self.volume.trim_many(ready)
            self.alloc.release(ready)
            return True

    async def _allocate(self, n: int) -> list[int]:
        """Blocks for new data, on pairs that take writes now (a lost pair fails only what
        it holds); when full, first wait for space that is being freed."""
        vol = self.volume

        def usable(block: int) -> bool:
            return vol.pair_usable(vol.layout.pair_of(block))

        try:
            return self.alloc.alloc(n, usable, vol.layout.pairs)
        except FsError:
            pass
        await self.sync()  # journals the records that free blocks
        await self._free_round()  # (after a round in progress, if there is one)
        return self.alloc.alloc(n, usable, vol.layout.pairs)

    def _go_readonly(self, why: str) -> None:
        if self.readonly is None:
            self.readonly = why

    def _errno(self, exc: MirrorfsError) -> FsError:
        """A volume failure as the errno a caller gets."""
        if isinstance(exc, Fenced):
            self._go_readonly(str(exc))
            return FsError(errno.EROFS)
        if isinstance(exc, NoSpace):
            return FsError(errno.ENOSPC)
        return FsError(exc.errno, str(exc))
