"""RAID-10 placement: logical block -> mirror pair -> replicas and slot.

Server 2k and 2k+1 form pair k. Logical block L lives on pair L mod P at slot
L div P on both servers, so a run of consecutive blocks is striped over every
pair. Pure arithmetic, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


def mirror_of(server: int) -> int:
    return server ^ 1


def replicas(pair: int) -> tuple[int, int]:
    return 2 * pair, 2 * pair + 1


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
        return replicas(pair)

    def mirror_of(self, server: int) -> int:
        return mirror_of(server)

    def pair_of_server(self, server: int) -> int:
        return server // 2

    def block_of(self, pair: int, slot: int) -> int:
        """The logical block stored at ``slot`` of ``pair`` (inverse of pair_of/slot_of)."""
        return slot * self.pairs + pair

    def place(self, block: int) -> tuple[int, int, tuple[int, int]]:
        """(pair, slot, replicas) of a logical block."""
        pair = block % self.pairs
        return pair, block // self.pairs, replicas(pair)
