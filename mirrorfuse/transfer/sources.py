"""Where a download's bytes come from: file servers, HTTP mirrors, servers of a volume.

A source serves byte ranges of one object and says how large it is (and,
when it can, its checksum and whether it is paused). Failures are
SourceFailed (the scheduler gives its segments to others) or SourcePaused.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mirrorfuse.client.connection import Connection, ServerDown
from mirrorfuse.core.scheduler import ALIVE, Segment
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import KeyLookup
from mirrorfuse.wire.errors import ServerError
from mirrorfuse.wire.messages import Availability, FileInfo, Read, Reply, Request

from .httpfetch import HttpFetcher
from .output import Output
from .wirefetch import Fetcher, FetchFailed, FetchPaused

if TYPE_CHECKING:  # only get builds a VolumeServerSource: a download needs no volume client
    from mirrorfuse.client.volume import Volume

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

    async def fetch(self, seg: Segment, out: Output, direct: bool) -> bytes | None:
        """The segment's bytes, or None when they were written into ``out`` (and checked)
        already; ``direct`` says that may be done (else only checked bytes are returned)."""
        return await self.read(seg)

    async def close(self) -> None:
        return None


def done(fut: asyncio.Future[Any], fetcher: Fetcher | HttpFetcher) -> None:
    """A fetch nobody awaits any more has ended: its connection closes, and its error is
    marked seen (asyncio would print it as lost)."""
    if not fut.cancelled():
        fut.exception()
    fetcher.close()


class ThreadedSource(Source):
    """A source read by blocking fetchers in threads (``wirefetch``, ``httpfetch``), one
    connection each; a fetch may splice its bytes into the output file directly."""

    def __init__(self) -> None:
        self._idle: list[Fetcher | HttpFetcher] = []  # fetchers not in use, kept connected

    @abstractmethod
    def _fetcher(self, out: Output | None) -> Fetcher | HttpFetcher: ...

    async def fetch(self, seg: Segment, out: Output, direct: bool) -> bytes | None:
        fetcher = self._idle.pop() if self._idle else self._fetcher(out)
        fd = out.fd if direct and out.can_splice else None
        running = out.run(fetcher.fetch, seg.start, seg.length, fd)
        try:
            got = await asyncio.shield(running)
        except asyncio.CancelledError:
            fetcher.abort()  # it may be writing into the file: wait until it stopped,
            while not running.done():  # however often this is cancelled meanwhile
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([running])
            done(running, fetcher)
            raise
        except FetchPaused as exc:
            self._idle.append(fetcher)
            raise SourcePaused(str(exc)) from None
        except FetchFailed as exc:
            self._idle.append(fetcher)  # closed: it connects again when next used
            raise SourceFailed(str(exc)) from None
        data = None if got is None else bytes(got)  # its buffer serves its next fetch
        self._idle.append(fetcher)
        return data

    async def read(self, seg: Segment) -> bytes:
        """One segment without an output (the downloader uses fetch): a fetcher of its
        own, closed after, so a cancelled read leaves no thread on a shared one."""
        fetcher = self._fetcher(None)
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(None, fetcher.fetch, seg.start, seg.length, None)
        try:
            got = await asyncio.shield(running)
        except asyncio.CancelledError:
            fetcher.abort()
            raise
        except FetchPaused as exc:
            raise SourcePaused(str(exc)) from None
        except FetchFailed as exc:
            raise SourceFailed(str(exc)) from None
        finally:
            running.add_done_callback(lambda f: done(f, fetcher))
        assert got is not None
        return bytes(got)

    async def close(self) -> None:
        for fetcher in self._idle:
            fetcher.close()
        self._idle.clear()


class FileServerSource(ThreadedSource):
    def __init__(
        self, address: Address, file: str | None = None, keys: KeyLookup | None = None
    ) -> None:
        self.address = address
        self.file = file  # a peer serves many files: which one
        self.keys = keys  # a peer's: the index group's key, proven before any request
        super().__init__()
        self.name = str(address)
        self._conn: Connection | None = None  # for info() (the event loop's own)

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

    def _fetcher(self, out: Output | None) -> Fetcher:
        view = out.view if out is not None and out.can_splice else None
        return Fetcher(self.address, self.file, self.keys, READ_TIMEOUT, view)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        await super().close()


class HttpSource(ThreadedSource):
    """An HTTP mirror, read with Range requests (``httpfetch``)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.name = url

    def _fetcher(self, out: Output | None) -> HttpFetcher:
        return HttpFetcher(self.url, READ_TIMEOUT)

    async def info(self) -> Info:
        fetcher = self._fetcher(None)  # kept for the first fetch: it is connected
        try:
            size = await asyncio.get_running_loop().run_in_executor(None, fetcher.size)
        except FetchFailed as exc:
            raise SourceFailed(str(exc)) from None
        finally:
            self._idle.append(fetcher)
        path = urllib.parse.urlsplit(fetcher.url).path  # where a redirect led
        name = urllib.parse.unquote(path.rpartition("/")[2])
        return Info(size, None, name=name)


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
