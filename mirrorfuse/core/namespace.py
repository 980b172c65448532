"""Inodes and directories as a state machine fed by journal records.

The namespace changes only through ``apply(record)``. Validation (does the
name exist, is the directory empty, may this user do it) happens before a
record is made, in the file system layer; ``apply`` trusts its records and
never does I/O, so replaying the journal on another machine gives the same
state. The records are defined in ``wire.records``.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Iterable

from mirrorfuse.wire.legacy import decode_any_checkpoint
from mirrorfuse.wire.records import (
    CHECKPOINT_FORMAT,
    AnyRecord,
    Attr,
    Checkpoint,
    Data,
    Free,
    Inode,
    Ln,
    Mk,
    Mv,
    Rm,
    Xdel,
    Xset,
    encode_checkpoint,
)

ROOT = 1
NAME_MAX = 255


def name_too_long(name: str) -> bool:
    """More than NAME_MAX bytes (names are kept as the bytes they arrived as)."""
    return len(name.encode("utf-8", "surrogateescape")) > NAME_MAX


class LookupFailed(Exception):
    """A path that does not lead to an inode; ``errno`` says why (ENOENT, ENOTDIR...)."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


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

    def lookup(self, path: str) -> Inode:
        """The inode at an absolute path; LookupFailed with the errno a syscall would give."""
        node = self.inodes[ROOT]
        for part in path.split("/"):
            if not part:
                continue
            if node.entries is None:
                raise LookupFailed(errno.ENOTDIR)
            if name_too_long(part):
                raise LookupFailed(errno.ENAMETOOLONG)
            ino = node.entries.get(part)
            if ino is None:
                raise LookupFailed(errno.ENOENT)
            node = self.inodes[ino]
        return node

    def used_blocks(self) -> Iterable[int]:
        for node in self.inodes.values():
            for blk, _ in node.blocks.values():
                yield blk

    def orphans(self) -> list[int]:
        return [i for i, n in self.inodes.items() if n.nlink == 0]

    # -- the state machine --------------------------------------------------------------

    def apply(self, rec: AnyRecord) -> list[int]:
        """Apply one record; returns the blocks it freed. (The sequence number moves only
        when it applied: a record refused here is never journaled.)"""
        freed = self._apply(rec)
        self.seq += 1
        return freed

    def _apply(self, rec: AnyRecord) -> list[int]:
        match rec:
            case Mk():
                self._mk(rec)
            case Ln():
                self._ln(rec)
            case Rm():
                self._rm(rec)
            case Mv():
                self._mv(rec)
            case Attr():
                self._attr(rec)
            case Data():
                return self._data(rec)
            case Xset():
                node = self.inodes[rec.ino]
                node.xattrs[rec.name] = rec.value
                node.ctime = rec.t
            case Xdel():
                node = self.inodes[rec.ino]
                node.xattrs.pop(rec.name, None)
                node.ctime = rec.t
            case Free():
                gone = self.inodes.pop(rec.ino)
                return [blk for blk, _ in gone.blocks.values()]
        return []

    def _mk(self, rec: Mk) -> None:
        t = rec.t
        node = Inode(rec.ino, rec.mode, rec.uid, rec.gid, atime=t, mtime=t, ctime=t, rdev=rec.rdev)
        node.target = rec.target
        pdir = self.inodes[rec.parent]
        assert pdir.entries is not None
        if stat.S_ISDIR(rec.mode):
            node.entries = {}
            node.nlink = 2
            node.parent = rec.parent
            pdir.nlink += 1
        if rec.target is not None:
            node.size = len(rec.target.encode("utf-8", "surrogateescape"))
        self.inodes[rec.ino] = node
        pdir.entries[rec.name] = rec.ino
        pdir.mtime = pdir.ctime = t
        self.next_ino = max(self.next_ino, rec.ino + 1)

    def _ln(self, rec: Ln) -> None:
        node = self.inodes[rec.ino]
        node.nlink += 1
        node.ctime = rec.t
        pdir = self.inodes[rec.parent]
        assert pdir.entries is not None
        pdir.entries[rec.name] = rec.ino
        pdir.mtime = pdir.ctime = rec.t

    def _drop_link(self, ino: int, t: int) -> None:
        node = self.inodes[ino]
        if node.is_dir:
            node.nlink = 0
            self.inodes[node.parent].nlink -= 1
        else:
            node.nlink -= 1
        node.ctime = t

    def _rm(self, rec: Rm) -> None:
        pdir = self.inodes[rec.parent]
        assert pdir.entries is not None
        ino = pdir.entries.pop(rec.name)
        pdir.mtime = pdir.ctime = rec.t
        self._drop_link(ino, rec.t)

    def _mv(self, rec: Mv) -> None:
        t = rec.t
        src, dst = self.inodes[rec.src_parent], self.inodes[rec.dst_parent]
        assert src.entries is not None and dst.entries is not None
        ino = src.entries.pop(rec.src_name)
        replaced = dst.entries.get(rec.dst_name)
        if replaced is not None and replaced != ino:
            self._drop_link(replaced, t)
        dst.entries[rec.dst_name] = ino
        node = self.inodes[ino]
        node.ctime = t
        if node.is_dir and rec.src_parent != rec.dst_parent:
            node.parent = rec.dst_parent
            src.nlink -= 1
            dst.nlink += 1
        src.mtime = src.ctime = dst.mtime = dst.ctime = t

    def _attr(self, rec: Attr) -> None:
        node = self.inodes[rec.ino]
        node.ctime = rec.ctime
        if rec.mode is not None:
            node.mode = rec.mode
        if rec.uid is not None:
            node.uid = rec.uid
        if rec.gid is not None:
            node.gid = rec.gid
        if rec.atime is not None:
            node.atime = rec.atime
        if rec.mtime is not None:
            node.mtime = rec.mtime

    def _data(self, rec: Data) -> list[int]:
        node = self.inodes[rec.ino]
        freed: list[int] = []
        node.inline = rec.inline
        if rec.inline is not None:
            freed = [blk for blk, _ in node.blocks.values()]
            node.blocks = {}
        elif rec.cut is not None:  # the truncation comes first: new blocks may be past it
            for index in [i for i in node.blocks if i >= rec.cut]:
                freed.append(node.blocks.pop(index)[0])
        for index, (blk, csum) in rec.new.items():
            old = node.blocks.get(index)
            if old is not None and old[0] != blk:
                freed.append(old[0])
            node.blocks[index] = (blk, csum)
        node.size = rec.size
        node.mtime = node.ctime = rec.t
        return freed

    # -- snapshots (checkpoints) ----------------------------------------------------------

    def snapshot(self) -> bytes:
        ckpt = Checkpoint(
            CHECKPOINT_FORMAT, self.block_size, self.seq, self.next_ino, list(self.inodes.values())
        )
        return encode_checkpoint(ckpt)

    @classmethod
    def from_snapshot(cls, raw: bytes) -> Namespace:
        ckpt = decode_any_checkpoint(raw)
        ns = cls(ckpt.block_size)
        ns.seq = ckpt.seq
        ns.next_ino = ckpt.next_ino
        ns.inodes = {node.ino: node for node in ckpt.inodes}
        return ns
