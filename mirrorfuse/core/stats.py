"""Counts and latency histograms kept as plain numbers, read by a metrics exporter when it
is scraped.

Recording a request costs two clock reads (the caller's), a bisect and a few integer
additions: no lock, no label lookup, no string. The exporter turns these into
Prometheus families only when asked (``servers/metrics.py``); it reads them from its
own thread, where a count one request behind is harmless. Each entry is changed by one
thread at a time (a daemon's event loop, or the one worker of its in-order queue).
"""

from __future__ import annotations

from bisect import bisect_left

# upper bounds in seconds (Prometheus's "le"); a last bucket counts what is above them all
BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class OpStat:
    """One kind of operation: how many, how many failed, bytes each way, a histogram."""

    __slots__ = ("buckets", "count", "errors", "reply_bytes", "request_bytes", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.request_bytes = 0  # data carried by the requests (a write's)
        self.reply_bytes = 0  # data carried by the replies (a read's)
        self.seconds = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)

    def record(self, seconds: float, request_bytes: int = 0, reply_bytes: int = 0) -> None:
        self.count += 1
        self.seconds += seconds
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.request_bytes += request_bytes
        self.reply_bytes += reply_bytes

    def cumulative(self) -> list[tuple[str, int]]:
        """Buckets as Prometheus counts them: each bound with everything at or below it."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*map(repr, BUCKETS), "+Inf"), list(self.buckets), strict=True):
            total += n
            out.append((bound, total))
        return out


class OpStats:
    """Operations by key (a message type, a FUSE request's name): their ``OpStat``."""

    def __init__(self) -> None:
        self.ops: dict[object, OpStat] = {}
        self.failures: dict[tuple[object, str], int] = {}  # (key, why): how many

    def of(self, key: object) -> OpStat:
        stat = self.ops.get(key)
        if stat is None:
            stat = self.ops[key] = OpStat()
        return stat

    def get(self, key: object) -> OpStat:
        """The kind's numbers, for a reader: none yet reads as zeros (and adds nothing)."""
        return self.ops.get(key) or OpStat()

    def failed(self, key: object, code: str, seconds: float) -> None:
        """One that failed (with an error code): counted, timed, and counted by code."""
        stat = self.of(key)
        stat.record(seconds)
        stat.errors += 1
        self.failures[key, code] = self.failures.get((key, code), 0) + 1

    def items(self) -> list[tuple[object, OpStat]]:
        """A copy to iterate over while the owner goes on adding kinds."""
        return list(self.ops.items())

    def failure_items(self) -> list[tuple[tuple[object, str], int]]:
        return list(self.failures.items())
