"""An index replica's --data file: its state, saved whenever it changed, read at start.

The file holds the state's snapshot (``IndexState.snapshot``), written
durably. At start it is read and checked like any snapshot from the group;
one that cannot be read or does not check out is set aside (renamed
``.bad``) with one line saying why, and the replica starts empty and catches
up from the others: never a crash at every start.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from mirrorfuse.core.group import BadSnapshot, IndexState, Replica

from .files import atomic_write

log = logging.getLogger("mirrorfs-index")


def load_state(path: Path | None, rid: int = 0) -> IndexState | None:
    """The state this replica saved before it stopped, if any (it catches up from there)."""
    if path is None or not path.exists():
        return None
    try:
        return IndexState.from_snapshot(path.read_bytes())
    except (OSError, BadSnapshot) as exc:  # torn, foreign, damaged: start empty
        why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        aside = path.with_name(path.name + ".bad")
        try:
            os.replace(path, aside)
            kept = f"moved to {aside}"
        except OSError as err:
            kept = f"left in place ({err.strerror})"
        log.error(
            "replica %d: the saved state %s is unusable (%s), %s; "
            "starting empty, catching up from the group",
            rid,
            path,
            why[:300],
            kept,
        )
        return None


class Saver:
    """Keeps a replica's state in its --data file, written whenever it changed."""

    def __init__(
        self, path: Path, saved: int, write: Callable[[Path, bytes], None] = atomic_write
    ) -> None:
        self.path = path
        self.saved = saved  # the sequence the file holds
        self.write = write

    async def save(self, replica: Replica) -> None:
        state = replica.state
        if state.seq == self.saved:
            return
        seq = state.seq  # what this save holds: the state moves on while it is written
        snapshot = state.snapshot()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.write, self.path, snapshot)
            self.saved = seq
        except OSError as exc:  # a full disk: go on serving from memory, say so
            log.error("cannot save state to %s: %s", self.path, exc.strerror)
