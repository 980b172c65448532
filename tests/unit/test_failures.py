"""The failure table's state machine, without I/O: each transition, and any run of events
against a model that states the rules in a different way."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mirrorfuse.core import failures
from mirrorfuse.core.failures import ALIVE, FAILED, REBUILDING, Event, LastCopy, NotAllowed
from mirrorfuse.wire.messages import State, Table

A, F, R = ALIVE, FAILED, REBUILDING


def test_a_server_fails_and_comes_back_only_through_a_rebuild():
    s = failures.fresh(4).states
    s = failures.transition(s, 1, Event.FAIL)
    assert s == (A, F, A, A)
    with pytest.raises(NotAllowed, match="server 1 is failed: cannot finish a rebuild"):
        failures.transition(s, 1, Event.REBUILT)
    s = failures.transition(s, 1, Event.BEGIN_REBUILD)
    assert s == (A, R, A, A)
    assert failures.readable(s, 0) == [0] and failures.writable(s, 0) == [0, 1]
    s = failures.transition(s, 1, Event.REBUILT)
    assert s == (A, A, A, A)


def test_the_last_live_copy_of_a_pair_is_never_failed():
    s = (A, F, A, A)
    assert not failures.may_fail(s, 0) and failures.may_fail(s, 2)
    with pytest.raises(LastCopy, match="last live copy of mirror pair 0"):
        failures.transition(s, 0, Event.FAIL)
    # a server being rebuilt is no copy yet: its mirror is still the last one
    with pytest.raises(LastCopy):
        failures.transition((A, R, A, A), 0, Event.FAIL)
    assert failures.transition((A, R, A, A), 1, Event.FAIL) == (A, F, A, A)


def test_nothing_to_rebuild_from_and_nothing_to_rebuild():
    with pytest.raises(NotAllowed, match="server 0 is alive: cannot begin a rebuild"):
        failures.transition((A, A, A, A), 0, Event.BEGIN_REBUILD)
    with pytest.raises(NotAllowed, match="cannot finish a rebuild"):
        failures.transition((A, A, A, A), 0, Event.REBUILT)


def test_repeated_events_change_nothing():
    s = (A, F, A, A)
    assert failures.transition(s, 1, Event.FAIL) is s
    r = (A, R, A, A)
    assert failures.transition(r, 1, Event.BEGIN_REBUILD) is r


def test_the_newest_table_wins_and_a_bad_one_is_named():
    old, new = Table(gen=3, states=(A, A, A, A)), Table(gen=4, states=(A, F, A, A))
    assert failures.newest(old, None, new) is new and failures.newest() is None
    assert failures.problem(new, 4) is None
    assert "2 states for 4 servers" in str(failures.problem(Table(gen=2, states=(A, A)), 4))
    assert "pair 1 has no live server" in str(
        failures.problem(Table(gen=2, states=(A, A, F, F)), 4)
    )
    assert "not positive" in str(failures.problem(Table(gen=0, states=(A,) * 4), 4))


def model_next(states: list[State], server: int, event: Event) -> State | None:
    """The rules as a user would state them; None: refused."""
    me, mirror = states[server], states[server ^ 1]
    if event is Event.FAIL:
        if me == ALIVE:
            return FAILED if mirror == ALIVE else None  # never the last live copy
        return FAILED  # failed stays failed; a rebuild target can always fail
    if event is Event.BEGIN_REBUILD:
        return REBUILDING if me != ALIVE and mirror == ALIVE else None
    return ALIVE if me == REBUILDING else None  # REBUILT


class Table8(RuleBasedStateMachine):
    """Eight servers, any events in any order: the machine agrees with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.states = failures.fresh(8).states
        self.model = list(self.states)
        self.refused = 0

    @rule(server=st.integers(0, 7), event=st.sampled_from(list(Event)))
    def event(self, server: int, event: Event) -> None:
        want = model_next(self.model, server, event)
        may_fail = failures.may_fail(self.states, server)
        try:
            got = failures.transition(self.states, server, event)
        except LastCopy:
            assert want is None and event is Event.FAIL and not may_fail
            self.refused += 1
            return
        except NotAllowed:
            assert want is None
            self.refused += 1
            return
        assert want is not None, (self.model, server, event)
        if event is Event.FAIL and self.model[server] != FAILED:
            assert may_fail
        self.model[server] = want
        self.states = got
        assert list(self.states) == self.model

    @precondition(lambda self: any(s != ALIVE for s in self.model))
    @rule(data=st.data())
    def heal_one(self, data: st.DataObject) -> None:
        """What a rebuild does: begin, then done (each step may be refused)."""
        server = data.draw(st.sampled_from([i for i, s in enumerate(self.model) if s != ALIVE]))
        for event in (Event.BEGIN_REBUILD, Event.REBUILT):
            self.event(server, event)

    @invariant()
    def every_pair_keeps_a_live_server(self) -> None:
        for pair in range(4):
            assert failures.readable(self.states, pair)
            assert set(failures.readable(self.states, pair)) <= set(
                failures.writable(self.states, pair)
            )
        assert failures.problem(Table(gen=1, states=self.states), 8) is None

    @invariant()
    def a_server_is_rebuilt_only_from_a_live_mirror(self) -> None:
        for s, state in enumerate(self.states):
            if state == REBUILDING:
                assert self.states[s ^ 1] == ALIVE

    @invariant()
    def holders_are_the_writable_servers(self) -> None:
        writable = {s for p in range(4) for s in failures.writable(self.states, p)}
        assert set(failures.holders(self.states)) == writable


Table8.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
test_any_run_of_events_agrees_with_the_model = Table8.TestCase
