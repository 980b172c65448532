"""One retry rule: an attempt that failed for a temporary reason is repeated, boundedly.

There is one idea of a temporary failure: the attempt acted on a view that
turned out to be out of date. For the volume that view is the failure table
(a server answered STALE, a server failed so the survivors carry on alone, a
rebuild added a replica); for the index group it is "a replica will answer"
(a datagram was lost, a new master is taking over). The attempt raises
TryAgain and runs again against the new view; everything else it raises is
final and goes to the caller. The bound is the same everywhere, so a view
that never settles is reported rather than looped on.

(How long the last live copy of a pair is given before it counts as gone is
another question, answered in ``table.py``: it decides when a failure is
final, not how an operation is repeated.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from mirrorfuse.wire.errors import MirrorfsError

T = TypeVar("T")

TRIES = 20


class TryAgain(Exception):
    """This attempt's view was out of date: repeat it against the new one."""


class GaveUp(MirrorfsError):
    """Every try failed for a temporary reason."""


async def retry(attempt: Callable[[], Awaitable[T]], gave_up: str, tries: int = TRIES) -> T:
    """Run ``attempt`` until it does not raise TryAgain, at most ``tries`` times;
    ``gave_up`` is what the error says after the last try."""
    for _ in range(tries):
        try:
            return await attempt()
        except TryAgain:
            continue
    raise GaveUp(f"{gave_up} ({tries} tries)")
