"""The frame decoder as a pure state machine: no sockets."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfuse.wire.frames import (
    HEADER,
    MAGIC,
    MAX_BODY,
    MAX_PAYLOAD,
    VERSION,
    BadRequest,
    Flag,
    FrameDecoder,
    Msg,
    ProtocolError,
    encode,
    need,
)

bodies = st.dictionaries(
    st.text(max_size=8),
    st.one_of(
        st.integers(-(2**63), 2**64 - 1),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.booleans(),
        st.none(),
    ),
    max_size=5,
)
frames = st.tuples(
    st.integers(0, 255),
    st.integers(0, 2**64 - 1),
    st.integers(0, 0xFFFF),
    bodies,
    st.binary(max_size=3000),
)


@given(st.lists(frames, max_size=8), st.data())
def test_frames_round_trip_however_the_stream_is_cut(items, data):
    stream = b"".join(b"".join(encode(t, r, b, p, f)) for t, r, f, b, p in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder()
    got = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        dec.feed(stream[prev:cut])
        prev = cut
        got += dec.frames()
    assert [(f.type, f.req_id, f.flags, f.body, f.payload) for f in got] == [
        (t, r, f, b, p) for t, r, f, b, p in items
    ]
    assert all(f.defect is None for f in got)
    assert dec.buffered == 0


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_gives_frames_none_or_protocol_error_only(blob):
    dec = FrameDecoder()
    dec.feed(blob)
    try:
        dec.frames()
    except ProtocolError:
        with pytest.raises(ProtocolError):  # and it stays broken
            dec.next_frame()


def header(body_len=0, payload_len=0, magic=MAGIC, version=VERSION):
    return HEADER.pack(magic, version, Msg.STAT, 7, 0, body_len, payload_len)


@pytest.mark.parametrize(
    "head, reason",
    [
        (header(magic=b"XX"), "bad magic"),
        (header(version=9), "version 9"),
        (header(body_len=MAX_BODY + 1), "body length"),
        (header(payload_len=MAX_PAYLOAD + 1), "payload length"),
    ],
)
def test_untrustworthy_headers_break_the_stream(head, reason):
    dec = FrameDecoder()
    dec.feed(head)
    with pytest.raises(ProtocolError, match=reason):
        dec.next_frame()


@pytest.mark.parametrize("body", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2}), b"\x92"])
def test_a_bad_body_is_a_defect_of_that_frame_only(body):
    dec = FrameDecoder()
    dec.feed(header(len(body)) + body + b"".join(encode(Msg.HELLO, 8, {"a": 1})))
    bad, good = dec.frames()
    assert bad.req_id == 7 and bad.defect and bad.body == {}
    assert good.req_id == 8 and good.body == {"a": 1} and good.defect is None


def test_partial_header_waits_for_more():
    dec = FrameDecoder()
    raw = b"".join(encode(Msg.READ, 1, {"slot": 3}, b"x" * 10, Flag.REPLY))
    dec.feed(raw[:5])
    assert dec.next_frame() is None
    dec.feed(raw[5:-1])
    assert dec.next_frame() is None
    dec.feed(raw[-1:])
    frame = dec.next_frame()
    assert frame.is_reply and frame.payload == b"x" * 10 and frame.body == {"slot": 3}


def test_encode_refuses_oversized_parts():
    with pytest.raises(ValueError):
        encode(Msg.WRITE, 1, {}, b"x" * (MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        encode(Msg.WRITE, 1, {"k": "x" * (MAX_BODY + 1)})


def test_need_checks_presence_and_type():
    assert need({"slot": 3}, "slot", int) == 3
    with pytest.raises(BadRequest, match="missing"):
        need({}, "slot", int)
    with pytest.raises(BadRequest, match="must be int"):
        need({"slot": "3"}, "slot", int)
    with pytest.raises(BadRequest, match="must be int"):
        need({"slot": True}, "slot", int)


def test_header_layout_is_fixed():
    assert HEADER.size == 22
    assert struct.unpack(">2s", b"".join(encode(1, 1))[:2])[0] == b"MF"
