"""The metadata on the servers: lease, journal batches and checkpoints.

Write-all, read-any: every batch and checkpoint goes to every writable server
(alive or being rebuilt), so the metadata survives as long as one server of
the volume does. A server that answers GAP missed earlier batches (a rebuild
target); it is healed from the last checkpoint and the batches since, which
the caller keeps.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mirrorfuse.client.connection import ServerDown
from mirrorfuse.client.volume import ALIVE, Fenced, Volume
from mirrorfuse.wire.errors import MirrorfsError, ServerError, VolumeIOError
from mirrorfuse.wire.frames import Frame, Msg

ENTRY = struct.Struct("<QIIQI")  # as stored by the server: first, count, length, epoch, crc
CHUNK = 4 << 20


class Leased(MirrorfsError):
    """The volume is mounted read-write elsewhere."""


@dataclass
class Batch:
    first: int
    count: int
    data: bytes

    @property
    def last(self) -> int:
        return self.first + self.count - 1


def holder_info(mountpoint: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "mountpoint": mountpoint,
    }


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "another client"
    where = f" at {holder['mountpoint']}" if holder.get("mountpoint") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{where}"


def _raise_meta(exc: ServerError) -> None:
    if exc.code == "FENCED":
        raise Fenced(f"this client was fenced: {exc}") from None


class MetaStore:
    def __init__(self, volume: Volume) -> None:
        self.vol = volume
        self.epoch = 0
        self.holder: dict[str, Any] = {}

    # -- lease --------------------------------------------------------------------------

    async def infos(self) -> dict[int, dict[str, Any]]:
        """META_INFO of every writable server that answers."""
        targets = [s for s in range(self.vol.spec.count) if self.vol.states[s] != "failed"]
        replies = await asyncio.gather(
            *(self.vol._send(s, Msg.META_INFO, {}) for s in targets), return_exceptions=True
        )
        return {s: r.body for s, r in zip(targets, replies, strict=True) if isinstance(r, Frame)}

    async def take_lease(self, holder: dict[str, Any], force: bool) -> None:
        infos = await self.infos()
        if not force:
            for info in infos.values():
                if info["holder_active"]:
                    who = describe_holder(info["holder"])
                    raise Leased(
                        f"the volume is already mounted read-write by {who}; "
                        "unmount it there, or take it over with --force"
                    )
        self.epoch = max((i["epoch"] for i in infos.values()), default=0) + 1
        self.holder = holder
        body = {"epoch": self.epoch, "holder": holder, "force": force}
        await self._all(Msg.LEASE, body)
        self.vol.lease = {"epoch": self.epoch, "holder": holder}

    # -- sending to every writable server ---------------------------------------------------

    async def _all(
        self,
        type_: int,
        body: dict[str, Any],
        payload: bytes = b"",
        on_error: Callable[[int, ServerError], Any] | None = None,
    ) -> None:
        """Send to every writable server; fail the silent ones, retry on a newer table."""
        for _ in range(20):
            targets = [
                s
                for s in range(self.vol.spec.count)
                if self.vol.states[s] in ("alive", "rebuilding")
            ]
            if not targets:
                raise VolumeIOError("no server is left to hold the metadata")
            if "gen" in body:
                body["gen"] = self.vol.gen
            results = await asyncio.gather(
                *(self.vol._send(s, type_, body, payload) for s in targets), return_exceptions=True
            )
            retry = False
            for s, res in zip(targets, results, strict=True):
                if not isinstance(res, BaseException):
                    continue
                if isinstance(res, ServerError):
                    _raise_meta(res)
                    if res.code == "LEASED":
                        raise Leased(f"server {s} reports the volume mounted elsewhere")
                    if on_error is not None and await on_error(s, res):
                        continue
                if isinstance(res, ServerError | ServerDown):
                    retry |= await self.vol._handle(s, res)
                else:
                    raise res
            if not retry:
                return
        raise MirrorfsError("the failure table keeps changing")

    # -- journal --------------------------------------------------------------------------

    async def append(self, batch: Batch, heal: Callable[[int, int], Any]) -> None:
        body = {
            "first": batch.first,
            "count": batch.count,
            "epoch": self.epoch,
            "gen": self.vol.gen,
        }

        async def on_error(server: int, exc: ServerError) -> bool:
            if exc.code != "GAP":
                return False
            await heal(server, int(exc.body.get("last", 0)))
            await self.vol._send(
                server, Msg.JOURNAL_APPEND, {**body, "gen": self.vol.gen}, batch.data
            )
            return True

        await self._all(Msg.JOURNAL_APPEND, body, batch.data, on_error)

    async def send_batches(self, server: int, batches: list[Batch]) -> None:
        for b in batches:
            body = {"first": b.first, "count": b.count, "epoch": self.epoch, "gen": self.vol.gen}
            await self.vol._send(server, Msg.JOURNAL_APPEND, body, b.data)

    async def put_checkpoint(self, seq: int, blob: bytes, server: int | None = None) -> None:
        """Store a checkpoint on one server, or on every writable one."""
        total = len(blob)
        offsets = list(range(0, total, CHUNK)) or [0]
        for off in offsets:
            body = {
                "seq": seq,
                "offset": off,
                "total": total,
                "final": off == offsets[-1],
                "epoch": self.epoch,
                "gen": self.vol.gen,
            }
            chunk = blob[off : off + CHUNK]
            if server is None:
                await self._all(Msg.CHECKPOINT_PUT, body, chunk)
            else:
                await self.vol._send(server, Msg.CHECKPOINT_PUT, body, chunk)

    # -- reading it back ------------------------------------------------------------------

    async def load(self) -> tuple[int, bytes | None, list[Batch]]:
        """Checkpoint and journal from the live server holding the longest journal."""
        infos = await self.infos()
        live = {s: i for s, i in infos.items() if self.vol.states[s] == ALIVE}
        if not live:
            raise VolumeIOError("no live server answers for the metadata")
        source = max(live, key=lambda s: (live[s]["last_seq"], -s))
        seq, blob = await self._get_checkpoint(source)
        batches = await self._read_journal(source, seq + 1)
        return seq, blob, batches

    async def _get_checkpoint(self, server: int) -> tuple[int, bytes | None]:
        parts: list[bytes] = []
        offset = 0
        while True:
            reply = await self.vol._send(
                server, Msg.CHECKPOINT_GET, {"offset": offset, "length": CHUNK}
            )
            seq, total, crc = reply.body["seq"], reply.body["total"], reply.body["crc"]
            if seq == 0:
                return 0, None
            parts.append(reply.payload)
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
            reply = await self.vol._send(
                server, Msg.JOURNAL_READ, {"from": nxt, "max_bytes": CHUNK}
            )
            raw = reply.payload
            pos = 0
            while pos + ENTRY.size <= len(raw):
                first, count, length, _epoch, crc = ENTRY.unpack_from(raw, pos)
                data = bytes(raw[pos + ENTRY.size : pos + ENTRY.size + length])
                if zlib.crc32(data) != crc:
                    raise MirrorfsError(f"journal entry {first} on server {server} is damaged")
                batches.append(Batch(first, count, data))
                pos += ENTRY.size + length
            nxt = reply.body["next"]
        return batches
