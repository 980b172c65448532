"""Bytes too large for a datagram (index snapshots), handed over by token on a TCP port.

A replica that must send a snapshot bigger than one datagram keeps it here
under a random token for a while and multicasts only the token and its TCP
address; the receiver reads it in parts of at most BLOB_PART bytes, each one
frame of the common wire protocol.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from mirrorfuse.client.connection import Connection
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.frames import (
    BadRequest,
    Flag,
    Frame,
    FrameServer,
    Msg,
    encode,
    encode_error,
    need,
)

BLOB_PART = 4 << 20
KEEP = 60.0  # seconds a blob stays readable
MAX_BLOB = 1 << 30


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
    """One connection to a BlobStore: BLOB_READ {token, offset} -> a part and the total."""

    def __init__(self, store: BlobStore) -> None:
        super().__init__()
        self.store = store

    def on_frame(self, frame: Frame) -> None:
        if frame.defect or frame.is_reply or frame.type != Msg.BLOB_READ:
            what = frame.defect or f"unexpected message type {frame.type}"
            self.send(encode_error(frame.req_id, frame.type, "BAD_REQUEST", what))
            return
        try:
            token = need(frame.body, "token", str)
            offset = need(frame.body, "offset", int)
        except BadRequest as exc:
            self.send(encode_error(frame.req_id, frame.type, "BAD_REQUEST", str(exc)))
            return
        got = self.store.part(token, max(0, offset))
        if got is None:
            self.send(encode_error(frame.req_id, frame.type, "NOT_FOUND", "no such snapshot"))
            return
        data, total = got
        self.send(encode(Msg.BLOB_READ, frame.req_id, {"total": total}, data, flags=Flag.REPLY))


def offered_at(offer: dict[str, Any], sender: str) -> tuple[str, int, str]:
    """Where a snapshot offer says to read it: host, port, token (an offer from a
    replica listening on every address means the address it was sent from)."""
    host = str(offer["host"])
    return (sender if host in ("0.0.0.0", "") else host), int(offer["port"]), str(offer["token"])


async def fetch_blob(host: str, port: int, token: str, timeout: float = 10.0) -> bytes:
    """Read a whole blob; raises MirrorfsError (ServerDown, ServerError) on failure."""
    conn = await Connection.open(0, Address(host, port), timeout)
    try:
        parts: list[bytes] = []
        got, total = 0, None
        while total is None or got < total:
            frame = await conn.request(Msg.BLOB_READ, {"token": token, "offset": got})
            total = int(frame.body.get("total", 0))
            if total > MAX_BLOB or (not frame.payload and got < total):
                raise ValueError(f"bad snapshot part at {got} of {total}")
            parts.append(bytes(frame.payload))
            got += len(frame.payload)
        return b"".join(parts)
    finally:
        conn.close()
