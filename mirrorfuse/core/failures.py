"""The failure table as a state machine: which servers may be read, written, healed.

Every server holds a copy of the table: per server a state, the identity of
the data directory it should hold, and the generation at which it stopped
being alive; and one generation for the whole. The volume feeds it a
server's failure or a directory found stale; a healer feeds it "heal begins"
and "healed". Each event is checked against the transition table below and
its guards, so no caller can make a pair lose its last live copy on paper,
or re-admit a server that was not healed. The table only changes here;
persisting it (with the next generation) is the caller's business. No I/O.

* failed: out of reach; when the same directory comes back, only the blocks
  that changed since are copied to it.
* stale: its directory is another one, or older than the table says: it is
  never read, and is healed in full.
* healing: taking writes while a healer copies what it lacks.
"""

from __future__ import annotations

from enum import Enum

from mirrorfuse.wire.messages import State, Table

from .layout import mirror_of, replicas

ALIVE, FAILED, STALE, HEALING = State.ALIVE, State.FAILED, State.STALE, State.HEALING
FULL = -1  # "since" of a server whose full heal began: only another full heal completes it


class Event(Enum):
    FAIL = "fail"  # refused, reset, an error, or silent past the timeout
    STALE = "be found stale"  # its directory is another one, or older than the table says
    BEGIN_HEAL = "begin a heal"  # a copy of what it lacks starts (with its identity)
    HEALED = "finish a heal"  # the copy is complete and synced


# (state, event) -> next state. Anything not listed is refused.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (ALIVE, Event.FAIL): FAILED,
    (ALIVE, Event.STALE): STALE,
    (FAILED, Event.FAIL): FAILED,
    (FAILED, Event.STALE): STALE,
    (STALE, Event.FAIL): STALE,  # still needs a full heal, wherever it is
    (STALE, Event.STALE): STALE,
    (HEALING, Event.FAIL): FAILED,
    (HEALING, Event.STALE): STALE,
    (FAILED, Event.BEGIN_HEAL): HEALING,
    (STALE, Event.BEGIN_HEAL): HEALING,
    (HEALING, Event.BEGIN_HEAL): HEALING,  # a heal run again
    (HEALING, Event.HEALED): ALIVE,
}


class NotAllowed(Exception):
    """The event does not apply to the server in its state; the message says why."""


class LastCopy(NotAllowed):
    """The server is the last live copy of its pair: it is never taken out."""


def fresh(count: int, idents: tuple[str, ...] = ()) -> Table:
    return Table(gen=1, states=(ALIVE,) * count, idents=idents or ("",) * count, since=(0,) * count)


def normalized(table: Table) -> Table:
    """A table with an identity and a since for every server (older tables had neither)."""
    n = len(table.states)
    if len(table.idents) == n and len(table.since) == n:
        return table
    idents = tuple(table.idents[:n]) + ("",) * (n - len(table.idents))
    since = tuple(table.since[:n]) + (0,) * (n - len(table.since))
    return Table(gen=table.gen, states=table.states, idents=idents, since=since)


def may_fail(states: tuple[State, ...], server: int) -> bool:
    """A server may be taken out unless it is the last live copy of its pair."""
    return states[server] != ALIVE or states[mirror_of(server)] == ALIVE


def transition(
    table: Table, server: int, event: Event, ident: str = "", full: bool = False
) -> Table:
    """The table after ``event`` happened to ``server``, at the same generation (the same
    table when nothing changes). ``ident``: the directory a heal begins on; ``full``: that
    heal copies everything (until it ends, the directory is never caught up instead)."""
    table = normalized(table)
    states = table.states
    current = states[server]
    nxt = TRANSITIONS.get((current, event))
    if nxt is None:
        raise NotAllowed(f"server {server} is {current.value}: cannot {event.value}")
    mirror = states[mirror_of(server)]
    if current == ALIVE and mirror != ALIVE:
        raise LastCopy(f"server {server} is the last live copy of mirror pair {server // 2}")
    if event is Event.BEGIN_HEAL and mirror != ALIVE:
        raise NotAllowed(
            f"server {server}'s mirror, server {mirror_of(server)}, is {mirror.value}: "
            "there is no copy to heal from"
        )
    idents, since = list(table.idents), list(table.since)
    if event is Event.BEGIN_HEAL:
        if not ident:
            raise NotAllowed("a heal needs the identity of the directory it fills")
        idents[server] = ident
        if full:
            since[server] = FULL
    if current == ALIVE:
        since[server] = table.gen + 1  # the generation this change will be stored as
    if nxt == ALIVE:
        since[server] = 0
    new_states = states[:server] + (nxt,) + states[server + 1 :]
    new = Table(gen=table.gen, states=new_states, idents=tuple(idents), since=tuple(since))
    return table if new == table else new


def readable(states: tuple[State, ...], pair: int) -> list[int]:
    """The servers of a pair that hold every block: reads go to them."""
    return [s for s in replicas(pair) if states[s] == ALIVE]


def writable(states: tuple[State, ...], pair: int) -> list[int]:
    """The servers of a pair that take writes: the live ones and one being healed."""
    return [s for s in replicas(pair) if states[s] in (ALIVE, HEALING)]


def holders(states: tuple[State, ...]) -> list[int]:
    """Every server that takes writes (the metadata goes to all of them)."""
    return [s for s, st in enumerate(states) if st in (ALIVE, HEALING)]


def newest(*tables: Table | None) -> Table | None:
    """The table with the highest generation: every copy converges on it."""
    present = [t for t in tables if t is not None]
    return max(present, key=lambda t: t.gen, default=None)


def misfit(table: Table, server: int, ident: str, gen: int) -> str | None:
    """Why the directory a server answers with cannot be the one the table counts alive
    (or healing): another identity, or (alive) a table older than the one it was alive
    in. None: it fits."""
    table = normalized(table)
    state = table.states[server]
    if state not in (ALIVE, HEALING):
        return None
    want = table.idents[server]
    if want and ident != want:
        return f"holds another data directory ({ident[:8]}; the volume counts {want[:8]})"
    if state == ALIVE and gen < table.gen:
        return f"holds an older copy (failure table {gen}, the volume is at {table.gen})"
    return None


def can_catch_up(table: Table, server: int, ident: str, gen: int) -> bool:
    """Whether a failed server's directory is the one it left with, as it left it: then
    only what changed since needs copying. Not when a full heal of it never ended."""
    table = normalized(table)
    return (
        table.states[server] in (FAILED, HEALING)
        and table.since[server] != FULL
        and bool(ident)
        and ident == table.idents[server]
        and gen >= table.since[server] - 1
    )


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
