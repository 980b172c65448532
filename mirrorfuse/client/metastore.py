"""The metadata on the servers: lease, journal batches and checkpoints.

Write-all, read-any: every batch and checkpoint goes to every server that
takes writes (alive or being rebuilt), so the metadata survives as long as
one server of the volume does. A server that answers GAP missed earlier
batches (a rebuild target); it is healed from the last checkpoint and the
batches since, which the caller keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from mirrorfuse.core.namespace import Namespace
from mirrorfuse.core.replay import Batch, replay
from mirrorfuse.wire.errors import MirrorfsError, ServerError, VolumeIOError
from mirrorfuse.wire.messages import (
    CheckpointGet,
    CheckpointPut,
    Holder,
    JournalAppend,
    JournalRead,
    Lease,
    MetaInfo,
    MetaInfoReply,
    State,
)
from mirrorfuse.wire.records import journal_entries

from .connection import ServerDown
from .retry import TryAgain, retry
from .table import Fenced
from .volume import Volume

CHUNK = 4 << 20


class Leased(MirrorfsError):
    """The volume is mounted read-write elsewhere."""


def holder_info(mountpoint: str) -> Holder:
    return Holder(
        id=str(uuid.uuid4()), host=socket.gethostname(), pid=os.getpid(), mountpoint=mountpoint
    )


def describe_holder(holder: Holder) -> str:
    if not holder.id:
        return "another client"
    where = f" at {holder.mountpoint}" if holder.mountpoint else ""
    return f"pid {holder.pid} on host {holder.host}{where}"


class MetaStore:
    def __init__(self, volume: Volume) -> None:
        self.vol = volume
        self.epoch = 0

    # -- lease --------------------------------------------------------------------------

    async def infos(self) -> dict[int, MetaInfoReply]:
        """META_INFO of every server not failed that answers."""
        targets = [s for s in range(self.vol.spec.count) if self.vol.states[s] != State.FAILED]
        replies = await asyncio.gather(
            *(self.vol.call(s, MetaInfo()) for s in targets), return_exceptions=True
        )
        return {
            s: r.body
            for s, r in zip(targets, replies, strict=True)
            if not isinstance(r, BaseException)
        }

    async def take_lease(self, holder: Holder, force: bool) -> None:
        infos = await self.infos()
        if not force:
            for info in infos.values():
                if info.holder_active:
                    raise Leased(
                        f"the volume is already mounted read-write by "
                        f"{describe_holder(info.holder)}; "
                        "unmount it there, or take it over with --force"
                    )
        self.epoch = max((i.epoch for i in infos.values()), default=0) + 1
        lease = Lease(epoch=self.epoch, holder=holder, force=force)
        await self._all(lambda s: self.vol.call(s, lease))
        self.vol.hold_lease(lease)
        await self.vol.table.persist()

    # -- sending to every server taking writes ----------------------------------------------

    async def _all(
        self,
        send: Callable[[int], Awaitable[Any]],
        on_error: Callable[[int, ServerError], Awaitable[bool]] | None = None,
    ) -> None:
        """Send to every server taking writes; fail the silent ones, again on a newer table.

        The metadata is on every server, so a server that cannot be marked failed (the
        last live copy of its pair) and is out of reach just misses this part: it says
        GAP when it is back and is healed then. Only when no server took it, it failed.
        ``on_error`` may deal with a server's error reply itself (True: dealt with).
        """

        async def attempt() -> None:
            targets = self.vol.table.holders()
            if not targets:
                raise VolumeIOError("no server is left to hold the metadata")
            results = await asyncio.gather(*(send(s) for s in targets), return_exceptions=True)
            stale = False
            took = 0
            for s, res in zip(targets, results, strict=True):
                if not isinstance(res, BaseException):
                    took += 1
                    continue
                if isinstance(res, ServerError):
                    if res.code == "FENCED":
                        raise Fenced(f"this client was fenced: {res}") from None
                    if res.code == "LEASED":
                        raise Leased(f"server {s} reports the volume mounted elsewhere")
                    if on_error is not None and await on_error(s, res):
                        took += 1
                        continue
                if not isinstance(res, ServerError | ServerDown):
                    raise res
                with contextlib.suppress(VolumeIOError):  # a last copy: it misses this one
                    stale |= await self.vol.handle_error(s, res)
            if stale:
                raise TryAgain
            if not took:
                raise VolumeIOError("no server took the metadata (none of them answers)")

        await retry(attempt, "writing the metadata: the failure table kept changing")

    def _append(self, batch: Batch) -> JournalAppend:
        return JournalAppend(
            first=batch.first, count=batch.count, epoch=self.epoch, gen=self.vol.gen
        )

    # -- journal --------------------------------------------------------------------------

    async def append(self, batch: Batch, heal: Callable[[int, int], Awaitable[None]]) -> None:
        async def on_error(server: int, exc: ServerError) -> bool:
            if exc.code != "GAP":
                return False
            await heal(server, exc.last or 0)
            await self.vol.call(server, self._append(batch), batch.data)
            return True

        await self._all(lambda s: self.vol.call(s, self._append(batch), batch.data), on_error)

    async def send_batches(self, server: int, batches: list[Batch]) -> None:
        for b in batches:
            await self.vol.call(server, self._append(b), b.data)

    async def put_checkpoint(self, seq: int, blob: bytes, server: int | None = None) -> None:
        """Store a checkpoint on one server, or on every server taking writes."""
        total = len(blob)
        offsets = list(range(0, total, CHUNK)) or [0]
        for off in offsets:
            await self._put_part(
                seq, blob[off : off + CHUNK], off, total, off == offsets[-1], server
            )

    async def _put_part(
        self, seq: int, chunk: bytes, offset: int, total: int, final: bool, server: int | None
    ) -> None:
        def req() -> CheckpointPut:  # made at each try: the table generation moves on
            return CheckpointPut(
                seq=seq,
                offset=offset,
                total=total,
                final=final,
                epoch=self.epoch,
                gen=self.vol.gen,
            )

        if server is None:
            await self._all(lambda s: self.vol.call(s, req(), chunk))
        else:
            await self.vol.call(server, req(), chunk)

    # -- reading it back ------------------------------------------------------------------

    async def load(self) -> tuple[int, bytes | None, list[Batch]]:
        """Checkpoint and journal from the live server holding the longest journal; when
        its copy turns out damaged, from the next one."""
        infos = await self.infos()
        live = {s: i for s, i in infos.items() if self.vol.states[s] == State.ALIVE}
        if not live:
            raise VolumeIOError("no live server answers for the metadata")
        damaged = []
        for source in sorted(live, key=lambda s: (-live[s].last_seq, s)):
            try:
                seq, blob = await self._get_checkpoint(source)
                batches = await self._read_journal(source, seq + 1)
            except MirrorfsError as exc:
                damaged.append(str(exc))
                continue
            if (batches[-1].last if batches else seq) < live[source].last_seq:
                damaged.append(f"the journal on server {source} ends early")
                continue
            return seq, blob, batches
        raise MirrorfsError("no server holds whole metadata: " + "; ".join(damaged))

    async def _get_checkpoint(self, server: int) -> tuple[int, bytes | None]:
        parts: list[bytes] = []
        offset = 0
        while True:
            reply = await self.vol.call(server, CheckpointGet(offset=offset, length=CHUNK))
            seq, total, crc = reply.body.seq, reply.body.total, reply.body.crc
            if seq == 0:
                return 0, None
            parts.append(bytes(reply.payload))
            offset += len(reply.payload)
            if offset >= total or not reply.payload:
                break
        blob = b"".join(parts)
        if len(blob) != total or zlib.crc32(blob) != crc:
            raise MirrorfsError(f"the checkpoint on server {server} is damaged")
        return seq, blob

    async def _read_journal(self, server: int, start: int) -> list[Batch]:
        batches: list[Batch] = []
        nxt: int | None = start
        while nxt is not None:
            reply = await self.vol.call(server, JournalRead(start=nxt, max_bytes=CHUNK))
            for first, count, _epoch, crc, data in journal_entries(reply.payload):
                if zlib.crc32(data) != crc:
                    raise MirrorfsError(f"journal entry {first} on server {server} is damaged")
                batches.append(Batch(first, count, data))
            nxt = reply.body.next
        return batches


async def read_namespace(vol: Volume) -> Namespace:
    """The committed namespace, read as a mount reads it (no lease: nothing is changed)."""
    _seq, blob, batches = await MetaStore(vol).load()
    return replay(vol.block_size, blob, batches, os.getuid(), os.getgid(), time.time_ns())
