"""Where a download's bytes come from: file servers, HTTP mirrors, servers of a volume.

A source serves byte ranges of one object and says how large it is (and,
when it can, its checksum and whether it is paused). Failures are
SourceFailed (the scheduler gives its segments to others) or SourcePaused.
"""

from __future__ import annotations

import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash

from mirrorfuse.client.connection import Connection, ServerDown
from mirrorfuse.client.volume import Volume
from mirrorfuse.core.scheduler import ALIVE, Segment
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import KeyLookup
from mirrorfuse.wire.errors import ServerError
from mirrorfuse.wire.messages import Availability, FileInfo, FileRead, Read, Reply, Request

if TYPE_CHECKING:
    import aiohttp  # imported when an HTTP mirror is used: it is slow to import

WORKERS_PER_SOURCE = 2
READ_TIMEOUT = 10.0


class SourcePaused(Exception):
    pass


class SourceFailed(Exception):
    pass


@dataclass
class Info:
    size: int
    checksum: int | None  # xxh3-64 of the whole object, when the source knows it
    state: Availability = ALIVE
    name: str = ""  # the file's name where the source says it (a directory -o saves it so)


class Source(ABC):
    """A place that serves byte ranges of one object."""

    name: str

    @abstractmethod
    async def info(self) -> Info: ...

    @abstractmethod
    async def read(self, seg: Segment) -> bytes: ...

    async def close(self) -> None:
        return None


class FileServerSource(Source):
    def __init__(
        self, address: Address, file: str | None = None, keys: KeyLookup | None = None
    ) -> None:
        self.address = address
        self.file = file  # a peer serves many files: which one
        self.keys = keys  # a peer's: the index group's key, proven before any request
        self.name = str(address)
        self._conn: Connection | None = None

    async def _c(self) -> Connection:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = await Connection.open(0, self.address, READ_TIMEOUT, keys=self.keys)
            except ServerDown as exc:
                raise SourceFailed(exc.reason) from None
        return self._conn

    async def _request(self, req: Request[Any]) -> Reply[Any]:
        try:
            return await (await self._c()).call(req)
        except ServerDown as exc:
            raise SourceFailed(exc.reason) from None
        except ServerError as exc:
            if exc.code == "PAUSED":
                raise SourcePaused(str(exc)) from None
            raise SourceFailed(str(exc)) from None

    async def info(self) -> Info:
        b = (await self._request(FileInfo(name=self.file))).body
        return Info(b.size, b.checksum, b.state, b.name)

    async def read(self, seg: Segment) -> bytes:
        reply = await self._request(FileRead(offset=seg.start, length=seg.length, name=self.file))
        data = bytes(reply.payload)
        if len(data) != seg.length or xxhash.xxh3_64_intdigest(data) != reply.body.checksum:
            raise SourceFailed(f"segment {seg.index} arrived damaged")
        return data

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class HttpSource(Source):
    """An HTTP mirror, read with Range requests (aiohttp: its parser is in C)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = url
        self._session: aiohttp.ClientSession | None = None

    def _s(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT),
                connector=aiohttp.TCPConnector(limit=WORKERS_PER_SOURCE),
            )
        return self._session

    async def _get(self, start: int, end: int) -> tuple[int, dict[str, str], bytes]:
        import aiohttp

        try:
            async with self._s().get(self.url, headers={"Range": f"bytes={start}-{end}"}) as r:
                if r.status != 206:  # not a range: do not read a whole file to learn that
                    return r.status, dict(r.headers), b""
                return r.status, dict(r.headers), await r.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise SourceFailed(f"{type(exc).__name__}: {exc}") from None

    async def info(self) -> Info:
        status, headers, _ = await self._get(0, 0)
        rng = headers.get("Content-Range", "")
        if status != 206 or "/" not in rng:
            raise SourceFailed(f"does not serve byte ranges (HTTP {status})")
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rpartition("/")[2])
        return Info(int(rng.rpartition("/")[2]), None, name=name)

    async def read(self, seg: Segment) -> bytes:
        status, _, data = await self._get(seg.start, seg.end - 1)
        if status != 206 or len(data) != seg.length:
            raise SourceFailed(f"HTTP {status}, {len(data)} bytes for {seg.length}")
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class VolumeServerSource(Source):
    """One server of a mirrorfs volume; a segment is one block, checked against the block map."""

    def __init__(
        self, vol: Volume, server: int, blocks: dict[int, tuple[int, int]], size: int
    ) -> None:
        self.vol = vol
        self.server = server
        self.blocks = blocks
        self.size = size
        self.name = f"server {server} ({vol.spec.addresses[server]})"

    async def info(self) -> Info:
        return Info(self.size, None)

    async def read(self, seg: Segment) -> bytes:
        block, csum = self.blocks[seg.index]
        try:
            reply = await self.vol.call(self.server, Read(slot=self.vol.layout.slot_of(block)))
        except (ServerDown, ServerError) as exc:
            raise SourceFailed(str(exc)) from None
        data = bytes(reply.payload)
        if self.vol.checksum(data) != csum:
            raise SourceFailed(f"block {seg.index} is damaged on this server")
        return bytes(data) + bytes(seg.length - len(data))  # a short last block: zeros follow
