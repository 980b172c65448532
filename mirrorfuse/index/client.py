"""A client of the index group: ask the group, take the first reply.

Every replica answers every request. The client takes the first reply to
each of its request ids and ignores the rest: duplicates, and late replies
to earlier requests. A request that gets no reply in time is sent again
with the same id, which the group applies only once (a retry of an applied
update gets its original reply); updates are sent again for long enough to
outlast a change of master. Each client object is an incarnation of its own:
its id ends in a random part, so a process restarted under the same name
(a peer's ``--id``) is not taken for the old one, whose request ids it
would repeat. Every datagram is sealed with the group's key (``key``, by
default read from ``keys.default_key_path()``), and replies without a valid,
fresh seal are ignored. The socket is bound to one address of this machine:
``interface`` if given (the replicas' ``--host``), else for a multicast
group 127.0.0.1 (replicas started without ``--host`` keep the group on this
machine), else the address the routes take to the replicas.
``IndexClient`` runs on the caller's event loop; ``BlockingIndexClient``
gives the same calls to code without one (the command line, tests).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import socket
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from mirrorfuse.client.blocking import new_event_loop
from mirrorfuse.client.retry import GaveUp, TryAgain, retry
from mirrorfuse.core.group import SILENCE, BadSnapshot, IndexState
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.datagrams import (
    MAX_CLIENT,
    Answer,
    BadDatagram,
    FilesPage,
    Opener,
    PeersPage,
    Query,
    ReplicaStatus,
    Req,
    Result,
    Sealer,
    SnapshotOffer,
    StateDump,
    UpdateResult,
    VersionSkew,
    offered_at,
    pack,
    result_of,
    unpack,
)
from mirrorfuse.wire.errors import MirrorfsError

from .blobs import fetch_blob
from .keys import group_key

T = TypeVar("T")

# an update keeps being sent for this long: a master's silence, its successor
# taking over (a heartbeat or two) and catching up, with room to spare
PATIENCE = 4 * SILENCE

QUERY_REPLIES: dict[str, type[Result]] = {
    "peers": PeersPage,
    "files": FilesPage,
    "search": FilesPage,
    "held": FilesPage,
    "snapshot": SnapshotOffer,
    "status": ReplicaStatus,
    "state": StateDump,
}


def backoff(attempt: int, limit: float) -> float:
    """How long to wait for a reply before sending again: a lost datagram costs a
    quarter of a second, a group without a master (failover) is not flooded."""
    return min(0.25 * 2**attempt, limit)


def tries_for(patience: float, limit: float) -> int:
    """How many tries, backing off up to ``limit`` each, wait ``patience`` seconds in all."""
    n, waited = 0, 0.0
    while waited < patience:
        waited += backoff(n, limit)
        n += 1
    return max(n, 1)


def local_address(targets: list[Address], multicast: bool) -> str:
    """The address of this machine to send from: loopback for a group kept on this
    machine or replicas on it, else the one the routes take (0.0.0.0 when they differ)."""
    if multicast:
        return "127.0.0.1"
    sources = set()
    for t in targets:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect((t.host, t.port))  # no datagram is sent: the route is looked up
            sources.add(probe.getsockname()[0])
        except OSError:
            return "0.0.0.0"
        finally:
            probe.close()
    outside = {s for s in sources if not s.startswith("127.")}
    if len(outside) > 1 or "0.0.0.0" in sources:
        return "0.0.0.0"
    return outside.pop() if outside else "127.0.0.1"


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, client: IndexClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.client._received(data, str(addr[0]))


class IndexClient:
    def __init__(
        self,
        group: str,
        port: int,
        replicas: list[Address] | None = None,
        client_id: str | None = None,
        key: bytes | None = None,
        interface: str | None = None,
    ) -> None:
        self.targets = replicas or [Address(group, port)]
        self.interface = interface or local_address(self.targets, not replicas)
        self.key = key if key is not None else group_key()
        self.sealer = Sealer(self.key, secrets.token_bytes(8))
        self.opener = Opener(self.key)
        name = client_id or f"{socket.gethostname()}-{os.getpid()}"
        self.client = f"{name[: MAX_CLIENT - 9]}-{uuid.uuid4().hex[:8]}"  # this incarnation
        self.ids = itertools.count(1)
        self.ignored = 0  # duplicate, late and foreign replies seen
        self.unsealed = 0  # datagrams without a valid, fresh seal of the group's key
        self.timeout = 2.0  # the longest wait for a reply before sending again
        self.patience = PATIENCE  # how long an update is tried
        self.tries = 3  # how often a query is tried (another replica's answer is as good)
        self.last_sender = "127.0.0.1"  # who sent the last reply taken
        self._transport: asyncio.DatagramTransport | None = None
        self._opening = asyncio.Lock()
        self._waiting: dict[int, asyncio.Queue[tuple[Answer, str]]] = {}
        self.skew = ""  # a reply of another protocol version was seen (said when none answers)

    async def _open(self) -> asyncio.DatagramTransport:
        async with self._opening:  # two first calls at once make one socket
            return await self._open_once()

    async def _open_once(self) -> asyncio.DatagramTransport:
        if self._transport is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                iface = socket.inet_aton(socket.gethostbyname(self.interface))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
                sock.bind((self.interface, 0))
            except OSError as exc:
                sock.close()
                raise MirrorfsError(f"cannot send from {self.interface}: {exc}") from None
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Endpoint(self), sock=sock
            )
        return self._transport

    def _received(self, data: bytes, sender: str) -> None:
        try:
            data = self.opener.open(data, time.time())
        except BadDatagram as exc:  # not from the group: nothing in it is read
            self.unsealed += 1
            self.skew = (
                f"{self.unsealed} datagram(s) without the group's valid seal came, the last "
                f"from {sender} ({exc}; a replica of another version, or with another key?)"
            )
            return
        try:
            msg = unpack(data)
        except VersionSkew as exc:
            self.skew = f"a replica at {sender} sent {exc}"
            return
        except BadDatagram:
            return  # not a reply of the group at all
        queue = self._waiting.get(msg.req) if isinstance(msg, Answer) else None
        if queue is None or not isinstance(msg, Answer) or msg.client != self.client:
            self.ignored += 1  # a late reply to an earlier request, or not ours
            return
        queue.put_nowait((msg, sender))

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are, unsealed, to every target (tests send garbage with it)."""
        transport = await self._open()
        for target in self.targets:
            transport.sendto(data, (target.host, target.port))

    async def send(self, data: bytes) -> None:
        """Send a packed datagram to every target, sealed anew (a retry too)."""
        await self.send_raw(self.sealer.seal(data, time.time()))

    async def _ask(self, make: Any, timeout: float, tries: int) -> Answer:
        """Send ``make(req_id)`` until the first reply to it arrives."""
        req = next(self.ids)
        data = pack(make(req))
        queue: asyncio.Queue[tuple[Answer, str]] = asyncio.Queue()
        self._waiting[req] = queue
        n = itertools.count()

        async def attempt() -> Answer:
            await self.send(data)
            try:
                msg, sender = await asyncio.wait_for(queue.get(), backoff(next(n), timeout))
            except TimeoutError:
                raise TryAgain from None
            self.last_sender = sender
            return msg

        try:
            return await retry(attempt, "no index replica answered", tries)
        except GaveUp as exc:
            raise GaveUp(f"{exc}; {self.skew}" if self.skew else str(exc)) from None
        finally:
            del self._waiting[req]
            self.ignored += queue.qsize()  # duplicates that came in meanwhile

    async def request(
        self, op: str, args: dict[str, Any], timeout: float | None = None, tries: int | None = None
    ) -> UpdateResult:
        """An update, ordered by the group; the first reply."""

        def make(req: int) -> Req:
            return Req(client=self.client, req=req, op=op, args=args)

        limit = timeout or self.timeout
        msg = await self._ask(make, limit, tries or tries_for(self.patience, limit))
        return self._result(msg, UpdateResult)

    async def query(
        self, q: str, timeout: float | None = None, tries: int | None = None, **kw: Any
    ) -> Any:
        """A read-only question, any replica answers from its copy: the reply of its kind."""

        def make(req: int) -> Query:
            return Query(client=self.client, req=req, q=q, **kw)

        msg = await self._ask(make, timeout or self.timeout, tries or self.tries)
        return self._result(msg, QUERY_REPLIES.get(q, Result))

    @staticmethod
    def _result(msg: Answer, kind: type[T]) -> T:
        try:
            return result_of(msg.reply, kind)
        except BadDatagram as exc:
            raise MirrorfsError(f"replica {msg.replica} sent {exc}") from None

    async def query_pages(self, q: str, **kw: Any) -> dict[str, Any]:
        """A paged question (files, search, peers, held): every page, merged."""
        merged: dict[str, Any] = {}
        after = ""
        while True:
            reply = await self.query(q, after=after, **kw)
            if not reply.ok:
                raise MirrorfsError(f"the index refused: {reply.error}")
            merged.update(reply.peers if q == "peers" else reply.files)
            if not reply.next:
                return merged
            after = reply.next

    async def snapshot(self) -> IndexState:
        """The whole index as one replica holds it (a peer's cached copy)."""
        offer: SnapshotOffer = await self.query("snapshot")
        if not offer.ok:
            raise MirrorfsError(f"the index refused: {offer.error}")
        blob = offer.blob
        if blob is None:
            where = offered_at(offer.host, offer.port, self.last_sender)
            blob = await fetch_blob(where, offer.token, self.key)
        try:
            return IndexState.from_snapshot(blob)
        except BadSnapshot as exc:
            raise MirrorfsError(f"the index sent {exc}") from None

    async def query_all(self, q: str, wait: float = 1.0, **kw: Any) -> list[Any]:
        """Every replica's answer that arrives within ``wait`` seconds (status of the group)."""
        req = next(self.ids)
        queue: asyncio.Queue[tuple[Answer, str]] = asyncio.Queue()
        self._waiting[req] = queue
        try:
            await self.send(pack(Query(client=self.client, req=req, q=q, **kw)))
            end = time.monotonic() + wait
            out = []
            while (left := end - time.monotonic()) > 0:
                try:
                    msg, _ = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                out.append(self._result(msg, QUERY_REPLIES.get(q, Result)))
            return out
        finally:
            del self._waiting[req]

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class BlockingIndexClient:
    """The same calls for code without an event loop: each runs on a private one."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._runner = asyncio.Runner(loop_factory=new_event_loop)
        self.aio = IndexClient(*args, **kw)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    @property
    def client(self) -> str:
        return self.aio.client

    @property
    def ignored(self) -> int:
        return self.aio.ignored

    def request(self, op: str, args: dict[str, Any], **kw: Any) -> UpdateResult:
        return self._run(self.aio.request(op, args, **kw))

    def query(self, q: str, **kw: Any) -> Any:
        return self._run(self.aio.query(q, **kw))

    def query_pages(self, q: str, **kw: Any) -> dict[str, Any]:
        return self._run(self.aio.query_pages(q, **kw))

    def query_all(self, q: str, wait: float = 1.0, **kw: Any) -> list[Any]:
        return self._run(self.aio.query_all(q, wait, **kw))

    def snapshot(self) -> IndexState:
        return self._run(self.aio.snapshot())

    def send_raw(self, data: bytes) -> None:
        self._run(self.aio.send_raw(data))

    def send(self, data: bytes) -> None:
        self._run(self.aio.send(data))

    def close(self) -> None:
        self.aio.close()
        self._runner.close()
