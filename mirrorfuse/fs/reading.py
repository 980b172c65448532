"""Committed file data: chunks through the cache, fetched as little as a read needs,
and blocks fetched ahead of a sequential reader, spread over every live mirror."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

from mirrorfuse.client.volume import Volume
from mirrorfuse.core.scheduler import Scheduler, Segment
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.records import Inode

from .base import FsError
from .cache import CHUNK, Chunk, ChunkCache
from .pending import Layer

READAHEAD_BYTES = 16 << 20
MISSES_KEPT = 100_000  # blocks whose chunk misses are counted


class Reader(ABC):
    volume: Volume
    bs: int
    cache: ChunkCache
    _turns: dict[tuple[str, ...], int]
    _misses: dict[tuple[int, int], int]
    readahead: int  # bytes fetched ahead of a sequential reader; 0 reads as asked

    @abstractmethod
    def _errno(self, exc: MirrorfsError) -> FsError: ...

    @property
    def chunk(self) -> int:
        return min(CHUNK, self.bs)

    async def _committed_range(self, node: Inode, idx: int, lo: int, hi: int) -> bytes | bytearray:
        """Bytes [lo, hi) of block ``idx`` as committed (shorter where it ends early)."""
        if node.inline is not None:
            return node.inline[lo:hi] if idx == 0 else b""
        entry = node.blocks.get(idx)
        if entry is None or hi <= lo:
            return b""
        blk, csum = entry
        ch = self.chunk
        first, last = lo // ch, (hi - 1) // ch
        futs = [self.cache.get((blk, csum, c)) for c in range(first, last + 1)]
        missing = [c for c, f in zip(range(first, last + 1), futs, strict=True) if f is None]
        if missing:
            c0, c1 = missing[0], missing[-1] + 1
            nchunks = -(-self.bs // ch)
            if not self.volume.chunk:  # whole-block checksums: the whole block comes anyway
                c0, c1 = 0, nchunks
            elif self._missed(blk, csum):  # a second miss in a block: the rest comes along
                rest = [c for c in range(nchunks) if (blk, csum, c) not in self.cache.items]
                c0, c1 = min(c0, rest[0]), max(c1, rest[-1] + 1)
            fetched = self._fetch(blk, csum, c0, c1)
            for c in missing:
                futs[c - first] = fetched[c]
        base = first * ch
        try:
            if len(futs) == 1:
                piece = await futs[0]  # type: ignore[misc]
                if lo == base and hi - lo >= len(piece):
                    return piece
                return piece[lo - base : hi - base]
            chunks = await asyncio.gather(*futs)  # type: ignore[arg-type]
        except MirrorfsError as exc:
            raise self._errno(exc) from None
        # one copy: the first and last chunks cut to the range, then joined
        views = [memoryview(c) for c in chunks]
        views[-1] = views[-1][: hi - last * ch]
        views[0] = views[0][lo - base :]
        return b"".join(views)

    def _missed(self, blk: int, csum: int) -> bool:
        """Count a miss in a block; True from its second on (random reads that keep
        landing in one block: fetching the rest at once costs less than a trip each)."""
        if len(self._misses) > MISSES_KEPT:
            self._misses.clear()
        seen = self._misses.get((blk, csum), 0)
        self._misses[(blk, csum)] = seen + 1
        return seen > 0

    def _fetch(
        self, blk: int, csum: int, c0: int, c1: int, server: int | None = None
    ) -> dict[int, asyncio.Future[Chunk]]:
        """Fetch chunks [c0, c1) of a block in one request; their futures are in the cache
        at once, so a second reader waits for this fetch instead of starting another."""
        loop = asyncio.get_running_loop()
        futs: dict[int, asyncio.Future[Chunk]] = {c: loop.create_future() for c in range(c0, c1)}
        for c, f in futs.items():
            if self.cache.items.get((blk, csum, c)) is None:
                self.cache.put((blk, csum, c), f)
        ch = self.chunk

        async def run() -> None:
            data: bytes | memoryview
            try:
                if server is not None:
                    whole = await self.volume.read_via(blk, csum, server)
                    data = memoryview(whole)[c0 * ch : c1 * ch]
                else:
                    data = await self.volume.read_range(blk, csum, c0 * ch, (c1 - c0) * ch)
            except BaseException as exc:
                for f in futs.values():
                    if not f.done():
                        f.set_exception(exc)
                        f.exception()  # retrieved: an unread failed prefetch is no error
                return
            view = memoryview(data)
            for c, f in futs.items():
                off = (c - c0) * ch
                if not f.done():
                    f.set_result(view[off : off + ch])

        loop.create_task(run())
        return futs

    def _read_ahead(self, node: Inode, layers: list[Layer], start: int) -> None:
        """Hand the blocks ahead to the live servers through the fetch scheduler.

        Equal shares across every live mirror, each block only to the servers of
        its own pair; what is cached or being fetched already is left alone.
        """
        if not self.readahead or node.inline is not None:
            return
        ahead = start + max(self.readahead // self.bs, 2)
        nblocks = -(-node.size // self.bs)
        wanted = []
        for i in range(start, min(ahead, nblocks)):
            entry = node.blocks.get(i)
            if entry is None or any(i in x.dirty or x.hides(i) for x in layers):
                continue
            if self.cache.items.get((*entry, 0)) is None:
                wanted.append((i, *entry))
        if not wanted:
            return
        vol = self.volume
        eligible = {
            k: {str(s) for s in vol.readable(vol.layout.pair_of(blk))}
            for k, (_, blk, _) in enumerate(wanted)
        }
        names = sorted({n for e in eligible.values() for n in e})
        if not names:
            return
        # the window slides a block at a time: rotate who comes first, or ties
        # would always go to the first server of each pair
        key = tuple(names)
        turn = self._turns[key] = self._turns.get(key, -1) + 1
        names = names[turn % len(names) :] + names[: turn % len(names)]
        sched = Scheduler(
            [Segment(k, k, k + 1) for k in range(len(wanted))], names, eligible=eligible
        )
        nchunks = -(-self.bs // self.chunk)
        while not sched.finished:
            progressed = False
            for name in names:
                seg = sched.next(name)
                if seg is None:
                    continue
                progressed = True
                sched.completed(name, seg.index, 0.0)
                _, blk, csum = wanted[seg.index]
                self._fetch(blk, csum, 0, nchunks, int(name))
            if not progressed:
                return
