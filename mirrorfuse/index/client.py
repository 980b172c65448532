"""A client of the index group (seed 002): ask the group, show the first reply.

Every replica answers every request. The client takes the first reply to
its current request id and ignores the rest: duplicates, and late replies
to earlier requests. A request that gets no reply in time is sent again
with the same id, which the group applies only once.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import time
import uuid
from typing import Any

import msgpack

from mirrorfuse.core.group import IndexState
from mirrorfuse.index.blobs import fetch_blob, offered_at
from mirrorfuse.wire.errors import MirrorfsError


def backoff(attempt: int, limit: float) -> float:
    """How long to wait for a reply before sending again: a lost datagram costs a
    quarter of a second, a group without a master (failover) is not flooded."""
    return min(0.25 * 2**attempt, limit)


class IndexClient:
    def __init__(
        self,
        group: str,
        port: int,
        replicas: list[tuple[str, int]] | None = None,
        client_id: str | None = None,
    ) -> None:
        self.targets = replicas or [(group, port)]
        self.client = client_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ids = itertools.count(1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        self.sock.setsockopt(
            socket.IPPROTO_IP,
            socket.IP_MULTICAST_IF,
            struct.pack("4s", socket.inet_aton("0.0.0.0")),
        )
        self.sock.bind(("0.0.0.0", 0))
        self.ignored = 0  # duplicate and late replies seen
        self.timeout, self.tries = 2.0, 5  # per try; updates are retried more than queries
        self.last_sender = "127.0.0.1"  # who sent the last reply taken

    def _send(self, msg: dict[str, Any]) -> None:
        data = msgpack.packb(msg, use_bin_type=True)
        for target in self.targets:
            self.sock.sendto(data, target)

    def _collect(self, req: int, until: float, first_only: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return out
            self.sock.settimeout(left)
            try:
                data, sender = self.sock.recvfrom(65536)
            except TimeoutError:
                return out
            try:
                m = msgpack.unpackb(data, raw=False, strict_map_key=False)
            except Exception:
                continue
            if not isinstance(m, dict) or m.get("client") != self.client or m.get("req") != req:
                self.ignored += 1  # a late reply to an earlier request, or not ours
                continue
            out.append(m)
            self.last_sender = sender[0]
            if first_only:
                return out

    def request(
        self, op: str, args: dict[str, Any], timeout: float | None = None, tries: int | None = None
    ) -> dict[str, Any]:
        """An update, ordered by the group; the first reply."""
        timeout = timeout or self.timeout
        tries = tries or self.tries
        req = next(self.ids)
        msg = {"t": "req", "client": self.client, "req": req, "op": op, "args": args}
        for i in range(tries):
            self._send(msg)
            got = self._collect(req, time.monotonic() + backoff(i, timeout), True)
            if got:
                return got[0]["reply"]
        raise MirrorfsError(f"no index replica answered ({tries} tries)")

    def query(
        self, q: str, timeout: float | None = None, tries: int | None = None, **kw: Any
    ) -> dict[str, Any]:
        """A read-only question; any replica answers from its copy."""
        timeout = timeout or self.timeout
        tries = tries or max(1, self.tries - 2)
        req = next(self.ids)
        for i in range(tries):
            self._send({"t": "query", "client": self.client, "req": req, "q": q, **kw})
            got = self._collect(req, time.monotonic() + backoff(i, timeout), True)
            if got:
                return got[0]["reply"]
        raise MirrorfsError(f"no index replica answered ({tries} tries)")

    def query_pages(self, q: str, key: str, **kw: Any) -> dict[str, Any]:
        """A paged question (files, search, peers): every page, merged under ``key``."""
        merged: dict[str, Any] = {}
        after = ""
        while True:
            reply = self.query(q, after=after, **kw)
            if not reply.get("ok"):
                raise MirrorfsError(f"the index refused: {reply.get('error')}")
            merged.update(reply[key])
            if not reply.get("next"):
                return merged
            after = reply["next"]

    def snapshot(self) -> IndexState:
        """The whole index as one replica holds it (a peer's cached copy)."""
        offer = self.query("snapshot")
        if not offer.get("ok"):
            raise MirrorfsError(f"the index refused: {offer.get('error')}")
        if "blob" in offer:
            return IndexState.from_snapshot(bytes(offer["blob"]))
        blob = asyncio.run(fetch_blob(*offered_at(offer, self.last_sender)))
        return IndexState.from_snapshot(blob)

    def query_all(self, q: str, wait: float = 1.0, **kw: Any) -> list[dict[str, Any]]:
        """Every replica's answer that arrives within ``wait`` seconds (status of the group)."""
        req = next(self.ids)
        self._send({"t": "query", "client": self.client, "req": req, "q": q, **kw})
        return [m["reply"] for m in self._collect(req, time.monotonic() + wait, False)]

    def close(self) -> None:
        self.sock.close()
