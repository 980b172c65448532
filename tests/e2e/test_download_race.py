"""mirrorfs-cli download's end game: a source that stalls mid-segment is raced by a fast
one, whose copy (buffered, never written in place) wins; the stalled fetch, which was
splicing into the output in place, is stopped before that copy's bytes land.

Both sources are serve-file's own server (VirtualServer) on uvloop in a thread of this
process, so the test sees what each was asked and when a connection ended; the stalling
one sends a reply's head, then wrong bytes slowly, never the last one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xxhash
from fakes import LoopThread
from helpers import sha

from mirrorfuse.client.loop import new_event_loop
from mirrorfuse.wire.frames import Frame, Msg
from mirrorfuse.wire.messages import FileRead, FileReadReply, decode, encode_reply
from servers.fileserver import FileConnection, VirtualServer, listen

CLI = str(Path(sys.executable).parent / "mirrorfs-cli")
MiB = 1 << 20
SIZE = 32 * MiB  # 32 segments of 1 MiB from two sources
TRICKLE = 8 << 10  # bytes every 5 ms: a stalled segment's payload lasts 0.64 s


@dataclass
class Seen:
    fast: set[int] = field(default_factory=set)  # offsets the fast source was asked for
    stalled: list[int] = field(default_factory=list)  # offsets the stalling one holds
    # for each stalled segment, when its connection ended: had the fast source been asked
    # for it by then? (yes: a race's copy; no: ended first, as after a timeout)
    ended: list[bool] = field(default_factory=list)


class Stalling(FileConnection):
    """Answers FILE_INFO as serve-file does; a FILE_READ gets its reply's head (with the
    right checksum), then its payload as wrong bytes, slowly, all but the last: the fetch
    never ends until the client ends the connection."""

    def __init__(self, server: VirtualServer, seen: Seen) -> None:
        super().__init__(server)
        self.seen = seen
        self.holding: list[int] = []

    def on_frame(self, frame: Frame) -> None:
        if frame.type != Msg.FILE_READ:
            super().on_frame(frame)
            return
        req = decode(FileRead, frame.body)
        self.seen.stalled.append(req.offset)
        self.holding.append(req.offset)
        right = os.pread(self.server.fd, req.length, req.offset)
        body = FileReadReply(checksum=xxhash.xxh3_64_intdigest(right))
        head = encode_reply(frame.type, frame.req_id, body, right)[0]
        self.send([head])
        self._trickle(req.length - 1)

    def _trickle(self, left: int) -> None:
        """Wrong bytes, a few at a time, for as long as the fetch lasts (but never the
        last byte): a copy written in place meanwhile would be overwritten."""
        if left <= 0 or self.transport is None or self.transport.is_closing():
            return
        n = min(TRICKLE, left)
        self.send([b"\xff" * n])
        asyncio.get_running_loop().call_later(0.005, self._trickle, left - n)

    def connection_lost(self, exc: Exception | None) -> None:
        self.seen.ended += [offset in self.seen.fast for offset in self.holding]
        super().connection_lost(exc)


@dataclass
class Sources:
    src: Path
    fast: int  # ports
    stalling: int
    seen: Seen


@pytest.fixture
def sources(tmp_path: Path) -> Iterator[Sources]:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(SIZE))
    checksum = xxhash.xxh3_64_intdigest(src.read_bytes())
    seen = Seen()
    fast = VirtualServer(1, 0, src, SIZE, checksum)
    slow = VirtualServer(2, 0, src, SIZE, checksum)
    read = fast.handlers[FileRead]

    def recorded(req: FileRead, payload: bytes | bytearray, flags: int):  # noqa: ANN202
        seen.fast.add(req.offset)
        return read(req, payload, flags)

    fast.handlers[FileRead] = recorded

    async def start() -> tuple[int, int]:
        await listen([fast], "127.0.0.1")
        loop = asyncio.get_running_loop()
        slow.listener = await loop.create_server(lambda: Stalling(slow, seen), "127.0.0.1", 0)
        assert fast.listener is not None
        return fast.listener.sockets[0].getsockname()[1], slow.listener.sockets[0].getsockname()[1]

    lt = LoopThread(new_event_loop)  # serve-file's loop
    try:
        ports = lt.run(start())
        yield Sources(src, ports[0], ports[1], seen)
    finally:
        lt.call(fast.end)
        lt.call(slow.end)
        lt.close()
        fast.close()
        slow.close()


def test_a_stalled_segment_is_raced_and_the_winning_copy_lands_over_it(tmp_path, sources):
    out = tmp_path / "out.bin"
    res = subprocess.run(
        [CLI, "download", "-i", "5", "-o", str(out), "-a", "127.0.0.1"]
        + ["-p", str(sources.fast), str(sources.stalling)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(verified)" in res.stdout
    assert sha(out) == sha(sources.src)  # the wrong bytes spliced in place were overwritten
    assert not out.with_name("out.bin.mfs-state").exists()
    assert not out.with_name("out.bin.mfs-partial").exists()
    seen = sources.seen
    assert seen.stalled, "the stalling source was never asked for a segment"
    assert seen.fast >= set(seen.stalled)  # every stalled segment came from the fast one
    # and each stalled fetch was stopped after the fast copy had been asked for: a race
    # it lost, not a read timeout (that ends the fetch first, then asks elsewhere)
    assert seen.ended == [True] * len(seen.stalled), (seen, res.stdout)
