"""The downloader's end game in one process, with sources of our own that keep the
contract of a threaded source (transfer/sources.ThreadedSource): a fetch asked to write in
place (``direct``) writes into the output, and when cancelled it returns only once it has
stopped writing there.

One source stalls in the middle of writing its segments in place, and goes on writing
wrong bytes for a moment after it is cancelled (as a fetch thread does until its abort
reaches it); a fast one races those segments. The race's copy must come buffered (never
in place), and its bytes must land only after the stalled fetch stopped: then the file is
right whatever the stalled fetch wrote.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import xxhash

from mirrorfuse.core.scheduler import Segment
from mirrorfuse.transfer.download import Download
from mirrorfuse.transfer.output import Output
from mirrorfuse.transfer.sources import Info, Source, SourceFailed, ThreadedSource
from mirrorfuse.transfer.wirefetch import FetchFailed

MiB = 1 << 20
SIZE = 4 * MiB  # 16 segments of 256 KiB from two sources
WRONG = 0xFF


@dataclass
class Fetches:
    direct: dict[int, bool] = field(default_factory=dict)  # segment: written in place?
    cancelled: list[int] = field(default_factory=list)


class Fast(Source):
    def __init__(self, data: bytes) -> None:
        self.name = "fast"
        self.data = data
        self.seen = Fetches()

    async def info(self) -> Info:
        return Info(len(self.data), xxhash.xxh3_64_intdigest(self.data))

    async def read(self, seg: Segment) -> bytes:
        return self.data[seg.start : seg.end]

    async def fetch(self, seg: Segment, out: Output, direct: bool) -> bytes | None:
        self.seen.direct[seg.index] = direct
        await asyncio.sleep(0)
        if direct:
            os.pwrite(out.fd, self.data[seg.start : seg.end], seg.start)
            return None
        return self.data[seg.start : seg.end]


class Stalling(Fast):
    """Writes half of each segment in place (wrong bytes), then waits forever; cancelled,
    it writes wrong bytes over the whole segment a moment later, then stops."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.name = "stalling"

    async def fetch(self, seg: Segment, out: Output, direct: bool) -> bytes | None:
        self.seen.direct[seg.index] = direct
        if direct:
            os.pwrite(out.fd, bytes([WRONG]) * (seg.length // 2), seg.start)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.seen.cancelled.append(seg.index)
            if direct:  # its thread still runs a little, writing
                await asyncio.sleep(0.05)
                os.pwrite(out.fd, bytes([WRONG]) * seg.length, seg.start)
            raise
        raise AssertionError("not reached")


def download(sources: list[Source], out: Path) -> tuple[Download, list[str]]:
    """A whole download that must succeed; what it said."""
    said: list[str] = []
    dl = Download(sources, out, 3600, False, say=said.append)

    async def run() -> int:
        return await asyncio.wait_for(dl.run(), 30)  # a hang bound, far above what it takes

    assert asyncio.run(run()) == 0, said
    return dl, said


def test_a_stalled_segment_is_raced_buffered_and_lands_after_the_stalled_fetch_stopped(
    tmp_path: Path,
) -> None:
    data = os.urandom(SIZE)
    fast, stalling = Fast(data), Stalling(data)
    out = tmp_path / "out.bin"
    dl, said = download([fast, stalling], out)
    assert out.read_bytes() == data, "bytes written by the stalled fetch were left in the file"
    assert any("(verified)" in m for m in said), said
    assert not dl.state_path.exists() and not dl.partial.exists()
    stalled = sorted(stalling.seen.direct)
    assert stalled and all(stalling.seen.direct.values())  # its own segments, in place
    assert sorted(stalling.seen.cancelled) == stalled  # each stopped, by the race it lost
    raced = {i: fast.seen.direct[i] for i in stalled}
    assert raced == dict.fromkeys(stalled, False)  # the race's copies came buffered
    own = [d for i, d in fast.seen.direct.items() if i not in stalled]
    assert own and all(own)  # its own segments were written in place


class SlowToStop:
    """A fetcher whose fetch blocks until aborted, then writes on for a moment (as a
    splice already under way does) before it raises."""

    def __init__(self) -> None:
        self.aborted = threading.Event()
        self.stopped = False  # its fetch has returned
        self.closed = False

    def fetch(self, start: int, length: int, fd: int | None) -> None:
        assert self.aborted.wait(30)
        time.sleep(0.1)
        self.stopped = True
        raise FetchFailed("stopped")

    def abort(self) -> None:
        self.aborted.set()

    def close(self) -> None:
        self.closed = True


class OneFetcher(ThreadedSource):
    def __init__(self, fetcher: SlowToStop) -> None:
        super().__init__()
        self.name = "one"
        self.made = fetcher

    def _fetcher(self, out: Output | None) -> Any:
        return self.made

    async def info(self) -> Info:
        return Info(SIZE, None)


def test_a_cancelled_threaded_fetch_returns_only_once_its_thread_stopped(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_bytes(bytes(SIZE))
    fd = os.open(path, os.O_RDWR)
    out = Output(fd, SIZE, 1)
    fetcher = SlowToStop()
    src = OneFetcher(fetcher)

    async def cancel_one() -> None:
        task = asyncio.ensure_future(src.fetch(Segment(0, 0, MiB), out, True))
        await asyncio.sleep(0.05)  # it runs in its thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(cancel_one())
        assert fetcher.aborted.is_set() and fetcher.stopped and fetcher.closed
        assert src._idle == []  # an aborted fetcher is not used again
    finally:
        out.close()
        os.close(fd)


def test_a_fetch_cancelled_twice_still_returns_only_once_its_thread_stopped(
    tmp_path: Path,
) -> None:
    """A fetch whose read timed out (its wait_for cancels it) is cancelled again by the
    race's winner meanwhile: it must not end before its thread (the winner writes then)."""
    path = tmp_path / "out"
    path.write_bytes(bytes(SIZE))
    fd = os.open(path, os.O_RDWR)
    out = Output(fd, SIZE, 1)
    fetcher = SlowToStop()
    src = OneFetcher(fetcher)

    async def cancel_twice() -> bool:
        task = asyncio.ensure_future(src.fetch(Segment(0, 0, MiB), out, True))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.01)  # it waits for its thread now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return fetcher.stopped  # as the task ended

    try:
        assert asyncio.run(cancel_twice()), "the task ended while its thread still ran"
        assert fetcher.closed
    finally:
        out.close()
        os.close(fd)


class Dying(Stalling):
    """Its first fetch stalls mid-segment (writing wrong bytes in place, and more once
    cancelled); every other fails, so after three failures it is declared dead and the
    stalled segment is handed to the other source while its fetch still runs."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.name = "dying"
        self.first: int | None = None

    async def fetch(self, seg: Segment, out: Output, direct: bool) -> bytes | None:
        if self.first is None:
            self.first = seg.index
            return await super().fetch(seg, out, direct)
        raise SourceFailed("refused")


def test_a_dead_sources_segment_still_being_written_is_not_written_in_place_by_another(
    tmp_path: Path,
) -> None:
    data = os.urandom(SIZE)
    fast, dying = Fast(data), Dying(data)
    out = tmp_path / "out.bin"
    _, said = download([dying, fast], out)
    assert any("source dying failed" in m for m in said), said
    assert out.read_bytes() == data, "the dead source's late bytes were left in the file"
    assert dying.first is not None and fast.seen.direct[dying.first] is False
