"""The replicated index group without sockets: a simulated LAN of replicas and clients."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfuse.core.group import (
    AskFor,
    Heartbeat,
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
                                for a in r.on_ask(sender, act.first)
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
        self.now += dt
        for r in list(self.replicas.values()):
            self.route(r.id, r.tick(self.now))

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
