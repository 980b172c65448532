"""The frame decoder as a pure state machine, and typed bodies at the edge: no sockets."""

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
    Flag,
    FrameDecoder,
    Msg,
    ProtocolError,
    encode,
)
from mirrorfuse.wire.messages import (
    REQUESTS,
    BadMessage,
    Read,
    Write,
    decode,
    decode_request,
    encode_request,
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
    assert [(f.type, f.req_id, f.flags, msgpack.unpackb(f.body), f.payload) for f in got] == [
        (t, r, f, b, p) for t, r, f, b, p in items
    ]
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


def header(body_len=0, payload_len=0, magic=MAGIC, version=VERSION, kind=Msg.STAT):
    return HEADER.pack(magic, version, kind, 7, 0, body_len, payload_len)


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


@pytest.mark.parametrize(
    "body, why",
    [
        (b"\xc1", "invalid"),
        (msgpack.packb([1, 2]), "Expected `object`, got `array`"),
        (msgpack.packb({"slot": "3"}), "Expected `int`, got `str` - at `$.slot`"),
        (msgpack.packb({"slot": -1}), "Expected `int` >= 0 - at `$.slot`"),
        (msgpack.packb({"slot": True}), "Expected `int`, got `bool`"),
        (msgpack.packb({}), "missing required field `slot`"),
    ],
)
def test_a_bad_body_is_refused_naming_the_field_and_the_next_frame_is_fine(body, why):
    dec = FrameDecoder()
    dec.feed(header(len(body), kind=Msg.READ) + body + b"".join(encode_request(8, Read(slot=3))))
    bad, good = dec.frames()
    with pytest.raises(BadMessage, match="bad READ request") as err:
        decode_request(bad)
    assert why in str(err.value)
    assert decode_request(good) == Read(slot=3) and good.req_id == 8


def test_every_request_round_trips_and_an_unknown_type_is_refused():
    dec = FrameDecoder()
    dec.feed(b"".join(encode_request(1, Write(slot=4, checksum=2**64 - 1, gen=3), b"data")))
    frame = dec.next_frame()
    assert decode_request(frame) == Write(slot=4, checksum=2**64 - 1, gen=3)
    assert frame.payload == b"data"
    with pytest.raises(BadMessage, match="unknown message type 200"):
        decode_request(type(frame)(200, 1))
    assert all(t == kind.TYPE for t, kind in REQUESTS.items())
    assert all(kind.REPLY is not None for kind in REQUESTS.values())


def test_unknown_fields_are_ignored_so_a_newer_peer_may_add_optional_ones():
    raw = msgpack.packb({"slot": 5, "colour": "blue"})
    assert decode(Read, raw) == Read(slot=5)


def test_partial_header_waits_for_more():
    dec = FrameDecoder()
    raw = b"".join(encode(Msg.READ, 1, Read(slot=3), b"x" * 10, Flag.REPLY))
    dec.feed(raw[:5])
    assert dec.next_frame() is None
    dec.feed(raw[5:-1])
    assert dec.next_frame() is None
    dec.feed(raw[-1:])
    frame = dec.next_frame()
    assert frame.is_reply and frame.payload == b"x" * 10 and decode(Read, frame.body).slot == 3


def test_encode_refuses_oversized_parts():
    with pytest.raises(ValueError):
        encode(Msg.WRITE, 1, {}, b"x" * (MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        encode(Msg.WRITE, 1, {"k": "x" * (MAX_BODY + 1)})


def test_header_layout_is_fixed():
    assert HEADER.size == 22
    assert struct.unpack(">2s", b"".join(encode(1, 1))[:2])[0] == b"MF"
