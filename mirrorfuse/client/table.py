"""This client's copy of the failure table, kept in step with the servers' copies.

A client marks a replica failed when it refuses, resets, errors or stops
answering, and persists the new table on the survivors before going on, so
every later client knows. Writes carry the client's table generation; a
server with a newer table refuses them (STALE), the client reloads the table
and tries again. That is what lets a rebuild add a replica under a live
mount: no client can go on writing to one replica only once the rebuild has
started. The transitions themselves are ``core.failures``; this module does
the talking.

The last live replica of a pair is never marked failed: while it is out of
reach, operations on that pair get a few tries and then fail with EIO.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

from mirrorfuse.core import failures
from mirrorfuse.core.failures import Event
from mirrorfuse.core.layout import mirror_of
from mirrorfuse.wire.errors import MirrorfsError, ServerError, VolumeIOError
from mirrorfuse.wire.messages import GetTable, Identity, SetTable, SetTableReply, State, Table

from .cluster import Cluster
from .connection import ServerDown, WrongDirectory
from .retry import TryAgain, retry

LAST_COPY_TRIES = 3  # attempts on the last live copy of a pair before EIO


class NoSpace(MirrorfsError):
    errno = errno.ENOSPC


class Fenced(MirrorfsError):
    """Another client took the volume over: this one must stop changing it."""

    errno = errno.EROFS


class FailureTable:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.table = failures.fresh(cluster.spec.count)
        self.on_failure: Callable[[int, str], None] | None = None
        self.epoch: int | None = None  # the mount's lease epoch, once it holds one
        self.unpersisted = False  # changed here while no lease was held
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Task[None] | None = None
        self._pending: Table | None = None  # a table being persisted (connections check it)
        self._announced: set[int] = set()
        self.failures = [0] * cluster.spec.count  # times this client marked each failed
        self._strikes: dict[int, int] = {}  # failed attempts on a pair's last live copy
        self._gone: set[int] = set()  # last copies that ran out of tries: EIO at once

    @property
    def gen(self) -> int:
        return self.table.gen

    @property
    def states(self) -> tuple[State, ...]:
        return self.table.states

    def readable(self, pair: int) -> list[int]:
        return failures.readable(self.table.states, pair)

    def writable(self, pair: int) -> list[int]:
        return failures.writable(self.table.states, pair)

    def holders(self) -> list[int]:
        return failures.holders(self.table.states)

    def adopt(self, other: Table | None) -> None:
        """Take a table some server holds when it is newer than ours."""
        newest = failures.newest(self.table, other)
        if newest is not None:
            self.table = failures.normalized(newest)

    def misfit(self, server: int, hello: Identity) -> str | None:
        """Why a server's directory cannot be the one the table counts alive or healing
        (on every connection). Its age is checked while its mirror is alive: then every
        table since reached it, or it was marked failed (one behind: an update under way).
        The last copy of a pair may have missed tables; its identity must do."""
        why = None
        for table in (self.table, self._pending):  # the one being persisted fits too
            if table is None:
                continue
            mirror_alive = table.states[mirror_of(server)] == State.ALIVE
            gen = hello.gen + 1 if mirror_alive else table.gen
            why = failures.misfit(table, server, hello.ident, gen)
            if why is None:
                return None
        return why

    # -- keeping in step ------------------------------------------------------------------

    def saw_gen(self, server: int, gen: int) -> None:
        """A reply carried a newer generation than ours: fetch that table (once at a time)."""
        if gen > self.table.gen and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.ensure_future(self.refresh())

    def struck(self, server: int) -> bool:
        """The last live copy of its pair, and its last request failed."""
        return server in self._strikes or server in self._gone

    def succeeded(self, server: int) -> None:
        """A request to it worked: whatever it was, it is back."""
        if self._strikes or self._gone:
            self._strikes.pop(server, None)
            self._gone.discard(server)

    async def refresh(self) -> None:
        """Adopt the newest table held by any reachable, non-failed server."""
        targets = [s for s, st in enumerate(self.table.states) if st != State.FAILED]
        replies = await asyncio.gather(
            *(self.cluster.call(s, GetTable()) for s in targets), return_exceptions=True
        )
        for reply in replies:
            if not isinstance(reply, BaseException):
                self.adopt(reply.body)

    async def update(self, server: int, event: Event, ident: str = "", full: bool = False) -> None:
        """Feed ``event`` to the newest table and persist it on every server taking writes.

        An event the newest table does not allow (another client got there
        first) changes nothing; the caller looks at ``states`` afterwards.
        Servers found unreachable on the way are marked failed in the same table.
        ``ident``: the directory a heal begins on; ``full``: that heal copies everything.
        """
        await self._change([(server, event, ident, full)], {})

    async def learn(self, idents: dict[int, str]) -> None:
        """Record the identities of directories a table of an older version did not have
        (and bring every server taking writes up to this table)."""
        await self._change([], idents, always=True)

    async def _change(
        self,
        events: list[tuple[int, Event, str, bool]],
        idents: dict[int, str],
        always: bool = False,
    ) -> None:
        async def attempt() -> None:
            table = self.table
            for s, ev, idt, full in events:
                try:
                    table = failures.transition(table, s, ev, idt, full)
                except failures.NotAllowed:
                    continue
            if idents:
                known = tuple(idents.get(s) or i for s, i in enumerate(table.idents))
                table = Table(gen=table.gen, states=table.states, idents=known, since=table.since)
            if table == self.table and not always:
                return
            new = Table(
                gen=table.gen + 1, states=table.states, idents=table.idents, since=table.since
            )
            if self.epoch is None:
                # without the lease nothing may change on the servers (they fence it):
                # kept here, and written by ``persist`` once the lease is held
                self._count_failed(new)
                self.table = new
                self.unpersisted = True
                return
            targets = failures.holders(new.states)
            self._pending = new
            try:
                replies = await asyncio.gather(
                    *(self.cluster.call(s, SetTable(table=new, epoch=self.epoch)) for s in targets),
                    return_exceptions=True,
                )
            finally:
                self._pending = None
            answers: list[SetTableReply] = []
            unreachable = []  # to be marked failed too: never a pair's last live copy
            for s, r in zip(targets, replies, strict=True):
                if isinstance(r, BaseException):
                    if isinstance(r, ServerError) and r.code == "FENCED":
                        raise Fenced(f"server {s} fenced this client: {r}")
                    if not isinstance(r, MirrorfsError):
                        raise r
                    if failures.may_fail(new.states, s):
                        unreachable.append(s)
                else:
                    answers.append(r.body)
            if any(a.accepted for a in answers):
                self._count_failed(new)
                self.table = new
            rejected = [a.table for a in answers if not a.accepted]
            for other in rejected:  # another client moved the table on: merge, go again
                if other.gen >= self.table.gen:
                    self.table = failures.normalized(other)
            events.extend(
                (s, Event.FAIL, "", False)
                for s in unreachable
                if (s, Event.FAIL, "", False) not in events
            )
            if rejected or unreachable:
                raise TryAgain

        async with self._lock:
            await retry(attempt, "could not persist the failure table")

    async def persist(self) -> None:
        """Write what was learned before the lease was held (a server found down)."""
        if self.unpersisted:
            self.unpersisted = False
            await self._change([], {}, always=True)

    def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()

    def _count_failed(self, new: Table) -> None:
        for s, (was, now) in enumerate(zip(self.table.states, new.states, strict=False)):
            self.failures[s] += now == State.FAILED and was != State.FAILED

    # -- failures -------------------------------------------------------------------------

    async def fail(self, server: int, reason: str) -> None:
        """Mark a replica failed (persisted); raise EIO when it was the last of its pair."""
        if self.table.states[server] in (State.FAILED, State.STALE):
            return
        self.cluster.drop(server)
        if not failures.may_fail(self.table.states, server):
            # the last copy of its pair: a slow server (its writes throttled by the
            # kernel, say) gets a few more tries before the operation fails with EIO;
            # once out of tries, it is given up on until a request to it works again
            gone = VolumeIOError(
                f"mirror pair {server // 2} has no live server left: server {server} {reason}"
            )
            if server in self._gone:
                raise gone
            self._strikes[server] = self._strikes.get(server, 0) + 1
            if self._strikes[server] < LAST_COPY_TRIES:
                await asyncio.sleep(0.2 * self._strikes[server])
                return
            self._strikes.pop(server, None)
            self._gone.add(server)
            raise gone
        await self.update(server, Event.FAIL)
        if self.table.states[server] == State.FAILED and server not in self._announced:
            self._announced.add(server)
            if self.on_failure is not None:
                self.on_failure(server, reason)

    async def stale(self, server: int, reason: str) -> None:
        """A server whose directory is another one, or older: never read again until
        healed in full (EIO for its pair when it was the last copy the table counted)."""
        self.cluster.drop(server)
        if self.table.states[server] == State.STALE:
            return
        if not failures.may_fail(self.table.states, server):
            self._gone.add(server)
            raise VolumeIOError(
                f"mirror pair {server // 2} has no live server left: server {server} {reason}"
            )
        await self.update(server, Event.STALE)
        if self.on_failure is not None and self.table.states[server] == State.STALE:
            self.on_failure(server, reason)

    async def handle(self, server: int, exc: BaseException) -> bool:
        """Deal with one server's failed request; True when the caller must try again
        because its table was stale. Errors no retry can help are raised."""
        if isinstance(exc, WrongDirectory):
            await self.stale(server, exc.reason)
            return False
        if isinstance(exc, ServerDown):
            await self.fail(server, exc.reason)
            return False
        if isinstance(exc, ServerError):
            if exc.code == "STALE":
                await self.refresh()
                return True
            if exc.code == "ENOSPC":
                raise NoSpace(f"no space left on server {server}")
            if exc.code == "FENCED":
                raise Fenced(f"server {server} fenced this client: {exc}")
            await self.fail(server, f"answered with an error: {exc}")
            return False
        raise exc
