"""The client's failure table against scripted servers (no processes): what it persists,
when it tries again, when it stops."""

from __future__ import annotations

import asyncio

import pytest

from mirrorfuse.client.connection import ServerDown
from mirrorfuse.client.table import FailureTable, Fenced
from mirrorfuse.core.failures import ALIVE, FAILED, Event
from mirrorfuse.wire.addresses import from_base_port
from mirrorfuse.wire.errors import ServerError, VolumeIOError
from mirrorfuse.wire.messages import SetTable, SetTableReply, Table

A, F = ALIVE, FAILED


class Servers:
    """Each server holds a table; a server in ``down`` does not answer."""

    def __init__(self, count: int = 4) -> None:
        self.spec = from_base_port(20000, count)
        self.tables = [Table(gen=1, states=(A,) * count) for _ in range(count)]
        self.down: set[int] = set()
        self.fenced: set[int] = set()
        self.calls = 0

    async def call(self, server: int, req, payload=b"", flags=0):
        self.calls += 1
        if server in self.down:
            raise ServerDown(server, self.spec.addresses[server], "did not answer")
        if server in self.fenced:
            raise ServerError("FENCED", "another mount took over", server)
        assert isinstance(req, SetTable)
        mine = self.tables[server]
        accepted = req.table.gen > mine.gen
        if accepted:
            self.tables[server] = req.table

        class R:
            body = SetTableReply(accepted=accepted, table=self.tables[server])

        return R()

    def drop(self, server: int) -> None:
        pass


def table_of(servers: Servers, epoch: int | None = 1) -> FailureTable:
    t = FailureTable(servers)  # type: ignore[arg-type]
    t.epoch = epoch  # a client holding the lease (the servers fence any other)
    return t


def test_without_the_lease_a_failure_is_kept_here_until_the_lease_is_held():
    s = Servers()
    s.down.add(1)
    t = table_of(s, epoch=None)
    asyncio.run(t.fail(1, "did not answer"))
    assert t.states == (A, F, A, A)
    assert [x.gen for x in s.tables] == [1, 1, 1, 1]  # nothing sent
    t.epoch = 1
    asyncio.run(t.persist())
    assert t.states == (A, F, A, A)
    assert [x.gen for x in s.tables] == [t.gen, 1, t.gen, t.gen] and t.gen > 1


def test_a_failure_is_persisted_on_every_server_still_taking_writes():
    s = Servers()
    s.down.add(1)
    t = table_of(s)
    asyncio.run(t.fail(1, "did not answer"))
    assert t.states == (A, F, A, A) and t.gen == 2
    assert [x.gen for x in s.tables] == [2, 1, 2, 2]  # not on the failed one


def test_a_server_found_unreachable_on_the_way_is_failed_in_the_same_table():
    s = Servers()
    s.down |= {1, 3}
    t = table_of(s)
    asyncio.run(t.fail(1, "did not answer"))
    assert t.states == (A, F, A, F)


def test_when_only_last_copies_do_not_answer_it_does_not_go_round_and_round():
    s = Servers()
    s.down |= {0, 1, 2, 3}  # this client is cut off from everyone
    t = table_of(s)
    asyncio.run(t.fail(1, "did not answer"))
    # two rounds: 1, then 2 as well (3 and 0 are then last copies, never failed); it
    # stops there instead of trying again while only last copies are silent
    assert s.calls == 3 + 2, s.calls
    assert t.states == (A, A, A, A)  # nobody could store the new table: nothing adopted


def test_a_newer_table_from_another_client_is_merged():
    s = Servers()
    other = Table(gen=5, states=(A, A, F, A))
    s.tables = [other] * 4
    t = table_of(s)
    asyncio.run(t.update(1, Event.FAIL))
    assert t.states == (A, F, F, A) and t.gen == 6
    assert s.tables[0] == s.tables[3] == t.table  # the failed ones keep the old one
    assert s.tables[1] == s.tables[2] == other


def test_a_fenced_client_stops():
    s = Servers()
    s.fenced.add(0)
    t = table_of(s)
    with pytest.raises(Fenced, match="server 0 fenced this client"):
        asyncio.run(t.update(1, Event.FAIL))


def test_the_last_copy_gets_a_few_tries_then_eio():
    s = Servers()
    t = table_of(s)
    t.table = Table(gen=3, states=(A, F, A, A))

    async def three() -> None:
        await t.fail(0, "did not answer")  # a slow server gets more time
        await t.fail(0, "did not answer")
        await t.fail(0, "did not answer")

    with pytest.raises(VolumeIOError, match="mirror pair 0 has no live server left"):
        asyncio.run(three())
    assert t.states == (A, F, A, A)  # never marked failed


def test_a_reconnected_server_must_be_as_new_as_the_table_while_its_mirror_lives():
    from mirrorfuse.wire.messages import Identity

    s = Servers()
    t = table_of(s)
    t.table = Table(gen=9, states=(A, A, F, A), idents=("d0", "d1", "d2", "d3"), since=(0,) * 4)

    def hello(server: int, ident: str, gen: int) -> Identity:
        return Identity(server=server, pid=1, formatted=True, ident=ident, gen=gen)

    assert t.misfit(1, hello(1, "d1", 9)) is None
    assert t.misfit(1, hello(1, "d1", 8)) is None  # one behind: an update under way
    assert "older copy" in str(t.misfit(1, hello(1, "d1", 7)))  # restored from a backup
    assert "another data directory" in str(t.misfit(1, hello(1, "x", 9)))
    # the last copy of its pair may have missed tables: only its identity counts
    assert t.misfit(3, hello(3, "d3", 2)) is None
    assert "another data directory" in str(t.misfit(3, hello(3, "x", 9)))
