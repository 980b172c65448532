"""Writes not yet sent: per block, the bytes written and which ranges they cover.

A write lands in memory at once, without reading the block it falls in: the
committed bytes around it are fetched only when the block is written out (or
read), so random 4 KiB writes cost nothing until a flush, and then one block
write per block however many landed in it. A file's pending changes form a
``Layer`` (dirty blocks, a truncation, a size); while one layer is being
written out, new writes go to the next one, and reads look through the
layers newest first, then at what is committed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


class DirtyBlock:
    """Bytes written into one block; ``spans`` are the sorted, merged [lo, hi) ranges
    they cover (the rest is whatever lies below: the committed block or zeros)."""

    __slots__ = ("data", "spans")

    def __init__(self) -> None:
        self.data: bytes | bytearray = b""  # bytes: as written whole, not copied (yet)
        self.spans: list[tuple[int, int]] = []

    def write(self, off: int, buf: bytes | bytearray | memoryview) -> None:
        end = off + len(buf)
        if not self.data and off == 0:
            self.data = buf if isinstance(buf, bytes) else bytes(buf)
            self._cover(off, end)
            return
        if isinstance(self.data, bytes):
            self.data = bytearray(self.data)  # a second write into it: copied once
        if len(self.data) < end:
            self.data.extend(bytes(end - len(self.data)))
        self.data[off:end] = buf
        self._cover(off, end)

    def _cover(self, lo: int, hi: int) -> None:
        spans = self.spans
        i = bisect.bisect_left(spans, (lo, lo))
        if i > 0 and spans[i - 1][1] >= lo:
            i -= 1
        j = i
        while j < len(spans) and spans[j][0] <= hi:
            lo = min(lo, spans[j][0])
            hi = max(hi, spans[j][1])
            j += 1
        spans[i:j] = [(lo, hi)]

    def cut(self, at: int) -> None:
        """Forget everything written at or after ``at`` (a truncation inside the block)."""
        self.data = self.data[:at]
        self.spans = [(lo, min(hi, at)) for lo, hi in self.spans if lo < at]

    def covers(self, lo: int, hi: int) -> bool:
        """Whether [lo, hi) was written whole (nothing below needs reading)."""
        if hi <= lo:
            return True
        i = bisect.bisect_right(self.spans, (lo, 1 << 62)) - 1
        return i >= 0 and self.spans[i][0] <= lo and self.spans[i][1] >= hi

    def over(self, below: bytes | bytearray | memoryview, lo: int, hi: int) -> bytearray:
        """Bytes [lo, hi) of the block: these writes laid over ``below`` (what lies under
        them at [lo, hi), zeros past its end)."""
        out = bytearray(below[: hi - lo])
        if len(out) < hi - lo:
            out.extend(bytes(hi - lo - len(out)))
        for s, e in self.spans:
            if s >= hi:
                break
            s, e = max(s, lo), min(e, hi)
            if s < e:
                out[s - lo : e - lo] = self.data[s:e]
        return out

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass
class Layer:
    """One generation of a file's unsent changes.

    ``cut``: block indexes at or past it were dropped (a truncation), before any
    block of ``dirty`` was written; ``size``: the file size these changes leave.
    """

    dirty: dict[int, DirtyBlock] = field(default_factory=dict)
    cut: int | None = None
    size: int | None = None
    mtime: int | None = None
    since: float = 0.0  # when the first change landed (monotonic), for the timer
    nbytes: int = 0  # memory the dirty blocks hold

    @property
    def empty(self) -> bool:
        return not self.dirty and self.cut is None and self.size is None

    def write(self, bs: int, off: int, buf: bytes | memoryview) -> int:
        """Lay ``buf`` in at ``off``; returns how much more memory the layer holds."""
        view = memoryview(buf)
        pos = off
        grew = 0
        if off % bs + len(buf) <= bs:  # within one block: hand the buffer itself over
            blk = self.dirty.get(off // bs)
            if blk is None:
                blk = self.dirty[off // bs] = DirtyBlock()
            before = blk.nbytes
            blk.write(off % bs, buf)
            self.nbytes += blk.nbytes - before
            return blk.nbytes - before
        while view:
            idx, boff = divmod(pos, bs)
            n = min(bs - boff, len(view))
            blk = self.dirty.get(idx)
            if blk is None:
                blk = self.dirty[idx] = DirtyBlock()
            before = blk.nbytes
            blk.write(boff, view[:n])
            grew += blk.nbytes - before
            pos += n
            view = view[n:]
        self.nbytes += grew
        return grew

    def truncate(self, bs: int, old_size: int, length: int) -> None:
        """Shrink to ``length`` (growing needs nothing: past the old end reads as zeros,
        because a shrink always zeroes the rest of the block it ends in)."""
        if length >= old_size:
            return
        keep = -(-length // bs)  # blocks that stay
        for idx in [i for i in self.dirty if i >= keep]:
            self.nbytes -= self.dirty.pop(idx).nbytes
        self.cut = keep if self.cut is None else min(self.cut, keep)
        tail = length % bs
        if tail:
            idx = length // bs
            blk = self.dirty.get(idx)
            if blk is None:
                blk = self.dirty[idx] = DirtyBlock()
            before = blk.nbytes
            blk.cut(tail)
            blk.write(tail, bytes(bs - tail))  # to the block's end: whatever lay below
            self.nbytes += blk.nbytes - before

    def hides(self, idx: int) -> bool:
        """Whether what lies below this layer at block ``idx`` was truncated away."""
        return self.cut is not None and idx >= self.cut
