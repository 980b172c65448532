"""Block numbers to hand out, and clean blocks kept in memory."""

from __future__ import annotations

import errno
import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future

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
        self.lock = threading.Lock()

    def alloc(
        self, n: int, usable: Callable[[int], bool] | None = None, period: int = 1
    ) -> list[int]:
        """``n`` free blocks, lowest first, skipping those ``usable`` refuses (a pair out of
        reach); whether a block is usable repeats every ``period`` numbers, and when no
        block of a period is, any will do (the write then fails as it must)."""
        with self.lock:
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
        with self.lock:
            for b in blocks:
                heapq.heappush(self.free, b)
                self.in_use -= 1


class BlockCache:
    """Clean blocks by (block, checksum): a block number's content changes only when reused.

    Values are futures so that a block being fetched (read-ahead) is fetched once.
    """

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max(max_blocks, 4)
        self.items: OrderedDict[tuple[int, int], Future[bytes]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> Future[bytes] | None:
        with self.lock:
            fut = self.items.get(key)
            if fut is None:
                return None
            if fut.done() and fut.exception() is not None:
                del self.items[key]  # a failed fetch is tried again next time
                return None
            self.items.move_to_end(key)
            return fut

    def put(self, key: tuple[int, int], fut: Future[bytes]) -> None:
        with self.lock:
            self.items[key] = fut
            while len(self.items) > self.max_blocks:
                self.items.popitem(last=False)
