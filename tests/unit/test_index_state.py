"""The replicated index itself: leaving peers, the table of clients, saved snapshots."""

from __future__ import annotations

import msgspec

from mirrorfuse.core.indexstate import (
    CLIENT_KEEP,
    PRUNE_EVERY,
    IndexState,
    Order,
    Request,
)
from mirrorfuse.wire.datagrams import FileEntry, PeerEntry, UpdateResult


def apply_all(state: IndexState, requests: list[Request], t: float = 0.0) -> list[UpdateResult]:
    return [state.apply(Order(state.seq + 1, 0, r, t)) for r in requests]


def test_a_peer_that_leaves_is_dropped_with_its_files_at_once():
    s = IndexState()
    apply_all(
        s,
        [
            Request("a-1", 1, "register", {"peer": "a", "addr": "h:1"}),
            Request("b-1", 1, "register", {"peer": "b", "addr": "h:2"}),
            Request("a-1", 2, "advertise", {"peer": "a", "name": "x", "size": 1, "checksum": 1}),
            Request("a-1", 3, "advertise", {"peer": "a", "name": "y", "size": 1, "checksum": 1}),
            Request("b-1", 2, "advertise", {"peer": "b", "name": "y", "size": 1, "checksum": 1}),
        ],
    )
    (reply,) = apply_all(s, [Request("a-1", 4, "leave", {"peer": "a"})])
    assert reply == UpdateResult(dropped=["a"])
    assert list(s.peers) == ["b"] and list(s.files) == ["y"]
    assert s.files["y"].owner == "b" and s.files["y"].holders == ["b"]
    (again,) = apply_all(s, [Request("a-1", 5, "leave", {"peer": "a"})])
    assert not again.ok and "unknown peer" in again.error


def test_a_restarted_client_is_a_new_incarnation_and_old_ones_are_forgotten_alike():
    replicas = [IndexState(), IndexState()]
    t = 1000.0
    for n in range(3):  # a peer restarted three times: three client ids
        reqs = [Request(f"peer-a-{n}", 1, "register", {"peer": "a", "addr": "h:1"})]
        for s in replicas:
            assert apply_all(s, reqs, t) == [UpdateResult()]  # registered again each time
    for s in replicas:
        assert sorted(s.clients) == ["peer-a-0", "peer-a-1", "peer-a-2"]
    # an hour later by the masters' clock, only clients heard since are remembered
    later = t + CLIENT_KEEP + 1
    beat = Request("peer-a-2", 2, "heartbeat", {"peer": "a"})
    for s in replicas:
        apply_all(s, [beat], later)
        while s.seq % PRUNE_EVERY:
            apply_all(s, [Request("other", s.seq + 10, "heartbeat", {"peer": "a"})], later)
        assert sorted(s.clients) == ["other", "peer-a-2"]
        assert sorted(s.client_seen) == ["other", "peer-a-2"]
    assert replicas[0].digest() == replicas[1].digest()


class OldSnapshot(msgspec.Struct, array_like=True):
    """What --data files held before client times were kept."""

    seq: int
    peers: dict[str, PeerEntry]
    files: dict[str, FileEntry]
    clients: dict[str, tuple[int, UpdateResult]]


def test_a_snapshot_saved_by_the_previous_version_loads():
    old = OldSnapshot(
        7,
        {"a": PeerEntry("h:1", 5.0)},
        {"x": FileEntry("a", 1, 1, ["a"])},
        {"peer-a": (3, UpdateResult())},
    )
    s = IndexState.from_snapshot(msgspec.msgpack.encode(old))
    assert (s.seq, list(s.peers), list(s.files), s.clients["peer-a"][0]) == (7, ["a"], ["x"], 3)
    assert s.client_seen == {}
    assert IndexState.from_snapshot(s.snapshot()) == s
