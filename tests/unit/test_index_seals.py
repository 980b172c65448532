"""The index group's defences without sockets: sealed datagrams (the group's key, fresh
stamps, counters seen once), snapshots checked before they are adopted, and a damaged
--data file. Fuzzed with hypothesis: sealed and unsealed, well-formed and not."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import multiprocessing as mp
import secrets
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrorfuse.core.indexstate import IndexState, Order, Request, Snapshot
from mirrorfuse.index.keys import create_group_key, group_key
from mirrorfuse.wire import datagrams as dg
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import KeyFileError, new_key
from mirrorfuse.wire.datagrams import (
    MAX_SKEW,
    WINDOW,
    FileEntry,
    Opener,
    PeerEntry,
    Replayed,
    Sealer,
    Unsealed,
    pack,
)
from servers.index import IndexReplica
from servers.indexstore import load_state

KEY = new_key()
NOW = 1_700_000_000.0
SENDER = ("127.0.0.1", 7000)


def sealer(key: bytes = KEY) -> Sealer:
    return Sealer(key, secrets.token_bytes(8))


# -- seals ---------------------------------------------------------------------------------


def test_a_sealed_datagram_opens_once_and_only_with_the_key():
    s, o = sealer(), Opener(KEY)
    sealed = s.seal(b"hello", NOW)
    assert o.open(sealed, NOW + 1) == b"hello"
    with pytest.raises(Replayed, match="seen before"):
        o.open(sealed, NOW + 2)  # the same datagram again
    with pytest.raises(Unsealed):
        Opener(new_key()).open(sealed, NOW)  # another group's key
    for i in range(len(sealed)):  # any bit changed anywhere
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(Unsealed):
            Opener(KEY).open(bytes(bad), NOW)
    with pytest.raises(Unsealed):
        o.open(b"hello", NOW)  # never sealed at all
    with pytest.raises(Unsealed):
        o.open(b"", NOW)


def test_stamps_too_far_from_this_clock_are_refused():
    s = sealer()
    for stamp in (NOW - MAX_SKEW - 1, NOW + MAX_SKEW + 1, math.nan, math.inf, -math.inf):
        with pytest.raises(Replayed, match="stamped"):
            Opener(KEY).open(s.seal(b"x", stamp), NOW)
    assert Opener(KEY).open(s.seal(b"x", NOW - MAX_SKEW + 1), NOW) == b"x"


def test_datagrams_out_of_order_count_once_within_the_window():
    s, o = sealer(), Opener(KEY)
    sealed = [s.seal(bytes([i % 256]), NOW) for i in range(WINDOW + 10)]
    assert o.open(sealed[5], NOW) == b"\x05"
    assert o.open(sealed[2], NOW) == b"\x02"  # late, but not seen: taken
    with pytest.raises(Replayed):
        o.open(sealed[2], NOW)
    assert o.open(sealed[-1], NOW)
    with pytest.raises(Replayed):
        o.open(sealed[3], NOW)  # fell out of the window: it cannot be told from a replay
    other = sealer()  # each sender has counters of its own
    assert o.open(other.seal(b"y", NOW), NOW) == b"y"


def test_the_senders_remembered_are_bounded(monkeypatch):
    monkeypatch.setattr(dg, "MAX_SENDERS", 50)
    o = Opener(KEY)
    for _ in range(200):
        o.open(sealer().seal(b"z", NOW), NOW)
    assert len(o.seen) == 50


# -- a replica fed datagrams ----------------------------------------------------------------


class Capture:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


async def no_blob(where: Address, token: str, key: bytes) -> bytes:
    raise AssertionError("no snapshot is read by TCP here")


async def unreachable(where: Address, token: str, key: bytes) -> bytes:
    raise ConnectionRefusedError(111, "no replica there")


def replica(rid: int = 1, state: IndexState | None = None, fetch=no_blob) -> IndexReplica:
    rep = IndexReplica(rid, [Address("235.1.1.1", 1)], fetch, Address("127.0.0.1", 1), KEY, state)
    rep.connection_made(Capture())  # type: ignore[arg-type]
    return rep


def indexed(n: int = 3) -> IndexState:
    s = IndexState()
    reqs = [Request("c", 1, "register", {"peer": "p", "addr": "h:1"})]
    reqs += [
        Request("c", i + 2, "advertise", {"peer": "p", "name": f"f{i}", "size": 1, "checksum": 1})
        for i in range(n)
    ]
    for r in reqs:
        s.apply(Order(s.seq + 1, 1, r, NOW))
    return s


def ready_replica(fetch=no_blob) -> IndexReplica:
    rep = replica(1, indexed(), fetch)
    rep.replica.grace_until = 0.0
    rep.route(rep.replica.tick(time.time()))
    assert rep.replica.ready and rep.replica.is_master(time.time())
    return rep


def feed(rep: IndexReplica, data: bytes) -> None:
    rep.datagram_received(data, SENDER)


def forged_order(seq: int) -> dg.Order:
    args = {"peer": "evil", "addr": "6.6.6.6:1"}
    return dg.Order(seq=seq, master=0, time=NOW, client="x", req=1, op="register", args=args)


def evil_snapshot(seq: int) -> bytes:
    s = indexed()
    s.seq = seq
    s.peers["evil"] = PeerEntry("6.6.6.6:1", NOW)
    s.files["passwords"] = FileEntry("evil", 1, 1, ["evil"])
    return s.snapshot()


def test_forged_orders_and_snapshots_without_the_key_change_nothing():
    rep = ready_replica()
    before = rep.replica.state.digest()
    seq = rep.replica.state.seq
    forger = sealer(new_key())
    forgeries = [
        pack(forged_order(seq + 1)),
        forger.seal(pack(forged_order(seq + 1)), time.time()),
        pack(dg.Snap(to=1, seq=seq + 100, blob=evil_snapshot(seq + 100))),
        forger.seal(pack(dg.Snap(to=1, seq=seq + 100, blob=evil_snapshot(seq + 100))), NOW),
        pack(dg.Hb(replica=0, seq=seq + 5, ready=True, master=0)),  # a master that is not
    ]
    for data in forgeries:
        feed(rep, data)
    assert rep.replica.state.digest() == before
    assert (rep.unsealed, rep.dropped, rep.replayed) == (5, 5, 0)
    assert rep.replica.members == {} and rep.replica.is_master(time.time())


def test_a_replayed_request_is_dropped_and_once_remembered_is_harmless():
    rep = ready_replica()
    client = sealer()
    adv = {"peer": "p", "name": "new", "size": 1, "checksum": 1}
    req = client.seal(pack(dg.Req(client="c", req=50, op="advertise", args=adv)), time.time())
    feed(rep, req)
    applied = rep.replica.state.digest()
    assert "new" in rep.replica.state.files
    rep.replica.state.drop_holder("new", "p")  # the peer revoked it since, say
    revoked = rep.replica.state.digest()
    feed(rep, req)  # the same datagram, captured and sent again
    assert rep.replayed == 1 and rep.replica.state.digest() == revoked != applied
    again = replica(1, rep.replica.state)  # a replica restarted knows no counters yet:
    again.replica.grace_until = 0.0
    again.route(again.replica.tick(time.time()))
    feed(again, req)  # ... the group's table of clients makes it a retry, not a new request
    assert again.replayed == 0 and again.replica.state.digest() == revoked


def test_a_replayed_order_is_dropped_and_an_old_one_is_never_applied_again():
    rep = ready_replica()
    master = sealer()
    seq = rep.replica.state.seq
    adv = {"peer": "p", "name": "late", "size": 1, "checksum": 1}
    order = dg.Order(seq=seq + 1, master=0, time=NOW, client="c", req=90, op="advertise", args=adv)
    sealed = master.seal(pack(order), time.time())
    feed(rep, sealed)
    assert rep.replica.state.seq == seq + 1
    feed(rep, sealed)
    assert rep.replayed == 1
    fresh = replica(1, rep.replica.state)
    feed(fresh, sealed)  # known counters or not, an order already applied is not again
    assert fresh.replica.state.seq == seq + 1 and fresh.replayed == 0


def test_a_malformed_snapshot_from_a_key_holder_is_refused_and_counted(caplog):
    rep = replica(2)  # catching up: it takes a snapshot offered to it
    good = indexed()
    bad_states = []
    for broken in (
        lambda s: s.files["f0"].holders.clear(),
        lambda s: s.files["f0"].holders.append("nobody-registered"),
        lambda s: setattr(s.files["f0"], "owner", "someone-else"),
        lambda s: s.files["f0"].holders.append("p"),  # listed twice
        lambda s: s.files.__setitem__("a/b", FileEntry("p", 1, 1, ["p"])),
        lambda s: setattr(s.files["f0"], "size", -1),
        lambda s: setattr(s, "seq", 2**63),
        lambda s: setattr(s.peers["p"], "interval", -1.0),
    ):
        s = indexed()
        broken(s)
        bad_states.append((s.seq, s.snapshot()))
    bad_states += [(9, b"\xc1 garbage"), (9, msgspec.msgpack.encode([9, {}, {}])), (4, b"")]
    bad_states.append((7, good.snapshot()))  # a good snapshot, said to be at another sequence
    sealed = sealer()
    with caplog.at_level(logging.WARNING, logger="mirrorfs-index"):
        for seq, blob in bad_states:
            snap = dg.Snap(to=2, seq=max(min(seq, 2**63), 1), blob=blob)
            feed(rep, sealed.seal(pack(snap), time.time()))
    assert rep.replica.state.seq == 0 and rep.bad_snapshots == len(bad_states)
    refusals = [r for r in caplog.records if "refused a snapshot" in r.getMessage()]
    assert len(refusals) == len(bad_states)
    assert all("\n" not in r.getMessage() for r in refusals)  # one line each
    feed(rep, sealed.seal(pack(dg.Snap(to=2, seq=good.seq, blob=good.snapshot())), time.time()))
    assert rep.replica.state.digest() == good.digest()  # and a good one is still taken


def test_any_state_the_group_reaches_passes_the_checks():
    """Reachable states are never refused (else a replica behind could never catch up)."""
    s = indexed(5)
    ops = [
        Request("d", 1, "register", {"peer": "q", "addr": "h:2", "interval": math.inf}),
        Request("d", 2, "advertise", {"peer": "q", "name": "f1", "size": 1, "checksum": 1}),
        Request("c", 9, "revoke", {"peer": "p", "name": "f1"}),
        Request("c", 10, "leave", {"peer": "p"}),
        Request("e", 1, "expire", {"interval": 0.001}),
    ]
    for r in ops:
        s.apply(Order(s.seq + 1, 1, r, NOW + s.seq))
        assert IndexState.from_snapshot(s.snapshot()) == s


datagram_fields = {
    "client": st.text(max_size=30),
    "req": st.integers(-(2**63), 2**64 - 1),
    "seq": st.integers(-5, 2**64 - 1),
    "replica": st.integers(-3, 5),
    "first": st.integers(-5, 2**64 - 1),
    "op": st.sampled_from(["register", "advertise", "revoke", "leave", "expire", "heartbeat", "x"]),
    "args": st.dictionaries(
        st.sampled_from(["peer", "addr", "name", "size", "checksum", "interval"]),
        st.one_of(st.text(max_size=20), st.integers(-3, 2**40), st.floats(), st.none()),
        max_size=6,
    ),
    "q": st.sampled_from(["status", "files", "search", "peers", "held", "snapshot", "state", "x"]),
}
datagrams = st.one_of(
    st.builds(dg.Req, **{k: datagram_fields[k] for k in ("client", "req", "op", "args")}),
    st.builds(
        dg.Query,
        client=datagram_fields["client"],
        req=datagram_fields["req"],
        q=datagram_fields["q"],
        after=st.text(max_size=5),
        pattern=st.text(max_size=5),
    ),
    st.builds(
        dg.Order,
        seq=datagram_fields["seq"],
        master=datagram_fields["replica"],
        time=st.floats(),
        client=datagram_fields["client"],
        req=datagram_fields["req"],
        op=datagram_fields["op"],
        args=datagram_fields["args"],
    ),
    st.builds(
        dg.Hb,
        replica=datagram_fields["replica"],
        seq=datagram_fields["seq"],
        ready=st.booleans(),
        master=st.one_of(st.none(), datagram_fields["replica"]),
        chain=st.integers(0, 2**64 - 1),
    ),
    st.builds(
        dg.Ask,
        replica=datagram_fields["replica"],
        first=datagram_fields["first"],
        to=datagram_fields["replica"],
    ),
    st.builds(
        dg.Snap,
        to=st.just(1),
        seq=st.integers(0, 2**64 - 1),
        blob=st.one_of(st.none(), st.binary(max_size=40), st.just(indexed().snapshot())),
        host=st.text(max_size=10),
        port=st.integers(0, 65535),
        token=st.text(max_size=10),
    ),
)
raw = st.one_of(
    datagrams.map(pack),
    st.binary(max_size=200),
    st.builds(lambda kind: msgspec.msgpack.encode({"t": kind, "v": dg.VERSION}), st.text()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(raw, st.sampled_from(["none", "key", "other", "stale"])), max_size=8))
def test_fuzzed_datagrams_sealed_or_not_never_break_a_replica(batch):
    """Unsealed, wrongly sealed and stale datagrams change nothing and are counted; sealed
    ones, however odd, are handled or dropped, never an error; the replica goes on."""
    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mirrorfs-index").addHandler(handler)
    try:
        rep = asyncio.run(fuzz(batch))  # on a loop: an offer by token starts a (failing) read
    finally:
        logging.getLogger("mirrorfs-index").removeHandler(handler)
    assert rep.unsealed == sum(how in ("none", "other") for _, how in batch)
    assert rep.replayed == sum(how == "stale" for _, how in batch)
    assert errors == []  # no datagram reached the catch-all: none made the replica fail


async def fuzz(batch: list[tuple[bytes, str]]) -> IndexReplica:
    rep = ready_replica(unreachable)
    forger, friend = sealer(new_key()), sealer()
    for data, how in batch:
        before = (rep.replica.state.digest(), dict(rep.replica.members))
        if how == "none":
            feed(rep, data)
        elif how == "other":
            feed(rep, forger.seal(data, time.time()))
        elif how == "stale":
            feed(rep, friend.seal(data, time.time() - 2 * MAX_SKEW))
        else:
            feed(rep, friend.seal(data, time.time()))
            continue
        assert (rep.replica.state.digest(), dict(rep.replica.members)) == before
    for _ in range(3):
        await asyncio.sleep(0)  # reads by token fail, and the replica may ask again
    assert not rep.fetching
    rep.route(rep.replica.tick(time.time()))  # and it goes on
    good = sealer().seal(pack(dg.Query(client="z", req=1, q="status")), time.time())
    feed(rep, good)
    assert rep.transport.sent[-1][1] == SENDER  # type: ignore[union-attr]
    return rep


# -- the group's key file, and a replica's --data file ---------------------------------------


def test_the_group_key_is_made_once_with_mode_0600(tmp_path: Path):
    path = tmp_path / "keys" / "index.key"
    with pytest.raises(KeyFileError, match="no index group key"):
        group_key(path)
    where, key, made = create_group_key(path)
    assert (where, made) == (path, True) and group_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert create_group_key(path) == (path, key, False)  # never replaced
    assert sorted(p.name for p in path.parent.iterdir()) == ["index.key"]


def test_replicas_that_start_at_once_make_one_key(tmp_path: Path):
    path = tmp_path / "keys" / "index.key"
    with concurrent.futures.ProcessPoolExecutor(6, mp_context=mp.get_context("fork")) as pool:
        made = list(pool.map(create_group_key, [path] * 12))
    assert len({key for _, key, _ in made}) == 1 and sum(m for _, _, m in made) == 1
    assert group_key(path) == made[0][1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["index.key"]


def test_a_damaged_saved_state_is_set_aside_with_one_line_and_the_replica_starts_empty(
    tmp_path: Path, caplog
):
    good = indexed()
    inconsistent = indexed()
    inconsistent.files["f0"].holders = ["ghost"]
    cases = {
        "garbage": b"\x00\xff" * 100,
        "empty": b"",
        "inconsistent": inconsistent.snapshot(),
        "truncated": good.snapshot()[:-7],
        "foreign": msgspec.msgpack.encode(Snapshot(2**63, {}, {}, {})),
    }
    for name, blob in cases.items():
        path = tmp_path / f"{name}.snapshot"
        path.write_bytes(blob)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="mirrorfs-index"):
            assert load_state(path, 4) is None
        (line,) = [r.getMessage() for r in caplog.records]
        assert "\n" not in line and "replica 4: the saved state" in line
        assert "starting empty, catching up from the group" in line
        assert not path.exists() and path.with_name(path.name + ".bad").read_bytes() == blob
    path = tmp_path / "good.snapshot"
    path.write_bytes(good.snapshot())
    loaded = load_state(path, 4)
    assert loaded is not None and loaded.digest() == good.digest()


def test_replies_in_the_replica_status_count_what_was_dropped():
    rep = ready_replica()
    feed(rep, b"unsealed")
    friend = sealer()
    sealed = friend.seal(pack(dg.Query(client="z", req=1, q="status")), time.time())
    feed(rep, sealed)
    feed(rep, sealed)
    feed(rep, friend.seal(b"\xc1", time.time()))
    data, _ = rep.transport.sent[-1]  # type: ignore[union-attr]
    answer = dg.unpack(Opener(KEY).open(data, time.time()))
    assert isinstance(answer, dg.Answer)
    st_ = msgspec.msgpack.decode(answer.reply, type=dg.ReplicaStatus)
    # counted when it answered: the unsealed one before it; the replay and garbage after
    assert (st_.dropped, st_.unsealed, st_.replayed) == (1, 1, 0)
    assert (rep.dropped, rep.unsealed, rep.replayed) == (3, 1, 1)
