"""Block checksums in both schemes, and what a READ reply must hold to be believed."""

from __future__ import annotations

import random
import struct

import msgspec
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from mirrorfuse.wire.checksums import (
    CHUNK,
    MAX_SUMS,
    WHOLE,
    block_checksum,
    check_read,
    chunk_sums,
    covering,
    default_chunk,
    valid_chunk,
)
from mirrorfuse.wire.messages import BadMessage, Read, ReadReply, decode

K = 4096  # a small chunk keeps the examples small


def data_of(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def honest(data: bytes, chunk: int, offset: int, length: int) -> tuple[ReadReply, bytes]:
    """What a server holding ``data`` answers to a range read."""
    start, end = covering(offset, length, len(data), chunk)
    sums = chunk_sums(data, chunk)
    reply = ReadReply(
        gen=1, checksum=xxhash.xxh3_64_intdigest(sums), size=len(data), start=start, sums=sums
    )
    return reply, data[start:end]


def test_chunk_sums_are_each_chunk_s_xxh3_little_endian_and_the_block_sum_hashes_them():
    data = data_of(3 * K + 100)
    sums = chunk_sums(data, K)
    assert len(sums) == 4 * 8
    pieces = [data[0:K], data[K : 2 * K], data[2 * K : 3 * K], data[3 * K :]]
    assert [struct.unpack_from("<Q", sums, 8 * i)[0] for i in range(4)] == [
        xxhash.xxh3_64_intdigest(p) for p in pieces
    ]
    assert block_checksum(data, K) == xxhash.xxh3_64_intdigest(sums)
    # the old scheme: the whole block's xxh3, as every volume formatted before had it
    assert block_checksum(data, WHOLE) == xxhash.xxh3_64_intdigest(data)
    assert block_checksum(data, K) != block_checksum(data, WHOLE)
    # nothing hashes alike in both: an absent block is the same to both schemes
    assert block_checksum(b"", K) == block_checksum(b"", WHOLE) == xxhash.xxh3_64_intdigest(b"")


def test_the_scheme_of_a_new_volume_and_which_ones_are_valid():
    assert default_chunk(1 << 20) == CHUNK == 65536
    assert default_chunk(4096) == 4096  # a block smaller than a chunk: one chunk a block
    assert valid_chunk(0, 4096) and valid_chunk(4096, 4096) and valid_chunk(65536, 1 << 20)
    assert not valid_chunk(2048, 4096)  # too small
    assert not valid_chunk(8192, 4096)  # beyond the block
    assert not valid_chunk(3 * 4096, 1 << 20)  # not a power of two
    assert MAX_SUMS == 8192  # the sums of a 4 MiB block of 4 KiB chunks


@pytest.mark.parametrize(
    ("offset", "length", "size", "want"),
    [
        (0, 4096, 1 << 20, (0, 4096)),
        (4095, 2, 1 << 20, (0, 8192)),  # straddles a boundary: two chunks
        (5000, 100, 6000, (4096, 6000)),  # the last, short chunk
        (6000, 100, 6000, (4096, 4096)),  # at the end: nothing
        (9000, 100, 6000, (4096, 4096)),  # past the end: nothing
        (0, 0, 6000, (0, 0)),  # no length: nothing
        (0, 1 << 22, 6000, (0, 6000)),  # the whole block
    ],
)
def test_covering_gives_the_whole_chunks_a_range_touches(offset, length, size, want):
    assert covering(offset, length, size, K) == want


@given(
    st.integers(0, 5 * K),
    st.integers(0, 6 * K),
    st.integers(0, 6 * K),
    st.sampled_from([K, 2 * K]),
)
def test_an_honest_range_reply_gives_exactly_the_bytes_asked_for(size, offset, length, chunk):
    data = data_of(size, size)
    reply, payload = honest(data, chunk, offset, length)
    good = check_read(reply, payload, block_checksum(data, chunk), chunk, (offset, length))
    assert good is not None and good.data == data[offset : offset + length]
    assert good.block is None  # only chunks came: a repair fetches the whole block
    assert len(payload) <= max(length, 0) + 2 * chunk  # at most a chunk more on each side


@given(st.data())
def test_any_flipped_byte_of_chunks_or_sums_is_caught(draw):
    data = data_of(5 * K + 7, 3)
    offset = draw.draw(st.integers(0, len(data) - 1))
    length = draw.draw(st.integers(1, 2 * K))
    reply, payload = honest(data, K, offset, length)
    expected = block_checksum(data, K)
    where = draw.draw(st.sampled_from(["payload", "sums"]))
    if where == "payload":
        bad = bytearray(payload)
        bad[draw.draw(st.integers(0, len(bad) - 1))] ^= 0x01
        assert check_read(reply, bytes(bad), expected, K, (offset, length)) is None
    else:
        assert reply.sums is not None
        sums = bytearray(reply.sums)
        sums[draw.draw(st.integers(0, len(sums) - 1))] ^= 0x01
        forged = msgspec.structs.replace(reply, sums=bytes(sums))
        assert check_read(forged, payload, expected, K, (offset, length)) is None
        # even when the server's stored checksum was made to agree with the bad sums
        agreed = msgspec.structs.replace(forged, checksum=xxhash.xxh3_64_intdigest(sums))
        assert check_read(agreed, payload, expected, K, (offset, length)) is None


def test_a_reply_that_does_not_hold_together_is_a_bad_copy():
    data = data_of(3 * K)
    expected = block_checksum(data, K)
    reply, payload = honest(data, K, K + 10, 20)
    want = (K + 10, 20)
    assert check_read(reply, payload, expected, K, want) is not None
    r = msgspec.structs.replace
    for forged, body in [
        (r(reply, start=0), payload),  # the chunks of another place
        (reply, payload + data[2 * K : 2 * K + 1]),  # one byte too many
        (reply, payload[:-1]),  # one too few
        (r(reply, size=5 * K), payload),  # more chunks than sums
        (r(reply, checksum=1), payload),  # its stored checksum disagrees with its sums
        (r(reply, sums=None, size=None, start=None), payload),  # the chunks, as a whole block
        (r(reply, absent=True), payload),
    ]:
        assert check_read(forged, body, expected, K, want) is None, forged
    # the right chunks of another block: the sums do not hash to the block map's checksum
    other = data_of(3 * K, 2)
    reply2, payload2 = honest(other, K, K + 10, 20)
    assert check_read(reply2, payload2, expected, K, want) is None
    # without the block map's checksum, the one the server stored is the reference
    assert check_read(reply2, payload2, None, K, want) is not None


def test_a_whole_block_reply_is_checked_in_the_volume_s_scheme_and_sliced():
    data = data_of(3 * K)
    whole = ReadReply(gen=1, checksum=block_checksum(data, K))
    good = check_read(whole, data, block_checksum(data, K), K, (100, 50))
    assert good is not None and good.data == data[100:150] and good.block == data
    assert check_read(whole, data, xxhash.xxh3_64_intdigest(data), K, None) is None
    old = ReadReply(gen=1, checksum=xxhash.xxh3_64_intdigest(data))
    good = check_read(old, data, xxhash.xxh3_64_intdigest(data), WHOLE, (100, 50))
    assert good is not None and good.data == data[100:150]
    absent = ReadReply(gen=1, absent=True)
    good = check_read(absent, b"", xxhash.xxh3_64_intdigest(b""), K, (0, 10))
    assert good is not None and good.data == b""
    assert check_read(absent, b"", block_checksum(data, K), K, (0, 10)) is None


def test_range_fields_out_of_bounds_are_bad_messages():
    def raw(**fields: object) -> bytes:
        return msgspec.msgpack.encode({"slot": 1, **fields})

    assert decode(Read, raw(offset=4096, length=4096)) == Read(slot=1, offset=4096, length=4096)
    for fields in (
        {"offset": -1},
        {"length": -1},
        {"offset": (4 << 20) + 1},
        {"length": 1 << 40},
        {"offset": "0"},
    ):
        with pytest.raises(BadMessage):
            decode(Read, raw(**fields))
    too_many = msgspec.msgpack.encode({"gen": 1, "sums": bytes(MAX_SUMS + 8)})
    with pytest.raises(BadMessage):
        decode(ReadReply, too_many)
