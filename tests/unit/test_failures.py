"""The failure table's state machine, without I/O: each transition, and any run of events
against a model that states the rules in a different way."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mirrorfuse.core import failures
from mirrorfuse.core.failures import ALIVE, FAILED, HEALING, STALE, Event, LastCopy, NotAllowed
from mirrorfuse.wire.messages import State, Table

A, F, S, H = ALIVE, FAILED, STALE, HEALING


def table(*states: State, gen: int = 5) -> Table:
    n = len(states)
    return Table(gen=gen, states=states, idents=tuple(f"d{i}" for i in range(n)), since=(0,) * n)


def test_a_server_fails_and_comes_back_only_through_a_heal():
    t = failures.transition(table(A, A, A, A), 1, Event.FAIL)
    assert t.states == (A, F, A, A) and t.since == (0, 6, 0, 0)  # stored as generation 6
    with pytest.raises(NotAllowed, match="server 1 is failed: cannot finish a heal"):
        failures.transition(t, 1, Event.HEALED)
    t = failures.transition(t, 1, Event.BEGIN_HEAL, "d1")
    assert t.states == (A, H, A, A)
    assert failures.readable(t.states, 0) == [0] and failures.writable(t.states, 0) == [0, 1]
    t = failures.transition(t, 1, Event.HEALED)
    assert t.states == (A, A, A, A) and t.since == (0, 0, 0, 0)


def test_a_stale_directory_is_healed_onto_a_new_identity():
    t = failures.transition(table(A, A, A, A), 2, Event.STALE)
    assert t.states == (A, A, S, A)
    assert failures.transition(t, 2, Event.FAIL) is t  # it stays stale
    t = failures.transition(t, 2, Event.BEGIN_HEAL, "new")
    assert t.states[2] == H and t.idents[2] == "new"
    with pytest.raises(NotAllowed, match="needs the identity"):
        failures.transition(table(A, F, A, A), 1, Event.BEGIN_HEAL)


def test_the_last_live_copy_of_a_pair_is_never_taken_out():
    t = table(A, F, A, A)
    assert not failures.may_fail(t.states, 0) and failures.may_fail(t.states, 2)
    for event in (Event.FAIL, Event.STALE):
        with pytest.raises(LastCopy, match="last live copy of mirror pair 0"):
            failures.transition(t, 0, event)
    with pytest.raises(LastCopy):  # a server being healed is no copy yet
        failures.transition(table(A, H, A, A), 0, Event.FAIL)
    assert failures.transition(table(A, H, A, A), 1, Event.FAIL).states == (A, F, A, A)


def test_nothing_to_heal_from_and_nothing_to_heal():
    with pytest.raises(NotAllowed, match="server 0 is alive: cannot begin a heal"):
        failures.transition(table(A, A, A, A), 0, Event.BEGIN_HEAL, "x")
    with pytest.raises(NotAllowed, match="cannot finish a heal"):
        failures.transition(table(A, A, A, A), 0, Event.HEALED)


def test_repeated_events_change_nothing():
    t = table(A, F, A, A)
    assert failures.transition(t, 1, Event.FAIL) is t
    h = table(A, H, A, A)
    assert failures.transition(h, 1, Event.BEGIN_HEAL, "d1") is h


def test_which_directory_fits_and_which_can_catch_up():
    t = table(A, A, A, A)
    assert failures.misfit(t, 1, "d1", 5) is None
    assert "another data directory" in str(failures.misfit(t, 1, "zz", 5))
    assert "older copy" in str(failures.misfit(t, 1, "d1", 4))
    old = Table(gen=5, states=(A, A, A, A))  # a table from before identities
    assert failures.misfit(old, 1, "anything", 5) is None
    f = failures.transition(t, 1, Event.FAIL)  # failed in generation 6
    assert failures.can_catch_up(f, 1, "d1", 5)  # it left holding generation 5
    assert not failures.can_catch_up(f, 1, "d1", 4)  # an older copy of it
    assert not failures.can_catch_up(f, 1, "zz", 5)  # another directory
    assert not failures.can_catch_up(failures.transition(t, 1, Event.STALE), 1, "d1", 5)


def test_a_full_heal_cut_short_is_never_finished_as_a_catch_up():
    t = failures.transition(table(A, A, A, A), 1, Event.STALE)
    healing = failures.transition(t, 1, Event.BEGIN_HEAL, "new", full=True)
    assert "another data directory" in str(failures.misfit(healing, 1, "zz", 9))
    assert failures.misfit(healing, 1, "new", 1) is None  # healing: its table may lag
    cut = failures.transition(healing, 1, Event.FAIL)  # it failed half-filled
    assert cut.states[1] == F and not failures.can_catch_up(cut, 1, "new", 9)
    again = failures.transition(cut, 1, Event.BEGIN_HEAL, "newer", full=True)
    done = failures.transition(again, 1, Event.HEALED)
    assert done.states[1] == A and done.since[1] == 0
    later = failures.transition(done, 1, Event.FAIL)
    assert failures.can_catch_up(later, 1, "newer", later.gen)


def test_the_newest_table_wins_and_a_bad_one_is_named():
    old, new = table(A, A, A, A, gen=3), table(A, F, A, A, gen=4)
    assert failures.newest(old, None, new) is new and failures.newest() is None
    assert failures.problem(new, 4) is None
    assert "2 states for 4 servers" in str(failures.problem(Table(gen=2, states=(A, A)), 4))
    no_live = failures.problem(Table(gen=2, states=(A, A, F, F)), 4)
    assert "pair 1 has no live server" in str(no_live)
    assert "not positive" in str(failures.problem(Table(gen=0, states=(A,) * 4), 4))
    assert failures.normalized(Table(gen=2, states=(A, A))).idents == ("", "")


def model_next(states: list[State], server: int, event: Event) -> State | None:
    """The rules as a user would state them; None: refused."""
    me, mirror = states[server], states[server ^ 1]
    if me == ALIVE and event in (Event.FAIL, Event.STALE):
        return (FAILED if event is Event.FAIL else STALE) if mirror == ALIVE else None
    if event is Event.FAIL:
        return STALE if me == STALE else FAILED  # a stale one stays to be healed in full
    if event is Event.STALE:
        return STALE
    if event is Event.BEGIN_HEAL:
        return HEALING if me != ALIVE and mirror == ALIVE else None
    return ALIVE if me == HEALING else None  # HEALED


class Table8(RuleBasedStateMachine):
    """Eight servers, any events in any order: the machine agrees with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.table = failures.fresh(8, tuple(f"d{i}" for i in range(8)))
        self.model = list(self.table.states)

    @rule(server=st.integers(0, 7), event=st.sampled_from(list(Event)))
    def event(self, server: int, event: Event) -> None:
        want = model_next(self.model, server, event)
        try:
            got = failures.transition(self.table, server, event, f"n{server}")
        except NotAllowed:
            assert want is None, (self.model, server, event)
            return
        assert want is not None, (self.model, server, event)
        if self.model[server] == ALIVE:  # left alive: the generation it left in is noted
            assert got.since[server] == self.table.gen + 1
        self.model[server] = want
        self.table = Table(gen=got.gen + 1, states=got.states, idents=got.idents, since=got.since)
        assert list(self.table.states) == self.model

    @invariant()
    def every_pair_keeps_a_live_server(self) -> None:
        for pair in range(4):
            assert failures.readable(self.table.states, pair)
            assert set(failures.readable(self.table.states, pair)) <= set(
                failures.writable(self.table.states, pair)
            )
        assert failures.problem(self.table, 8) is None

    @invariant()
    def a_server_is_healed_only_from_a_live_mirror(self) -> None:
        for s, state in enumerate(self.table.states):
            if state == HEALING:
                assert self.table.states[s ^ 1] == ALIVE

    @invariant()
    def only_a_live_server_has_no_since(self) -> None:
        for s, state in enumerate(self.table.states):
            assert (self.table.since[s] == 0) == (state == ALIVE)


Table8.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
test_any_run_of_events_agrees_with_the_model = Table8.TestCase
