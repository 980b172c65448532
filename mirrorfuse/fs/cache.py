"""Block numbers to hand out, and clean chunks of blocks kept in memory."""

from __future__ import annotations

import asyncio
import errno
import heapq
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from mirrorfuse.wire.sizes import parse_size

from .base import FsError


class Allocator:
    """Logical block numbers: lowest free first, then new ones (runs stripe over pairs)."""

    def __init__(self, used: Iterable[int], limit: int) -> None:
        taken = set(used)
        self.limit = limit
        self.next = max(taken) + 1 if taken else 0
        self.free = [b for b in range(self.next) if b not in taken]
        heapq.heapify(self.free)
        self.in_use = len(taken)

    def alloc(
        self, n: int, usable: Callable[[int], bool] | None = None, period: int = 1
    ) -> list[int]:
        """``n`` free blocks, lowest first, skipping those ``usable`` refuses (a pair out of
        reach); whether a block is usable repeats every ``period`` numbers, and when no
        block of a period is, any will do (the write then fails as it must)."""
        if self.in_use + n > self.limit:
            raise FsError(errno.ENOSPC)
        ok = usable if usable is not None and any(map(usable, range(period))) else None
        out: list[int] = []
        skipped: list[int] = []
        while len(out) < n and self.free:
            b = heapq.heappop(self.free)
            (out if ok is None or ok(b) else skipped).append(b)
        while len(out) < n:
            b = self.next
            self.next += 1
            (out if ok is None or ok(b) else skipped).append(b)
        for b in skipped:
            heapq.heappush(self.free, b)
        self.in_use += n
        return out

    def release(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            heapq.heappush(self.free, b)
            self.in_use -= 1


CHUNK = 64 << 10  # the unit of caching (and of checksums on volumes that have them)


def cache_bytes() -> int:
    """The chunk cache's size: a 32nd of the memory free now, 64 MiB to 1 GiB
    (MIRRORFS_CACHE overrides).

    The kernel's page cache, kept across opens, is the big cache of file data; this
    one serves the rest of a chunk fetched for a small read, and read-ahead. Kept
    small, its memory is reused: filling fresh memory costs more than the network
    (5 ms a MiB in page faults, measured, against 0.3 ms reusing freed memory).
    """
    if "MIRRORFS_CACHE" in os.environ:
        return parse_size(os.environ["MIRRORFS_CACHE"])
    avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return min(max(avail // 32, 64 << 20), 1 << 30)


Key = tuple[int, int, int]  # logical block, its checksum, chunk index
Chunk = bytes | memoryview  # a view into the block it came with: no copy


class ChunkCache:
    """Clean chunks by (block, checksum, chunk): a block number's content changes only
    when the block is reused, and then its checksum changes too (or it was freed).

    Values are futures so that a chunk being fetched (read-ahead) is fetched once.
    """

    def __init__(self, max_bytes: int, chunk: int = CHUNK) -> None:
        self.max_items = max(max_bytes // chunk, 64)
        self.items: OrderedDict[Key, asyncio.Future[Chunk]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Key) -> asyncio.Future[Chunk] | None:
        fut = self.items.get(key)
        if fut is None:
            self.misses += 1
            return None
        if fut.done() and (fut.cancelled() or fut.exception() is not None):
            del self.items[key]  # a failed fetch is tried again next time
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return fut

    def put(self, key: Key, fut: asyncio.Future[Chunk]) -> None:
        self.items[key] = fut
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
