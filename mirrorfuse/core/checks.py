"""The namespace's invariants, checked without I/O (the heart of fsck)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .namespace import ROOT, Namespace


@dataclass
class Report:
    inodes: int = 0
    blocks: int = 0
    orphans: int = 0
    problems: list[str] = field(default_factory=list)


def check_namespace(ns: Namespace) -> Report:
    """Every invariant the state machine must keep, as a list of problems."""
    rep = Report(inodes=len(ns.inodes))
    bad = rep.problems.append
    refs: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    seen_dirs = {ROOT}
    stack = [ROOT]
    if ROOT not in ns.inodes or ns.inodes[ROOT].entries is None:
        bad("the root directory is missing")
        return rep
    while stack:
        d = ns.inodes[stack.pop()]
        for name, ino in (d.entries or {}).items():
            if not name or "/" in name or name in (".", ".."):
                bad(f"directory {d.ino} has an invalid name {name!r}")
            child = ns.inodes.get(ino)
            if child is None:
                bad(f"directory {d.ino} entry {name!r} points to missing inode {ino}")
                continue
            refs[ino] = refs.get(ino, 0) + 1
            if child.is_dir:
                subdirs[d.ino] = subdirs.get(d.ino, 0) + 1
                if ino in seen_dirs:
                    bad(f"directory {ino} is reachable twice")
                    continue
                if child.parent != d.ino:
                    bad(f"directory {ino} names {child.parent} as parent, not {d.ino}")
                seen_dirs.add(ino)
                stack.append(ino)
    owner: dict[int, int] = {}
    for ino, node in ns.inodes.items():
        if node.nlink == 0:
            rep.orphans += 1
        elif node.is_dir:
            if ino not in seen_dirs:
                bad(f"directory {ino} is not reachable from the root")
            elif node.nlink != 2 + subdirs.get(ino, 0):
                bad(f"directory {ino} has nlink {node.nlink}, expected {2 + subdirs.get(ino, 0)}")
        elif refs.get(ino, 0) != node.nlink:
            bad(f"inode {ino} has nlink {node.nlink} but {refs.get(ino, 0)} names")
        limit = -(-node.size // ns.block_size)
        for index, (blk, _csum) in node.blocks.items():
            rep.blocks += 1
            if index >= limit:
                bad(f"inode {ino} maps block index {index} beyond its size {node.size}")
            if blk in owner:
                bad(f"block {blk} is used by inodes {owner[blk]} and {ino}")
            owner[blk] = ino
        if ino >= ns.next_ino:
            bad(f"inode {ino} is not below the next inode number {ns.next_ino}")
    return rep
