"""The metadata at rest: journal records, batches, checkpoints and their on-disk headers.

A record says everything a change needs (timestamps and chosen inode and
block numbers included), so replaying the journal anywhere gives the same
namespace. Records travel in batches ``[format, [record, ...]]`` and a
checkpoint is ``[format, block size, seq, next inode, [inode, ...]]``; both
carry their format, so a journal or checkpoint written by another version is
refused with a clear message rather than misread. The servers store batches
and checkpoints without reading them, behind the fixed headers below.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Sequence

import msgspec

from .errors import MirrorfsError

RECORD_FORMAT = 1
CHECKPOINT_FORMAT = 2

# A journal entry on a server: first seq, record count, data length, epoch, crc32.
JOURNAL_ENTRY = struct.Struct("<QIIQI")
# A checkpoint file on a server: seq, data length, crc32.
CHECKPOINT_HEADER = struct.Struct("<QQI")


class RecordError(MirrorfsError):
    """Metadata that cannot be replayed: damaged, or written by another version."""


class Record(msgspec.Struct, array_like=True, tag_field="op", frozen=True):
    """A change to the namespace, encoded as [op, field, ...]."""


class Mk(Record, tag="mk", frozen=True):
    """A new inode and its first name."""

    parent: int
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    rdev: int
    t: int
    target: str | None = None  # a symlink's target


class Ln(Record, tag="ln", frozen=True):
    """Another name for an existing inode (a hard link)."""

    parent: int
    name: str
    ino: int
    t: int


class Rm(Record, tag="rm", frozen=True):
    """A name removed (unlink, rmdir)."""

    parent: int
    name: str
    t: int


class Mv(Record, tag="mv", frozen=True):
    """A rename; an existing destination is replaced."""

    src_parent: int
    src_name: str
    dst_parent: int
    dst_name: str
    t: int


class Attr(Record, tag="attr", frozen=True):
    """New attributes; None leaves one as it is."""

    ino: int
    ctime: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime: int | None = None
    mtime: int | None = None


class Data(Record, tag="data", frozen=True):
    """New content: drop block indexes >= cut, then map the new blocks, then the size.

    With ``inline``, the file's whole content is those bytes, kept in the record and
    the inode (a small file: no block server holds it), and every block is freed;
    without, the content is in blocks (a file that was inline is not any more).
    """

    ino: int
    size: int
    t: int
    new: dict[int, tuple[int, int]]  # index -> (logical block, checksum)
    cut: int | None = None
    inline: bytes | None = None


class Xset(Record, tag="xset", frozen=True):
    ino: int
    name: str
    value: bytes
    t: int


class Xdel(Record, tag="xdel", frozen=True):
    ino: int
    name: str
    t: int


class Free(Record, tag="free", frozen=True):
    """An inode with no name left and no open handle: gone, its blocks freed."""

    ino: int


AnyRecord = Mk | Ln | Rm | Mv | Attr | Data | Xset | Xdel | Free


class Inode(msgspec.Struct, array_like=True):
    """One inode as the namespace holds it and a checkpoint stores it."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int = 1
    size: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    rdev: int = 0
    target: str | None = None  # symlink target
    xattrs: dict[str, bytes] = {}
    blocks: dict[int, tuple[int, int]] = {}  # index -> (logical block, checksum)
    entries: dict[str, int] | None = None  # directories only
    parent: int = 0  # directories only: the directory holding it
    inline: bytes | None = None  # a small file's whole content (it has no blocks then)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class Checkpoint(msgspec.Struct, array_like=True):
    format: int
    block_size: int
    seq: int
    next_ino: int
    inodes: list[Inode]


_encoder = msgspec.msgpack.Encoder()
_records = msgspec.msgpack.Decoder(list[AnyRecord])
_checkpoint = msgspec.msgpack.Decoder(Checkpoint)
_outer = msgspec.msgpack.Decoder(list[msgspec.Raw])
_format = msgspec.msgpack.Decoder(int)


def encode_record(rec: Record) -> bytes:
    return _encoder.encode(rec)


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items (to frame items encoded one by one)."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_batch(encoded: Sequence[bytes]) -> bytes:
    """A batch from records already encoded one by one (as the journal queues them)."""
    return b"\x92" + _encoder.encode(RECORD_FORMAT) + array_header(len(encoded)) + b"".join(encoded)


def _versioned(raw: bytes, what: str, expected: int) -> list[msgspec.Raw]:
    try:
        parts = _outer.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise RecordError(f"the {what} is damaged ({exc})") from None
    try:
        version = _format.decode(parts[0]) if parts else None
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        version = None
    if version is None:
        raise RecordError(f"the {what} carries no format number (written by an older mirrorfs?)")
    if version != expected:
        raise RecordError(
            f"the {what} is in format {version}, this mirrorfs reads format {expected} "
            "(written by another version)"
        )
    return parts


def decode_batch(raw: bytes) -> list[AnyRecord]:
    parts = _versioned(raw, "journal batch", RECORD_FORMAT)
    if len(parts) != 2:
        raise RecordError("the journal batch is damaged (not [format, records])")
    try:
        return _records.decode(parts[1])
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise RecordError(f"a journal record is damaged or unknown ({exc})") from None


def encode_checkpoint(ckpt: Checkpoint) -> bytes:
    return _encoder.encode(ckpt)


def decode_checkpoint(raw: bytes) -> Checkpoint:
    _versioned(raw, "checkpoint", CHECKPOINT_FORMAT)
    try:
        return _checkpoint.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise RecordError(f"the checkpoint is damaged ({exc})") from None


def journal_entries(raw: bytes | bytearray) -> list[tuple[int, int, int, int, bytes]]:
    """(first, count, epoch, crc, data) of each whole entry in a JOURNAL_READ payload."""
    out = []
    pos = 0
    while pos + JOURNAL_ENTRY.size <= len(raw):
        first, count, length, epoch, crc = JOURNAL_ENTRY.unpack_from(raw, pos)
        start = pos + JOURNAL_ENTRY.size
        out.append((first, count, epoch, crc, bytes(raw[start : start + length])))
        pos = start + length
    return out
