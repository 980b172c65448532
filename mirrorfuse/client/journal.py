"""The metadata journal: numbered records, group commit, checkpoints.

The file system applies a record to its in-memory namespace and hands it to
``add`` in the same step (one event loop, no await between), so journal order
is apply order. A committer task on that loop sends whatever has accumulated
as one batch to every writable server; while that batch is on the wire the
next one collects (group commit). ``wait`` returns once a record is on every
live server.

A checkpoint is queued like a record, at the sequence number it was taken at,
so it reaches each server exactly when that server's journal ends there. The
last checkpoint and the batches since are kept to heal a server that missed
them (a rebuild target says GAP).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from mirrorfuse.core.replay import Batch
from mirrorfuse.core.stats import OpStat
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.messages import MetaInfo
from mirrorfuse.wire.records import encode_batch

from .metastore import Leased, MetaStore
from .table import Fenced

CHECKPOINT_RECORDS = 50_000
CHECKPOINT_BYTES = 32 << 20
MAX_BATCH_BYTES = 4 << 20


@dataclass
class _Checkpoint:
    seq: int
    blob: bytes


@dataclass
class _BringUp:
    """A healed server's metadata, brought up to date in journal order."""

    server: int
    done: asyncio.Future[None]


RETRY_AFTER = 1.0  # seconds between tries of a batch no server took


class JournalBroken(Exception):
    """This client may not write the journal any more (another mount took the volume
    over): the file system must stop changing things."""


class JournalUnavailable(Exception):
    """The last batch reached no server; it is tried again, and fsync fails meanwhile."""


class Journal:
    def __init__(
        self,
        meta: MetaStore,
        seq: int,
        checkpoint: bytes,
        on_committed: Callable[[int], None] | None = None,
    ) -> None:
        self._meta = meta
        self.seq = seq  # last record handed in
        self.committed = seq  # last record on every writable server
        self._ckpt = _Checkpoint(seq, checkpoint)
        self._tail: list[Batch] = []
        self._tail_bytes = 0
        self._queue: list[bytes | _Checkpoint | _BringUp] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._on_committed = on_committed
        self.error: BaseException | None = None  # permanent
        self.trouble: BaseException | None = None  # the last try failed; trying again
        self._closing = False
        self._wake = asyncio.Event()
        self.appends = OpStat()  # batches on every writable server: how many, how long
        self.records = 0  # records in them
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # -- called by the file system (on the journal's loop) --------------------------------

    def add(self, record: bytes) -> int:
        """Queue one encoded record (in the step that applied it: journal order is apply
        order)."""
        if self.error is not None:
            raise JournalBroken(str(self.error))
        self.seq += 1
        self._queue.append(record)
        self._wake.set()
        return self.seq

    def needs_checkpoint(self) -> bool:
        return (
            self.seq - self._ckpt.seq >= CHECKPOINT_RECORDS or self._tail_bytes >= CHECKPOINT_BYTES
        )

    def add_checkpoint(self, seq: int, blob: bytes) -> None:
        """Queue a checkpoint of the namespace as it is after record ``seq`` (== self.seq)."""
        assert seq == self.seq
        self._queue.append(_Checkpoint(seq, blob))
        self._wake.set()

    async def wait(self, upto: int | None = None, timeout: float | None = None) -> None:
        """Return when every record up to ``upto`` (default: all so far) is committed.

        JournalUnavailable while the servers that would hold them cannot be reached.
        """
        target = self.seq if upto is None else upto
        try:
            async with asyncio.timeout(timeout):
                while not (
                    self.committed >= target or self.error is not None or self.trouble is not None
                ):
                    w = asyncio.get_running_loop().create_future()
                    self._waiters.append(w)
                    await w
        except TimeoutError:
            raise TimeoutError(f"journal did not commit record {target} in time") from None
        if self.error is not None:
            raise JournalBroken(str(self.error))
        if self.committed < target and self.trouble is not None:
            raise JournalUnavailable(str(self.trouble))

    async def close(self, timeout: float = 60) -> None:
        await self.wait(timeout=timeout)
        self._closing = True
        self._wake.set()
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._task)

    # -- the committer (event loop) ------------------------------------------------------

    async def bring_up(self, server: int) -> None:
        """(On the event loop) bring a server's journal and checkpoint up to what is
        committed, between two batches: a heal ends with this before the server counts
        alive, so its metadata is whole even if no change follows."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.error is not None or self._closing:
            raise MirrorfsError(f"the journal is stopped: {self.error or 'unmounting'}")
        self._queue.append(_BringUp(server, done))
        self._wake.set()
        await done

    def _take(self) -> tuple[list[bytes], _Checkpoint | _BringUp | None]:
        """Records up to the next marker (and that marker)."""
        records: list[bytes] = []
        size = 0
        n = 0
        for item in self._queue:
            if isinstance(item, _Checkpoint | _BringUp):
                if records:
                    break
                del self._queue[0]
                return [], item
            if records and size + len(item) > MAX_BATCH_BYTES:
                break
            records.append(item)
            size += len(item)
            n += 1
        del self._queue[:n]
        return records, None

    async def _run(self) -> None:
        item: Batch | _Checkpoint | _BringUp | None = None  # taken, not yet on the servers
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                if item is None:
                    records, ckpt = self._take()
                    if ckpt is None and not records:
                        break
                    item = ckpt or Batch(self.committed + 1, len(records), encode_batch(records))
                try:
                    await self._store(item)
                except (Fenced, Leased) as exc:  # never again: every waiter must learn of it
                    self.error = exc
                    self._notify()
                    return
                except MirrorfsError as exc:  # e.g. no server reachable: keep it, try again
                    self.trouble = exc
                    self._notify()
                    await asyncio.sleep(RETRY_AFTER)
                    continue
                except Exception as exc:  # a defect: stop changing things, and say why
                    self.error = exc
                    self._notify()
                    raise
                self.trouble = None
                item = None
            if self._closing and not self._queue:
                return

    async def _store(self, item: Batch | _Checkpoint | _BringUp) -> None:
        if isinstance(item, _BringUp):
            try:
                info = await self._meta.vol.call(item.server, MetaInfo())
                await self._heal(item.server, info.body.last_seq)
            except Exception as exc:  # the heal fails, not the journal
                if not item.done.done():
                    item.done.set_exception(exc)
            else:
                if not item.done.done():
                    item.done.set_result(None)
            return
        if isinstance(item, _Checkpoint):
            await self._meta.put_checkpoint(item.seq, item.blob)
            self._ckpt = item
            self._tail, self._tail_bytes = [], 0
            return
        start = time.perf_counter()
        await self._meta.append(item, self._heal)
        self.appends.record(time.perf_counter() - start, len(item.data))
        self.records += item.count
        self._tail.append(item)
        self._tail_bytes += len(item.data)
        self.committed = item.last
        self._notify()
        if self._on_committed is not None:
            self._on_committed(item.last)

    async def _heal(self, server: int, last: int) -> None:
        """Bring a server whose journal ends at ``last`` up to our last committed batch."""
        if last >= self.committed:
            return  # up to date already (a GAP answered on the way healed it)
        starts = {b.first for b in self._tail}
        if last < self._ckpt.seq or (last > self._ckpt.seq and last + 1 not in starts):
            await self._meta.put_checkpoint(self._ckpt.seq, self._ckpt.blob, server)
            last = self._ckpt.seq
        await self._meta.send_batches(server, [b for b in self._tail if b.first > last])
