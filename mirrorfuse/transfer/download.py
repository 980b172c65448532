"""Segmented parallel download: workers, saving and resuming (the I/O around the scheduler).

A source serves byte ranges of one object: a mirrorfs file server, an HTTP
mirror (Range requests), or one server of a mirrorfs volume. Each source
runs a few worker tasks that ask the scheduler for segments, fetch them,
check them and write them at their offset into OUTPUT.mfs-partial. The
finished-segment bitmap is saved to OUTPUT.mfs-state every second and on
exit, so a download killed at any point resumes with -r: with the segment
size it was started with (the state file says it), whatever sources answer
now. The whole file is checked against its checksum (when a source knows it)
before it is renamed into place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from mirrorfuse.core.scheduler import (
    ALIVE,
    DEAD,
    PAUSED,
    Scheduler,
    Segment,
    segment_size,
    split,
)
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.sizes import human
from servers.files import atomic_write

from .output import CannotWrite, Output, OutputError, write_at
from .progress import Progress
from .sources import (
    READ_TIMEOUT,
    WORKERS_PER_SOURCE,
    Info,
    Source,
    SourceFailed,
    SourcePaused,
)

LEGACY_SEGMENT = 1 << 20  # every segment's size before it was sized to the file (no
# "segment_size" in the state file): such a download still resumes
SAVE_EVERY = 1.0  # seconds between saves of the state


def whole_checksum(path: Path) -> int:
    """xxh3-64 of a file, read through a mapping (no copy into Python)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64_intdigest(b"")
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            mm.madvise(mmap.MADV_SEQUENTIAL)
            return xxhash.xxh3_64_intdigest(mm)


class Download:
    def __init__(
        self,
        sources: list[Source],
        output: Path,
        interval: float,
        resume: bool,
        segments: Callable[[int], list[Segment]] | None = None,
        eligible: dict[int, set[str]] | None = None,
        check: Callable[[Segment, bytes], bool] | None = None,
        say: Callable[[str], None] = lambda m: print(m, flush=True),
    ) -> None:
        self.sources = {s.name: s for s in sources}
        self._place(output)
        self.interval = interval
        self.resume = resume
        self.fixed = segments  # a segmentation imposed (a volume's blocks), or sized here
        self.eligible = eligible
        self.check = check
        self.say = say
        self.tasks: dict[tuple[str, int], asyncio.Task[Any]] = {}
        self.holes: set[int] = set()  # segments that are zeros already (a sparse file's holes)
        self.wake = asyncio.Event()

    def _place(self, output: Path) -> None:
        self.output = output
        self.partial = output.with_name(output.name + ".mfs-partial")
        self.state_path = output.with_name(output.name + ".mfs-state")

    def _into_directory(self, infos: list[Info]) -> None:
        """-o names a directory: the file goes in it under the name its sources serve."""
        names = {i.name for i in infos if i.name}
        name = min(names, default="")  # sources of one file agree; any is fine
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise MirrorfsError(
                f"{self.output} is a directory and the sources do not say the file's name: "
                "give -o the path of the file to save"
            )
        self._place(self.output / name)

    # -- the state file ------------------------------------------------------------------

    def state(self, sched: Scheduler, size: int, checksum: int | None) -> bytes:
        """What a resume needs, as of now (taken on the event loop)."""
        state = {
            "size": size,
            "checksum": checksum,
            "segments": len(sched.segments),
            "segment_size": sched.segments[0].length if sched.segments else 0,
            "done": sched.bitmap(),
            "sources": list(self.sources),
        }
        return json.dumps(state).encode()

    def save(self, fd: int, state: bytes) -> None:
        """The data first, then the state that says it is there: a resume after a power
        cut never trusts segments that did not reach the disk."""
        os.fdatasync(fd)
        atomic_write(self.state_path, state)

    def plan(self, size: int, checksum: int | None, sources: int) -> tuple[list[Segment], set[int]]:
        """The segments, and those already here (on -r, from the state file).

        A new download's segments are sized to the file and its sources; a resumed one
        keeps the size it was started with (however many sources answer now)."""
        if not self.resume:
            if self.fixed is not None:
                return self.fixed(size), set()
            return split(size, segment_size(size, sources)), set()
        if not self.state_path.exists() or not self.partial.exists():
            raise MirrorfsError(f"nothing to resume: {self.state_path} is missing")
        again = f"start again without -r (or delete {self.state_path})"
        try:
            st = json.loads(self.state_path.read_text())
            saved_size, saved_sum, count, bitmap = (
                st["size"],
                st["checksum"],
                st["segments"],
                st["done"],
            )
            each = st.get("segment_size", LEGACY_SEGMENT if self.fixed is None else None)
            if each is not None and (not isinstance(each, int) or each < 0):
                raise ValueError(f"segment size {each!r}")
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise MirrorfsError(f"the saved state is damaged ({exc}): {again}") from None
        if saved_size != size or (checksum is not None and saved_sum not in (None, checksum)):
            raise MirrorfsError(f"the saved download is of another file: {again}")
        if each is None:  # a volume's file, saved before the state said it: its blocks
            each = next((s.length for s in self.fixed(size)), 0) if self.fixed else 0
        saved = split(size, each) if each else []
        segments = self.fixed(size) if self.fixed is not None else saved
        if count != len(segments) or segments != saved:
            raise MirrorfsError(
                f"the saved download was cut into {count} segments of {human(each or 0)}, "
                f"this one into {len(segments)}: {again}"
            )
        try:
            return segments, Scheduler.done_from_bitmap(bitmap, count)
        except (TypeError, ValueError, IndexError) as exc:
            raise MirrorfsError(f"the saved state is damaged ({exc}): {again}") from None

    # -- running -------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            return await self._run()
        finally:
            for s in self.sources.values():
                with contextlib.suppress(Exception):
                    await s.close()

    async def _run(self) -> int:
        infos = await asyncio.gather(
            *(s.info() for s in self.sources.values()), return_exceptions=True
        )
        good = {n: i for n, i in zip(self.sources, infos, strict=True) if isinstance(i, Info)}
        for n, i in zip(self.sources, infos, strict=True):
            if not isinstance(i, Info):
                self.say(f"source {n} is not available: {i}")
        if not good:
            raise MirrorfsError("no source answers")
        if self.output.is_dir():
            self._into_directory(list(good.values()))
        sizes = {i.size for i in good.values()}
        if len(sizes) != 1:
            raise MirrorfsError(f"the sources disagree on the size: {sorted(sizes)}")
        size = sizes.pop()
        sums = {i.checksum for i in good.values() if i.checksum is not None}
        if len(sums) > 1:
            raise MirrorfsError("the sources hold different files (checksums differ)")
        checksum = sums.pop() if sums else None
        segments, done = self.plan(size, checksum, len(good))
        done |= self.holes
        sched = Scheduler(segments, list(self.sources), done, self.eligible)
        for n in self.sources:
            if n not in good:
                sched.kill(n)
            elif good[n].state == PAUSED:
                sched.pause(n)
        each = human(segments[0].length) if segments else "0 B"
        self.say(
            f"downloading {human(size)} in {len(segments)} segments of {each} from "
            f"{len(good)} source(s)" + (f", {len(done)} already here" if done else "")
        )
        try:
            fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._cannot_write(exc) from None
        ok, saved, failure = False, False, None
        try:
            try:
                os.ftruncate(fd, size)
            except OSError as exc:  # larger than the file system takes (or the user may)
                raise self._cannot_write(exc) from None
            ok = await self._transfer(sched, fd, size, checksum)
        except CannotWrite as exc:
            failure = exc
        finally:
            try:
                if not ok:  # what a resume needs; a finished file needs no state (see finish)
                    self.save(fd, self.state(sched, size, checksum))
                    saved = True
            except OSError as exc:
                self.say(f"cannot save the download's state in {self.state_path}: {exc.strerror}")
            finally:
                os.close(fd)
        missing = human(sched.remaining())
        again = (
            f"Run again with -r to resume ({self.state_path})"
            if saved
            else "Start again without -r (no state could be saved)"
        )
        if failure is not None:
            raise CannotWrite(f"{failure}; {missing} missing. Make room first. {again}")
        if not ok:
            why = "every source failed" if not sched.live() else "no live source holds the rest"
            self.say(f"download incomplete ({why}); {missing} missing. {again}")
            return 1
        return self.finish(checksum)

    def finish(self, checksum: int | None) -> int:
        """Check the whole file and rename it into place.

        The data is not forced to the disk first: like cp, curl and aria2c, a finished
        download is left to the kernel's writeback (waiting for it would make every
        download as slow as the disk). Only a download that stops unfinished saves its
        state, after an fdatasync, so a resume never trusts bytes that did not land."""
        if checksum is not None:
            self.say("verifying the checksum...")
            if whole_checksum(self.partial) != checksum:
                raise MirrorfsError(
                    f"the downloaded file does not match its checksum; kept as {self.partial}"
                )
        os.replace(self.partial, self.output)  # as cp leaves it: no fsync of data or rename
        self.state_path.unlink(missing_ok=True)
        verified = "verified" if checksum is not None else "no checksum to verify against"
        self.say(f"saved {self.output} ({verified})")
        return 0

    async def _transfer(self, sched: Scheduler, fd: int, size: int, checksum: int | None) -> bool:
        progress = Progress(sched, size)

        async def ticker() -> None:
            while True:
                await asyncio.sleep(self.interval)
                progress.show()

        saving: list[asyncio.Future[None]] = []  # the save running in its thread

        async def saver() -> None:
            loop = asyncio.get_running_loop()
            while True:
                await asyncio.sleep(SAVE_EVERY)
                state = self.state(sched, size, checksum)
                saving[:] = [loop.run_in_executor(None, self.save, fd, state)]
                await asyncio.shield(saving[0])

        # started round by round: every source's first worker takes from its own share
        # before any second worker looks for more
        out = Output(fd, size, WORKERS_PER_SOURCE * len(self.sources))
        workers = [
            asyncio.ensure_future(self._worker(sched, name, out))
            for _ in range(WORKERS_PER_SOURCE)
            for name in self.sources
        ]
        pollers = [asyncio.ensure_future(self._poll_paused(sched, name)) for name in self.sources]
        helpers = [asyncio.ensure_future(ticker()), asyncio.ensure_future(saver())]
        try:
            await asyncio.gather(*workers)
        finally:
            # on an error (a full disk) or an interrupt, the other workers stop too (and
            # their fetches, which may be writing into the file) before anything is saved
            for t in workers + pollers + helpers:
                t.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.gather(*pollers, *helpers, return_exceptions=True)
            # cancelling the saver leaves its thread writing: the final save waits for it
            # (both write OUTPUT.mfs-state.tmp)
            await asyncio.gather(*saving, return_exceptions=True)
            progress.show(final=True)  # also when it failed: the live view ends
            out.close()
        return sched.finished

    def _kick(self) -> None:
        self.wake.set()
        self.wake = asyncio.Event()

    async def _worker(self, sched: Scheduler, name: str, out: Output) -> None:
        src = self.sources[name]
        while not sched.finished and sched.sources[name].state != DEAD:
            if sched.stuck:
                return
            seg = sched.next(name, time.monotonic())
            if seg is None:
                if sched.finished or not sched.live():
                    return
                # the rest is in flight elsewhere, or this source (or all) is paused
                await self._wait(0.5)
                continue
            # a second copy (end game) never writes in place: the first may still be
            # writing there, and only checked bytes may land where a finished segment is
            # nor does a fetch of a segment another still fetches (a dead source's, handed
            # on while its thread may be writing)
            alone = seg.index not in sched.sources[name].races and not any(
                i == seg.index for _, i in self.tasks
            )
            task = asyncio.ensure_future(self._fetch(src, seg, out, alone))
            self.tasks[(name, seg.index)] = task
            t0 = time.monotonic()
            try:
                data = await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not task.cancelled() or (current is not None and current.cancelling()):
                    raise  # this worker is stopped, not only its fetch
                sched.cancelled(name, seg.index)  # lost an end-game race
                continue
            except SourcePaused:
                sched.pause(name)
                sched.return_unstarted(name, seg.index)
                self.say(f"source {name} is paused: others take over its segments")
                self._kick()
                continue
            except CannotWrite:
                raise  # not the source's doing: the download stops
            except (SourceFailed, MirrorfsError) as exc:
                if sched.failed(name, seg.index):
                    self.say(
                        f"source {name} failed ({exc}); its segments are divided among "
                        f"{len(sched.live())} others"
                    )
                self._kick()
                continue
            finally:
                self.tasks.pop((name, seg.index), None)
            if data is not None and self.check is not None and not self.check(seg, data):
                sched.failed(name, seg.index)
                continue
            if seg.index in sched.done:  # a copy that came second: nothing to write
                sched.cancelled(name, seg.index)
                continue
            # others still fetching it stop first (one may be writing in place), then the
            # bytes land, then the segment counts as done (and a save may say so)
            others = [t for (n, i), t in self.tasks.items() if i == seg.index and n != name]
            for other in others:
                other.cancel()
            if others:
                await asyncio.gather(*others, return_exceptions=True)
                if seg.index in sched.done:  # one of them finished first meanwhile
                    sched.cancelled(name, seg.index)
                    continue
            if data is not None:
                try:
                    write_at(out.fd, data, seg.start)
                except OutputError as exc:
                    raise self._cannot_write(exc.error) from None
            sched.completed(name, seg.index, time.monotonic() - t0)
            self._kick()

    async def _fetch(self, src: Source, seg: Segment, out: Output, direct: bool) -> bytes | None:
        try:
            return await asyncio.wait_for(src.fetch(seg, out, direct), READ_TIMEOUT)
        except TimeoutError:
            raise SourceFailed(f"no answer in {READ_TIMEOUT:g}s") from None
        except OutputError as exc:  # the output file, not the source: the download stops
            raise self._cannot_write(exc.error) from None
        except OSError as exc:
            raise SourceFailed(str(exc)) from None

    def _cannot_write(self, exc: OSError) -> CannotWrite:
        return CannotWrite(f"cannot write {self.partial}: {exc.strerror or exc}")

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)

    async def _poll_paused(self, sched: Scheduler, name: str) -> None:
        """A paused source is asked now and then whether it is back."""
        while True:
            await asyncio.sleep(0.5)
            st = sched.sources[name]
            if st.state != PAUSED:
                continue
            try:
                info = await self.sources[name].info()
            except (SourceFailed, SourcePaused, MirrorfsError):
                continue
            if info.state == ALIVE:
                sched.resume(name)
                self.say(f"source {name} resumed")
                self._kick()
            elif info.state == DEAD:
                sched.kill(name)
