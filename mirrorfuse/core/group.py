"""The P2P index as a replicated group: state and ordering, with no I/O (issue 6 core).

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

import msgpack
import xxhash

SILENCE = 3.0  # seconds without a heartbeat before a replica counts as gone
LOG_KEEP = 10_000  # recent orders kept to fill other replicas' gaps
MISSED_BEATS = 3  # a peer silent for this many of its heartbeat intervals is dropped


# what each update must carry; a request that does not is refused alike on every replica
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "register": {"peer": str, "addr": str},
    "heartbeat": {"peer": str},
    "advertise": {"peer": str, "name": str, "size": int, "checksum": (int, str)},
    "revoke": {"peer": str, "name": str},
    "expire": {"interval": (int, float)},
}


def malformed(op: str, a: dict[str, Any]) -> str | None:
    """Why the arguments of ``op`` are unusable, or None."""
    for key, kind in SCHEMA.get(op, {}).items():
        if not isinstance(a.get(key), kind) or isinstance(a.get(key), bool):
            return f"{op} needs {key!r}"
    if op == "advertise" and a["size"] < 0:
        return "advertise needs a size of 0 or more"
    name = a.get("name")
    if op == "advertise" and (not name or "/" in name or "\0" in name or len(name) > 255):
        return f"{name!r} is not a file name (1-255 characters, no '/')"
    return None


def peer_limit(info: dict[str, Any], default_interval: float) -> float:
    """How long a peer may stay silent: three of the intervals it registered with."""
    return MISSED_BEATS * float(info.get("interval") or default_interval)


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
    reply: dict[str, Any]


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


@dataclass
class IndexState:
    seq: int = 0
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> addr, seen
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> owner, size, ...
    clients: dict[str, list[Any]] = field(default_factory=dict)  # client -> [req, reply]

    def apply(self, order: Order) -> dict[str, Any]:
        """Apply the next order; the reply every replica gives its client."""
        assert order.seq == self.seq + 1, (order.seq, self.seq)
        self.seq = order.seq
        r = order.request
        last = self.clients.get(r.client)
        if last is not None and r.req <= last[0]:
            return last[1] if r.req == last[0] else {"ok": False, "error": "stale request"}
        handler = getattr(self, f"_op_{r.op}", None) if r.op in SCHEMA else None
        problem = malformed(r.op, r.args) if handler else f"unknown request {r.op!r}"
        reply = {"ok": False, "error": problem} if problem else handler(r.args, order.t)
        self.clients[r.client] = [r.req, reply]
        return reply

    def _op_register(self, a: dict[str, Any], t: float) -> dict[str, Any]:
        info: dict[str, Any] = {"addr": a["addr"], "seen": t}
        if isinstance(a.get("interval"), int | float) and a["interval"] > 0:
            info["interval"] = a["interval"]
        self.peers[a["peer"]] = info
        return {"ok": True}

    def _op_heartbeat(self, a: dict[str, Any], t: float) -> dict[str, Any]:
        if a["peer"] not in self.peers:
            return {"ok": False, "error": "unknown peer: register first"}
        self.peers[a["peer"]]["seen"] = t
        return {"ok": True}

    def _op_advertise(self, a: dict[str, Any], t: float) -> dict[str, Any]:
        peer, name = a["peer"], a["name"]
        if peer not in self.peers:
            return {"ok": False, "error": "unknown peer: register first"}
        held = self.files.get(name)
        if held is None:
            self.files[name] = {
                "owner": peer,
                "size": a["size"],
                "checksum": a["checksum"],
                "holders": [peer],
            }
            return {"ok": True}
        if held["owner"] == peer:
            return {"ok": True}
        if (held["size"], held["checksum"]) == (a["size"], a["checksum"]):
            if peer not in held["holders"]:
                held["holders"].append(peer)
            return {"ok": True, "holder": True}
        return {"ok": False, "error": f"the name {name!r} is taken by peer {held['owner']}"}

    def _op_revoke(self, a: dict[str, Any], t: float) -> dict[str, Any]:
        held = self.files.get(a["name"])
        if held is None or a["peer"] not in held["holders"]:
            return {"ok": False, "error": f"{a['peer']} does not share {a['name']!r}"}
        self.drop_holder(a["name"], a["peer"])
        return {"ok": True}

    def _op_expire(self, a: dict[str, Any], t: float) -> dict[str, Any]:
        """Drop peers silent for three of their heartbeat intervals, and their files."""
        gone = sorted(
            p
            for p, info in self.peers.items()
            if t - info["seen"] > peer_limit(info, a["interval"])
        )
        for p in gone:
            del self.peers[p]
            for name in [n for n, f in self.files.items() if p in f["holders"]]:
                self.drop_holder(name, p)
        return {"ok": True, "dropped": gone}

    def drop_holder(self, name: str, peer: str) -> None:
        held = self.files[name]
        held["holders"].remove(peer)
        if not held["holders"]:
            del self.files[name]
        elif held["owner"] == peer:
            held["owner"] = held["holders"][0]

    def snapshot(self) -> bytes:
        return msgpack.packb([self.seq, self.peers, self.files, self.clients], use_bin_type=True)

    @classmethod
    def from_snapshot(cls, blob: bytes) -> IndexState:
        seq, peers, files, clients = msgpack.unpackb(blob, raw=False)
        return cls(seq, peers, files, clients)

    def digest(self) -> str:
        canon = msgpack.packb(
            [
                self.seq,
                sorted(self.peers.items()),
                sorted(self.files.items()),
                sorted(self.clients.items()),
            ],
            use_bin_type=True,
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
        self.state = IndexState.from_snapshot(blob)
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
                    now - p["seen"] > peer_limit(p, peer_interval)
                    for p in self.state.peers.values()
                )
                if stale:
                    key = (f"master-{self.id}", int(now * 1000))
                    args = {"interval": peer_interval}
                    self.unordered[key] = Request(key[0], key[1], "expire", args)
            if self.unordered:
                out += self._order_unordered(now)
        return out
