"""Bytes too large for a datagram (index snapshots), handed over by token on a TCP port.

A replica that must send a snapshot bigger than one datagram keeps it here
under a random token for a while and multicasts only the token and its TCP
address; the receiver reads it in parts of at most BLOB_PART bytes, each one
frame of the common wire protocol. A connection proves the group's key
before any frame is read (``wire.auth``, both ways: the reader checks the
replica's proof too), and all of a replica's connections share one set of
limits.
"""

from __future__ import annotations

import secrets
import time

from mirrorfuse.wire.auth import ServerHandshake
from mirrorfuse.wire.frames import Frame
from mirrorfuse.wire.messages import BlobRead, BlobReadReply

from .net import Answer, FrameServer, Limits, Refused, dispatch

BLOB_PART = 4 << 20
KEEP = 60.0  # seconds a blob stays readable


class BlobStore:
    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, float]] = {}

    def put(self, blob: bytes, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        self.blobs = {t: (b, exp) for t, (b, exp) in self.blobs.items() if exp > now}
        token = secrets.token_hex(8)
        self.blobs[token] = (blob, now + KEEP)
        return token

    def part(self, token: str, offset: int) -> tuple[bytes, int] | None:
        held = self.blobs.get(token)
        if held is None:
            return None
        blob = held[0]
        return blob[offset : offset + BLOB_PART], len(blob)


class BlobServer(FrameServer):
    """One connection to a BlobStore: BLOB_READ {token, offset} -> a part and the total,
    once the connection proved ``key``."""

    def __init__(self, store: BlobStore, key: bytes, limits: Limits | None = None) -> None:
        super().__init__(lambda: ServerHandshake(key, None), limits)
        self.store = store

    def read(self, req: BlobRead, payload: bytes | bytearray, flags: int) -> Answer:
        got = self.store.part(req.token, req.offset)
        if got is None:
            raise Refused("NOT_FOUND", "no such snapshot")
        data, total = got
        return BlobReadReply(total=total), data

    def on_frame(self, frame: Frame) -> None:
        self.send(dispatch(frame, {BlobRead: self.read}))
