"""Range reads against real servers: a 4 KiB read moves one 64 KiB chunk, not the 1 MiB
block; a damaged chunk or sum on one replica is read from the mirror and rewritten; heals
and repairs keep the sums right; a volume of whole-block checksums reads as before."""

from __future__ import annotations

import functools
import json
import random
import tarfile
from pathlib import Path

import xxhash
from helpers import Cluster

from mirrorfuse.client.blocking import BlockingVolume
from mirrorfuse.client.heal import heal
from mirrorfuse.client.keys import Keyring
from mirrorfuse.client.metastore import read_namespace
from mirrorfuse.tools import admin
from mirrorfuse.wire.auth import new_key
from mirrorfuse.wire.checksums import CHUNK, WHOLE, chunk_sums
from mirrorfuse.wire.messages import Format, Stat
from servers.files import write_key

MiB = 1 << 20
FIXTURE = Path(__file__).with_name("data") / "mirrorfs-1-volume.tar.gz"


def block_data(seed: int, size: int = MiB) -> bytes:
    return random.Random(seed).randbytes(size)


def flip(path: Path, offset: int, n: int = 16) -> None:
    """The disk returns other bytes here (bit rot)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def sums_on(c: Cluster, server: int, slot: int, n: int) -> bytes:
    """The sums a server keeps for a slot (1 MiB blocks of 64 KiB chunks: 128 bytes each)."""
    raw = (c.data_dir(server) / "slots.sum").read_bytes()
    return raw[slot * 128 : slot * 128 + 8 * n]


def served_bytes(vol: BlockingVolume) -> int:
    """Block bytes every server has read from its disk for reads."""
    v = vol.volume
    return sum(vol.run(v.call(s, Stat())).body.bytes_read for s in range(v.spec.count))


def test_a_4k_range_read_moves_one_chunk_and_gives_exactly_its_bytes(make_cluster):
    c = make_cluster(4)  # a new volume: 1 MiB blocks, 64 KiB chunks
    with BlockingVolume(c.spec, writer="test") as vol:
        v = vol.volume
        assert v.chunk == CHUNK
        data = {b: block_data(b) for b in range(3)}
        data[3] = block_data(3, 300_001)  # a short last block
        sums = dict(zip(data, vol.write_many(data.items()), strict=True))
        assert sums[0] == v.checksum(data[0]) != xxhash.xxh3_64_intdigest(data[0])
        for block, offset, length, moved in [
            (0, 0, 4096, CHUNK),
            (1, 500_000, 4096, CHUNK),
            (2, CHUNK - 100, 4096, 2 * CHUNK),  # across a chunk boundary: two chunks
            (3, 299_000, 4096, 300_001 - 4 * CHUNK),  # the last, short chunk
            (0, 0, MiB, MiB),  # the whole block, as a range
        ]:
            before, disk = sum(v.stats.received), served_bytes(vol)
            got = vol.run(v.read_range(block, sums[block], offset, length))
            assert got == data[block][offset : offset + length]
            assert sum(v.stats.received) - before == moved
            assert served_bytes(vol) - disk == moved  # and no more was read from disk
        assert vol.run(v.read_range(3, sums[3], 400_000, 10)) == b""  # past its end
        assert vol.run(v.read_range(0, sums[0], MiB - 10, 4096)) == data[0][-10:]
        assert vol.run(v.read_range(9, xxhash.xxh3_64_intdigest(b""), 0, 4096)) == b""
        assert sum(v.stats.bad) == 0


def test_a_corrupted_chunk_is_read_from_the_mirror_and_rewritten(make_cluster):
    c = make_cluster(4)
    with BlockingVolume(c.spec, writer="test") as vol:
        v = vol.volume
        data = block_data(7)
        csum = vol.write(6, data)
        _, slot, (a, b) = v.layout.place(6)
        flip(c.data_dir(a) / "slots.dat", slot * MiB + 5 * CHUNK + 10)
        # a range elsewhere in the block does not read the damaged chunk: it passes
        for _ in range(2):
            assert vol.run(v.read_range(6, csum, 0, 4096)) == data[:4096]
        assert v.stats.bad[a] == 0
        for _ in range(4):
            got = vol.run(v.read_range(6, csum, 5 * CHUNK, 4096))
            assert got == data[5 * CHUNK : 5 * CHUNK + 4096]
        assert (v.stats.bad[a], v.stats.repaired[a]) == (1, 1)
        assert (v.stats.bad[b], v.stats.repaired[b]) == (0, 0)
        assert vol.read(6, csum) == data
    raw = (c.data_dir(a) / "slots.dat").read_bytes()[slot * MiB : (slot + 1) * MiB]
    assert raw == data  # rewritten whole from the mirror
    assert sums_on(c, a, slot, 16) == chunk_sums(data, CHUNK)


def test_a_damaged_sum_is_found_and_rewritten(make_cluster):
    c = make_cluster(4)
    with BlockingVolume(c.spec, writer="test") as vol:
        v = vol.volume
        data = block_data(8)
        csum = vol.write(2, data)
        _, slot, (a, _b) = v.layout.place(2)
        flip(c.data_dir(a) / "slots.sum", slot * 128 + 8 * 3, 4)  # chunk 3's sum
        for _ in range(4):  # a chunk that is fine, but its sums no longer add up
            assert vol.run(v.read_range(2, csum, 0, 100)) == data[:100]
        assert (v.stats.bad[a], v.stats.repaired[a]) == (1, 1)
    assert sums_on(c, a, slot, 16) == chunk_sums(data, CHUNK)


def test_a_heal_gives_the_healed_server_the_right_sums(make_cluster):
    c = make_cluster(4)
    with BlockingVolume(c.spec, timeout=2.0, writer="test") as vol:
        v = vol.volume
        want = {b: block_data(100 + b, MiB - 1000 * b) for b in range(8)}
        vol.write_many(want.items())
        c.kill(1)
        again = {b: block_data(200 + b, 5000 + b) for b in range(0, 8, 2)}  # pair 0: 0,2,4,6
        vol.write_many(again.items())
        want.update(again)
        c.start(1)
        assert vol.run(heal(v, 1)) == 4  # what changed while it was out
        c.kill(3)
        c.start(3, c.root / "empty3")
        assert vol.run(heal(v, 3)) == 4  # everything, to an empty directory
        for server, blocks in ((1, range(0, 8, 2)), (3, range(1, 8, 2))):
            for block in blocks:
                slot, n = v.layout.slot_of(block), -(-len(want[block]) // CHUNK)
                got = (c.root / ("empty3" if server == 3 else "d1") / "slots.sum").read_bytes()
                assert got[slot * 128 : slot * 128 + 8 * n] == chunk_sums(want[block], CHUNK)
        c.kill(0)  # pair 0 from the healed server alone
        c.kill(2)
        for block, d in want.items():
            sums = v.checksum(d)
            assert vol.run(v.read_range(block, sums, len(d) - 50, 4096)) == d[-50:]


def test_a_volume_of_whole_block_checksums_still_reads_and_repairs(make_cluster, monkeypatch):
    c = make_cluster(4, format_args=None)
    monkeypatch.setattr(admin, "Format", functools.partial(Format, chunk=WHOLE))
    c.format()  # as an earlier version formatted it
    assert json.loads((c.data_dir(0) / "superblock.json").read_text())["format"] == "mirrorfs-2"
    with BlockingVolume(c.spec, writer="test") as vol:
        v = vol.volume
        assert v.chunk == WHOLE
        data = block_data(9)
        csum = vol.write(4, data)
        assert csum == xxhash.xxh3_64_intdigest(data)  # the checksum earlier versions wrote
        before = sum(v.stats.received)
        assert vol.run(v.read_range(4, csum, 300_000, 4096)) == data[300_000:304_096]
        assert sum(v.stats.received) - before == MiB  # the whole block, sliced
        _, slot, (a, _b) = v.layout.place(4)
        flip(c.data_dir(a) / "slots.dat", slot * MiB + 300_000)
        for _ in range(4):
            assert vol.run(v.read_range(4, csum, 300_000, 4096)) == data[300_000:304_096]
        assert (v.stats.bad[a], v.stats.repaired[a]) == (1, 1)
    assert not (c.data_dir(a) / "slots.sum").exists()
    raw = (c.data_dir(a) / "slots.dat").read_bytes()[slot * MiB : (slot + 1) * MiB]
    assert raw == data


def test_the_previous_version_s_volume_reads_by_range(tmp_path):
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path / "old", filter="data")
    volume = json.loads((tmp_path / "old" / "d0" / "superblock.json").read_text())["volume"]
    key_file = Keyring().path_for(volume)
    write_key(key_file, new_key())
    c = Cluster(tmp_path / "old", 4, server_args=("--key-file", str(key_file)))
    try:
        with BlockingVolume(c.spec) as vol:
            v = vol.volume
            assert v.chunk == WHOLE
            ns = vol.run(read_namespace(v))
            blocks = [bc for node in ns.inodes.values() for bc in node.blocks.values()]
            assert blocks
            for block, csum in blocks:
                whole = vol.read(block, csum)
                part = vol.run(v.read_range(block, csum, len(whole) // 3, 5000))
                assert part == whole[len(whole) // 3 : len(whole) // 3 + 5000]
            assert sum(v.stats.bad) == 0
    finally:
        c.close()
