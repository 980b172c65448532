"""Segmented parallel fetching: the scheduler (pure, no I/O).

An object of ``size`` bytes is cut into numbered segments, sized to the object
and the number of sources (``segment_size``: several per source, so a small
file is shared by every source too). Each source first
gets an equal, contiguous share. A source that runs out steals the back half
of the largest queue it may serve from (so fast sources end up doing more);
a paused source keeps its queue, but others steal from it. When a source
dies its unfinished segments are divided equally among the live ones. When
nothing is left to hand out, an idle source races a segment already in
flight elsewhere (end game), but only when its measured speed says it would
finish it well before the source fetching it (a slow or stalled one), so
sources of equal speed send every byte once; the first copy to arrive wins
and the caller cancels the other. The finished-segment bitmap can be saved
and resumed.

The caller (the I/O drivers) reports what happened; the scheduler says what
to do next. Sources may be restricted to some segments (``eligible``): a
volume's block is only on the two servers of its mirror pair.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from mirrorfuse.wire.messages import Availability

ALIVE, PAUSED, DEAD = Availability.ALIVE, Availability.PAUSED, Availability.DEAD
MAX_FAILURES = 3
SEGMENTS_PER_SOURCE = 8  # enough that idle sources can take work from busy ones
MIN_SEGMENT = 64 << 10  # below this, a request's round trip costs more than its bytes
MAX_SEGMENT = 1 << 20  # larger ones were no faster on loopback (measured 1, 2, 4 MiB)
RACE_MARGIN = 2.0  # a racer must expect to finish in under 1/2 of the holder's time left


@dataclass(frozen=True, slots=True)
class Segment:
    index: int
    start: int
    end: int  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class SourceState:
    name: str
    state: Availability = ALIVE
    queue: deque[int] = field(default_factory=deque)
    in_flight: set[int] = field(default_factory=set)
    since: dict[int, float] = field(default_factory=dict)  # in flight since (the caller's clock)
    races: set[int] = field(default_factory=set)  # in flight here as a second copy
    failures: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def speed(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def segment_size(size: int, sources: int) -> int:
    """Segments for ``size`` bytes from ``sources`` sources: SEGMENTS_PER_SOURCE for each
    (or more: a multiple of MIN_SEGMENT, rounded down), from MIN_SEGMENT to MAX_SEGMENT."""
    want = size // (max(sources, 1) * SEGMENTS_PER_SOURCE)
    return max(MIN_SEGMENT, min(MAX_SEGMENT, want // MIN_SEGMENT * MIN_SEGMENT))


def split(size: int, segment_size: int) -> list[Segment]:
    return [
        Segment(i, start, min(start + segment_size, size))
        for i, start in enumerate(range(0, size, segment_size))
    ]


class Scheduler:
    def __init__(
        self,
        segments: list[Segment],
        sources: Iterable[str],
        done: Iterable[int] = (),
        eligible: dict[int, set[str]] | None = None,
    ) -> None:
        self.segments = segments
        self.sources = {name: SourceState(name) for name in sources}
        if not self.sources:
            raise ValueError("no sources")
        self.done: set[int] = set(done)
        self.eligible = eligible
        self.winner: dict[int, str] = {}
        self._share([s.index for s in segments if s.index not in self.done], self.live())

    # -- queries ----------------------------------------------------------------------------

    def live(self) -> list[str]:
        return [n for n, s in self.sources.items() if s.state != DEAD]

    def may_serve(self, source: str, index: int) -> bool:
        return self.eligible is None or source in self.eligible.get(index, ())

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.segments)

    @property
    def stuck(self) -> bool:
        """Segments remain that no live source may serve: the transfer cannot finish."""
        if self.finished:
            return False
        live = self.live()
        if self.eligible is None:  # any live source may serve any segment
            return not live
        return any(
            not any(self.may_serve(n, s.index) for n in live)
            for s in self.segments
            if s.index not in self.done
        )

    def remaining(self) -> int:
        return sum(s.length for s in self.segments if s.index not in self.done)

    # -- sharing out --------------------------------------------------------------------------

    def _share(self, indexes: list[int], among: list[str]) -> None:
        """Give segments to sources in equal contiguous runs (respecting eligibility)."""
        if not indexes:
            return
        if self.eligible is None:
            n = len(among)
            if n == 0:
                return
            per, extra = divmod(len(indexes), n)
            pos = 0
            for k, name in enumerate(among):
                take = per + (k < extra)
                self.sources[name].queue.extend(indexes[pos : pos + take])
                pos += take
            return
        counts = dict.fromkeys(among, 0)
        for i in indexes:
            able = [n for n in among if self.may_serve(n, i)]
            if able:
                best = min(able, key=lambda n: counts[n])
                counts[best] += 1
                self.sources[best].queue.append(i)

    def next(self, source: str, now: float = 0.0) -> Segment | None:
        """The next segment for an idle source, or None (nothing it may do now).

        ``now`` is the caller's clock (seconds): when the segment goes out, so the end
        game can tell a late fetch from one that is on time."""
        st = self.sources[source]
        if st.state != ALIVE:
            return None
        while st.queue:
            i = st.queue.popleft()
            if i not in self.done:
                st.in_flight.add(i)
                st.since[i] = now
                return self.segments[i]
        stolen = self._steal(source)
        if stolen:
            st.queue.extend(stolen)
            return self.next(source, now)
        return self._race(source, now)

    def _stop(self, st: SourceState, index: int) -> None:
        """``index`` is no longer in flight at this source."""
        st.in_flight.discard(index)
        st.since.pop(index, None)
        st.races.discard(index)

    def _steal(self, thief: str) -> list[int]:
        """The back half of the largest queue this source may serve from."""
        best, best_len = None, 0
        for name, other in self.sources.items():
            if name == thief:
                continue
            servable = [i for i in other.queue if self.may_serve(thief, i)]
            if len(servable) > best_len:
                best, best_len = name, len(servable)
        if best is None:
            return []
        victim = self.sources[best]
        servable = [i for i in victim.queue if self.may_serve(thief, i)]
        # a paused or dead victim gives everything, a working one the back half
        take = servable if victim.state != ALIVE else servable[len(servable) // 2 :]
        if not take:
            take = servable[-1:]
        taken = set(take)
        victim.queue = deque(i for i in victim.queue if i not in taken)
        return take

    def _race(self, source: str, now: float) -> Segment | None:
        """End game: a second copy of a segment in flight elsewhere, when this source would
        finish it in under 1/RACE_MARGIN of the time the holder is expected to take still
        (the latest one). One race at a time per source and per segment."""
        racer = self.sources[source]
        if racer.speed <= 0 or racer.races:
            return None
        best: tuple[float, int] | None = None
        for name, holder in self.sources.items():
            if name == source:
                continue
            for i in holder.in_flight:
                if (
                    i in self.done
                    or i in racer.in_flight
                    or not self.may_serve(source, i)
                    or self._copies(i) > 1
                ):
                    continue
                left = self._time_left(holder, i, now)
                mine = self.segments[i].length / racer.speed
                if mine * RACE_MARGIN < left and (best is None or (left, -i) > best):
                    best = (left, -i)
        if best is None:
            return None
        i = -best[1]
        racer.in_flight.add(i)
        racer.since[i] = now
        racer.races.add(i)
        return self.segments[i]

    def _copies(self, index: int) -> int:
        return sum(index in s.in_flight for s in self.sources.values())

    def _time_left(self, holder: SourceState, index: int, now: float) -> float:
        """Seconds the holder should still take over ``index``, from its measured speed;
        as long again as it has taken so far when that speed is unknown or it is late."""
        elapsed = max(now - holder.since.get(index, now), 0.0)
        if holder.speed > 0:
            expected = self.segments[index].length / holder.speed
            if elapsed <= expected:
                return expected - elapsed
        return elapsed

    # -- what happened -----------------------------------------------------------------------

    def completed(self, source: str, index: int, seconds: float) -> list[str]:
        """A segment arrived. Returns the other sources now fetching it (to cancel)."""
        st = self.sources[source]
        self._stop(st, index)
        seg = self.segments[index]
        st.bytes += seg.length
        st.seconds += seconds
        st.failures = 0
        if index in self.done:
            return []
        self.done.add(index)
        self.winner[index] = source
        losers = []
        for name, other in self.sources.items():
            if index in other.in_flight:
                self._stop(other, index)
                losers.append(name)
        return losers

    def cancelled(self, source: str, index: int) -> None:
        self._stop(self.sources[source], index)

    def failed(self, source: str, index: int | None, fatal: bool = False) -> bool:
        """A fetch failed (bad data, error, timeout). Returns True when the source is now dead."""
        st = self.sources[source]
        if index is not None:
            self._stop(st, index)
            if index not in self.done and not self._elsewhere(index):
                st.queue.appendleft(index)  # retried, here or by a thief
        st.failures += 1
        if fatal or st.failures >= MAX_FAILURES:
            self.kill(source)
            return True
        return False

    def _elsewhere(self, index: int) -> bool:
        return any(index in s.in_flight or index in s.queue for s in self.sources.values())

    def kill(self, source: str) -> None:
        """The source is gone: its unfinished segments go, in equal shares, to the live ones."""
        st = self.sources[source]
        if st.state == DEAD:
            return
        st.state = DEAD
        orphans = [
            i
            for i in [*st.queue, *sorted(st.in_flight)]
            if i not in self.done and not self._elsewhere_but(i, source)
        ]
        st.queue.clear()
        st.in_flight.clear()
        st.since.clear()
        st.races.clear()
        self._share(sorted(set(orphans)), [n for n in self.live() if n != source])

    def _elsewhere_but(self, index: int, source: str) -> bool:
        return any(
            index in s.in_flight or index in s.queue for n, s in self.sources.items() if n != source
        )

    def pause(self, source: str) -> None:
        if self.sources[source].state == ALIVE:
            self.sources[source].state = PAUSED

    def resume(self, source: str) -> None:
        if self.sources[source].state == PAUSED:
            self.sources[source].state = ALIVE

    def return_unstarted(self, source: str, index: int) -> None:
        """A fetch given out but not started (its source paused): back to the front."""
        st = self.sources[source]
        self._stop(st, index)
        if index not in self.done and not self._elsewhere(index):
            st.queue.appendleft(index)

    # -- resume state ---------------------------------------------------------------------------

    def bitmap(self) -> str:
        bits = bytearray((len(self.segments) + 7) // 8)
        for i in self.done:
            bits[i // 8] |= 1 << (i % 8)
        return base64.b64encode(bytes(bits)).decode()

    @staticmethod
    def done_from_bitmap(text: str, count: int) -> set[int]:
        bits = base64.b64decode(text)
        return {i for i in range(count) if bits[i // 8] >> (i % 8) & 1}
