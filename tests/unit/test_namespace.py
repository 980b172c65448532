"""The namespace state machine without I/O: replay is deterministic and keeps every invariant."""

from __future__ import annotations

import stat

from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfuse.core.namespace import ROOT, Namespace, decode_records, encode_record
from mirrorfuse.tools.fsck import check_namespace

BS = 4096


class Driver:
    """Makes only valid records (as the file system would) and keeps the list."""

    def __init__(self) -> None:
        self.ns = Namespace.fresh(BS, t=1)
        self.records: list[list] = []
        self.t = 1
        self.next_block = 0

    def commit(self, rec: list) -> list[int]:
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
            self.commit(["mk", d, name, ns.next_ino, mode, 0, 0, 0, self.t, None])
        elif op == 1 and files and name not in ns.inodes[d].entries:
            self.commit(["ln", d, name, files[b % len(files)], self.t])
        elif op == 2 and ns.inodes[d].entries:
            names = sorted(ns.inodes[d].entries)
            victim = names[b % len(names)]
            node = ns.inodes[ns.inodes[d].entries[victim]]
            if node.is_dir and node.entries:
                return
            self.commit(["rm", d, victim, self.t])
            if node.nlink == 0:
                self.commit(["free", node.ino])
        elif op == 3 and files:
            ino = files[a % len(files)]
            size = b % (20 * BS)
            keep = -(-size // BS)
            new = {}
            for idx in range(b % 3):
                if idx < keep:
                    new[idx] = [self.next_block, self.next_block * 31]
                    self.next_block += 1
            # as the file system does: shrinking always cuts; growing may carry one
            shrink = size < ns.inodes[ino].size
            self.commit(["data", ino, size, self.t, new, keep if shrink or b % 2 else None])
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
            self.commit(["mv", d, src, dst_dir, name, self.t])
            if target is not None and ns.inodes[target].nlink == 0:
                self.commit(["free", target])
        elif op == 5 and files:
            self.commit(["attr", files[a % len(files)], {"mode": stat.S_IFREG | (b & 0o777)}])


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
    replayed = Namespace.fresh(BS, t=1)
    raw = b"".join(encode_record(r) for r in drv.records)
    for rec in decode_records(raw):
        replayed.apply(rec)
    assert replayed.snapshot() == ns.snapshot()
    # and so does a checkpoint taken half way plus the rest of the journal
    half = len(drv.records) // 2
    first = Namespace.fresh(BS, t=1)
    for rec in drv.records[:half]:
        first.apply(rec)
    resumed = Namespace.from_snapshot(first.snapshot())
    for rec in decode_records(b"".join(encode_record(r) for r in drv.records[half:])):
        resumed.apply(rec)
    assert resumed.snapshot() == ns.snapshot()


def test_truncate_then_new_block_in_one_record_keeps_the_new_block():
    ns = Namespace.fresh(BS)
    ns.apply(["mk", ROOT, "f", 2, stat.S_IFREG | 0o644, 0, 0, 0, 1, None])
    ns.apply(["data", 2, 3 * BS, 2, {0: [10, 1], 1: [11, 1], 2: [12, 1]}, None])
    freed = ns.apply(["data", 2, 7, 3, {0: [20, 2]}, 0])  # O_TRUNC, then 7 new bytes
    assert ns.inodes[2].blocks == {0: (20, 2)} and ns.inodes[2].size == 7
    assert sorted(freed) == [10, 11, 12]


def test_rename_over_a_file_drops_its_link():
    ns = Namespace.fresh(BS)
    ns.apply(["mk", ROOT, "a", 2, stat.S_IFREG, 0, 0, 0, 1, None])
    ns.apply(["mk", ROOT, "b", 3, stat.S_IFREG, 0, 0, 0, 1, None])
    ns.apply(["mv", ROOT, "a", ROOT, "b", 2])
    assert ns.inodes[ROOT].entries == {"b": 2} and ns.inodes[3].nlink == 0
    assert ns.orphans() == [3]
