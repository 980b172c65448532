"""Frames: the one framing of every mirrorfs daemon.

A frame is a fixed binary header, a msgpack body and an optional raw payload
that carries block data untouched, so a block is never re-encoded on its way
to the disk. The decoder is a sans-I/O state machine: it is fed bytes and
hands back frames, so it is tested without sockets and the same code serves
every client and server. Bodies stay raw here; ``messages`` gives them a type.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any

import msgspec

MAGIC = b"MF"
# 2: typed bodies (msgspec schemas). A peer speaking another version is refused
# at its first frame, before any body is read.
VERSION = 2
# magic, version, message type, request id, flags, body length, payload length
HEADER = struct.Struct(">2sBBQHII")
HEADER_SIZE = HEADER.size
MAX_BODY = 1 << 20
MAX_PAYLOAD = 16 << 20  # of any frame: a reply may carry 8 MiB of a file or a journal
# of a request to a block server: a block (4 MiB at most), a journal batch or a
# checkpoint chunk (4 MiB each); a daemon never reads a larger one
MAX_REQUEST_PAYLOAD = 8 << 20

_encoder = msgspec.msgpack.Encoder()


class Msg(IntEnum):
    """Message types; a reply carries the type of its request."""

    HELLO = 1
    STAT = 2
    FORMAT = 3
    READ = 4
    WRITE = 5
    TRIM = 6
    LIST = 7
    GET_TABLE = 8
    SET_TABLE = 9
    SYNC = 10
    HEAL_BEGIN = 11
    META_INFO = 12
    LEASE = 13
    JOURNAL_APPEND = 14
    JOURNAL_READ = 15
    CHECKPOINT_PUT = 16
    CHECKPOINT_GET = 17
    FILE_INFO = 20
    FILE_READ = 21
    BLOB_READ = 22  # a part of an index snapshot, by token (index replicas)
    PEER_INDEX = 23  # a peer's cached index and the peers it knows, exchanging lists
    PEER_SHARE = 24  # ask a running peer to share one more file (loopback only)
    PEER_UNSHARE = 25
    ERROR = 255


class Flag(IntFlag):
    REPLY = 0x1
    ERROR = 0x2
    REPAIR = 0x4  # a write that replaces a copy found bad (counted by the server)
    COPY = 0x8  # a rebuild copy: loses against any newer write to the same slot
    DEGRADED = 0x10  # the writer's table leaves the slot's mirror out: note it for its heal


class ProtocolError(Exception):
    """The byte stream cannot be trusted any more: the connection must close."""


@dataclass(slots=True)
class Frame:
    type: int
    req_id: int
    flags: int = 0
    body: bytes = b""  # msgpack, decoded against a schema by ``messages``
    payload: bytes | bytearray = b""
    held: int = 0  # bytes reserved for it from the receiver's budget, until handled

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & Flag.REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & Flag.ERROR)


def encode(
    type_: int,
    req_id: int,
    body: Any = None,
    payload: bytes | bytearray | memoryview = b"",
    flags: int = 0,
) -> list[bytes | bytearray | memoryview]:
    """Frame a message as buffers for ``writelines`` (the payload is not copied).

    ``body`` is a message struct (or a plain map, for tests and fuzzing).
    """
    raw = _encoder.encode({} if body is None else body)
    if len(raw) > MAX_BODY:
        raise ValueError(f"message body of {len(raw)} bytes exceeds {MAX_BODY}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = HEADER.pack(MAGIC, VERSION, type_, req_id, flags, len(raw), len(payload))
    return [head + raw, payload] if payload else [head + raw]


class FrameDecoder:
    """Incremental frame parser, usable as the buffer of an asyncio.BufferedProtocol.

    Headers and bodies collect in a scratch buffer; a payload larger than what
    has arrived gets its own buffer, and ``get_buffer`` then hands out that
    buffer so the socket writes block data straight into it (no extra copy).
    ``feed`` is the same machine for callers that already hold bytes.

    ``reserve`` (a daemon's budget of bytes in flight) is asked before a
    payload's buffer is allocated; when it says no, the decoder stops at that
    header (``blocked``) until ``retry`` is called, so memory follows what the
    daemon can take, not what a peer announces.
    """

    SCRATCH = 64 << 10

    def __init__(
        self, max_payload: int = MAX_PAYLOAD, reserve: Callable[[int], bool] | None = None
    ) -> None:
        self.max_payload = max_payload
        self.reserve = reserve
        self.blocked = False
        self._scratch = bytearray(self.SCRATCH)
        self._start = 0  # first unparsed byte in the scratch buffer
        self._end = 0  # end of received bytes in the scratch buffer
        self._waiting: Frame | None = None  # a frame whose payload is still arriving
        self._payload = bytearray()
        self._filled = 0
        self._ready: deque[Frame] = deque()
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as frames."""
        return self._end - self._start + (self._filled if self._waiting else 0)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._waiting is not None:
            return memoryview(self._payload)[self._filled :]
        if self._end == len(self._scratch):
            if self._start:
                size = self._end - self._start
                self._scratch[:size] = self._scratch[self._start : self._end]
                self._start, self._end = 0, size
            else:  # one header and body larger than the scratch buffer (bounded by MAX_BODY)
                self._scratch.extend(bytes(len(self._scratch)))
        return memoryview(self._scratch)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._broken is not None:
            self._start = self._end = 0
            return
        if self._waiting is not None:
            self._filled += nbytes
            if self._filled == len(self._payload):
                self._waiting.payload = self._payload
                self._ready.append(self._waiting)
                self._waiting, self._payload, self._filled = None, bytearray(), 0
        else:
            self._end += nbytes
        self._parse()

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    @property
    def partial(self) -> bool:
        """A frame has begun to arrive and is not complete."""
        return self._end > self._start or self._waiting is not None

    def retry(self) -> None:
        """Try again to take the frame the budget refused."""
        self.blocked = False
        self._parse()

    def _check(self, magic: bytes, version: int, body_len: int, payload_len: int) -> str | None:
        if magic != MAGIC:
            return "bad magic (not a mirrorfs peer?)"
        if version != VERSION:
            return f"protocol version {version} is not supported (this side speaks {VERSION})"
        if body_len > MAX_BODY:
            return f"body length {body_len} exceeds {MAX_BODY}"
        if payload_len > self.max_payload:
            return f"payload length {payload_len} exceeds {self.max_payload}"
        return None

    def _parse(self) -> None:
        while self._waiting is None and self._broken is None and not self.blocked:
            avail = self._end - self._start
            if avail < HEADER_SIZE:
                break
            magic, version, type_, req_id, flags, body_len, payload_len = HEADER.unpack_from(
                self._scratch, self._start
            )
            problem = self._check(magic, version, body_len, payload_len)
            if problem:
                self._broken = problem
                self._start = self._end = 0
                break
            if avail < HEADER_SIZE + body_len:
                break
            pos = self._start + HEADER_SIZE
            have = min(self._end - pos - body_len, payload_len)
            held = 0
            if self.reserve is not None and payload_len > have:
                held = body_len + payload_len
                if not self.reserve(held):
                    self.blocked = True
                    break
            body = bytes(self._scratch[pos : pos + body_len])
            pos += body_len
            frame = Frame(type_, req_id, flags, body, b"", held)
            if have == payload_len:
                frame.payload = bytes(self._scratch[pos : pos + have])
                self._ready.append(frame)
            else:
                self._payload = bytearray(payload_len)
                self._payload[:have] = self._scratch[pos : pos + have]
                self._filled = have
                self._waiting = frame
            self._start = pos + have
        if self._start == self._end:
            self._start = self._end = 0

    def drop(self) -> int:
        """Forget every frame not handed out; the bytes they held, to give back."""
        held = sum(f.held for f in self._ready) + (self._waiting.held if self._waiting else 0)
        self._ready.clear()
        self._waiting, self._payload, self._filled = None, bytearray(), 0
        self._start = self._end = 0
        return held

    def next_frame(self) -> Frame | None:
        """The next complete frame, None if more bytes are needed.

        Raises ProtocolError once the frames before a corrupt header are
        consumed, and on every later call, so nobody resynchronises by accident.
        """
        if self._ready:
            return self._ready.popleft()
        if self._broken is not None:
            raise ProtocolError(self._broken)
        return None

    def frames(self) -> list[Frame]:
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out
