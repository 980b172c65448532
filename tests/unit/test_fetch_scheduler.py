"""The fetch scheduler alone: every byte exactly once, whatever fails, pauses or races."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfuse.core.scheduler import (
    DEAD,
    MAX_SEGMENT,
    MIN_SEGMENT,
    SEGMENTS_PER_SOURCE,
    Scheduler,
    segment_size,
    split,
)

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


def test_end_game_races_a_late_segment_and_reports_the_loser():
    sched = Scheduler(split(200, 100), ["a", "b"])
    a = sched.next("a", now=0.0)
    b = sched.next("b", now=0.0)
    sched.completed("b", b.index, 0.1)  # b: 1000 B/s; a has not finished anything
    assert sched.next("b", now=0.1) is None  # a may still be on time: no second copy
    race = sched.next("b", now=1.0)  # a has taken 10 times b's time: b races it
    assert race.index == a.index
    assert sched.completed("b", race.index, 0.1) == ["a"]
    assert sched.finished and sched.winner[a.index] == "b"


def test_sources_of_equal_speed_never_race_so_each_byte_is_sent_once():
    """The bug: 2 segments of 1 MiB, 4 sources with 2 workers each: every idle worker raced
    a segment in flight, and a 2 MiB file cost 8 MiB."""
    names = ["s0", "s1", "s2", "s3"]
    sched = Scheduler(split(2 << 20, segment_size(2 << 20, 4)), names)
    sent = dict.fromkeys(names, 0)
    now, fetching = 0.0, {}
    while not sched.finished:
        for name in names * 2:  # two workers each
            if sum(k[0] == name for k in fetching) < 2:
                seg = sched.next(name, now)
                if seg is not None:
                    fetching[(name, seg.index)] = now
                    sent[name] += seg.length
        now += 0.1  # every fetch takes 0.1 s at every source
        for (name, index), since in list(fetching.items()):
            if (name, index) in fetching and now - since >= 0.1 - 1e-9:
                del fetching[(name, index)]
                for loser in sched.completed(name, index, now - since):
                    sched.cancelled(loser, index)
                    del fetching[(loser, index)]
    assert sent == dict.fromkeys(names, 512 << 10)  # a quarter each, nothing twice


def test_a_stalled_fetch_gets_one_racer_and_a_racer_races_one_segment():
    sched = Scheduler(split(600, 100), ["slow", "b", "c"])
    for name in ("b", "c"):  # both measured at 1000 B/s
        seg = sched.next(name, 0.0)
        sched.completed(name, seg.index, 0.1)
    stalled = [sched.next("slow", 0.0).index, sched.next("slow", 0.0).index]
    for name in ("b", "c"):
        sched.completed(name, sched.next(name, 0.1).index, 0.1)
    assert not any(sched.sources[n].queue for n in sched.sources)
    assert sched.next("b", 0.15) is None  # slow's fetches are young still
    first = sched.next("b", 5.0)
    assert first.index in stalled
    assert sched.next("b", 5.0) is None  # b races one segment at a time
    second = sched.next("c", 5.0)
    assert second.index in stalled and second.index != first.index  # one racer a segment
    assert sched.next("c", 5.0) is None
    assert sched.completed("b", first.index, 0.1) == ["slow"]
    assert sched.next("b", 5.1) is None  # the other has its racer already


def test_a_source_with_no_measured_speed_does_not_race():
    sched = Scheduler(split(100, 100), ["a", "b"])
    sched.next("a", 0.0)
    assert sched.next("b", 100.0) is None


def test_a_much_faster_source_races_a_slow_one_that_is_on_time():
    sched = Scheduler(split(400, 100), ["a", "b"])
    sched.completed("a", sched.next("a", 0.0).index, 1.0)  # a: 100 B/s
    sched.completed("b", sched.next("b", 0.0).index, 0.01)  # b: 10000 B/s
    held = sched.next("a", 1.0)
    sched.completed("b", sched.next("b", 1.0).index, 0.01)
    race = sched.next("b", 1.02)  # a needs 1 s more, b 0.01 s: worth a second copy
    assert race is not None and race.index == held.index


@given(st.integers(0, 1 << 40), st.integers(1, 64))
def test_segments_are_sized_to_the_file_and_its_sources(size, sources):
    each = segment_size(size, sources)
    assert MIN_SEGMENT <= each <= MAX_SEGMENT and each % MIN_SEGMENT == 0
    count = len(range(0, size, each))
    if each < MAX_SEGMENT:  # small enough files: not too many segments either
        assert count <= 2 * SEGMENTS_PER_SOURCE * sources
    if each > MIN_SEGMENT:  # large enough files: several segments for every source
        assert count >= SEGMENTS_PER_SOURCE * sources


def test_segment_sizes_of_some_files():
    KiB, MiB = 1 << 10, 1 << 20
    assert segment_size(2 * MiB, 4) == 64 * KiB  # 32 segments, 8 for each source
    assert segment_size(2 * MiB, 1) == 256 * KiB
    assert segment_size(10 * KiB, 4) == 64 * KiB  # one segment: a request is not free
    assert segment_size(8 * MiB, 4) == 256 * KiB
    assert segment_size(256 * MiB, 4) == MiB
    assert segment_size(100 << 30, 8) == MiB


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
