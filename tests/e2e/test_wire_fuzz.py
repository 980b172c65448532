"""Garbage thrown at a live server: it answers or hangs up, never dies, and others go on."""

from __future__ import annotations

import contextlib
import socket

import msgpack
import xxhash
from helpers import prove
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrorfuse.client.blocking import BlockingVolume
from mirrorfuse.wire.auth import REPLY_SIZE, ClientHandshake, new_key
from mirrorfuse.wire.frames import HEADER, MAGIC, VERSION, Flag, FrameDecoder, Msg, encode

ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
fields = st.one_of(
    ints,
    st.text(max_size=10),
    st.binary(max_size=10),
    st.none(),
    st.booleans(),
    st.lists(ints, max_size=3),
    st.floats(allow_nan=False),
)
body_maps = st.dictionaries(
    st.sampled_from(
        [
            "slot",
            "gen",
            "checksum",
            "volume",
            "server",
            "count",
            "block_size",
            "start",
            "limit",
            "states",
            "force",
            "offset",
            "length",
            "chunk",
            "x",
        ]
    ),
    fields,
    max_size=6,
)
well_framed = st.builds(
    lambda t, f, body, payload: b"".join(encode(t, 9, body, payload, f)),
    st.integers(0, 255),
    st.sampled_from([0, int(Flag.COPY), int(Flag.REPAIR), int(Flag.REPLY)]),
    body_maps,
    st.binary(max_size=70000),
)
bad_headers = st.builds(
    lambda magic, ver, t, blen, plen, tail: HEADER.pack(magic, ver, t, 1, 0, blen, plen) + tail,
    st.sampled_from([MAGIC, b"XX"]),
    st.sampled_from([VERSION, 0, VERSION - 1, VERSION + 1]),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
)
bad_bodies = st.builds(
    lambda t, raw: HEADER.pack(MAGIC, VERSION, t, 3, 0, len(raw), 0) + raw,
    st.integers(0, 255),
    st.one_of(st.binary(max_size=40), st.just(msgpack.packb([1, 2]))),
)
garbage = st.one_of(st.binary(max_size=300), well_framed, bad_headers, bad_bodies)


def exchange(port: int, blob: bytes, key: bytes | None = None) -> list:
    """Send ``blob`` (after proving ``key``), read until the server goes quiet or hangs up;
    return decoded replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if key is not None:
            prove(s, key)
        with contextlib.suppress(OSError):  # it may have hung up already
            s.sendall(blob)
            s.shutdown(socket.SHUT_WR)
        s.settimeout(0.3)
        dec = FrameDecoder()
        try:
            while chunk := s.recv(65536):
                dec.feed(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return dec.frames()


def body(frame) -> dict:
    return msgpack.unpackb(frame.body)


def test_live_server_survives_garbage_and_keeps_serving(cluster4):
    port = cluster4.base
    key = cluster4.key()
    with BlockingVolume(cluster4.spec, writer="test") as vol:
        csum = vol.write(0, b"precious")
        before = [r["blocks"] for r in cluster4.status()["rows"]]

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(garbage, st.booleans())
        def throw(blob: bytes, with_key: bool) -> None:
            replies = exchange(port, blob, key if with_key else None)
            if not with_key:  # one refusal at most, and never anything done
                assert len(replies) <= 1
                assert all(f.is_error and f.req_id == 0 for f in replies)
                assert all(body(f)["code"] in ("AUTH", "PROTOCOL") for f in replies)
            for frame in replies:
                assert frame.is_reply
                # only requests that are well-formed and allowed may succeed
                if not frame.is_error:
                    assert frame.type in {m.value for m in Msg}
            assert cluster4.servers[0].running

        throw()
        # the persistent client connection was never disturbed
        assert vol.read(0, csum) == b"precious"
        assert cluster4.servers[0].running
    rows = cluster4.status()["rows"]
    assert rows[0]["state"] == "alive"
    assert rows[0]["blocks"] >= before[0]


def test_without_the_key_a_request_gets_one_refusal_then_hangup(cluster4):
    for blob in (
        b"".join(encode(Msg.STAT, 4)),
        b"".join(encode(Msg.FORMAT, 1, {"volume": "x", "server": 0, "count": 4})),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40),
    ):
        replies = exchange(cluster4.base, blob)
        assert len(replies) == 1 and replies[0].is_error and replies[0].req_id == 0
        assert body(replies[0])["code"] == "AUTH"
        assert "no key handshake" in body(replies[0])["msg"]
    with socket.create_connection(("127.0.0.1", cluster4.base), timeout=5) as s:
        s.sendall(ClientHandshake(lambda _v: None).hello())
        s.recv(REPLY_SIZE, socket.MSG_WAITALL)
        s.sendall(new_key() + b"".join(encode(Msg.STAT, 4)))  # a guess as the proof
        s.settimeout(2)
        dec = FrameDecoder()
        while chunk := s.recv(65536):
            dec.feed(chunk)
    wrong = dec.frames()
    assert [body(f)["code"] for f in wrong] == ["AUTH"]
    assert "did not prove the volume key" in body(wrong[0])["msg"]


def test_malformed_frame_gets_an_error_then_hangup(cluster4):
    replies = exchange(cluster4.base, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", cluster4.key())
    assert len(replies) == 1 and replies[0].is_error
    assert body(replies[0])["code"] == "PROTOCOL"
    assert "bad magic" in body(replies[0])["msg"]


def test_a_client_of_another_protocol_version_is_told_so_then_hung_up_on(cluster4):
    old = HEADER.pack(MAGIC, VERSION - 1, Msg.STAT, 1, 0, 1, 0) + b"\x80"
    replies = exchange(cluster4.base, old, cluster4.key())
    assert len(replies) == 1 and replies[0].is_error
    assert body(replies[0])["code"] == "PROTOCOL"
    assert f"protocol version {VERSION - 1} is not supported" in body(replies[0])["msg"]


def test_unknown_type_and_bad_fields_get_error_replies_on_a_live_connection(cluster4):
    blob = b"".join(
        encode(200, 1)
        + encode(Msg.READ, 2, {"slot": "zero"})
        + encode(Msg.WRITE, 3, {"slot": 1})
        + encode(Msg.STAT, 4)
    )
    replies = {f.req_id: f for f in exchange(cluster4.base, blob, cluster4.key())}
    assert body(replies[1])["code"] == "UNKNOWN_TYPE"
    assert body(replies[2])["code"] == "BAD_REQUEST" and "slot" in body(replies[2])["msg"]
    assert body(replies[3])["code"] == "BAD_REQUEST"
    assert not replies[4].is_error and body(replies[4])["server"] == 0


def test_a_write_whose_data_does_not_match_its_checksum_is_refused(cluster4):
    with BlockingVolume(cluster4.spec, writer="test") as vol:
        gen, epoch = vol.volume.gen, vol.volume.table.epoch
    blob = b"".join(
        encode(Msg.WRITE, 5, {"slot": 0, "checksum": 1, "gen": gen, "epoch": epoch}, b"data")
    )
    (reply,) = exchange(cluster4.base, blob, cluster4.key())
    assert body(reply)["code"] == "CHECKSUM"


def test_changes_without_the_current_epoch_are_fenced(cluster4):
    with BlockingVolume(cluster4.spec, writer="test") as vol:
        gen, epoch = vol.volume.gen, vol.volume.table.epoch
        csum = vol.write(0, b"kept")
    data = b"overwritten"
    check = xxhash.xxh3_64_intdigest(data)
    for fields in ({}, {"epoch": epoch - 1}):
        blob = b"".join(
            encode(Msg.WRITE, 1, {"slot": 0, "checksum": check, "gen": gen, **fields}, data)
            + encode(Msg.TRIM, 2, {"slot": 0, "gen": gen, **fields})
            + encode(Msg.SET_TABLE, 3, {"table": {"gen": 99, "states": ["failed"] * 4}, **fields})
        )
        replies = exchange(cluster4.base, blob, cluster4.key())
        assert [body(f)["code"] for f in replies] == ["FENCED"] * 3
    with BlockingVolume(cluster4.spec) as vol:
        assert vol.read(0, csum) == b"kept"
        assert list(vol.volume.states) == ["alive"] * 4


def test_text_that_is_not_utf8_is_a_bad_request_and_the_connection_goes_on(cluster4):
    bad_text = b"\x81\xa6volume\xa1\xff"  # {"volume": <one byte that is not UTF-8>}
    blob = HEADER.pack(MAGIC, VERSION, Msg.HELLO, 1, 0, len(bad_text), 0) + bad_text
    blob += b"".join(encode(Msg.STAT, 2))
    replies = {f.req_id: f for f in exchange(cluster4.base, blob, cluster4.key())}
    assert body(replies[1])["code"] == "BAD_REQUEST"
    assert not replies[2].is_error and body(replies[2])["server"] == 0
