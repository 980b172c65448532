"""A block server's part in healing: what changed while its mirror was out, and being healed.

While its mirror is failed or stale, a server notes every slot written or
trimmed (``dirty.log``, read back at start), so that a mirror coming back
with its own directory is sent only those. While it is itself being healed,
a copy loses against any newer write to the same slot, and it counts what
the healer has copied, for ``status``.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

SLOT = struct.Struct("<Q")
HEALER_QUIET = 15.0  # seconds of silence after which a healer counts as gone


class DirtySet:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.slots: set[int] = set()
        if path.exists():
            raw = path.read_bytes()
            whole = len(raw) - len(raw) % SLOT.size  # a torn last entry is dropped
            self.slots = {s for (s,) in SLOT.iter_unpack(raw[:whole])}
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def add(self, slot: int) -> None:
        if slot not in self.slots:
            self.slots.add(slot)
            os.write(self._fd, SLOT.pack(slot))

    def page(self, start: int, limit: int) -> tuple[list[int], int | None]:
        """Slots from ``start`` in order, at most ``limit``, and where to go on (None: done)."""
        ahead = sorted(s for s in self.slots if s >= start)
        if len(ahead) <= limit:
            return ahead, None
        return ahead[:limit], ahead[limit]

    def clear(self) -> None:
        self.slots.clear()
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Refusal(Exception):
    """Another healer is at work on this server."""


class NotHealing(Exception):
    """A heal's copy reached a server that is not being healed (it restarted since the
    heal began, and forgot which slots were written anew): the heal must begin again."""


class BeingHealed:
    """This server while a healer copies to it: copies never overwrite newer writes."""

    def __init__(self, healer: str, total: int) -> None:
        self.healer = healer
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.active = self.started
        self.fresh: set[int] = set()  # slots written normally since the heal began

    def takeover(self, healer: str, total: int) -> BeingHealed:
        """A healer begins: the same one saying how much it will copy, or another one
        once this one fell silent."""
        if healer == self.healer:
            self.total = total
            self.active = time.monotonic()
            return self
        if time.monotonic() - self.active < HEALER_QUIET:
            raise Refusal(f"being healed by another client ({self.healer})")
        new = BeingHealed(healer, total)
        new.fresh = self.fresh  # still newer than any copy the new healer reads
        return new

    def skip(self, slot: int, copy: bool) -> bool:
        """Whether this write is a copy of a slot that has since been written anew."""
        if not copy:
            self.fresh.add(slot)
            return False
        self.active = time.monotonic()
        self.done += 1
        return slot in self.fresh

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started
