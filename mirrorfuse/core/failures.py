"""The failure table as a state machine: which servers may be read, written, rebuilt.

Every server holds a copy of the table (one state per server and a
generation). The volume feeds it a server's failure, the rebuild feeds it
"rebuild begins" and "rebuild done"; each event is checked against the
transition table below and its guards, so no caller can make a pair lose its
last live copy on paper or re-admit a server that was never rebuilt. The
table only changes here; persisting it (with the next generation) is the
caller's business. No I/O.
"""

from __future__ import annotations

from enum import Enum

from mirrorfuse.wire.messages import State, Table

from .layout import mirror_of, replicas

ALIVE, FAILED, REBUILDING = State.ALIVE, State.FAILED, State.REBUILDING


class Event(Enum):
    FAIL = "fail"  # refused, reset, an error, or silent past the timeout
    BEGIN_REBUILD = "begin a rebuild"  # a copy of its mirror's blocks starts
    REBUILT = "finish a rebuild"  # the copy is complete and synced


# (state, event) -> next state. Anything not listed is refused.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (ALIVE, Event.FAIL): FAILED,
    (REBUILDING, Event.FAIL): FAILED,
    (FAILED, Event.FAIL): FAILED,
    (FAILED, Event.BEGIN_REBUILD): REBUILDING,
    (REBUILDING, Event.BEGIN_REBUILD): REBUILDING,  # a rebuild run again
    (REBUILDING, Event.REBUILT): ALIVE,
}


class NotAllowed(Exception):
    """The event does not apply to the server in its state; the message says why."""


class LastCopy(NotAllowed):
    """The server is the last live copy of its pair: it is never marked failed."""


def fresh(count: int) -> Table:
    return Table(gen=1, states=(ALIVE,) * count)


def may_fail(states: tuple[State, ...], server: int) -> bool:
    """A server may be marked failed unless it is the last live copy of its pair."""
    if states[server] == REBUILDING:
        return True
    return states[server] == ALIVE and states[mirror_of(server)] == ALIVE


def transition(states: tuple[State, ...], server: int, event: Event) -> tuple[State, ...]:
    """The states after ``event`` happened to ``server`` (the same tuple when nothing changes)."""
    current = states[server]
    nxt = TRANSITIONS.get((current, event))
    if nxt is None:
        raise NotAllowed(f"server {server} is {current.value}: cannot {event.value}")
    mirror = states[mirror_of(server)]
    if event is Event.FAIL and current == ALIVE and mirror != ALIVE:
        raise LastCopy(f"server {server} is the last live copy of mirror pair {server // 2}")
    if event is Event.BEGIN_REBUILD and mirror != ALIVE:
        raise NotAllowed(
            f"server {server}'s mirror, server {mirror_of(server)}, is {mirror.value}: "
            "there is no copy to rebuild from"
        )
    if nxt == current:
        return states
    return states[:server] + (nxt,) + states[server + 1 :]


def readable(states: tuple[State, ...], pair: int) -> list[int]:
    """The servers of a pair that hold every block: reads go to them."""
    return [s for s in replicas(pair) if states[s] == ALIVE]


def writable(states: tuple[State, ...], pair: int) -> list[int]:
    """The servers of a pair that take writes: the live ones and one being rebuilt."""
    return [s for s in replicas(pair) if states[s] in (ALIVE, REBUILDING)]


def holders(states: tuple[State, ...]) -> list[int]:
    """Every server that takes writes (the metadata goes to all of them)."""
    return [s for s, st in enumerate(states) if st in (ALIVE, REBUILDING)]


def newest(*tables: Table | None) -> Table | None:
    """The table with the highest generation: every copy converges on it."""
    present = [t for t in tables if t is not None]
    return max(present, key=lambda t: t.gen, default=None)


def problem(table: Table, count: int) -> str | None:
    """Why a table cannot be a volume's table, or None (checked by servers before adopting)."""
    if len(table.states) != count:
        return f"a table of {len(table.states)} states for {count} servers"
    if table.gen < 1:
        return f"table generation {table.gen} is not positive"
    for pair in range(count // 2):
        if not readable(table.states, pair):
            return f"mirror pair {pair} has no live server in the table"
    return None
