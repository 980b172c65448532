"""The P2P index as a replicated group: state and ordering, with no I/O.

Every replica holds the whole index. The live replica with the lowest id is
the master: it gives each client request the next sequence number and sends
the numbered *order* to the group; every replica applies orders strictly in
sequence, so all hold the same state. A replica that sees a gap asks for the
missing orders (or, when they are gone from everyone's recent log, a snapshot
with its sequence number), which is also how a replica that joins late
catches up. Requests carry (client id, request id): a retried or re-proposed
request is applied once, and its reply is repeated.

A replica remembers requests it has seen but not seen ordered; when it
becomes master (the old one fell silent), it orders them, so a request the
old master never ordered is not lost. Like etcd's raft package, the methods
return what to send; the caller does the sending, the sockets and the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash

from mirrorfuse.wire.datagrams import (
    UPDATES,
    AdvertiseArgs,
    ExpireArgs,
    FileEntry,
    HeartbeatArgs,
    PeerEntry,
    RegisterArgs,
    RevokeArgs,
    UpdateResult,
)

SILENCE = 3.0  # seconds without a heartbeat before a replica counts as gone
LOG_KEEP = 10_000  # recent orders kept to fill other replicas' gaps
MISSED_BEATS = 3  # a peer silent for this many of its heartbeat intervals is dropped


def parse_update(op: str, args: dict[str, Any]) -> msgspec.Struct | str:
    """The typed arguments of an update, or why they are unusable (the same on every replica)."""
    kind = UPDATES.get(op)
    if kind is None:
        return f"unknown request {op!r}"
    try:
        parsed = msgspec.convert(args, kind)
    except msgspec.ValidationError as exc:
        return f"bad {op} request: {exc}"
    name = getattr(parsed, "name", None)
    if op == "advertise" and (not name or "/" in name or "\0" in name or len(name) > 255):
        return f"{name!r} is not a file name (1-255 characters, no '/')"
    return parsed


def peer_limit(info: PeerEntry, default_interval: float) -> float:
    """How long a peer may stay silent: three of the intervals it registered with."""
    return MISSED_BEATS * (info.interval or default_interval)


@dataclass(frozen=True)
class Request:
    client: str
    req: int
    op: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Order:
    seq: int
    master: int
    request: Request
    t: float  # the master's clock, so every replica expires peers alike


# -- what a replica asks its caller to send ---------------------------------------------------


@dataclass(frozen=True)
class SendOrder:
    order: Order


@dataclass(frozen=True)
class SendReply:
    client: str
    req: int
    reply: UpdateResult


@dataclass(frozen=True)
class AskFor:
    first: int  # "send me the orders from here"


@dataclass(frozen=True)
class SendSnapshot:
    to: int
    seq: int
    blob: bytes


@dataclass(frozen=True)
class Heartbeat:
    replica: int
    seq: int


# -- the index itself -----------------------------------------------------------------------


# -- the index itself -----------------------------------------------------------------------


class Snapshot(msgspec.Struct, array_like=True):
    seq: int
    peers: dict[str, PeerEntry]
    files: dict[str, FileEntry]
    clients: dict[str, tuple[int, UpdateResult]]


_encoder = msgspec.msgpack.Encoder()
_snapshots = msgspec.msgpack.Decoder(Snapshot)


class BadSnapshot(ValueError):
    """A snapshot that does not decode: never adopted."""


@dataclass
class IndexState:
    seq: int = 0
    peers: dict[str, PeerEntry] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    # client -> its last applied request id and the reply it got (retries get it again)
    clients: dict[str, tuple[int, UpdateResult]] = field(default_factory=dict)

    def apply(self, order: Order) -> UpdateResult:
        """Apply the next order; the reply every replica gives its client."""
        assert order.seq == self.seq + 1, (order.seq, self.seq)
        self.seq = order.seq
        r = order.request
        last = self.clients.get(r.client)
        if last is not None and r.req <= last[0]:
            return last[1] if r.req == last[0] else UpdateResult(ok=False, error="stale request")
        args = parse_update(r.op, r.args)
        if isinstance(args, str):
            reply = UpdateResult(ok=False, error=args)
        else:
            reply = self._apply(args, order.t)
        self.clients[r.client] = (r.req, reply)
        return reply

    def _apply(self, a: msgspec.Struct, t: float) -> UpdateResult:
        match a:
            case RegisterArgs():
                self.peers[a.peer] = PeerEntry(a.addr, t, a.interval)
                return UpdateResult()
            case HeartbeatArgs():
                if a.peer not in self.peers:
                    return UpdateResult(ok=False, error="unknown peer: register first")
                self.peers[a.peer].seen = t
                return UpdateResult()
            case AdvertiseArgs():
                return self._advertise(a)
            case RevokeArgs():
                held = self.files.get(a.name)
                if held is None or a.peer not in held.holders:
                    return UpdateResult(ok=False, error=f"{a.peer} does not share {a.name!r}")
                self.drop_holder(a.name, a.peer)
                return UpdateResult()
            case ExpireArgs():
                return UpdateResult(dropped=self._expire(a.interval, t))
        raise AssertionError(f"no handler for {a!r}")

    def _advertise(self, a: AdvertiseArgs) -> UpdateResult:
        if a.peer not in self.peers:
            return UpdateResult(ok=False, error="unknown peer: register first")
        held = self.files.get(a.name)
        if held is None:
            self.files[a.name] = FileEntry(a.peer, a.size, a.checksum, [a.peer])
            return UpdateResult()
        if held.owner == a.peer:
            return UpdateResult()
        if (held.size, held.checksum) == (a.size, a.checksum):
            if a.peer not in held.holders:
                held.holders.append(a.peer)
            return UpdateResult(holder=True)
        return UpdateResult(ok=False, error=f"the name {a.name!r} is taken by peer {held.owner}")

    def _expire(self, interval: float, t: float) -> list[str]:
        """Drop peers silent for three of their heartbeat intervals, and their files."""
        gone = sorted(
            p for p, info in self.peers.items() if t - info.seen > peer_limit(info, interval)
        )
        for p in gone:
            del self.peers[p]
            for name in [n for n, f in self.files.items() if p in f.holders]:
                self.drop_holder(name, p)
        return gone

    def drop_holder(self, name: str, peer: str) -> None:
        held = self.files[name]
        held.holders.remove(peer)
        if not held.holders:
            del self.files[name]
        elif held.owner == peer:
            held.owner = held.holders[0]

    def snapshot(self) -> bytes:
        return _encoder.encode(Snapshot(self.seq, self.peers, self.files, self.clients))

    @classmethod
    def from_snapshot(cls, blob: bytes) -> IndexState:
        try:
            snap = _snapshots.decode(blob)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadSnapshot(f"not an index snapshot ({exc})") from None
        return cls(snap.seq, snap.peers, snap.files, snap.clients)

    def digest(self) -> str:
        canon = _encoder.encode(
            [
                self.seq,
                sorted(self.peers.items()),
                sorted(self.files.items()),
                sorted(self.clients.items()),
            ]
        )
        return xxhash.xxh3_64_hexdigest(canon)


# -- one replica's ordering logic -----------------------------------------------------------------


class Replica:
    def __init__(
        self,
        rid: int,
        now: float,
        grace: float = SILENCE,
        log_keep: int = LOG_KEEP,
        state: IndexState | None = None,  # saved before a restart: catch up from there
    ) -> None:
        self.id = rid
        self.log_keep = log_keep
        # a replica that just started has heard nobody yet: it listens this long
        # before it may act as master (else a late joiner would number orders alone)
        self.grace_until = now + grace
        self.state = state if state is not None else IndexState()
        self.seen: dict[int, float] = {rid: now}  # replica -> last heard
        self.unordered: dict[tuple[str, int], Request] = {}
        self.ahead: dict[int, Order] = {}  # orders past a gap, waiting
        self.log: dict[int, Order] = {}
        self.next_seq = self.state.seq + 1  # what this replica would number next as master
        self.known_seq = 0  # the highest sequence number any replica has shown

    def master(self, now: float) -> int | None:
        live = [
            r
            for r, t in self.seen.items()
            if (r == self.id and now >= self.grace_until) or (r != self.id and now - t <= SILENCE)
        ]
        return min(live) if live else None

    def is_master(self, now: float) -> bool:
        return self.master(now) == self.id

    # -- events ------------------------------------------------------------------------------

    def on_request(self, req: Request, now: float) -> list[Any]:
        key = (req.client, req.req)
        last = self.state.clients.get(req.client)
        if last is not None and req.req <= last[0]:  # already applied: say it again
            return [SendReply(req.client, req.req, last[1])] if req.req == last[0] else []
        self.unordered[key] = req
        if self.is_master(now):
            return self._order_unordered(now)
        return []

    def _order_unordered(self, now: float) -> list[Any]:
        if self.known_seq > self.state.seq:
            # a new master first learns every order the old one gave out
            return [AskFor(self.state.seq + 1)]
        self.next_seq = max(self.next_seq, self.state.seq + 1)
        out: list[Any] = []
        for req in list(self.unordered.values()):
            order = Order(self.next_seq, self.id, req, now)
            self.next_seq += 1
            out.append(SendOrder(order))
            out += self.on_order(order, now)
        return out

    def on_order(self, order: Order, now: float) -> list[Any]:
        self.seen[order.master] = now
        self.known_seq = max(self.known_seq, order.seq)
        if order.seq <= self.state.seq:
            return []
        self.ahead[order.seq] = order
        out: list[Any] = []
        while self.state.seq + 1 in self.ahead:
            o = self.ahead.pop(self.state.seq + 1)
            reply = self.state.apply(o)
            self.log[o.seq] = o
            self.log.pop(o.seq - self.log_keep, None)
            self.unordered.pop((o.request.client, o.request.req), None)
            out.append(SendReply(o.request.client, o.request.req, reply))
        if self.ahead:
            out.append(AskFor(self.state.seq + 1))
        return out

    def on_heartbeat(self, hb: Heartbeat, now: float) -> list[Any]:
        self.seen[hb.replica] = now
        self.known_seq = max(self.known_seq, hb.seq)
        return [AskFor(self.state.seq + 1)] if hb.seq > self.state.seq else []

    def on_ask(self, asker: int, first: int) -> list[Any]:
        """Another replica misses orders from ``first``: send them, or a snapshot."""
        if first > self.state.seq:
            return []
        if all(s in self.log for s in range(first, self.state.seq + 1)):
            return [SendOrder(self.log[s]) for s in range(first, self.state.seq + 1)]
        return [SendSnapshot(asker, self.state.seq, self.state.snapshot())]

    def on_snapshot(self, seq: int, blob: bytes, now: float) -> list[Any]:
        self.known_seq = max(self.known_seq, seq)
        if seq <= self.state.seq:
            return []
        try:
            self.state = IndexState.from_snapshot(blob)
        except BadSnapshot:
            return []  # never adopt what does not decode: ask again later
        self.ahead = {s: o for s, o in self.ahead.items() if s > seq}
        self.unordered = {k: r for k, r in self.unordered.items() if not self._applied(r)}
        out: list[Any] = []
        if self.state.seq + 1 in self.ahead:
            out += self.on_order(self.ahead.pop(self.state.seq + 1), now)
        return out

    def _applied(self, req: Request) -> bool:
        last = self.state.clients.get(req.client)
        return last is not None and req.req <= last[0]

    def tick(self, now: float, peer_interval: float | None = None) -> list[Any]:
        """Every heartbeat interval: say we are here; as master, order what waits.

        ``peer_interval`` is the heartbeat interval of peers that did not give theirs.
        """
        out: list[Any] = [Heartbeat(self.id, self.state.seq)]
        if self.is_master(now):
            if peer_interval is not None and self.state.peers:
                stale = any(
                    now - p.seen > peer_limit(p, peer_interval) for p in self.state.peers.values()
                )
                if stale:
                    key = (f"master-{self.id}", int(now * 1000))
                    args = {"interval": peer_interval}
                    self.unordered[key] = Request(key[0], key[1], "expire", args)
            if self.unordered:
                out += self._order_unordered(now)
        return out
