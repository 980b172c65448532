"""Garbage thrown at the peer, the index replica's snapshot server and the file server of
serve-file, each listening in this process as its daemon builds it.

Without the key a keyed daemon answers at most one refusal (request id 0, AUTH) and does
nothing; with the key it answers with replies only and goes on serving; no exception
escapes, no connection is left open, no byte of the budget stays held; a peer never
shares, unshares or serves a file it does not advertise. (The block server has the same
treatment, live, in tests/e2e/test_wire_fuzz.py; here only the one bug found through the
peer that it shares.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_daemons import (
    BLOB,
    KEY,
    PLAIN,
    SERVED,
    Daemons,
    LoopThread,
    close_all,
    port_of,
    settle,
    shared_tree,
    start,
    start_peer,
)
from fuzz_garbage import (
    FUZZ,
    KEYED,
    NAMES,
    PEER_TYPES,
    body,
    check_file_reply,
    check_peer_reply,
    check_refusal_only,
    check_replies,
    exchange,
    garbage,
    peer_state,
    request,
    streams,
)
from hypothesis import given

from mirrorfuse.wire.frames import Frame, Msg, encode
from servers.block.server import listen as listen_blocks
from servers.block.store import Store


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    runner = LoopThread()
    try:
        d = runner.run(start(tmp_path_factory.mktemp("fuzzed"), runner))
        yield d
        runner.call(lambda: close_all(d.closers))
    finally:
        runner.close()


@KEYED
def test_peer_fuzzed(daemons: Daemons, keyed: bool):
    d = daemons
    before = d.runner.call(lambda: peer_state(d))

    @FUZZ
    @given(garbage(d, keyed, PEER_TYPES))
    def throw(blob: bytes) -> None:
        hs_reply, frames = exchange(d.peer_port, blob, KEY if keyed else None)
        settle(d, d.peer_limits)
        now = d.runner.call(lambda: peer_state(d))
        if keyed:
            check_replies(frames, check_peer_reply)
            # it may learn of peers; it shares, unshares and advertises nothing
            assert now[:3] == before[:3] and now[4:] == before[4:]
        else:
            check_refusal_only(hs_reply, frames)
            assert now == before
        # and it serves on, the file it advertises only
        (ok,) = request(
            d.peer_port,
            encode(Msg.FILE_READ, 7, {"name": "plain.txt", "offset": 0, "length": 9}),
            KEY,
        )
        assert not ok.is_error and bytes(ok.payload) == PLAIN[:9]

    throw()
    settle(d, d.peer_limits)


def test_peer_serves_by_name_only_what_it_advertises(daemons: Daemons):
    d = daemons
    for name in NAMES[1:] + [str(d.tmp / "secret"), str(d.peer.share / "plain.txt")]:
        asked = encode(Msg.FILE_INFO, 1, {"name": name})
        asked += encode(Msg.FILE_READ, 2, {"name": name, "offset": 0, "length": 5})
        replies = request(d.peer_port, asked, KEY, want=2)
        assert [body(f)["code"] for f in replies] == ["NOT_FOUND"] * 2, name
    settle(d, d.peer_limits)


def test_share_of_a_path_with_a_nul_byte_is_refused_with_a_reply(tmp_path: Path):
    """With the key, from this machine: a path the kernel cannot take is refused like any
    other, and the peer answers (it raised ValueError in a background task, leaving the
    request unanswered); a real file is shared over the same connection."""
    runner = LoopThread()
    try:
        share = shared_tree(tmp_path)
        peer, group, limits, server = runner.run(start_peer(share))
        port = port_of(server)
        secret = str(tmp_path / "secret")
        for path in (secret + "\x00", "/\x00", f"{tmp_path}/\x00/secret"):
            (reply,) = request(port, encode(Msg.PEER_SHARE, 3, {"path": path, "name": "x"}), KEY)
            assert not reply.is_error and body(reply)["ok"] is False, body(reply)
            assert "null" in body(reply)["error"]
        assert runner.call(lambda: sorted(peer.files)) == ["plain.txt"]
        assert not runner.escaped, runner.escaped
        (reply,) = request(port, encode(Msg.PEER_SHARE, 4, {"path": secret, "name": "x"}), KEY)
        assert body(reply) == {"ok": True}
        assert runner.call(lambda: sorted(peer.files)) == ["plain.txt", "x"]
        (reply,) = request(port, encode(Msg.PEER_UNSHARE, 5, {"name": "x"}), KEY)
        assert body(reply) == {"ok": True}
        runner.call(lambda: close_all([server.close] + [s.close for s in peer.files.values()]))
        assert not runner.escaped, runner.escaped
        assert [op for op, _ in group.requests][-2:] == ["advertise", "revoke"]
    finally:
        runner.close()


def test_a_reply_ready_after_the_refusal_is_dropped_not_raised(daemons: Daemons):
    """A share request answered in the background, then a broken header: the refusal
    ends the stream first, and the late reply must not be written after it (it raised
    RuntimeError in the task that made it)."""
    d = daemons
    blob = b"".join(encode(Msg.PEER_SHARE, 1)) + b"XX" * 12
    _, frames = exchange(d.peer_port, blob, KEY)
    assert [(f.req_id, body(f)["code"]) for f in frames] == [(0, "PROTOCOL")]
    settle(d, d.peer_limits)


def test_a_refused_connection_does_not_end_a_block_server_s_in_order_queue(tmp_path: Path):
    """The same on a block server: the reply to a metadata request of a connection refused
    meanwhile raised in the one task that serves every connection's metadata requests,
    and no later one was ever answered."""
    store = Store(tmp_path / "d", 0)
    store.format("v", 4, 4096, KEY)
    runner = LoopThread()
    try:
        server = runner.run(listen_blocks(store, "127.0.0.1", 0))
        port = port_of(server)
        blob = b"".join(encode(Msg.META_INFO, 1)) + b"XX" * 12
        _, frames = exchange(port, blob, KEY)
        assert [(f.req_id, body(f)["code"]) for f in frames] == [(0, "PROTOCOL")]
        (reply,) = request(port, encode(Msg.META_INFO, 2), KEY)
        assert not reply.is_error and "epoch" in body(reply)
        runner.call(server.close)
        escaped, runner.escaped = runner.escaped, []
        assert not escaped, escaped
    finally:
        runner.close()


# -- the index replica's snapshot server ----------------------------------------------------------


@KEYED
def test_blob_server_fuzzed(daemons: Daemons, keyed: bool):
    d = daemons
    before = d.runner.call(lambda: dict(d.store.blobs))

    def check_ok(f: Frame) -> None:
        assert f.type == Msg.BLOB_READ and body(f)["total"] == len(BLOB), f
        assert bytes(f.payload) in BLOB

    @FUZZ
    @given(garbage(d, keyed, [Msg.BLOB_READ]))
    def throw(blob: bytes) -> None:
        hs_reply, frames = exchange(d.blob_port, blob, KEY if keyed else None)
        settle(d, d.blob_limits)
        if keyed:
            check_replies(frames, check_ok)
        else:
            check_refusal_only(hs_reply, frames)
        assert d.runner.call(lambda: dict(d.store.blobs)) == before
        (ok,) = request(d.blob_port, encode(Msg.BLOB_READ, 7, {"token": d.token, "offset": 0}), KEY)
        assert not ok.is_error and bytes(ok.payload) == BLOB

    throw()
    settle(d, d.blob_limits)


# -- the file server of serve-file (no key, by design) -------------------------------------------


def test_file_server_fuzzed(daemons: Daemons):
    d = daemons

    @FUZZ
    @given(streams(d.tmp, "token", True, [Msg.FILE_INFO, Msg.FILE_READ]))
    def throw(blob: bytes) -> None:
        _, frames = exchange(d.file_port, blob)
        settle(d, d.file.limits)
        check_replies(frames, lambda f: check_file_reply(f, "served.bin", SERVED))
        assert d.runner.call(lambda: d.file.state) == "alive"
        (ok,) = request(d.file_port, encode(Msg.FILE_INFO, 7), None)
        assert not ok.is_error and body(ok)["size"] == len(SERVED)

    throw()
    settle(d, d.file.limits)
