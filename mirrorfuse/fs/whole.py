"""Whole files by path, for the interactive shell: where a file's blocks are, and
new content written block by block (the shell writes each replica itself)."""

from __future__ import annotations

import errno
import stat

from mirrorfuse.wire.records import Data

from .base import Context, FsError, now_ns
from .filesystem import FileSystem


def block_map(fs: FileSystem, path: str) -> tuple[int, list[tuple[int, int, int]], bytes | None]:
    """Size, (index, block, checksum) of a file's committed blocks, and its content when
    it is small enough to live in its metadata record (then it has no blocks)."""
    node = fs.resolve(path)
    if node.is_dir:
        raise FsError(errno.EISDIR)
    st = fs.states.get(node.ino)
    if st is not None and st.pending:
        raise FsError(errno.EBUSY, "the file has data not yet written out")
    blocks = sorted((i, b, c) for i, (b, c) in node.blocks.items())
    return node.size, blocks, node.inline


async def make_room(fs: FileSystem, path: str, size: int, ctx: Context) -> tuple[int, list[int]]:
    """The file to replace (created if missing) and fresh blocks for ``size`` bytes."""
    try:
        node = fs.resolve(path)
    except FsError as exc:
        if exc.errno != errno.ENOENT:
            raise
        parent, name = fs.resolve_parent(path)
        node = fs.mknod(parent, name, stat.S_IFREG | 0o644, 0, ctx)
    if node.is_dir:
        raise FsError(errno.EISDIR)
    if node.ino in fs.states:
        raise FsError(errno.EBUSY, "the file is open")
    n = -(-size // fs.bs)
    return node.ino, (await fs._allocate(n) if n else [])


def finish(fs: FileSystem, ino: int, size: int, blocks: list[int], sums: list[int]) -> None:
    """Switch the file to the blocks written: one record."""
    new = {i: (b, c) for i, (b, c) in enumerate(zip(blocks, sums, strict=True))}
    fs._commit(Data(ino, size, now_ns(), new, 0))


def give_back(fs: FileSystem, blocks: list[int]) -> None:
    fs.alloc.release(blocks)
