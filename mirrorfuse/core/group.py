"""The P2P index as a replicated group: who orders, and how replicas keep up, with no I/O.

Every replica holds the whole index (``core.indexstate``). The master, the
live *ready* replica with the lowest id, gives each client request the next
sequence number and sends the numbered *order* to the group; every replica
applies orders strictly in sequence, so all hold the same state. Requests
carry (client id, request id): a retried or re-proposed request is applied
once, and its original reply is repeated.

A replica that starts (new, or restarted with or without its saved state)
listens for a grace period, then catches up: it asks one replica, the one
that showed the highest sequence, for the orders it lacks, a bounded batch
at a time, or for a snapshot when they are gone from that replica's recent
log. It is *ready* once past its grace and at the sequence the others showed
it; only then does it answer queries (the caller's part) or count as a
master. Heartbeats carry the sequence, readiness and whom the sender takes
for the master: a replica that becomes master orders only once every other
live replica that is ready, or has a lower id, names it, so the previous
master has stepped down and its last orders are known (no two masters number
the same sequence). A master orders only within a lease after its last
heartbeat, and a process that was stopped for longer than the silence period
listens again before it may order.

Heartbeats also carry a hash chain of the orders applied: a replica whose
history differs from the master's at the same sequence (it saved an order
that reached nobody else before its crash, and the group numbered another
one since) drops its state and catches up from scratch.

A replica remembers requests it has seen but not seen ordered; when it
becomes master (the old one fell silent), it orders them, so a request the
old master never ordered is not lost. Like etcd's raft package, the methods
return what to send; the caller does the sending, the sockets and the clock.
Everything taken from the network is bounded: the requests waiting, the
orders kept past a gap, the replicas remembered, the orders sent per ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mirrorfuse.wire.datagrams import UpdateResult

from .indexstate import (
    MISSED_BEATS,
    BadSnapshot,
    IndexState,
    Order,
    Request,
    Snapshot,
    parse_update,
    peer_limit,
)

__all__ = [
    "ASK_AGAIN",
    "ASK_BATCH",
    "LOG_KEEP",
    "MISSED_BEATS",
    "SILENCE",
    "AskFor",
    "BadSnapshot",
    "Heartbeat",
    "IndexState",
    "Order",
    "Replica",
    "Request",
    "SendOrder",
    "SendReply",
    "SendSnapshot",
    "Snapshot",
    "parse_update",
    "peer_limit",
]

SILENCE = 3.0  # seconds without a heartbeat before a replica counts as gone
LOG_KEEP = 10_000  # recent orders kept to fill other replicas' gaps
ASK_BATCH = 100  # orders sent at most in answer to one ask (the asker asks on)
ASK_AGAIN = 1.0  # seconds before an ask that brought nothing is repeated
MAX_UNORDERED = 10_000  # requests waiting for a master, at most
MAX_AHEAD = 10_000  # orders past a gap kept, at most this far ahead
FORGET = 20 * SILENCE  # a replica silent this long is forgotten
# a master orders only within this long of its last heartbeat: the others count it
# live for SILENCE after they hear one, so it stops well before they may take over
LEASE = SILENCE - 1.0


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
    to: int = -1  # the replica asked (-1: whichever is lowest, see Replica.on_ask)


@dataclass(frozen=True)
class SendSnapshot:
    to: int
    seq: int
    blob: bytes


@dataclass(frozen=True)
class Heartbeat:
    replica: int
    seq: int
    ready: bool = True
    master: int | None = None  # whom the sender takes for the master
    chain: int = 0  # IndexState.chain at seq (0: not said)


@dataclass
class Member:
    """What this replica last heard from another one."""

    heard: float
    seq: int
    ready: bool
    master: int | None


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
        self.grace = grace
        self.grace_until = now + grace
        self.state = state if state is not None else IndexState()
        self.members: dict[int, Member] = {}  # the other replicas heard
        self.unordered: dict[tuple[str, int], Request] = {}
        self.ahead: dict[int, Order] = {}  # orders past a gap, waiting
        self.log: dict[int, Order] = {}
        self.chains: dict[int, int] = {}  # seq -> the state's chain there, as long as the log
        self.expect: tuple[int, int] | None = None  # (seq, chain) the master showed ahead
        self.resets = 0  # times its history was found to differ from the master's
        self.ready = False  # caught up once, past the grace: answers, may lead
        self.last_tick = now
        self.asked: tuple[int, float] | None = None  # the last order asked for, and when
        self.named: int | None = None  # the master this replica's last heartbeat named
        self.unfilled: float | None = None  # since when no live replica can fill the gap

    # -- who is who ------------------------------------------------------------------------

    def live(self, now: float) -> dict[int, Member]:
        return {r: m for r, m in self.members.items() if now - m.heard <= SILENCE}

    def master(self, now: float) -> int | None:
        """The lowest-id live ready replica, as this one sees the group."""
        ids = [r for r, m in self.live(now).items() if m.ready]
        if self.ready:
            ids.append(self.id)
        return min(ids) if ids else None

    def is_master(self, now: float) -> bool:
        return self.ready and self.master(now) == self.id

    def may_order(self, now: float) -> bool:
        """Master, running (not just woken from a stop), and named master by every other
        live replica that is ready (whoever led before has stepped down) or has a lower
        id (it knows this one is ready, so it cannot become ready and lead unaware)."""
        if not self.is_master(now) or now - self.last_tick > LEASE:
            return False
        return all(
            m.master == self.id or (m.ready and m.master is None)  # None: an older replica
            for r, m in self.live(now).items()
            if m.ready or r < self.id
        )

    def known_seq(self, now: float) -> int:
        """The highest sequence a live replica showed, or that this one holds orders up to."""
        seqs = [m.seq for m in self.live(now).values()]
        return max([self.state.seq, *seqs, max(self.ahead, default=0)])

    def _heartbeat(self, now: float) -> Heartbeat:
        self.named = self.master(now)
        return Heartbeat(self.id, self.state.seq, self.ready, self.named, self.state.chain)

    def _check_ready(self, now: float) -> list[Any]:
        """Once past the grace and caught up: ready, and say so at once."""
        if self.ready or now < self.grace_until or self.ahead:
            return []
        if self.state.seq < self.known_seq(now):
            return []
        self.ready = True
        return [self._heartbeat(now)]

    def _ask(self, now: float) -> list[Any]:
        """Ask one replica for what this one lacks; not again while an answer may be coming."""
        first = self.state.seq + 1
        if self.asked is not None and first <= self.asked[0] and now - self.asked[1] < ASK_AGAIN:
            return []
        self.asked = (first + ASK_BATCH - 1, now)
        return [AskFor(first, self._holder(first, now))]

    def _holder(self, first: int, now: float) -> int:
        having = [(-m.seq, r) for r, m in self.live(now).items() if m.seq >= first]
        if having:
            return min(having)[1]  # the highest sequence; of those, the lowest id
        master = self.master(now)
        return master if master is not None and master != self.id else -1

    # -- events ------------------------------------------------------------------------------

    def on_request(self, req: Request, now: float) -> list[Any]:
        key = (req.client, req.req)
        last = self.state.clients.get(req.client)
        if last is not None and req.req <= last[0]:  # already applied: say it again
            return [SendReply(req.client, req.req, last[1])] if req.req == last[0] else []
        if key not in self.unordered and len(self.unordered) >= MAX_UNORDERED:
            return []  # the client sends it again
        self.unordered[key] = req
        out = self._check_ready(now)
        if self.may_order(now):
            out += self._order_unordered(now)
        return out

    def _order_unordered(self, now: float) -> list[Any]:
        if self.known_seq(now) > self.state.seq:
            # a new master first learns every order the old one gave out
            return self._ask(now)
        out: list[Any] = []
        for key, req in list(self.unordered.items()):
            if self._applied(req):
                del self.unordered[key]
                continue
            order = Order(self.state.seq + 1, self.id, req, now)
            out.append(SendOrder(order))
            out += self.on_order(order, now)
        return out

    def on_order(self, order: Order, now: float) -> list[Any]:
        """An order, whoever numbered it (this replica too, before a restart)."""
        if order.seq <= self.state.seq or order.seq > self.state.seq + MAX_AHEAD:
            return []  # applied already, or too far ahead to keep: asked for later
        self.ahead[order.seq] = order
        return self._advance(now)

    def _advance(self, now: float) -> list[Any]:
        """Apply what follows the state without a gap; ask for the rest."""
        out: list[Any] = []
        while self.state.seq + 1 in self.ahead:
            o = self.ahead.pop(self.state.seq + 1)
            reply = self.state.apply(o)
            self.log[o.seq] = o
            self.log.pop(o.seq - self.log_keep, None)
            self.chains[o.seq] = self.state.chain
            self.chains.pop(o.seq - self.log_keep, None)
            self.unordered.pop((o.request.client, o.request.req), None)
            out.append(SendReply(o.request.client, o.request.req, reply))
        if self.expect is not None and self.expect[0] <= self.state.seq:
            seq, chain = self.expect
            self.expect = None
            if self.chains.get(seq, chain) != chain:
                return out + self._diverged(now)
        if self.known_seq(now) > self.state.seq:
            out += self._ask(now)
        return out + self._check_ready(now)

    def on_heartbeat(self, hb: Heartbeat, now: float) -> list[Any]:
        if hb.replica == self.id:
            return []
        self.members[hb.replica] = Member(now, hb.seq, hb.ready, hb.master)
        if hb.chain and hb.ready and hb.replica == self.master(now):
            mine = self.state.chain if hb.seq == self.state.seq else self.chains.get(hb.seq)
            if mine is None and hb.seq > self.state.seq:
                self.expect = (hb.seq, hb.chain)  # compared once this replica is there
            elif mine is not None and mine != hb.chain:
                return self._diverged(now)
        out: list[Any] = []
        if hb.seq > self.state.seq:
            out += self._ask(now)
        out += self._check_ready(now)
        if self.master(now) != self.named:  # say at once whom we follow now
            out.append(self._heartbeat(now))
        if self.unordered and self.may_order(now):  # the last replica named us: lead
            out += self._order_unordered(now)
        return out

    def _forget_unfillable(self, now: float) -> None:
        """Orders held past a gap that no live replica has shown it can fill, for SILENCE:
        numbered by a master that died before anyone else had them (or not by this group
        at all). Kept, they would have this replica ask forever and, as master, never
        order again; their requests are still waiting here and are ordered anew."""
        first = self.state.seq + 1
        if not self.ahead or any(m.seq >= first for m in self.live(now).values()):
            self.unfilled = None
        elif self.unfilled is None:
            self.unfilled = now
        elif now - self.unfilled > SILENCE:
            self.ahead.clear()
            self.unfilled = self.asked = None

    def _diverged(self, now: float) -> list[Any]:
        """This replica's history is not the master's: start again from nothing."""
        self.resets += 1
        self.state = IndexState()
        self.log.clear()
        self.chains.clear()
        self.ahead.clear()
        self.ready = False
        self.expect = self.asked = None
        return self._ask(now)

    def on_ask(self, asker: int, first: int, now: float, to: int = -1) -> list[Any]:
        """Another replica misses orders from ``first``: a batch of them, or a snapshot.

        Only the replica asked answers (``to``); an ask to nobody in particular is
        answered by the lowest live ready replica other than the asker, so one answers.
        """
        if asker == self.id or first > self.state.seq:
            return []
        if to != self.id and not (to == -1 and self._answers_for(asker, now)):
            return []
        last = min(self.state.seq, first + ASK_BATCH - 1)
        if all(s in self.log for s in range(first, last + 1)):
            return [SendOrder(self.log[s]) for s in range(first, last + 1)]
        return [SendSnapshot(asker, self.state.seq, self.state.snapshot())]

    def _answers_for(self, asker: int, now: float) -> bool:
        ids = [r for r, m in self.live(now).items() if m.ready and r != asker]
        return self.ready and min([self.id, *ids]) == self.id

    def on_snapshot(self, seq: int, blob: bytes, now: float) -> list[Any]:
        if seq <= self.state.seq:
            return []
        try:
            state = IndexState.from_snapshot(blob)
        except BadSnapshot:
            return []  # never adopt what does not decode or check out: ask again later
        return self.adopt(seq, state, now)

    def adopt(self, seq: int, state: IndexState, now: float) -> list[Any]:
        """A snapshot, decoded and checked (``IndexState.from_snapshot``), said to be at seq."""
        if seq <= self.state.seq or state.seq != seq:
            return []
        self.state = state
        self.chains[seq] = state.chain
        self.ahead = {s: o for s, o in self.ahead.items() if s > seq}
        self.unordered = {k: r for k, r in self.unordered.items() if not self._applied(r)}
        return self._advance(now)

    def _applied(self, req: Request) -> bool:
        last = self.state.clients.get(req.client)
        return last is not None and req.req <= last[0]

    def tick(self, now: float, peer_interval: float | None = None) -> list[Any]:
        """Every heartbeat interval: say we are here; catch up; as master, order what waits.

        ``peer_interval`` is the heartbeat interval of peers that did not give theirs.
        """
        if now - self.last_tick > SILENCE:  # this process was stopped: others led meanwhile
            self.ready = False
            self.grace_until = now + max(self.grace, SILENCE)
        self.last_tick = now
        for r in [r for r, m in self.members.items() if now - m.heard > FORGET]:
            del self.members[r]
        self._forget_unfillable(now)
        out = self._check_ready(now) or [self._heartbeat(now)]
        if self.known_seq(now) > self.state.seq:
            out += self._ask(now)
        if self.may_order(now):
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
