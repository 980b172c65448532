"""The index every replica holds, and the one way it changes: applying an order.

Peers, unique file names (other holders of the same content are listed), and
per client the last request applied with its reply, so a retry gets the
original result. Everything an order does depends only on the order and the
state, never on the replica's clock, so every replica holds the same index.
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
    LeaveArgs,
    PeerEntry,
    RegisterArgs,
    RevokeArgs,
    UpdateResult,
)

MISSED_BEATS = 3  # a peer silent for this many of its heartbeat intervals is dropped
# Each client process has an id of its own (an incarnation), so the table of clients
# is pruned: a client not heard for CLIENT_KEEP seconds of the masters' clocks is
# forgotten, checked every PRUNE_EVERY orders (alike everywhere: by the order).
CLIENT_KEEP = 3600.0
PRUNE_EVERY = 256
MAX_SEQ = 1 << 62  # no group numbers this many orders; a snapshot claiming more is bad


def bad_name(name: str) -> str | None:
    """Why a shared file's name is unusable (None: it is fine)."""
    if not name or "/" in name or "\0" in name or len(name) > 255:
        return f"{name!r} is not a file name (1-255 characters, no '/')"
    return None


def parse_update(op: str, args: dict[str, Any]) -> msgspec.Struct | str:
    """The typed arguments of an update, or why they are unusable (the same on every replica)."""
    kind = UPDATES.get(op)
    if kind is None:
        return f"unknown request {op!r}"
    try:
        parsed = msgspec.convert(args, kind)
    except msgspec.ValidationError as exc:
        return f"bad {op} request: {exc}"
    if isinstance(parsed, AdvertiseArgs) and (why := bad_name(parsed.name)) is not None:
        return why
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


class Snapshot(msgspec.Struct, array_like=True):
    seq: int
    peers: dict[str, PeerEntry]
    files: dict[str, FileEntry]
    clients: dict[str, tuple[int, UpdateResult]]
    # added later: snapshots saved before them load with these empty
    client_seen: dict[str, float] = {}
    chain: int = 0


_encoder = msgspec.msgpack.Encoder()
_canonical = msgspec.msgpack.Encoder(order="deterministic")
_snapshots = msgspec.msgpack.Decoder(Snapshot)


class BadSnapshot(ValueError):
    """A snapshot that does not decode, or that no run of the group could hold: never adopted."""


def check_snapshot(snap: Snapshot) -> None:
    """What applying orders always keeps true; raises BadSnapshot, in one line, if it is not.

    Every file has holders, each one a registered peer and listed once, and
    its owner among them; names are file names, sizes are not negative;
    numbers fit what the wire can carry. (Only what every version kept true:
    a state the group can reach must never be refused, or nobody catches up.)
    """
    if not 0 <= snap.seq <= MAX_SEQ or not 0 <= snap.chain < 1 << 64:
        raise BadSnapshot(f"sequence {snap.seq} or chain {snap.chain} out of range")
    for name, f in snap.files.items():
        why = bad_name(name) or _file_problem(f, snap.peers)
        if why is not None:
            raise BadSnapshot(f"file {name[:100]!r}: {why}")
    for peer, p in snap.peers.items():
        if p.interval is not None and not p.interval > 0:
            raise BadSnapshot(f"peer {peer[:100]!r} has heartbeat interval {p.interval}")


def _file_problem(f: FileEntry, peers: dict[str, PeerEntry]) -> str | None:
    if not f.holders or len(set(f.holders)) != len(f.holders):
        return f"{len(f.holders)} holders, {len(set(f.holders))} different"
    if f.owner not in f.holders:
        return "its owner is not one of its holders"
    if any(h not in peers for h in f.holders):
        return "held by a peer that is not registered"
    if f.size < 0:
        return f"size {f.size}"
    return None


@dataclass
class IndexState:
    seq: int = 0
    peers: dict[str, PeerEntry] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    # client -> its last applied request id and the reply it got (retries get it again)
    clients: dict[str, tuple[int, UpdateResult]] = field(default_factory=dict)
    client_seen: dict[str, float] = field(default_factory=dict)  # client -> last order's t
    # a hash of every order applied, in sequence: replicas with the same history at a
    # sequence have the same chain there (one that kept an order nobody else has does not)
    chain: int = 0

    def apply(self, order: Order) -> UpdateResult:
        """Apply the next order; the reply every replica gives its client."""
        assert order.seq == self.seq + 1, (order.seq, self.seq)
        self.seq = order.seq
        r = order.request
        link = [self.chain, order.seq, r.client, r.req, r.op, r.args, order.t]
        self.chain = xxhash.xxh3_64_intdigest(_canonical.encode(link))
        last = self.clients.get(r.client)
        if last is not None and r.req <= last[0]:
            reply = last[1] if r.req == last[0] else UpdateResult(ok=False, error="stale request")
        else:
            args = parse_update(r.op, r.args)
            if isinstance(args, str):
                reply = UpdateResult(ok=False, error=args)
            else:
                reply = self._apply(args, order.t)
            self.clients[r.client] = (r.req, reply)
        self.client_seen[r.client] = max(order.t, self.client_seen.get(r.client, order.t))
        if order.seq % PRUNE_EVERY == 0:
            self._prune_clients(order.t)
        return reply

    def _prune_clients(self, t: float) -> None:
        for client in list(self.clients):
            seen = self.client_seen.setdefault(client, t)  # from an older snapshot: from now
            if t - seen > CLIENT_KEEP:
                del self.clients[client]
                del self.client_seen[client]
        for client in [c for c in self.client_seen if c not in self.clients]:
            del self.client_seen[client]

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
            case LeaveArgs():
                if a.peer not in self.peers:
                    return UpdateResult(ok=False, error=f"unknown peer {a.peer!r}")
                self.drop_peer(a.peer)
                return UpdateResult(dropped=[a.peer])
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
            self.drop_peer(p)
        return gone

    def drop_peer(self, peer: str) -> None:
        """A peer and every file it holds (other holders keep theirs)."""
        self.peers.pop(peer, None)
        for name in [n for n, f in self.files.items() if peer in f.holders]:
            self.drop_holder(name, peer)

    def drop_holder(self, name: str, peer: str) -> None:
        held = self.files[name]
        held.holders.remove(peer)
        if not held.holders:
            del self.files[name]
        elif held.owner == peer:
            held.owner = held.holders[0]

    def snapshot(self) -> bytes:
        snap = Snapshot(
            self.seq, self.peers, self.files, self.clients, self.client_seen, self.chain
        )
        return _encoder.encode(snap)

    @classmethod
    def from_snapshot(cls, blob: bytes) -> IndexState:
        try:
            snap = _snapshots.decode(blob)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise BadSnapshot(f"not an index snapshot ({exc})") from None
        check_snapshot(snap)
        return cls(snap.seq, snap.peers, snap.files, snap.clients, snap.client_seen, snap.chain)

    def digest(self) -> str:
        canon = _encoder.encode(
            [
                self.seq,
                sorted(self.peers.items()),
                sorted(self.files.items()),
                sorted(self.clients.items()),
                sorted(self.client_seen.items()),
            ]
        )
        return xxhash.xxh3_64_hexdigest(canon)
