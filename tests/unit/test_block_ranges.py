"""A block server's side of chunk sums, its handlers called in this process: the scheme
fixed at format, writes verified in it, range reads that read only the chunks asked for
and the sums kept beside the slot."""

from __future__ import annotations

import json
import random

import msgspec
import pytest
import xxhash

from mirrorfuse.wire.auth import new_key
from mirrorfuse.wire.checksums import CHUNK, WHOLE, block_checksum, check_read, chunk_sums
from mirrorfuse.wire.frames import Flag, Frame, FrameDecoder, Msg, encode
from mirrorfuse.wire.messages import BadMessage, Format, Read, ReadReply, Write
from servers.block.server import BlockServer
from servers.block.store import Store, StoreError
from servers.net import Refused

KEY = new_key()
MiB = 1 << 20


def server_at(tmp_path, chunk: int | None = None, block_size: int = MiB) -> BlockServer:
    server = BlockServer(Store(tmp_path / "d", 0))
    req = Format(volume="v", server=0, count=4, block_size=block_size, key=KEY, chunk=chunk)
    server.format(req, b"", 0)
    return server


def write(server: BlockServer, slot: int, data: bytes, flags: int = 0) -> None:
    csum = block_checksum(data, server.store.chunk)
    req = Write(slot=slot, checksum=csum, gen=server.store.table.gen, epoch=0)
    server.write(req, data, flags)


def read(server: BlockServer, req: Read) -> tuple[ReadReply, bytes]:
    body, payload = server.read(req, b"", 0)
    assert isinstance(body, ReadReply)
    return body, bytes(payload)


def decoded(raw: bytes) -> list[Frame]:
    dec = FrameDecoder()
    dec.feed(raw)
    return dec.frames()


def superblock(tmp_path) -> dict:
    return json.loads((tmp_path / "d" / "superblock.json").read_text())


def test_a_new_volume_gets_64k_chunk_sums_and_says_so(tmp_path):
    server = server_at(tmp_path)
    assert server.identity().chunk == CHUNK
    assert superblock(tmp_path)["format"] == "mirrorfs-3"  # older servers refuse it
    assert superblock(tmp_path)["chunk"] == CHUNK
    server.store.close()
    assert Store(tmp_path / "d", 0).chunk == CHUNK  # fixed: kept across a restart


def test_a_volume_formatted_with_whole_block_checksums_stays_as_it_was(tmp_path):
    server = server_at(tmp_path, chunk=WHOLE)
    assert server.identity().chunk == WHOLE
    assert superblock(tmp_path)["format"] == "mirrorfs-2"  # what earlier versions read
    assert not (tmp_path / "d" / "slots.sum").exists()
    server.store.close()
    # a superblock written by an earlier version has no chunk at all
    sb = superblock(tmp_path)
    del sb["chunk"]
    (tmp_path / "d" / "superblock.json").write_text(json.dumps(sb))
    again = Store(tmp_path / "d", 0)
    assert again.chunk == WHOLE and superblock(tmp_path)["format"] == "mirrorfs-2"
    again.close()


def test_a_superblock_whose_scheme_contradicts_its_format_is_damaged(tmp_path):
    server_at(tmp_path, chunk=WHOLE).store.close()
    sb = superblock(tmp_path)
    (tmp_path / "d" / "superblock.json").write_text(json.dumps({**sb, "chunk": 3000}))
    with pytest.raises(StoreError, match="damaged"):
        Store(tmp_path / "d", 0)
    (tmp_path / "d" / "superblock.json").write_text(json.dumps({**sb, "format": "mirrorfs-3"}))
    with pytest.raises(StoreError, match="damaged"):
        Store(tmp_path / "d", 0)


@pytest.mark.parametrize(("chunk", "block_size"), [(3000, MiB), (2 * MiB, MiB), (2048, 4096)])
def test_a_format_with_a_chunk_that_does_not_fit_is_a_bad_request(tmp_path, chunk, block_size):
    server = BlockServer(Store(tmp_path / "d", 0))
    req = Format(volume="v", server=0, count=4, block_size=block_size, key=KEY, chunk=chunk)
    with pytest.raises(BadMessage, match="chunk"):
        server.format(req, b"", 0)
    assert not server.store.formatted


def test_small_blocks_get_one_chunk_a_block(tmp_path):
    assert server_at(tmp_path, block_size=4096).identity().chunk == 4096


def test_a_write_is_checked_in_the_volume_s_scheme(tmp_path):
    server = server_at(tmp_path)
    data = random.Random(1).randbytes(200_000)
    gen = server.store.table.gen
    whole = Write(slot=0, checksum=xxhash.xxh3_64_intdigest(data), gen=gen, epoch=0)
    with pytest.raises(Refused) as refused:
        server.write(whole, data, 0)
    assert refused.value.code == "CHECKSUM"
    write(server, 0, data)
    body, payload = read(server, Read(slot=0))
    assert payload == data and body.checksum == block_checksum(data, CHUNK)


def test_a_4k_range_read_reads_one_chunk_and_the_sums(tmp_path):
    server = server_at(tmp_path)
    data = random.Random(2).randbytes(MiB)
    write(server, 3, data)
    before = server.store.counters.bytes_read
    body, payload = read(server, Read(slot=3, offset=300_000, length=4096))
    assert len(payload) == CHUNK and body.start == 4 * CHUNK and body.size == MiB
    assert body.sums == chunk_sums(data, CHUNK) and len(body.sums) == 16 * 8
    assert server.store.counters.bytes_read - before == CHUNK
    good = check_read(body, payload, block_checksum(data, CHUNK), CHUNK, (300_000, 4096))
    assert good is not None and good.data == data[300_000:304_096]
    # a range over a boundary: two chunks; past the end: the sums only
    body, payload = read(server, Read(slot=3, offset=CHUNK - 1, length=2))
    assert (body.start, len(payload)) == (0, 2 * CHUNK)
    write(server, 4, data[:1000])
    body, payload = read(server, Read(slot=4, offset=2000, length=4096))
    assert payload == b"" and body.sums == chunk_sums(data[:1000], CHUNK)
    # either field alone is a range too; nothing written there is absent
    body, payload = read(server, Read(slot=3, length=10))
    assert len(payload) == CHUNK and body.sums is not None
    body, payload = read(server, Read(slot=9, offset=0))
    assert body.absent and payload == b"" and body.sums is None


def test_sums_follow_every_kind_of_write_and_a_restart(tmp_path):
    server = server_at(tmp_path)
    rng = random.Random(3)
    first, second = rng.randbytes(MiB), rng.randbytes(MiB // 2 + 5)
    write(server, 1, first)
    write(server, 1, second, Flag.REPAIR)  # a read repair rewrites the sums too
    server.store.begin_heal("h", 1)
    write(server, 2, first, Flag.COPY)  # and so does a heal's copy
    server.store.close()
    again = BlockServer(Store(tmp_path / "d", 0))
    for slot, data in ((1, second), (2, first)):
        body, payload = read(again, Read(slot=slot, offset=len(data) - 10, length=10))
        good = check_read(body, payload, block_checksum(data, CHUNK), CHUNK, (len(data) - 10, 10))
        assert good is not None and good.data == data[-10:]
    again.store.close()


def test_a_volume_of_whole_block_checksums_ignores_a_range(tmp_path):
    server = server_at(tmp_path, chunk=WHOLE)
    data = random.Random(4).randbytes(MiB)
    write(server, 0, data)
    body, payload = read(server, Read(slot=0, offset=300_000, length=4096))
    assert payload == data and body.sums is None
    assert body.checksum == xxhash.xxh3_64_intdigest(data)


def test_range_fields_out_of_bounds_get_bad_request_and_the_connection_goes_on(tmp_path):
    server = server_at(tmp_path)
    write(server, 0, b"kept")
    frames = [
        encode(Msg.READ, 1, {"slot": 0, "offset": -1}),
        encode(Msg.READ, 2, {"slot": 0, "length": 1 << 40}),
        encode(Msg.READ, 3, {"slot": 0, "offset": "x"}),
        encode(Msg.FORMAT, 4, {"volume": "v", "server": 0, "count": 4, "chunk": -5}),
        encode(Msg.READ, 5, {"slot": 0, "offset": 4 << 20, "length": 4 << 20}),
    ]
    codes = {}
    for parts in frames:
        (request,) = decoded(b"".join(parts))
        (reply,) = decoded(b"".join(server.handle(request)))
        codes[reply.req_id] = msgspec.msgpack.decode(reply.body).get("code", "OK")
        if reply.req_id == 5:
            assert reply.payload == b""  # far past the end: nothing, and the sums
    assert codes == {
        1: "BAD_REQUEST",
        2: "BAD_REQUEST",
        3: "BAD_REQUEST",
        4: "BAD_REQUEST",
        5: "OK",
    }


def test_a_directory_that_fails_to_open_is_not_left_locked(tmp_path):
    server_at(tmp_path).store.close()
    with pytest.raises(StoreError, match="belongs to server 0"):
        Store(tmp_path / "d", 1)
    Store(tmp_path / "d", 0).close()  # not "in use by another mirrorfs-server"
