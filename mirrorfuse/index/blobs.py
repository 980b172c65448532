"""Reading a snapshot a replica offered by token (the other half is servers/blobs.py).

The connection proves the group's key, and the replica must prove it too:
a server that does not (one without a key, or another key) is refused
before anything is read from it.
"""

from __future__ import annotations

from mirrorfuse.client.connection import Connection, KeyRefused
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.messages import BlobRead

MAX_BLOB = 1 << 30


async def fetch_blob(where: Address, token: str, key: bytes, timeout: float = 10.0) -> bytes:
    """Read a whole blob; raises MirrorfsError (ServerDown, ServerError) on failure."""
    conn = await Connection.open(0, where, timeout, keys=lambda _: key)
    try:
        if not conn.keyed:  # it holds no key at all: not a replica of this group
            raise KeyRefused(0, where, "did not prove the group's key")
        parts: list[bytes] = []
        got, total = 0, None
        while total is None or got < total:
            reply = await conn.call(BlobRead(token=token, offset=got))
            total = reply.body.total
            if total > MAX_BLOB or (not reply.payload and got < total):
                raise ValueError(f"bad snapshot part at {got} of {total}")
            parts.append(bytes(reply.payload))
            got += len(reply.payload)
        return b"".join(parts)
    finally:
        conn.close()
