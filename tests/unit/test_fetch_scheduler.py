"""The fetch scheduler alone: every byte exactly once, whatever fails, pauses or races."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfuse.core.scheduler import DEAD, Scheduler, split

SOURCES = ["s0", "s1", "s2", "s3"]


def drive(sched: Scheduler, events: list[tuple[int, int]], rescue: str | None = None) -> None:
    """Run the scheduler through random events; then let the live sources finish."""
    for kind, who in events:
        name = SOURCES[who % len(SOURCES)]
        st_ = sched.sources[name]
        if kind == 0:  # the source asks for work and finishes it
            seg = sched.next(name)
            if seg is not None:
                for loser in sched.completed(name, seg.index, 0.01 * (1 + who)):
                    sched.cancelled(loser, seg.index)
        elif kind == 1:  # it takes work and fails at it
            seg = sched.next(name)
            sched.failed(name, seg.index if seg else None)
        elif kind == 2 and len(sched.live()) > 1:
            sched.kill(name)
        elif kind == 3:
            sched.pause(name)
        elif kind == 4:
            sched.resume(name)
        elif kind == 5:  # takes work, leaves it in flight (a slow source)
            sched.next(name)
        assert st_.state in ("alive", "paused", DEAD)
    for name in SOURCES:
        sched.resume(name)
    # fetches in flight end one way or the other; here the live ones arrive
    for name in sched.live():
        for index in sorted(sched.sources[name].in_flight):
            for loser in sched.completed(name, index, 0.01):
                sched.cancelled(loser, index)
    # the survivors finish everything, the slow ones' in-flight segments by racing
    for _ in range(10 * len(sched.segments) + 10):
        if sched.finished:
            break
        progressed = False
        for name in sched.live():
            seg = sched.next(name)
            if seg is not None:
                progressed = True
                for loser in sched.completed(name, seg.index, 0.01):
                    sched.cancelled(loser, seg.index)
        if not progressed:
            break


events = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 700), events)
def test_every_byte_is_fetched_exactly_once(size, seg_size, evs):
    sched = Scheduler(split(size, seg_size), SOURCES)
    drive(sched, evs)
    before: set[int] = set()
    if not sched.finished:
        # only when every source died; then a resumed download fetches just the rest
        assert not sched.live()
        before = set(sched.done)
        again = Scheduler(sched.segments, ["fresh"], done=before)
        while (seg := again.next("fresh")) is not None:
            assert seg.index not in before
            again.completed("fresh", seg.index, 0.01)
        sched = again
    assert sched.finished
    covered = sorted((sched.segments[i].start, sched.segments[i].end) for i in sched.done)
    pos = 0
    for start, end in covered:  # contiguous, no overlap, no gap
        assert start == pos
        pos = end
    assert pos == size
    assert set(sched.winner) == sched.done - before  # one winning copy per segment fetched


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 300), events, st.data())
def test_resume_from_any_saved_state(size, seg_size, evs, data):
    segs = split(size, seg_size)
    first = Scheduler(segs, SOURCES)
    cut = data.draw(st.integers(0, len(evs)))
    drive_prefix = evs[:cut]
    for kind, who in drive_prefix:
        name = SOURCES[who % 4]
        if kind == 0:
            seg = first.next(name)
            if seg is not None:
                first.completed(name, seg.index, 0.01)
    saved = first.bitmap()
    done = Scheduler.done_from_bitmap(saved, len(segs))
    assert done == first.done
    again = Scheduler(segs, ["a", "b"], done=done)
    queued = [i for s in again.sources.values() for i in s.queue]
    assert sorted(queued) == sorted(set(range(len(segs))) - done)  # only what is missing
    while not again.finished:
        seg = again.next("a")
        again.completed("a", seg.index, 0.01)


def test_equal_shares_first_and_equal_redistribution_on_death():
    sched = Scheduler(split(1200, 100), ["a", "b", "c"])
    assert [list(s.queue) for s in sched.sources.values()] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
    ]
    sched.next("a")  # 0 in flight at a
    sched.kill("a")
    assert sorted([*sched.sources["b"].queue, *sched.sources["c"].queue]) == list(range(12))
    assert abs(len(sched.sources["b"].queue) - len(sched.sources["c"].queue)) <= 2


def test_idle_source_steals_the_back_half_and_paused_sources_are_taken_over():
    sched = Scheduler(split(800, 100), ["fast", "slow"])
    for _ in range(4):
        seg = sched.next("fast")
        sched.completed("fast", seg.index, 0.001)
    seg = sched.next("fast")  # its own queue is empty: steals half of slow's
    assert seg.index == 6 and list(sched.sources["slow"].queue) == [4, 5]
    sched.pause("slow")
    assert sched.next("slow") is None
    sched.completed("fast", 6, 0.001)
    got = [sched.next("fast").index for _ in range(3)]
    assert sorted(got) == [4, 5, 7]  # a paused source's whole queue is taken over


def test_end_game_races_the_last_segment_and_reports_the_loser():
    sched = Scheduler(split(200, 100), ["a", "b"])
    a = sched.next("a")
    b = sched.next("b")
    sched.completed("b", b.index, 0.1)
    race = sched.next("b")
    assert race.index == a.index
    assert sched.completed("b", race.index, 0.1) == ["a"]
    assert sched.finished and sched.winner[a.index] == "b"


def test_eligibility_keeps_segments_on_their_holders():
    eligible = {i: ({"s0", "s1"} if i % 2 == 0 else {"s2", "s3"}) for i in range(10)}
    sched = Scheduler(split(1000, 100), SOURCES, eligible=eligible)
    for name in SOURCES:
        assert all(name in eligible[i] for i in sched.sources[name].queue)
    sched.kill("s0")
    sched.kill("s1")
    assert sched.stuck  # the even segments have nobody left
    while (seg := sched.next("s2")) is not None:
        assert seg.index % 2 == 1
        sched.completed("s2", seg.index, 0.01)


def test_a_source_that_keeps_failing_is_declared_dead():
    sched = Scheduler(split(300, 100), ["a", "b"])
    for _ in range(3):
        seg = sched.next("a")
        dead = sched.failed("a", seg.index)
    assert dead and sched.sources["a"].state == DEAD
    while not sched.finished:
        seg = sched.next("b")
        sched.completed("b", seg.index, 0.01)
