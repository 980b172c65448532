"""The namespace from a checkpoint and the journal batches after it (what a mount replays)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mirrorfuse.wire.legacy import decode_any_batch
from mirrorfuse.wire.records import RecordError

from .namespace import Namespace


@dataclass(frozen=True, slots=True)
class Batch:
    """Records ``first .. first+count-1``, as one journal entry holds them."""

    first: int
    count: int
    data: bytes

    @property
    def last(self) -> int:
        return self.first + self.count - 1


def replay(
    block_size: int,
    checkpoint: bytes | None,
    batches: Iterable[Batch],
    uid: int = 0,
    gid: int = 0,
    t: int = 0,
) -> Namespace:
    """Raises RecordError for a journal that does not follow on, or cannot be read."""
    ns = (
        Namespace.from_snapshot(checkpoint)
        if checkpoint
        else Namespace.fresh(block_size, uid, gid, t)
    )
    for batch in batches:
        if batch.first != ns.seq + 1:
            raise RecordError(f"journal batch {batch.first} does not follow record {ns.seq}")
        records = decode_any_batch(batch.data, batch.count)
        if len(records) != batch.count:
            raise RecordError(
                f"journal batch {batch.first} holds {len(records)} records, not {batch.count}"
            )
        for n, rec in enumerate(records):
            try:
                ns.apply(rec)
            except (KeyError, AssertionError, TypeError) as exc:
                seq = batch.first + n
                raise RecordError(f"journal record {seq} does not apply ({exc!r})") from None
    return ns
