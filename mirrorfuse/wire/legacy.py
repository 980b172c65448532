"""Metadata written before records were typed (data directories of format mirrorfs-1).

Such a volume mounts as it is: its journal batches (records one after the
other, no format number) and its checkpoints (format 1) are read here, and
the first mount writes a checkpoint in today's format, which replaces them.
Records had today's shape except ``attr``, which carried a map of changes;
checkpoint rows held a block map as [index, block, checksum] triples.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .records import (
    CHECKPOINT_FORMAT,
    AnyRecord,
    Attr,
    Checkpoint,
    RecordError,
    array_header,
    decode_batch,
    decode_checkpoint,
)

CHECKPOINT_V1 = 1
_any = msgspec.msgpack.Decoder(list[Any])
_encoder = msgspec.msgpack.Encoder()


def _record(raw: list[Any]) -> AnyRecord:
    if raw and raw[0] == "attr" and len(raw) == 3 and isinstance(raw[2], dict):
        changes: dict[str, Any] = raw[2]
        fields = {k: changes[k] for k in ("mode", "uid", "gid", "atime", "mtime") if k in changes}
        return Attr(raw[1], changes["ctime"], **fields)
    result: AnyRecord = msgspec.convert(raw, AnyRecord)
    return result


def decode_batch_v0(raw: bytes, count: int) -> list[AnyRecord]:
    """``count`` records encoded one after the other."""
    try:
        return [_record(r) for r in _any.decode(array_header(count) + raw)]
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError) as exc:
        raise RecordError(f"a journal record of the old format is damaged ({exc})") from None


def decode_checkpoint_v1(raw: bytes) -> Checkpoint:
    try:
        fmt, block_size, seq, next_ino, rows = _any.decode(raw)
        inodes = []
        for row in rows:
            row = list(row)
            row[12] = {i: (b, c) for i, b, c in row[12]}  # triples -> a map
            inodes.append(row)
        return msgspec.convert([fmt, block_size, seq, next_ino, inodes], Checkpoint)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        raise RecordError(f"the checkpoint of the old format is damaged ({exc})") from None


def decode_any_batch(raw: bytes, count: int) -> list[AnyRecord]:
    """A journal batch of today's format, or of the old one."""
    try:
        return decode_batch(raw)
    except RecordError as today:
        try:
            return decode_batch_v0(raw, count)
        except RecordError:
            raise today from None


def decode_any_checkpoint(raw: bytes) -> Checkpoint:
    """A checkpoint of today's format, or of the old one."""
    try:
        return decode_checkpoint(raw)
    except RecordError as today:
        try:
            old = decode_checkpoint_v1(raw)
        except RecordError:
            raise today from None
        if old.format != CHECKPOINT_V1:
            raise today from None
        old.format = CHECKPOINT_FORMAT
        return old
