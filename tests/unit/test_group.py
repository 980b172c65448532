"""The replicated index group without sockets: a simulated LAN of replicas and clients."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfuse.core.group import (
    ASK_BATCH,
    AskFor,
    Heartbeat,
    IndexState,
    Order,
    Replica,
    Request,
    SendOrder,
    SendReply,
    SendSnapshot,
)
from mirrorfuse.wire.datagrams import UpdateResult


class Lan:
    """Reliable, ordered multicast (the seed's assumption); replicas can die or join late."""

    def __init__(self, n: int) -> None:
        self.now = 0.0
        self.replicas = {i: Replica(i, 0.0, grace=0.0) for i in range(n)}  # the founders
        self.acked: dict[tuple[str, int], UpdateResult] = {}  # first reply a client saw
        self.tick(0.0)  # the founders hear each other

    def route(self, sender: int, actions: list) -> None:
        for act in actions:
            if isinstance(act, SendOrder):
                for r in list(self.replicas.values()):
                    if r.id != sender:
                        self.route(r.id, r.on_order(act.order, self.now))
            elif isinstance(act, SendReply):
                self.acked.setdefault((act.client, act.req), act.reply)
            elif isinstance(act, AskFor):
                for r in list(self.replicas.values()):
                    if r.id != sender:
                        self.route(
                            r.id,
                            [
                                a if not isinstance(a, SendOrder) else _Direct(a, sender)
                                for a in r.on_ask(sender, act.first, self.now, act.to)
                            ],
                        )
            elif isinstance(act, _Direct):
                target = self.replicas.get(act.to)
                if target is not None:
                    self.route(act.to, target.on_order(act.send.order, self.now))
            elif isinstance(act, SendSnapshot):
                target = self.replicas.get(act.to)
                if target is not None:
                    self.route(act.to, target.on_snapshot(act.seq, act.blob, self.now))
            elif isinstance(act, Heartbeat):
                for r in list(self.replicas.values()):
                    if r.id != sender:
                        self.route(r.id, r.on_heartbeat(act, self.now))

    def request(self, req: Request) -> None:
        for r in list(self.replicas.values()):  # multicast to the group
            self.route(r.id, r.on_request(req, self.now))

    def tick(self, dt: float = 1.0) -> None:
        """Time passes, in heartbeat intervals of at most a second."""
        while True:
            step = min(dt, 1.0)
            self.now += step
            dt -= step
            for r in list(self.replicas.values()):
                self.route(r.id, r.tick(self.now))
            if dt <= 0:
                return

    def kill(self, rid: int) -> None:
        del self.replicas[rid]

    def join(self, rid: int) -> None:
        self.replicas[rid] = Replica(rid, self.now)  # listens before it may lead
        self.tick(0.0)

    def digests(self) -> set[str]:
        return {r.state.digest() for r in self.replicas.values()}


class _Direct:
    def __init__(self, send: SendOrder, to: int) -> None:
        self.send = send
        self.to = to


def reg(client: str, req: int, peer: str) -> Request:
    return Request(client, req, "register", {"peer": peer, "addr": f"{peer}:1"})


def adv(client: str, req: int, peer: str, name: str, size: int = 1, csum: str = "x") -> Request:
    return Request(
        client, req, "advertise", {"peer": peer, "name": name, "size": size, "checksum": csum}
    )


def test_all_replicas_agree_and_the_first_reply_is_shown_once():
    lan = Lan(3)
    lan.request(reg("c1", 1, "p1"))
    lan.request(adv("c1", 2, "p1", "song.mp3"))
    lan.request(adv("c1", 2, "p1", "song.mp3"))  # a retry: applied once
    assert len(lan.digests()) == 1
    state = lan.replicas[0].state
    assert state.seq == 2 and state.files["song.mp3"].owner == "p1"
    assert lan.acked[("c1", 2)] == UpdateResult()


def test_names_are_unique_and_a_second_holder_needs_the_same_content():
    lan = Lan(3)
    for p in ("p1", "p2", "p3"):
        lan.request(reg(p, 1, p))
    lan.request(adv("p1", 2, "p1", "film", 10, "aa"))
    lan.request(adv("p2", 2, "p2", "film", 99, "bb"))
    lan.request(adv("p3", 2, "p3", "film", 10, "aa"))
    assert lan.acked[("p2", 2)].ok is False and "taken by peer p1" in lan.acked[("p2", 2)].error
    assert lan.acked[("p3", 2)] == UpdateResult(holder=True)
    assert lan.replicas[1].state.files["film"].holders == ["p1", "p3"]


def test_killing_the_master_loses_no_acknowledged_update():
    lan = Lan(3)
    lan.request(reg("c", 1, "p"))
    for req in range(2, 40):
        lan.request(adv("c", req, "p", f"f{req}"))
        if req == 20:
            lan.kill(0)  # the master
            lan.tick(4.0)  # silence: replica 1 takes over
    assert lan.replicas[1].is_master(lan.now)
    assert len(lan.digests()) == 1
    files = lan.replicas[2].state.files
    for (_client, req), reply in lan.acked.items():
        if reply.ok and req > 1:
            assert f"f{req}" in files  # nothing a client saw acknowledged is gone


def test_a_request_the_old_master_never_ordered_is_ordered_by_the_new_one():
    lan = Lan(3)
    lan.request(reg("c", 1, "p"))
    del lan.replicas[0]  # the master dies before it sees the next request
    lan.request(adv("c", 2, "p", "late"))  # replicas 1 and 2 keep it unordered
    assert ("c", 2) not in lan.acked
    lan.tick(4.0)
    assert lan.acked[("c", 2)] == UpdateResult()
    assert len(lan.digests()) == 1


def test_a_late_replica_catches_up_by_snapshot_and_then_follows():
    lan = Lan(2)
    lan.request(reg("c", 1, "p"))
    for req in range(2, 60):
        lan.request(adv("c", req, "p", f"f{req}"))
    for r in lan.replicas.values():  # the recent log is gone: only a snapshot helps
        r.log.clear()
    lan.join(5)
    lan.request(adv("c", 60, "p", "after"))
    assert len(lan.digests()) == 1 and lan.replicas[5].state.seq == 60


def test_a_replica_that_just_joined_does_not_lead_before_it_has_listened():
    lan = Lan(2)
    lan.request(reg("c", 1, "p"))
    lan.kill(0)
    lan.kill(1)
    lan.join(7)  # alone and new: it must not number orders from 1 on its own
    lan.request(adv("c", 2, "p", "x"))
    assert ("c", 2) not in lan.acked and lan.replicas[7].state.seq == 0
    lan.tick(4.0)  # nobody else answered in the silence period: now it leads
    assert lan.replicas[7].is_master(lan.now)


def test_silent_peers_are_dropped_with_their_files_everywhere():
    lan = Lan(3)
    lan.request(reg("a", 1, "a"))
    lan.request(reg("b", 1, "b"))
    lan.request(adv("a", 2, "a", "shared", 5, "s"))
    lan.request(adv("b", 2, "b", "shared", 5, "s"))
    lan.request(adv("a", 3, "a", "only-a"))
    for step in range(3, 12):
        lan.request(Request("b", step, "heartbeat", {"peer": "b"}))
        lan.now += 1.0
        for r in list(lan.replicas.values()):
            lan.route(r.id, r.tick(lan.now, peer_interval=1.0))
    state = lan.replicas[2].state
    assert "a" not in state.peers and "b" in state.peers
    assert "only-a" not in state.files and state.files["shared"].holders == ["b"]
    assert len(lan.digests()) == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3)), min_size=5, max_size=80),
    st.integers(0, 2**32),
)
def test_any_run_with_deaths_and_joins_keeps_replicas_identical(steps, seed):
    rng = random.Random(seed)
    lan = Lan(4)
    next_id = 4
    peers = ["p0", "p1", "p2"]
    reqs = {p: 1 for p in peers}
    for p in peers:
        lan.request(reg(p, 1, p))
    for kind, who in steps:
        if kind == 0 and len(lan.replicas) > 1:
            lan.kill(rng.choice(sorted(lan.replicas)))
            lan.tick(4.0)
        elif kind == 1:
            lan.join(next_id)
            next_id += 1
        else:
            p = peers[who % 3]
            reqs[p] += 1
            lan.request(adv(p, reqs[p], p, f"n{rng.randrange(6)}", rng.randrange(2), "c"))
        assert len(lan.digests()) == 1
    files = next(iter(lan.replicas.values())).state.files
    for f in files.values():
        assert f.owner in f.holders and len(set(f.holders)) == len(f.holders)


def test_a_peer_is_dropped_after_three_of_its_own_intervals():
    lan = Lan(2)
    lan.request(Request("f", 1, "register", {"peer": "fast", "addr": "f:1", "interval": 0.5}))
    lan.request(reg("s", 1, "slow"))  # no interval given: the default, 3 s
    for _ in range(4):  # 2 s of silence from both
        lan.now += 0.5
        for r in list(lan.replicas.values()):
            lan.route(r.id, r.tick(lan.now, peer_interval=3.0))
    for r in lan.replicas.values():
        assert sorted(r.state.peers) == ["slow"]


def test_bad_requests_get_the_same_error_everywhere_and_change_nothing():
    lan = Lan(3)
    lan.request(reg("c", 1, "p"))
    before = lan.digests()
    bad = [
        Request("c", 2, "advertise", {"peer": "p", "name": "x"}),  # no size, no checksum
        Request("c", 3, "advertise", {"peer": "p", "name": "a/b", "size": 1, "checksum": 1}),
        Request("c", 4, "advertise", {"peer": "p", "name": "", "size": 1, "checksum": 1}),
        Request("c", 5, "advertise", {"peer": "p", "name": "x", "size": -1, "checksum": 1}),
        Request("c", 6, "advertise", {"peer": "nobody", "name": "x", "size": 1, "checksum": 1}),
        Request("c", 7, "revoke", {"peer": "p", "name": "never-shared"}),
        Request("c", 8, "teleport", {}),
        Request("c", 9, "register", {"peer": 5, "addr": None}),
    ]
    for req in bad:
        lan.request(req)
    replies = [lan.acked[("c", r.req)] for r in bad]
    assert all(not r.ok for r in replies)
    assert "bad advertise request" in replies[0].error and "`size`" in replies[0].error
    assert all("is not a file name" in r.error for r in replies[1:3])
    assert ">= 0 - at `$.size`" in replies[3].error
    assert "register first" in replies[4].error
    assert "does not share 'never-shared'" in replies[5].error
    assert "unknown request 'teleport'" in replies[6].error
    assert len(lan.digests()) == 1
    files_and_peers = {(tuple(r.state.files), tuple(r.state.peers)) for r in lan.replicas.values()}
    assert files_and_peers == {((), ("p",))}
    assert before != lan.digests()  # the requests were ordered (and remembered), not lost


# -- restarts, catching up, handing over ---------------------------------------------------


def restart(lan: Lan, rid: int, state=None) -> Replica:
    """kill -9 and start again under the same id (``state``: what it saved, if anything)."""
    lan.replicas.pop(rid, None)
    lan.replicas[rid] = r = Replica(rid, lan.now, state=state)
    lan.tick(0.0)
    return r


def test_a_restarted_lowest_replica_catches_up_follows_then_leads():
    lan = Lan(3)
    lan.request(reg("c", 1, "p"))
    for req in range(2, 30):
        lan.request(adv("c", req, "p", f"f{req}"))
    lan.kill(0)
    lan.tick(4.0)
    lan.request(adv("c", 30, "p", "while-0-is-down"))
    r0 = restart(lan, 0)  # empty: it numbered most of these orders before it died
    assert r0.state.seq == 30 and not r0.ready  # caught up, still in its grace
    lan.request(adv("c", 31, "p", "during-its-grace"))  # replica 1 still orders
    assert ("c", 31) in lan.acked and lan.replicas[1].is_master(lan.now)
    assert not r0.is_master(lan.now) and lan.replicas[2].master(lan.now) == 1
    lan.tick(4.0)
    assert r0.ready and {r.master(lan.now) for r in lan.replicas.values()} == {0}
    lan.request(adv("c", 32, "p", "after"))
    assert ("c", 32) in lan.acked and len(lan.digests()) == 1 and r0.state.seq == 32


def test_a_replica_restarted_from_its_saved_state_catches_up_on_what_it_missed():
    lan = Lan(3)
    lan.request(reg("c", 1, "p"))
    saved = lan.replicas[0].state.snapshot()
    for req in range(2, 20):
        lan.request(adv("c", req, "p", f"f{req}"))
    lan.kill(0)
    lan.tick(4.0)
    r0 = restart(lan, 0, IndexState.from_snapshot(saved))
    assert r0.state.seq == 19
    lan.tick(4.0)
    lan.request(adv("c", 20, "p", "last"))
    assert lan.acked[("c", 20)].ok and len(lan.digests()) == 1


def test_a_replica_behind_is_not_ready_and_not_master():
    lan = Lan(2)
    lan.request(reg("c", 1, "p"))
    late = Replica(0, lan.now, grace=0.0)  # past its grace at once, but empty
    assert AskFor(1, 1) in late.on_heartbeat(Heartbeat(1, 1, True, 1), lan.now)
    assert not late.ready and late.master(lan.now) == 1 and not late.may_order(lan.now)
    assert late.on_request(adv("c", 2, "p", "x"), lan.now) == []  # waits, orders nothing
    out = late.on_order(lan.replicas[1].log[1], lan.now)
    chain = late.state.chain
    assert late.ready and Heartbeat(0, 1, True, 0, chain) in out  # caught up: says so at once
    assert not late.may_order(lan.now)  # until replica 1 names it master


def test_an_ask_is_answered_by_the_replica_asked_with_a_bounded_batch():
    lan = Lan(4)
    lan.request(reg("c", 1, "p"))
    for req in range(2, 3 * ASK_BATCH):
        lan.request(adv("c", req, "p", f"f{req}"))
    now = lan.now
    answers = {r.id: r.on_ask(3, 5, now, to=1) for r in lan.replicas.values()}
    assert [len(a) for a in answers.values()] == [0, ASK_BATCH, 0, 0]
    assert [a.order.seq for a in answers[1]] == list(range(5, 5 + ASK_BATCH))
    # asked nobody in particular: only the lowest live replica other than the asker
    assert [len(r.on_ask(0, 5, now)) for r in lan.replicas.values()] == [0, ASK_BATCH, 0, 0]
    assert [len(r.on_ask(2, 5, now)) for r in lan.replicas.values()] == [ASK_BATCH, 0, 0, 0]
    lan.replicas[1].log.clear()  # gone from its recent log: a snapshot instead
    (snap,) = lan.replicas[1].on_ask(3, 5, now, to=1)
    assert isinstance(snap, SendSnapshot) and snap.to == 3 and snap.seq == 3 * ASK_BATCH - 1


def test_a_replica_asks_again_only_when_an_answer_is_overdue():
    r = Replica(5, 0.0)

    def asks(out: list) -> list:
        return [a for a in out if isinstance(a, AskFor)]

    assert asks(r.on_heartbeat(Heartbeat(1, 500, True, 1), 0.1)) == [AskFor(1, 1)]
    assert asks(r.on_heartbeat(Heartbeat(2, 600, True, 1), 0.2)) == []  # an answer is coming
    assert asks(r.tick(0.5)) == []
    assert asks(r.tick(1.5)) == [AskFor(1, 2)]  # none came: ask the one that showed the most


def test_a_retry_during_a_failover_gets_the_original_reply():
    lan = Lan(3)
    for p in ("a", "b"):
        lan.request(reg(p, 1, p))
    lan.request(adv("a", 2, "a", "film", 10, "x"))
    lan.request(adv("b", 2, "b", "film", 10, "x"))
    original = lan.acked.pop(("b", 2))  # the client never saw it
    assert original == UpdateResult(holder=True)
    lan.kill(0)
    lan.request(adv("b", 2, "b", "film", 10, "x"))  # the retry, same id, no master yet
    assert lan.acked[("b", 2)] == original  # from a replica that applied it
    lan.tick(4.0)
    assert lan.replicas[1].state.seq == 4 and len(lan.digests()) == 1  # applied once


def test_a_master_stopped_and_resumed_does_not_order_before_it_has_listened_again():
    lan = Lan(3)
    lan.request(reg("c", 1, "p"))
    stopped = lan.replicas.pop(0)  # SIGSTOP: hears nothing, says nothing
    lan.tick(5.0)
    lan.request(adv("c", 2, "p", "x"))
    assert lan.replicas[1].is_master(lan.now) and ("c", 2) in lan.acked
    # SIGCONT: a request it finds waiting is not ordered from its stale state
    assert stopped.on_request(adv("c", 3, "p", "y"), lan.now) == []
    lan.replicas[0] = stopped
    lan.tick(0.0)  # it notices it was stopped: listens again, catches up
    assert not stopped.ready and stopped.state.seq == 2
    lan.request(adv("c", 3, "p", "y"))
    lan.tick(4.0)
    lan.request(adv("c", 4, "p", "z"))
    assert stopped.is_master(lan.now) and len(lan.digests()) == 1 and stopped.state.seq == 4


def test_a_replica_restarted_with_an_order_nobody_else_got_starts_again_from_scratch():
    lan = Lan(3)
    lan.request(reg("c", 1, "p"))
    # the master numbered and saved an order, which reached nobody before it died
    saved = IndexState.from_snapshot(lan.replicas[0].state.snapshot())
    saved.apply(Order(2, 0, adv("c", 2, "p", "private"), lan.now))
    lan.kill(0)
    lan.tick(4.0)
    for req in range(3, 6):  # replica 1 numbers others from 2 on
        lan.request(adv("c", req, "p", f"f{req}"))
    r0 = restart(lan, 0, saved)
    lan.tick(4.0)
    assert r0.resets == 1 and "private" not in r0.state.files
    assert len(lan.digests()) == 1 and r0.state.seq == 4 and r0.ready


def test_an_order_past_a_gap_that_no_live_replica_can_fill_does_not_stop_the_group():
    """The master died after numbering two orders; the first reached nobody, the second
    one replica (or: a stray order, sealed with the key, numbered by no one alive). The
    orders held past the gap are forgotten once no live replica can fill it, and the new
    master orders the waiting requests anew instead of asking for ever."""
    lan = Lan(3)
    lan.request(reg("c", 1, "p"))
    lost, held = adv("c", 2, "p", "lost"), adv("c", 3, "p", "held")
    lan.kill(0)
    for r in lan.replicas.values():  # the requests reached every replica, the orders did not
        r.on_request(lost, lan.now)
        r.on_request(held, lan.now)
    lan.replicas[1].on_order(Order(3, 0, held, lan.now), lan.now)  # only the second, to one
    assert 3 in lan.replicas[1].ahead
    lan.tick(8.0)
    lan.request(adv("c", 4, "p", "after"))
    assert len(lan.digests()) == 1
    state = lan.replicas[1].state
    assert {"lost", "held", "after"} <= set(state.files) and lan.replicas[1].ahead == {}
    assert lan.replicas[1].is_master(lan.now)
