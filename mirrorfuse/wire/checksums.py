"""Block checksums: a volume's scheme, chunk sums, and checking what a READ brought back.

A volume's scheme is fixed when it is formatted: ``chunk``, in bytes.

* ``chunk = 0`` (volumes formatted before chunk sums): a block's checksum is the
  xxh3-64 of its bytes; a read moves and checks the whole block.
* ``chunk > 0`` (64 KiB for new volumes): the block is cut in chunks of ``chunk``
  bytes, the last one shorter; a chunk's sum is its xxh3-64, 8 bytes little-endian;
  the block's checksum is the xxh3-64 of its sums one after another. A read of a
  few bytes moves only the chunks it touches and the block's sums (8 bytes a chunk),
  and is checked end to end: the sums hash to the checksum the block map holds,
  each chunk to its sum.

The empty block has the same checksum in both schemes (the xxh3-64 of nothing).
Servers verify writes and the client verifies reads with these same functions.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

import xxhash

from .sizes import MAX_BLOCK

WHOLE = 0  # the scheme of volumes formatted before chunk sums
CHUNK = 64 << 10  # the chunk of new volumes (smaller blocks: one chunk a block)
MIN_CHUNK = 4 << 10
SUM_SIZE = 8
MAX_SUMS = MAX_BLOCK // MIN_CHUNK * SUM_SIZE  # the sums of the largest block: 8 KiB


def valid_chunk(chunk: int, block_size: int) -> bool:
    """0 (whole blocks), or a power of two from 4 KiB up to the block size."""
    return chunk == WHOLE or (MIN_CHUNK <= chunk <= block_size and not chunk & (chunk - 1))


def default_chunk(block_size: int) -> int:
    """The scheme a new volume gets."""
    return min(CHUNK, block_size)


def count(size: int, chunk: int) -> int:
    """How many chunks (and sums) a block of ``size`` bytes has."""
    return -(-size // chunk)


def chunk_sums(data: bytes | bytearray | memoryview, chunk: int) -> bytes:
    """Every chunk's xxh3-64, 8 bytes little-endian each, one after another."""
    view = memoryview(data)
    n = count(len(view), chunk)
    digest = xxhash.xxh3_64_intdigest
    return struct.pack(f"<{n}Q", *(digest(view[i : i + chunk]) for i in range(0, n * chunk, chunk)))


def sums_checksum(sums: bytes | bytearray | memoryview) -> int:
    """A chunked block's checksum, from its sums."""
    return xxhash.xxh3_64_intdigest(sums)


def block_checksum(data: bytes | bytearray | memoryview, chunk: int) -> int:
    """A block's checksum in the volume's scheme."""
    if chunk == WHOLE:
        return xxhash.xxh3_64_intdigest(data)
    return sums_checksum(chunk_sums(data, chunk))


def covering(offset: int, length: int, size: int, chunk: int) -> tuple[int, int]:
    """The chunks bytes [offset, offset + length) of a block of ``size`` bytes touch, as
    [start, end) in the block: whole chunks (the last one may be shorter), nothing
    (start == end) for a range past the end or of no length."""
    lo, hi = min(offset, size), min(offset + length, size)
    start = lo - lo % chunk
    if hi <= lo:
        return start, start
    return start, min(size, count(hi, chunk) * chunk)


def chunks_match(
    payload: bytes | bytearray | memoryview, start: int, sums: bytes, chunk: int
) -> bool:
    """Whether each chunk of ``payload`` (which begins at chunk boundary ``start`` of the
    block) has its sum in ``sums``."""
    view = memoryview(payload)
    first = start // chunk
    for k, i in enumerate(range(0, len(view), chunk)):
        at = (first + k) * SUM_SIZE
        if at + SUM_SIZE > len(sums):
            return False
        (want,) = struct.unpack_from("<Q", sums, at)
        if xxhash.xxh3_64_intdigest(view[i : i + chunk]) != want:
            return False
    return True


class ReadAnswer(Protocol):
    """What a READ reply says (``messages.ReadReply``)."""

    @property
    def checksum(self) -> int | None: ...
    @property
    def absent(self) -> bool: ...
    @property
    def size(self) -> int | None: ...
    @property
    def start(self) -> int | None: ...
    @property
    def sums(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Checked:
    """A read that passed: the bytes asked for, the block's checksum, and the whole block
    when the reply held it (None: only the chunks of a range)."""

    data: bytes
    checksum: int
    block: bytes | None


def check_read(
    reply: ReadAnswer,
    payload: bytes | bytearray | memoryview,
    expected: int | None,
    chunk: int,
    want: tuple[int, int] | None = None,
) -> Checked | None:
    """A READ reply checked against ``expected`` (None: the checksum the server stored)
    in the scheme ``chunk``; ``want`` = (offset, length): the bytes asked for, else the
    whole block. None: the copy is bad (or the reply does not hold together)."""
    if reply.sums is None:  # the whole block: an old-scheme volume, or no range asked
        data = bytes(payload)
        actual = block_checksum(data, chunk)
        stored = actual if reply.absent else reply.checksum
        if stored != actual or (expected is not None and actual != expected):
            return None
        part = data if want is None else data[want[0] : want[0] + want[1]]
        return Checked(part, actual, data)
    size, start, sums = reply.size, reply.start, reply.sums
    if want is None or chunk == WHOLE or size is None or start is None or reply.absent:
        return None
    if len(sums) != SUM_SIZE * count(size, chunk):
        return None
    actual = sums_checksum(sums)
    if reply.checksum != actual or (expected is not None and actual != expected):
        return None
    offset, length = want
    first, end = covering(offset, length, size, chunk)
    if (
        start != first
        or len(payload) != end - first
        or not chunks_match(payload, start, sums, chunk)
    ):
        return None
    lo = offset - start
    return Checked(bytes(memoryview(payload)[lo : lo + length]), actual, None)
