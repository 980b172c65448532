"""A block server's copy of the metadata, as files in a directory: no server, no mount."""

from __future__ import annotations

import zlib

import pytest

from mirrorfuse.wire.records import CHECKPOINT_HEADER, JOURNAL_ENTRY
from servers.block.meta import Meta
from servers.net import Refused


def entries(meta: Meta) -> list[tuple[int, int]]:
    return [(e.first, e.count) for e in meta.entries]


def test_appends_are_contiguous_a_retry_is_a_no_op_and_a_hole_is_a_gap(tmp_path):
    m = Meta(tmp_path)
    assert m.append(1, 3, 1, b"abc") and m.append(4, 1, 1, b"d")
    assert not m.append(4, 1, 1, b"d")  # already held: a retry
    with pytest.raises(Refused) as gap:
        m.append(9, 1, 1, b"x")
    assert gap.value.code == "GAP" and gap.value.last == 4
    m.close()
    again = Meta(tmp_path)
    assert entries(again) == [(1, 3), (4, 1)] and again.last_seq == 4
    data, nxt = again.read(2, 1 << 20)
    last = JOURNAL_ENTRY.pack(4, 1, 1, 1, zlib.crc32(b"d")) + b"d"
    assert nxt is None and data.endswith(b"abc" + last)


@pytest.mark.parametrize("tail", [b"\x01\x02\x03", JOURNAL_ENTRY.pack(3, 1, 100, 1, 0) + b"short"])
def test_a_torn_tail_is_cut_off(tmp_path, tail):
    m = Meta(tmp_path)
    m.append(1, 2, 1, b"xy")
    m.close()
    with open(tmp_path / "journal.log", "ab") as f:
        f.write(tail)
    good = JOURNAL_ENTRY.size + 2
    again = Meta(tmp_path)
    assert entries(again) == [(1, 2)]
    assert (tmp_path / "journal.log").stat().st_size == good
    assert again.append(3, 1, 1, b"z")  # and it goes on from there


def test_an_entry_that_does_not_follow_ends_the_journal(tmp_path):
    m = Meta(tmp_path)
    m.append(1, 1, 1, b"a")
    m.close()
    with open(tmp_path / "journal.log", "ab") as f:
        f.write(JOURNAL_ENTRY.pack(5, 1, 1, 1, zlib.crc32(b"e")) + b"e")
    assert entries(Meta(tmp_path)) == [(1, 1)]


def checkpoint(meta: Meta, seq: int, blob: bytes, parts: int = 3) -> None:
    size = -(-len(blob) // parts)
    for i in range(parts):
        off = i * size
        meta.put_checkpoint(seq, off, len(blob), blob[off : off + size], i == parts - 1)


def test_a_checkpoint_replaces_the_journal_only_when_whole(tmp_path):
    m = Meta(tmp_path)
    m.append(1, 5, 1, b"hello")
    blob = bytes(range(256)) * 40
    m.put_checkpoint(5, 0, len(blob), blob[:1000], False)  # a client that died mid-way
    m.close()
    again = Meta(tmp_path)
    assert again.checkpoint_seq == 0 and again.last_seq == 5  # the old state stands
    checkpoint(again, 5, blob)
    assert again.checkpoint_seq == 5 and again.entries == [] and again.last_seq == 5
    seq, total, crc, part = again.get_checkpoint(0, 1 << 20)
    assert (seq, total, crc, part) == (5, len(blob), zlib.crc32(blob), blob)
    assert not (tmp_path / "checkpoint.tmp").exists()
    again.close()
    assert Meta(tmp_path).checkpoint_seq == 5
    with pytest.raises(Refused, match="older than journal end"):
        checkpoint(Meta(tmp_path), 4, blob)


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_a_damaged_checkpoint_is_set_aside_not_offered(tmp_path, damage):
    m = Meta(tmp_path)
    checkpoint(m, 7, b"x" * 5000)
    m.append(8, 1, 1, b"y")
    m.close()
    path = tmp_path / "checkpoint.bin"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[CHECKPOINT_HEADER.size + 10] ^= 0xFF
    else:
        del raw[-100:]
    path.write_bytes(raw)
    again = Meta(tmp_path)
    assert again.checkpoint_seq == 0 and again.get_checkpoint(0, 100)[0] == 0
    assert again.last_seq == 0  # its journal no longer follows anything: a client heals it
    assert (tmp_path / "checkpoint.damaged").exists()
