"""One replica of the P2P index group, reached by UDP multicast (or unicast).

Datagrams are the typed kinds of ``wire.datagrams``: client requests and
queries; ``order``, ``hb``, ``ask`` and ``snap`` between replicas. The
ordering logic is ``core.group.Replica``; this module only moves datagrams,
keeps time and saves the state. Every datagram is sealed with the group's
key (``wire.datagrams.Sealer``); one without a valid seal, one seen before,
and one that does not decode are dropped and counted, never fatal. A
snapshot is checked before it is adopted (``IndexState.from_snapshot``); a
bad one is refused, counted and never saved.

A replica answers queries only once it has caught up with the group
(``Replica.ready``); before that only ``status`` answers, saying so, so a
client that takes the first reply never sees a half-filled index.

A snapshot larger than a datagram is offered by token and read over TCP
(``servers.blobs``; the reading side is given to ``serve`` by the command
that starts the replica). Replies that would not fit in a datagram
(``files``, ``search``, ``peers`` of a large index) come in pages: each
carries ``next``, the cursor to ask with for the next page.
"""

from __future__ import annotations

import asyncio
import bisect
import fnmatch
import logging
import re
import secrets
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec

from mirrorfuse.core.group import (
    LOG_KEEP,
    AskFor,
    BadSnapshot,
    Heartbeat,
    IndexState,
    Order,
    Replica,
    Request,
    SendOrder,
    SendReply,
    SendSnapshot,
)
from mirrorfuse.wire import datagrams as dg
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.datagrams import (
    MAX_DATAGRAM,
    BadDatagram,
    Opener,
    Replayed,
    Result,
    Sealer,
    Unsealed,
    pack,
    unpack,
)
from mirrorfuse.wire.errors import MirrorfsError

from .blobs import BlobServer, BlobStore
from .indexstore import Saver, load_state
from .net import Limits, in_background

log = logging.getLogger("mirrorfs-index")

PAGE_BYTES = 40_000  # a page of a paged reply stays well inside one datagram
INLINE_SNAPSHOT = 40_000  # larger snapshots go by TCP
HEARTBEAT = 1.0
PEER_INTERVAL = 3.0  # a peer's heartbeat interval, unless it registered with its own
MAX_WAITING = 10_000  # clients remembered for a reply still to come, at most

V = TypeVar("V")
_encoder = msgspec.msgpack.Encoder()
FetchBlob = Callable[[Address, str, bytes], Awaitable[bytes]]  # where, token, the key
Sender = tuple[str, int]  # a socket's peer address, where a reply goes


def order_to_wire(o: Order) -> dg.Order:
    r = o.request
    return dg.Order(
        seq=o.seq, master=o.master, time=o.t, client=r.client, req=r.req, op=r.op, args=r.args
    )


def order_from_wire(m: dg.Order) -> Order:
    return Order(m.seq, m.master, Request(m.client, m.req, m.op, m.args), m.time)


def page(
    items: dict[str, V], keys: list[str], after: str, pattern: str | None = None
) -> tuple[dict[str, V], str | None]:
    """The entries after the cursor ``after`` (sorted keys) that fit in PAGE_BYTES."""
    out: dict[str, V] = {}
    size = 0
    # names that match start with the pattern's literal prefix: begin there, stop past it
    prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0] if pattern is not None else ""
    start = bisect.bisect_right(keys, after) if after else 0
    for i in range(max(start, bisect.bisect_left(keys, prefix)), len(keys)):
        key = keys[i]
        if not key.startswith(prefix):
            break
        if pattern is not None and not fnmatch.fnmatchcase(key, pattern):
            continue
        size += len(_encoder.encode(key)) + len(_encoder.encode(items[key]))
        if size > PAGE_BYTES and out:
            return out, keys[i - 1]
        out[key] = items[key]
    return out, None


class IndexReplica(asyncio.DatagramProtocol):
    def __init__(
        self,
        rid: int,
        targets: list[Address],
        fetch_blob: FetchBlob,
        tcp: Address,
        key: bytes,
        state: IndexState | None = None,
        log_keep: int = LOG_KEEP,
    ) -> None:
        self.replica = Replica(rid, time.time(), log_keep=log_keep, state=state)
        self.targets = targets  # the group address, or every replica's (unicast)
        self.fetch_blob = fetch_blob
        self.transport: asyncio.DatagramTransport | None = None
        self.key = key  # the group's: datagrams are sealed with it, snapshots read by TCP prove it
        self.sealer = Sealer(key, secrets.token_bytes(8))  # this process's incarnation
        self.opener = Opener(key)
        # (client, request) -> its sender, for the reply when the request is applied
        self.clients: dict[tuple[str, int], Sender] = {}
        self.dropped = 0  # datagrams dropped, for whatever reason; of them:
        self.unsealed = 0  # without a valid seal of the group's key
        self.replayed = 0  # sealed, but seen before or stamped too far from this clock
        self.bad_snapshots = 0  # snapshots refused (they did not decode or check out)
        self.blobs = BlobStore()
        self.tcp = tcp  # where this replica hands out large snapshots
        self.fetching = False  # a snapshot is on its way by TCP: do not ask again
        self.tcp_snapshots = 0  # snapshots received by TCP (shown in status)
        self._sorted: dict[str, tuple[int, list[str]]] = {}  # what -> (seq, sorted keys)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's are not subclasses

    def _sendto(self, data: bytes, addr: Sender) -> None:
        if self.transport is not None:
            self.transport.sendto(self.sealer.seal(data, time.time()), addr)

    def send_group(self, msg: dg.Datagram) -> None:
        data = pack(msg)
        if len(data) > MAX_DATAGRAM:
            log.warning("a %s of %d bytes is too large to send", type(msg).__name__, len(data))
            return
        for target in self.targets:
            self._sendto(data, (target.host, target.port))

    def route(self, actions: list[Any]) -> None:
        rid = self.replica.id
        for act in actions:
            if isinstance(act, SendOrder):
                self.send_group(order_to_wire(act.order))
            elif isinstance(act, SendReply):
                addr = self.clients.pop((act.client, act.req), None)
                if addr is not None:
                    self._sendto(pack(dg.answer(act.client, act.req, rid, act.reply)), addr)
            elif isinstance(act, AskFor):
                if not self.fetching:
                    self.send_group(dg.Ask(replica=rid, first=act.first, to=act.to))
            elif isinstance(act, SendSnapshot):
                offer = self.offer(act.seq, act.blob)
                self.send_group(
                    dg.Snap(
                        to=act.to,
                        seq=act.seq,
                        blob=offer.blob,
                        host=offer.host,
                        port=offer.port,
                        token=offer.token,
                    )
                )
            elif isinstance(act, Heartbeat):
                hb = dg.Hb(
                    replica=act.replica,
                    seq=act.seq,
                    ready=act.ready,
                    master=act.master,
                    chain=act.chain,
                )
                self.send_group(hb)

    def offer(self, seq: int, blob: bytes) -> dg.SnapshotOffer:
        """A snapshot in the datagram itself, or a token to read it by over TCP."""
        if len(blob) <= INLINE_SNAPSHOT:
            return dg.SnapshotOffer(seq=seq, blob=blob)
        host, port = self.tcp.host, self.tcp.port
        return dg.SnapshotOffer(seq=seq, host=host, port=port, token=self.blobs.put(blob))

    async def fetch_snapshot(self, seq: int, where: Address, token: str) -> None:
        try:
            blob = await self.fetch_blob(where, token, self.key)
            self.tcp_snapshots += 1
            self.adopt(seq, blob, f"{where}")
        except (MirrorfsError, ValueError, OSError) as exc:
            log.warning(
                "cannot read a snapshot from %s: %s "
                "(on a LAN, start replicas with --host set to their own address)",
                where,
                exc,
            )
        finally:
            self.fetching = False

    def adopt(self, seq: int, blob: bytes, source: str) -> None:
        """A snapshot offered to this replica: checked whole before it is used, else refused."""
        try:
            state = IndexState.from_snapshot(blob)
            if state.seq != seq:
                raise BadSnapshot(f"it holds sequence {state.seq}, not {seq} as offered")
        except BadSnapshot as exc:
            self.bad_snapshots += 1
            log.warning(
                "replica %d refused a snapshot from %s: %s (%d refused so far)",
                self.replica.id,
                source,
                str(exc)[:300],
                self.bad_snapshots,
            )
            return
        self.route(self.replica.adopt(seq, state, time.time()))

    def on_snap(self, m: dg.Snap, sender: str) -> None:
        if m.seq <= self.replica.state.seq:
            return  # an old offer (this replica caught up meanwhile)
        if m.blob is not None:
            self.adopt(m.seq, m.blob, sender)
        elif not self.fetching and m.port > 0 and m.token:
            self.fetching = True
            where = dg.offered_at(m.host, m.port, sender)
            in_background(self.fetch_snapshot(m.seq, where, m.token))

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        sender = (str(addr[0]), int(addr[1]))
        try:  # the seal first: nothing from without the key is decoded
            msg = unpack(self.opener.open(data, time.time()))
        except Unsealed as exc:
            self.unsealed += 1
            self.drop(str(exc), sender)
            return
        except Replayed as exc:
            self.replayed += 1
            self.drop(str(exc), sender)
            return
        except BadDatagram as exc:
            self.drop(f"a datagram that is not the group's ({exc})", sender)
            return
        try:
            self.handle(msg, sender)
        except Exception as exc:  # a bug must not close the group's socket: say it, go on
            log.error("replica %d: a %s failed: %r", self.replica.id, type(msg).__name__, exc)
            self.drop(f"a {type(msg).__name__} it could not handle", sender)

    def drop(self, what: str, addr: Sender) -> None:
        """Count it; say so for the first and then every hundredth (no log flood)."""
        self.dropped += 1
        if self.dropped % 100 == 1:
            log.warning(
                "replica %d dropped %s from %s:%d (%d dropped so far)",
                self.replica.id,
                what,
                addr[0],
                addr[1],
                self.dropped,
            )

    def handle(self, m: dg.AnyDatagram, addr: Sender) -> None:
        now = time.time()
        rep = self.replica
        match m:
            case dg.Req():
                req = Request(m.client, m.req, m.op, m.args)
                self.clients.pop((req.client, req.req), None)
                self.clients[(req.client, req.req)] = addr
                if len(self.clients) > MAX_WAITING:  # the longest waiting is forgotten
                    del self.clients[next(iter(self.clients))]
                self.route(rep.on_request(req, now))
            case dg.Query():
                if not rep.ready and m.q != "status":
                    return  # catching up: another replica answers from a whole index
                data = pack(dg.answer(m.client, m.req, rep.id, self.answer(m)))
                if len(data) > MAX_DATAGRAM:
                    too_large = Result(ok=False, error="reply too large")
                    data = pack(dg.answer(m.client, m.req, rep.id, too_large))
                self._sendto(data, addr)
            case dg.Order():  # whoever numbered it: this replica too, before a restart
                self.route(rep.on_order(order_from_wire(m), now))
            case dg.Hb() if m.replica != rep.id:
                hb = Heartbeat(m.replica, m.seq, m.ready, m.master, m.chain)
                self.route(rep.on_heartbeat(hb, now))
            case dg.Ask() if m.replica != rep.id:
                self.route(rep.on_ask(m.replica, m.first, now, m.to))
            case dg.Snap() if m.to == rep.id:
                self.on_snap(m, addr[0])

    def keys(self, what: str, items: dict[str, Any]) -> list[str]:
        """Sorted names, kept while the state does not change (pages of a large index)."""
        seq = self.replica.state.seq
        held = self._sorted.get(what)
        if held is None or held[0] != seq:
            held = self._sorted[what] = (seq, sorted(items))
        return held[1]

    def answer(self, m: dg.Query) -> Result:
        st = self.replica.state
        if m.q == "peers":
            peers = {p: i.addr for p, i in st.peers.items()}
            got, nxt = page(peers, self.keys("peers", peers), m.after)
            return dg.PeersPage(peers=got, next=nxt, seq=st.seq)
        if m.q in ("files", "search"):
            pattern = m.pattern if m.q == "search" else None
            got_files, nxt = page(st.files, self.keys("files", st.files), m.after, pattern)
            return dg.FilesPage(files=got_files, next=nxt, seq=st.seq)
        if m.q == "held":  # what the index lists for one peer (it reconciles after a restart)
            held = {n: f for n, f in st.files.items() if m.peer in f.holders}
            got_files, nxt = page(held, sorted(held), m.after)
            return dg.FilesPage(files=got_files, next=nxt, seq=st.seq)
        if m.q == "snapshot":  # a peer caching the whole index
            return self.offer(st.seq, st.snapshot())
        if m.q == "status":
            return dg.ReplicaStatus(
                replica=self.replica.id,
                seq=st.seq,
                master=self.replica.master(time.time()),
                digest=st.digest(),
                dropped=self.dropped,
                unsealed=self.unsealed,
                replayed=self.replayed,
                bad_snapshots=self.bad_snapshots,
                tcp_snapshots=self.tcp_snapshots,
                peers=len(st.peers),
                files=len(st.files),
                ready=self.replica.ready,
            )
        if m.q == "state":  # the whole replicated state, to compare replicas
            return dg.StateDump(seq=st.seq, peers=st.peers, files=st.files, clients=st.clients)
        return Result(ok=False, error=f"unknown query {m.q!r}")


def multicast_socket(group: str, port: int, interface: str = "0.0.0.0") -> socket.socket:
    """Bound to the group's address (datagrams sent to this host's own addresses do not
    reach it), a member on ``interface`` (an address of this host; 0.0.0.0: the one the
    routes choose), and sending there."""
    iface = socket.inet_aton(socket.gethostbyname(interface))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((group, port))
    mreq = struct.pack("4s4s", socket.inet_aton(group), iface)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return sock


@dataclass
class Options:
    group: str
    port: int
    id: int
    host: str
    targets: list[Address]  # every replica (unicast); empty: multicast
    data: Path | None
    log_keep: int
    key: bytes  # the group's


async def serve(opts: Options, fetch_blob: FetchBlob, ready: Callable[[str], None]) -> int:
    """Run one replica until SIGTERM or SIGINT; ``ready`` is told the start line."""
    loop = asyncio.get_running_loop()
    if opts.targets:
        targets = opts.targets
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((opts.host, opts.port))
    else:
        targets = [Address(opts.group, opts.port)]
        sock = multicast_socket(opts.group, opts.port, opts.host)
    store_path = opts.data / f"replica-{opts.id}.snapshot" if opts.data else None
    if store_path is not None:
        store_path.parent.mkdir(parents=True, exist_ok=True)
    state = load_state(store_path, opts.id)
    blobs: list[BlobStore] = []
    limits = Limits(max_connections=64)  # other replicas, peers: one snapshot read each
    tcp = await loop.create_server(lambda: BlobServer(blobs[0], opts.key, limits), opts.host, 0)
    tcp_addr = Address(opts.host, tcp.sockets[0].getsockname()[1])
    transport, proto = await loop.create_datagram_endpoint(
        lambda: IndexReplica(
            opts.id, targets, fetch_blob, tcp_addr, opts.key, state, opts.log_keep
        ),
        sock=sock,
    )
    blobs.append(proto.blobs)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loaded = f", state from {store_path} at sequence {state.seq}" if state else ""
    ready(loaded)
    saver = Saver(store_path, state.seq if state else 0) if store_path is not None else None
    proto.route(proto.replica.tick(time.time()))
    resets = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), HEARTBEAT)
        except TimeoutError:
            try:
                proto.route(proto.replica.tick(time.time(), PEER_INTERVAL))
            except Exception as exc:  # a bug must not stop the replica: say it, go on
                log.error("replica %d: a heartbeat failed: %r", opts.id, exc)
        if proto.replica.resets != resets:
            resets = proto.replica.resets
            log.warning(
                "replica %d held orders the master's history lacks (lost before a crash): "
                "caught up again from scratch",
                opts.id,
            )
        if saver is not None:
            await saver.save(proto.replica)
    transport.close()
    tcp.close()
    return 0
