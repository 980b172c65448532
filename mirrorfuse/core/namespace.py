"""Inodes and directories as a state machine fed by journal records.

The namespace changes only through ``apply(record)``. A record is a plain
list (msgpack-able) that says everything the change needs, timestamps and
chosen inode and block numbers included, so replaying the journal on another
machine gives the same state. Validation (does the name exist, is the
directory empty, may this user do it) happens before a record is made, in
the file system layer; ``apply`` trusts its records and never does I/O.

Records:
  ["mk", parent, name, ino, mode, uid, gid, rdev, t, target]   new inode + entry
  ["ln", parent, name, ino, t]                                 hard link
  ["rm", parent, name, t]                                      unlink / rmdir
  ["mv", src_parent, src_name, dst_parent, dst_name, t]        rename (replaces)
  ["attr", ino, {"mode"|"uid"|"gid"|"atime"|"mtime"|"ctime": value}]
  ["data", ino, size, t, {index: [block, checksum]}, cut]      drop index >= cut, then map
  ["xset", ino, name, value, t], ["xdel", ino, name, t]        extended attributes
  ["free", ino]                                                drop an unlinked inode
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

ROOT = 1
SNAPSHOT_FORMAT = 1


@dataclass(slots=True)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int = 1
    size: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    rdev: int = 0
    target: str | None = None  # symlink target
    xattrs: dict[str, bytes] = field(default_factory=dict)
    blocks: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (block, csum)
    entries: dict[str, int] | None = None  # directories only
    parent: int = 0  # directories only: the directory holding it

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def dump(self) -> list[Any]:
        return [
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.size,
            self.atime,
            self.mtime,
            self.ctime,
            self.rdev,
            self.target,
            self.xattrs,
            [[i, b, c] for i, (b, c) in self.blocks.items()],
            self.entries,
            self.parent,
        ]

    @classmethod
    def load(cls, row: list[Any]) -> Inode:
        ino = cls(*row[:11])
        ino.xattrs = dict(row[11])
        ino.blocks = {i: (b, c) for i, b, c in row[12]}
        ino.entries = dict(row[13]) if row[13] is not None else None
        ino.parent = row[14]
        return ino


class Namespace:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.inodes: dict[int, Inode] = {}
        self.next_ino = ROOT + 1
        self.seq = 0  # sequence number of the last record applied

    @classmethod
    def fresh(cls, block_size: int, uid: int = 0, gid: int = 0, t: int = 0) -> Namespace:
        ns = cls(block_size)
        root = Inode(ROOT, stat.S_IFDIR | 0o755, uid, gid, nlink=2, atime=t, mtime=t, ctime=t)
        root.entries = {}
        root.parent = ROOT
        ns.inodes[ROOT] = root
        return ns

    # -- queries ----------------------------------------------------------------------

    def get(self, ino: int) -> Inode:
        return self.inodes[ino]

    def used_blocks(self) -> Iterable[int]:
        for node in self.inodes.values():
            for blk, _ in node.blocks.values():
                yield blk

    def orphans(self) -> list[int]:
        return [i for i, n in self.inodes.items() if n.nlink == 0]

    # -- the state machine --------------------------------------------------------------

    def apply(self, rec: list[Any]) -> list[int]:
        """Apply one record; returns the blocks it freed."""
        op = rec[0]
        handler = _HANDLERS.get(op)
        if handler is None:
            raise ValueError(f"unknown journal record {op!r}")
        self.seq += 1
        return handler(self, rec)

    def _mk(self, rec: list[Any]) -> list[int]:
        _, parent, name, ino, mode, uid, gid, rdev, t, target = rec
        node = Inode(ino, mode, uid, gid, atime=t, mtime=t, ctime=t, rdev=rdev, target=target)
        pdir = self.inodes[parent]
        if stat.S_ISDIR(mode):
            node.entries = {}
            node.nlink = 2
            node.parent = parent
            pdir.nlink += 1
        if target is not None:
            node.size = len(target.encode("utf-8", "surrogateescape"))
        self.inodes[ino] = node
        pdir.entries[name] = ino
        pdir.mtime = pdir.ctime = t
        self.next_ino = max(self.next_ino, ino + 1)
        return []

    def _ln(self, rec: list[Any]) -> list[int]:
        _, parent, name, ino, t = rec
        node = self.inodes[ino]
        node.nlink += 1
        node.ctime = t
        pdir = self.inodes[parent]
        pdir.entries[name] = ino
        pdir.mtime = pdir.ctime = t
        return []

    def _drop_link(self, ino: int, t: int) -> None:
        node = self.inodes[ino]
        if node.is_dir:
            node.nlink = 0
            self.inodes[node.parent].nlink -= 1
        else:
            node.nlink -= 1
        node.ctime = t

    def _rm(self, rec: list[Any]) -> list[int]:
        _, parent, name, t = rec
        pdir = self.inodes[parent]
        ino = pdir.entries.pop(name)
        pdir.mtime = pdir.ctime = t
        self._drop_link(ino, t)
        return []

    def _mv(self, rec: list[Any]) -> list[int]:
        _, sp, sn, dp, dn, t = rec
        src, dst = self.inodes[sp], self.inodes[dp]
        ino = src.entries.pop(sn)
        replaced = dst.entries.get(dn)
        if replaced is not None and replaced != ino:
            self._drop_link(replaced, t)
        dst.entries[dn] = ino
        node = self.inodes[ino]
        node.ctime = t
        if node.is_dir and sp != dp:
            node.parent = dp
            src.nlink -= 1
            dst.nlink += 1
        src.mtime = src.ctime = dst.mtime = dst.ctime = t
        return []

    def _attr(self, rec: list[Any]) -> list[int]:
        _, ino, changes = rec
        node = self.inodes[ino]
        for key, value in changes.items():
            setattr(node, key, value)
        return []

    def _data(self, rec: list[Any]) -> list[int]:
        _, ino, size, t, new, cut = rec
        node = self.inodes[ino]
        freed = []
        if cut is not None:  # the truncation comes first: new blocks may be past it
            for index in [i for i in node.blocks if i >= cut]:
                freed.append(node.blocks.pop(index)[0])
        for index, (blk, csum) in new.items():
            old = node.blocks.get(index)
            if old is not None and old[0] != blk:
                freed.append(old[0])
            node.blocks[index] = (blk, csum)
        node.size = size
        node.mtime = node.ctime = t
        return freed

    def _xset(self, rec: list[Any]) -> list[int]:
        _, ino, name, value, t = rec
        node = self.inodes[ino]
        node.xattrs[name] = value
        node.ctime = t
        return []

    def _xdel(self, rec: list[Any]) -> list[int]:
        _, ino, name, t = rec
        node = self.inodes[ino]
        node.xattrs.pop(name, None)
        node.ctime = t
        return []

    def _free(self, rec: list[Any]) -> list[int]:
        node = self.inodes.pop(rec[1])
        return [blk for blk, _ in node.blocks.values()]

    # -- snapshots (checkpoints) ----------------------------------------------------------

    def snapshot(self) -> bytes:
        return msgpack.packb(
            [
                SNAPSHOT_FORMAT,
                self.block_size,
                self.seq,
                self.next_ino,
                [n.dump() for n in self.inodes.values()],
            ],
            use_bin_type=True,
        )

    @classmethod
    def from_snapshot(cls, raw: bytes) -> Namespace:
        fmt, block_size, seq, next_ino, rows = msgpack.unpackb(
            raw, raw=False, strict_map_key=False, use_list=True
        )
        if fmt != SNAPSHOT_FORMAT:
            raise ValueError(f"checkpoint format {fmt} is not supported")
        ns = cls(block_size)
        ns.seq = seq
        ns.next_ino = next_ino
        for row in rows:
            node = Inode.load(row)
            ns.inodes[node.ino] = node
        return ns


_HANDLERS = {
    "mk": Namespace._mk,
    "ln": Namespace._ln,
    "rm": Namespace._rm,
    "mv": Namespace._mv,
    "attr": Namespace._attr,
    "data": Namespace._data,
    "xset": Namespace._xset,
    "xdel": Namespace._xdel,
    "free": Namespace._free,
}


def encode_record(rec: list[Any]) -> bytes:
    return msgpack.packb(rec, use_bin_type=True)


def decode_records(raw: bytes) -> Iterable[list[Any]]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, use_list=True)
    unpacker.feed(raw)
    yield from unpacker
