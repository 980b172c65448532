"""RAID-10 placement: logical block -> mirror pair -> replicas and slot.

Server 2k and 2k+1 form pair k. Logical block L lives on pair L mod P at slot
L div P on both servers, so a run of consecutive blocks is striped over every
pair. Pure arithmetic, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SERVERS = 4
MAX_SERVERS = 16


def check_count(count: int) -> None:
    """Reject a server count the layout cannot use, with the reason."""
    from mirrorfuse.wire.errors import UsageError

    if count % 2:
        raise UsageError(
            f"{count} servers is an odd number: servers work in mirror pairs (2k, 2k+1)"
        )
    if not MIN_SERVERS <= count <= MAX_SERVERS:
        raise UsageError(
            f"{count} servers: mirrorfs needs between 4 and 16 servers (an even number)"
        )


@dataclass(frozen=True, slots=True)
class Layout:
    servers: int

    @property
    def pairs(self) -> int:
        return self.servers // 2

    def pair_of(self, block: int) -> int:
        return block % self.pairs

    def slot_of(self, block: int) -> int:
        return block // self.pairs

    def replicas(self, pair: int) -> tuple[int, int]:
        return 2 * pair, 2 * pair + 1

    def mirror_of(self, server: int) -> int:
        return server ^ 1

    def block_of(self, pair: int, slot: int) -> int:
        """The logical block stored at ``slot`` of ``pair`` (inverse of pair_of/slot_of)."""
        return slot * self.pairs + pair

    def place(self, block: int) -> tuple[int, int, tuple[int, int]]:
        """(pair, slot, replicas) of a logical block."""
        pair = block % self.pairs
        return pair, block // self.pairs, (2 * pair, 2 * pair + 1)
