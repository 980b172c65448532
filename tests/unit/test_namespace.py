"""The namespace state machine without I/O: replay is deterministic and keeps every invariant."""

from __future__ import annotations

import stat

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfuse.core.checks import check_namespace
from mirrorfuse.core.namespace import ROOT, Namespace
from mirrorfuse.core.replay import Batch, replay
from mirrorfuse.wire.records import (
    Attr,
    Data,
    Free,
    Ln,
    Mk,
    Mv,
    Record,
    RecordError,
    Rm,
    decode_batch,
    encode_batch,
    encode_record,
)

BS = 4096


class Driver:
    """Makes only valid records (as the file system would) and keeps the list."""

    def __init__(self) -> None:
        self.ns = Namespace.fresh(BS, t=1)
        self.records: list[Record] = []
        self.t = 1
        self.next_block = 0

    def commit(self, rec: Record) -> list[int]:
        self.t += 1
        self.records.append(rec)
        return self.ns.apply(rec)

    def dirs(self) -> list[int]:
        return [i for i, n in self.ns.inodes.items() if n.is_dir and n.nlink > 0]

    def files(self) -> list[int]:
        return [i for i, n in self.ns.inodes.items() if not n.is_dir and n.nlink > 0]

    def step(self, op: int, a: int, b: int, name: str) -> None:
        ns = self.ns
        dirs, files = self.dirs(), self.files()
        d = dirs[a % len(dirs)]
        if op == 0 and name not in ns.inodes[d].entries:
            mode = stat.S_IFDIR | 0o755 if b % 3 == 0 else stat.S_IFREG | 0o644
            self.commit(Mk(d, name, ns.next_ino, mode, 0, 0, 0, self.t, None))
        elif op == 1 and files and name not in ns.inodes[d].entries:
            self.commit(Ln(d, name, files[b % len(files)], self.t))
        elif op == 2 and ns.inodes[d].entries:
            names = sorted(ns.inodes[d].entries)
            victim = names[b % len(names)]
            node = ns.inodes[ns.inodes[d].entries[victim]]
            if node.is_dir and node.entries:
                return
            self.commit(Rm(d, victim, self.t))
            if node.nlink == 0:
                self.commit(Free(node.ino))
        elif op == 3 and files:
            ino = files[a % len(files)]
            size = b % (20 * BS)
            keep = -(-size // BS)
            new = {}
            for idx in range(b % 3):
                if idx < keep:
                    new[idx] = (self.next_block, self.next_block * 31)
                    self.next_block += 1
            # as the file system does: shrinking always cuts; growing may carry one
            shrink = size < ns.inodes[ino].size
            self.commit(Data(ino, size, self.t, new, keep if shrink or b % 2 else None))
        elif op == 4 and ns.inodes[d].entries:
            names = sorted(ns.inodes[d].entries)
            src = names[b % len(names)]
            ino = ns.inodes[d].entries[src]
            dst_dir = dirs[b % len(dirs)]
            walk = dst_dir
            while True:  # never into its own subtree
                if walk == ino:
                    return
                if walk == ROOT:
                    break
                walk = ns.inodes[walk].parent
            target = ns.inodes[dst_dir].entries.get(name)
            if target is not None:
                tnode, snode = ns.inodes[target], ns.inodes[ino]
                if (
                    target == ino
                    or tnode.is_dir != snode.is_dir
                    or (tnode.is_dir and tnode.entries)
                ):
                    return
            self.commit(Mv(d, src, dst_dir, name, self.t))
            if target is not None and ns.inodes[target].nlink == 0:
                self.commit(Free(target))
        elif op == 5 and files:
            self.commit(Attr(files[a % len(files)], self.t, mode=stat.S_IFREG | (b & 0o777)))


ops = st.lists(
    st.tuples(
        st.integers(0, 5),
        st.integers(0, 50),
        st.integers(0, 10**6),
        st.sampled_from(["a", "b", "c", "dd", "e f", "ü"]),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_replay_snapshot_and_invariants(steps):
    drv = Driver()
    for step in steps:
        drv.step(*step)
    ns = drv.ns
    assert check_namespace(ns).problems == []
    # a checkpoint restores exactly this state
    assert Namespace.from_snapshot(ns.snapshot()).snapshot() == ns.snapshot()
    # replaying the encoded journal from the start gives the same state
    batch = encode_batch([encode_record(r) for r in drv.records])
    assert decode_batch(batch) == drv.records
    replayed = replay(BS, None, [Batch(1, len(drv.records), batch)] if drv.records else [], t=1)
    assert replayed.snapshot() == ns.snapshot()
    # and so does a checkpoint taken half way plus the rest of the journal
    half = len(drv.records) // 2
    first = Namespace.fresh(BS, t=1)
    for rec in drv.records[:half]:
        first.apply(rec)
    rest = drv.records[half:]
    tail = [Batch(half + 1, len(rest), encode_batch([encode_record(r) for r in rest]))]
    resumed = replay(BS, first.snapshot(), tail if rest else [])
    assert resumed.snapshot() == ns.snapshot()


def test_truncate_then_new_block_in_one_record_keeps_the_new_block():
    ns = Namespace.fresh(BS)
    ns.apply(Mk(ROOT, "f", 2, stat.S_IFREG | 0o644, 0, 0, 0, 1, None))
    ns.apply(Data(2, 3 * BS, 2, {0: (10, 1), 1: (11, 1), 2: (12, 1)}, None))
    freed = ns.apply(Data(2, 7, 3, {0: (20, 2)}, 0))  # O_TRUNC, then 7 new bytes
    assert ns.inodes[2].blocks == {0: (20, 2)} and ns.inodes[2].size == 7
    assert sorted(freed) == [10, 11, 12]


def test_rename_over_a_file_drops_its_link():
    ns = Namespace.fresh(BS)
    ns.apply(Mk(ROOT, "a", 2, stat.S_IFREG, 0, 0, 0, 1, None))
    ns.apply(Mk(ROOT, "b", 3, stat.S_IFREG, 0, 0, 0, 1, None))
    ns.apply(Mv(ROOT, "a", ROOT, "b", 2))
    assert ns.inodes[ROOT].entries == {"b": 2} and ns.inodes[3].nlink == 0
    assert ns.orphans() == [3]


def test_records_keep_their_tagged_array_shape():
    raw = encode_record(Mk(ROOT, "f", 2, stat.S_IFREG, 0, 0, 0, 1, None))
    assert msgpack.unpackb(raw) == ["mk", ROOT, "f", 2, stat.S_IFREG, 0, 0, 0, 1, None]


@pytest.mark.parametrize(
    "batch, why",
    [
        (msgpack.packb([9, []]), "format 9, this mirrorfs reads format 1"),
        (msgpack.packb(["mk", 1, "a"]), "no format number"),
        (msgpack.packb([1, [["teleport", 1]]]), "damaged or unknown"),
        (msgpack.packb([1, [["mk", 1, "a"]]]), "damaged or unknown"),
        (b"\xc1", "damaged"),
    ],
)
def test_a_batch_of_another_version_or_damaged_is_a_clear_error(batch, why):
    with pytest.raises(RecordError, match=why):
        decode_batch(batch)


def test_a_checkpoint_of_another_format_is_refused():
    ns = Namespace.fresh(BS)
    raw = msgpack.unpackb(ns.snapshot())
    raw[0] = 9
    with pytest.raises(RecordError, match="checkpoint is in format 9"):
        Namespace.from_snapshot(msgpack.packb(raw))


def test_metadata_of_the_previous_format_is_read():
    """Records one after the other (attr with a map of changes), checkpoint rows with
    block maps as triples: what mirrorfs-1 data directories hold."""
    f = stat.S_IFREG | 0o644
    old = [
        ["mk", ROOT, "f", 2, f, 0, 0, 0, 5, None],
        ["attr", 2, {"mode": f | 0o4000, "ctime": 6}],
        ["data", 2, 10, 7, {0: [40, 99]}, None],
        ["attr", 2, {"uid": 7, "gid": 8, "ctime": 8}],
    ]
    raw = b"".join(msgpack.packb(r) for r in old)
    ns = replay(BS, None, [Batch(1, len(old), raw)])
    node = ns.inodes[2]
    assert (node.mode, node.uid, node.gid, node.ctime) == (f | 0o4000, 7, 8, 8)
    assert node.blocks == {0: (40, 99)} and node.size == 10
    row = [2, f, 0, 0, 1, 10, 5, 7, 8, 0, None, {"user.k": b"v"}, [[0, 40, 99]], None, 0]
    root = [ROOT, stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0, 0, 0, 0, None, {}, [], {"f": 2}, ROOT]
    ckpt = Namespace.from_snapshot(msgpack.packb([1, BS, 4, 3, [root, row]]))
    assert ckpt.inodes[2].blocks == {0: (40, 99)} and ckpt.inodes[2].xattrs == {"user.k": b"v"}
    assert ckpt.lookup("/f").ino == 2 and ckpt.seq == 4


def test_a_record_that_does_not_apply_is_reported_with_its_number():
    bad = encode_batch([encode_record(Rm(ROOT, "never-made", 5))])
    with pytest.raises(RecordError, match="journal record 1 does not apply"):
        replay(BS, None, [Batch(1, 1, bad)])
    with pytest.raises(RecordError, match="holds 1 records, not 2"):
        replay(BS, None, [Batch(1, 2, bad)])
    with pytest.raises(RecordError, match="does not follow record 0"):
        replay(BS, None, [Batch(3, 1, bad)])
