"""Open files: handles, reads through the block cache, buffered writes, truncation.

File data is buffered per inode and flushed copy-on-write: the new blocks
are written to fresh block numbers on both mirrors first, then one ``Data``
record switches the block map, so a crash leaves the old or the new content,
never a mix. This is the data half of ``FileSystem`` (a base class of it);
names and attributes are the other half.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mirrorfuse.client.blocking import BlockingVolume
from mirrorfuse.client.journal import Journal, JournalBroken, JournalUnavailable
from mirrorfuse.core.namespace import Namespace
from mirrorfuse.core.scheduler import Scheduler, Segment
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.records import AnyRecord, Data, Free, Inode

from .base import Context, FsError, names, now_ns
from .cache import Allocator, BlockCache

FLUSH_BLOCKS = 32  # dirty blocks per file before it is written out
CACHE_BYTES = 128 << 20
READAHEAD_BYTES = 16 << 20

T = TypeVar("T")


@dataclass
class FileState:
    """An inode's runtime state: open handles and data not yet written out."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    dirty: dict[int, bytearray] = field(default_factory=dict)
    size: int | None = None  # pending size, None: the inode's
    mtime: int | None = None
    cut: int | None = None  # pending truncation: drop block indexes >= cut
    opens: int = 0


@dataclass
class Handle:
    ino: int
    flags: int
    next_read: int = 0  # where a sequential reader will read next


class OpenFiles(ABC):
    """The data half of the file system; FileSystem provides the rest."""

    bvol: BlockingVolume
    ns: Namespace
    bs: int
    lock: threading.RLock
    alloc: Allocator
    cache: BlockCache
    readonly: str | None
    readahead: int
    journal: Journal
    states: dict[int, FileState]
    handles: dict[int, Handle]
    _next_fh: int
    _turns: dict[tuple[str, ...], int]

    # the names half, provided by FileSystem
    @abstractmethod
    def _commit(self, rec: AnyRecord) -> int: ...

    @abstractmethod
    def _allocate(self, n: int) -> list[int]: ...

    @abstractmethod
    def _io(self, func: Callable[..., T], *args: Any) -> T: ...

    @abstractmethod
    def _go_readonly(self, why: str) -> None: ...

    @abstractmethod
    def _lookup(self, path: str) -> Inode: ...

    @abstractmethod
    def _dir(self, path: str) -> Inode: ...

    @abstractmethod
    def _split(self, path: str) -> tuple[str, str]: ...

    @abstractmethod
    def _node(self, path: str | None, fh: int | None) -> Inode: ...

    @abstractmethod
    def _new(
        self, path: str, mode: int, ctx: Context, rdev: int = 0, target: str | None = None
    ) -> Inode: ...

    def _size(self, node: Inode) -> int:
        st = self.states.get(node.ino)
        return st.size if st is not None and st.size is not None else node.size

    # -- opening and closing ------------------------------------------------------------------

    def _state(self, ino: int) -> FileState:
        st = self.states.get(ino)
        if st is None:
            st = self.states[ino] = FileState()
        return st

    def _handle(self, node: Inode, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(node.ino, flags)
        self._state(node.ino).opens += 1
        return fh

    def open(self, path: str, flags: int) -> int:
        with self.lock:
            node = self._lookup(path)
            if node.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
                raise FsError(errno.EISDIR)
            fh = self._handle(node, flags)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            self.truncate(None, 0, fh)
        return fh

    def create(self, path: str, mode: int, flags: int, ctx: Context) -> int:
        with self.lock:
            parent_path, name = self._split(path)
            parent = self._dir(parent_path)
            existing = names(parent).get(name)
            if existing is not None:
                if flags & os.O_EXCL:
                    raise FsError(errno.EEXIST)
                node = self.ns.inodes[existing]
            else:
                node = self._new(path, stat.S_IFREG | (mode & 0o7777), ctx)
            fh = self._handle(node, flags)
        if existing is not None and flags & os.O_TRUNC:
            self.truncate(None, 0, fh)
        return fh

    def opendir(self, path: str) -> int:
        with self.lock:
            node = self._dir(path)
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = Handle(node.ino, os.O_RDONLY | os.O_DIRECTORY)
            return fh

    def releasedir(self, fh: int) -> None:
        with self.lock:
            self.handles.pop(fh, None)

    def release(self, fh: int) -> None:
        with self.lock:
            h = self.handles.pop(fh, None)
            if h is None:
                return
            st = self.states.get(h.ino)
            node = self.ns.inodes.get(h.ino)
        if st is None:
            return
        with st.lock:
            try:
                if node is not None and node.nlink > 0:
                    self._flush(h.ino, st)
            except OSError:
                # close() already got this error from flush; release cannot report it,
                # and data that cannot be written must not pin the file forever
                st.dirty.clear()
                st.size = st.mtime = st.cut = None
            finally:
                with self.lock:
                    st.opens -= 1
                    if st.opens == 0 and not st.dirty:
                        self.states.pop(h.ino, None)
                        if node is not None and node.nlink == 0 and h.ino in self.ns.inodes:
                            self._commit(Free(h.ino))

    def flush(self, fh: int) -> None:
        h = self.handles.get(fh)
        if h is None:
            return
        st = self.states.get(h.ino)
        if st is not None:
            with st.lock:
                self._flush(h.ino, st)

    def fsync(self, fh: int | None, datasync: bool = False) -> None:
        """Return when the file's data and every record so far are on every live replica
        (EIO when a pair holding the file's data is lost)."""
        pairs: set[int] = set()
        if fh is not None:
            self.flush(fh)
            h = self.handles.get(fh)
            node = self.ns.inodes.get(h.ino) if h is not None else None
            if node is not None:
                layout = self.bvol.volume.layout
                pairs = {layout.pair_of(blk) for blk, _ in node.blocks.values()}
        self.sync(pairs)

    def sync(self, pairs: set[int] | None = None) -> None:
        try:
            self.journal.wait()
        except JournalBroken as exc:
            self._go_readonly(str(exc))
            raise FsError(errno.EIO) from None
        except JournalUnavailable as exc:  # no server takes the metadata now: not for good
            raise FsError(errno.EIO, str(exc)) from None
        self._io(self.bvol.sync, pairs or set())

    # -- reading ------------------------------------------------------------------------------

    def _block(self, node: Inode, index: int) -> Future[bytes] | None:
        """The committed content of one block, fetched (or being fetched) through the cache.

        None for a block with no content: never written, or past a truncation of the
        open file that is not written out yet (it reads as zeros, not as it was).
        """
        st = self.states.get(node.ino)
        if st is not None and st.cut is not None and index >= st.cut:
            return None
        entry = node.blocks.get(index)
        if entry is None:
            return None
        key = (entry[0], entry[1])
        fut = self.cache.get(key)
        if fut is None:
            fut = self.bvol.submit(self._fetch(entry[0], entry[1]))
            self.cache.put(key, fut)
        return fut

    async def _fetch(self, block: int, csum: int) -> bytes:
        # immutable once, here: every read of the block slices it without copying twice
        return bytes(await self.bvol.volume.read(block, csum))

    def _prefetch(self, node: Inode, indexes: range) -> None:
        """Hand the blocks ahead to the live servers through the fetch scheduler.

        Equal shares across every live mirror, each block only to the servers of
        its own pair; what is cached or being fetched already is left alone.
        """
        st = self.states.get(node.ino)
        cut = st.cut if st is not None and st.cut is not None else None
        wanted = [
            (i, *node.blocks[i])
            for i in indexes
            if i in node.blocks
            and (cut is None or i < cut)
            and self.cache.get(node.blocks[i]) is None
        ]
        if not wanted:
            return
        vol = self.bvol.volume
        eligible = {
            k: {str(s) for s in vol.readable(vol.layout.pair_of(blk))}
            for k, (_, blk, _) in enumerate(wanted)
        }
        names = sorted({n for e in eligible.values() for n in e})
        if not names:
            return
        # the window slides a block at a time: rotate who comes first, or ties
        # would always go to the first server of each pair
        key = tuple(names)  # per set of servers: blocks alternate between pairs
        turn = self._turns[key] = self._turns.get(key, -1) + 1
        names = names[turn % len(names) :] + names[: turn % len(names)]
        sched = Scheduler(
            [Segment(k, k, k + 1) for k in range(len(wanted))], names, eligible=eligible
        )
        while not sched.finished:
            progressed = False
            for name in names:
                seg = sched.next(name)
                if seg is None:
                    continue
                progressed = True
                sched.completed(name, seg.index, 0.0)
                _, blk, csum = wanted[seg.index]
                fut = self.bvol.submit(self._fetch_via(blk, csum, int(name)))
                self.cache.put((blk, csum), fut)
            if not progressed:
                return

    async def _fetch_via(self, block: int, csum: int, server: int) -> bytes:
        return bytes(await self.bvol.volume.read_via(block, csum, server))

    def _result(self, fut: Future[bytes]) -> bytes:
        try:
            return fut.result()
        except MirrorfsError as exc:
            raise FsError(exc.errno, str(exc)) from None

    def read(self, fh: int, size: int, offset: int) -> bytes:
        h = self.handles.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        st = self.states.get(h.ino)
        lock = st.lock if st is not None else threading.RLock()
        with lock:
            with self.lock:
                node = self.ns.inodes[h.ino]
                fsize = self._size(node)
                if node.is_dir:
                    raise FsError(errno.EISDIR)
            end = min(offset + size, fsize)
            if offset >= end:
                return b""
            first, last = offset // self.bs, (end - 1) // self.bs
            futures = {}
            for idx in range(first, last + 1):
                if st is None or idx not in st.dirty:
                    futures[idx] = self._block(node, idx)
            if h.next_read == offset and self.readahead:  # sequential: fetch what comes next
                ahead = last + 1 + max(self.readahead // self.bs, 2)
                self._prefetch(node, range(last + 1, min(ahead, (fsize - 1) // self.bs + 1)))
            h.next_read = end
            one = futures.get(first)
            if first == last and one is not None:
                # the common case: within one committed block, one slice, one copy
                data = self._result(one)
                lo, hi = offset - first * self.bs, end - first * self.bs
                if len(data) >= hi:
                    return data[lo:hi]
            out = bytearray()
            for idx in range(first, last + 1):
                piece_of: bytes | bytearray
                if st is not None and idx in st.dirty:
                    piece_of = st.dirty[idx]
                else:
                    fut = futures[idx]
                    piece_of = self._result(fut) if fut is not None else b""
                lo = max(offset, idx * self.bs) - idx * self.bs
                hi = min(end, (idx + 1) * self.bs) - idx * self.bs
                piece = piece_of[lo:hi]
                out += piece
                if len(piece) < hi - lo:
                    out += bytes(hi - lo - len(piece))
            return bytes(out)

    # -- writing --------------------------------------------------------------------------------

    def write(self, fh: int, data: bytes, offset: int) -> int:
        h = self.handles.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        if self.readonly is not None:
            raise FsError(errno.EROFS)
        st = self.states.get(h.ino) or self._state(h.ino)
        with st.lock:
            with self.lock:
                node = self.ns.inodes[h.ino]
                size = self._size(node)
            if h.flags & os.O_APPEND:
                offset = size
            view = memoryview(data)
            pos = offset
            while view:
                idx, boff = divmod(pos, self.bs)
                n = min(self.bs - boff, len(view))
                buf = st.dirty.get(idx)
                if buf is None:
                    buf = self._base_for_write(node, st, idx, boff, n)
                    st.dirty[idx] = buf
                if len(buf) < boff:
                    buf.extend(bytes(boff - len(buf)))
                buf[boff : boff + n] = view[:n]
                pos += n
                view = view[n:]
            st.size = max(size, offset + len(data))
            st.mtime = now_ns()
            if len(st.dirty) >= FLUSH_BLOCKS:
                self._flush(h.ino, st)
        return len(data)

    def _base_for_write(self, node: Inode, st: FileState, idx: int, boff: int, n: int) -> bytearray:
        """The block a partial write lands in: its committed content, or nothing yet."""
        if (boff == 0 and n == self.bs) or (st.cut is not None and idx >= st.cut):
            return bytearray()
        fut = self._block(node, idx)
        return bytearray(self._result(fut)) if fut is not None else bytearray()

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        if length < 0:
            raise FsError(errno.EINVAL)
        with self.lock:
            node = self._node(path, fh)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            st = self._state(node.ino)
        with st.lock:
            size = self._size(node)
            keep = -(-length // self.bs)  # blocks that stay
            if length < size:
                for idx in [i for i in st.dirty if i >= keep]:
                    del st.dirty[idx]
                st.cut = keep if st.cut is None else min(st.cut, keep)
                tail = length % self.bs
                if tail:
                    idx = length // self.bs
                    buf = st.dirty.get(idx)
                    if buf is None:
                        buf = self._base_for_write(node, st, idx, 0, 0)
                    del buf[tail:]
                    st.dirty[idx] = buf
            st.size = length
            st.mtime = now_ns()
            if st.opens == 0:
                # nobody will close this file: write the truncation out now. With the
                # file open it waits for the close, so a truncate-and-rewrite lands
                # as one record (after a crash: old content or new, never empty)
                self._flush(node.ino, st, force=True)
                with self.lock:
                    if st.opens == 0 and not st.dirty:
                        self.states.pop(node.ino, None)

    def _flush(self, ino: int, st: FileState, force: bool = False) -> None:
        """Write the dirty blocks copy-on-write, then switch the block map in one record."""
        if not st.dirty and st.size is None and st.cut is None and not force:
            return
        with self.lock:
            node = self.ns.inodes.get(ino)
            if node is None:
                return
            size = self._size(node)
        items = []
        for idx, buf in sorted(st.dirty.items()):
            valid = min(self.bs, size - idx * self.bs)
            if valid > 0:
                items.append((idx, bytes(buf[:valid])))
        blocks = self._allocate(len(items)) if items else []
        try:
            sums = self._io(
                self.bvol.write_many, list(zip(blocks, [d for _, d in items], strict=True))
            )
        except BaseException:
            self.alloc.release(blocks)
            raise
        new = {idx: (blk, csum) for (idx, _), blk, csum in zip(items, blocks, sums, strict=True)}
        with self.lock:
            t = st.mtime or now_ns()
            self._commit(Data(ino, size, t, new, st.cut))
            st.dirty.clear()
            st.size = st.mtime = st.cut = None

    # -- whole files (the interactive shell) -------------------------------------------------

    def block_map(self, path: str) -> tuple[int, list[tuple[int, int, int]]]:
        """Size and (index, block, checksum) of a file's committed blocks."""
        with self.lock:
            node = self._lookup(path)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            st = self.states.get(node.ino)
            if st is not None and (st.dirty or st.size is not None):
                raise FsError(errno.EBUSY, "the file has data not yet written out")
            return node.size, sorted((i, b, c) for i, (b, c) in node.blocks.items())

    def replace_content(
        self,
        path: str,
        data: bytes,
        ctx: Context,
        write_blocks: Callable[[list[tuple[int, bytes]]], list[int]] | None = None,
    ) -> list[int]:
        """Make a file hold exactly ``data`` (created if missing): new blocks, one record.

        ``write_blocks`` writes (block, data) pairs and returns their checksums; by
        default both mirrors in parallel. Returns the logical blocks used.
        """
        with self.lock:
            try:
                node = self._lookup(path)
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                node = self._new(path, stat.S_IFREG | 0o644, ctx)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if node.ino in self.states:
                raise FsError(errno.EBUSY, "the file is open")
        pieces = [data[i : i + self.bs] for i in range(0, len(data), self.bs)]
        blocks = self._allocate(len(pieces)) if pieces else []
        writer = write_blocks or self.bvol.write_many
        try:
            sums = self._io(writer, list(zip(blocks, pieces, strict=True)))
        except BaseException:
            self.alloc.release(blocks)
            raise
        new = {i: (b, c) for i, (b, c) in enumerate(zip(blocks, sums, strict=True))}
        with self.lock:
            self._commit(Data(node.ino, len(data), now_ns(), new, 0))
        return blocks
