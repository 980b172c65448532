"""POSIX semantics over the namespace and the mirrored volume (knows nothing of FUSE).

Every change is a journal record applied to the in-memory namespace under
``self.lock``. File data is buffered per inode and flushed copy-on-write: the
new blocks are written to fresh block numbers on both mirrors first, then one
``data`` record switches the block map, so a crash leaves the old or the new
content, never a mix. Blocks a record frees are trimmed and reused only after
that record is committed.

Paths are absolute strings as FUSE gives them; errors are FsError(errno).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from mirrorfuse.client.journal import Journal, JournalBroken
from mirrorfuse.client.volume import BlockingVolume, Fenced, NoSpace
from mirrorfuse.core.namespace import ROOT, Inode, Namespace, encode_record
from mirrorfuse.core.scheduler import Scheduler, Segment
from mirrorfuse.wire.errors import MirrorfsError

NAME_MAX = 255
FLUSH_BLOCKS = 32  # dirty blocks per file before it is written out
CACHE_BYTES = 128 << 20
READAHEAD_BYTES = 16 << 20
XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class FsError(OSError):
    def __init__(self, err: int, detail: str | None = None) -> None:
        super().__init__(err, detail or os.strerror(err))


def now_ns() -> int:
    return time.time_ns()


@dataclass
class Context:
    """Who asks: uid and gid of the calling process."""

    uid: int = 0
    gid: int = 0


class Allocator:
    """Logical block numbers: lowest free first, then new ones (runs stripe over pairs)."""

    def __init__(self, used: Iterable[int], limit: int) -> None:
        used = set(used)
        self.limit = limit
        self.next = max(used) + 1 if used else 0
        self.free = [b for b in range(self.next) if b not in used]
        heapq.heapify(self.free)
        self.in_use = len(used)
        self.lock = threading.Lock()

    def alloc(self, n: int) -> list[int]:
        with self.lock:
            if self.in_use + n > self.limit:
                raise FsError(errno.ENOSPC)
            out = [heapq.heappop(self.free) for _ in range(min(n, len(self.free)))]
            while len(out) < n:
                out.append(self.next)
                self.next += 1
            self.in_use += n
            return out

    def release(self, blocks: Iterable[int]) -> None:
        with self.lock:
            for b in blocks:
                heapq.heappush(self.free, b)
                self.in_use -= 1


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


class BlockCache:
    """Clean blocks by (block, checksum): a block number's content changes only when reused.

    Values are futures so that a block being fetched (read-ahead) is fetched once.
    """

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max(max_blocks, 4)
        self.items: OrderedDict[tuple[int, int], Future[bytes]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> Future[bytes] | None:
        with self.lock:
            fut = self.items.get(key)
            if fut is None:
                return None
            if fut.done() and fut.exception() is not None:
                del self.items[key]  # a failed fetch is tried again next time
                return None
            self.items.move_to_end(key)
            return fut

    def put(self, key: tuple[int, int], fut: Future[bytes]) -> None:
        with self.lock:
            self.items[key] = fut
            while len(self.items) > self.max_blocks:
                self.items.popitem(last=False)


class FileSystem:
    def __init__(
        self, bvol: BlockingVolume, ns: Namespace, journal_factory, capacity_blocks: int
    ) -> None:
        self.bvol = bvol
        self.ns = ns
        self.bs = ns.block_size
        self.lock = threading.RLock()
        self.alloc = Allocator(ns.used_blocks(), capacity_blocks)
        self.states: dict[int, FileState] = {}
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._pending_free: list[tuple[int, list[int]]] = []
        self._free_lock = threading.Lock()
        self._freed = threading.Condition(self._free_lock)
        self._freeing = 0  # trims in flight whose blocks are not free yet
        self.cache = BlockCache(CACHE_BYTES // self.bs)
        self.readonly: str | None = None
        # bytes fetched ahead of a sequential reader; 0 reads block by block
        self.readahead = int(os.environ.get("MIRRORFS_READAHEAD", READAHEAD_BYTES))
        self._turns: dict[tuple[str, ...], int] = {}
        self.journal: Journal = journal_factory(self._committed)

    # -- records ------------------------------------------------------------------------

    def _commit(self, rec: list[Any]) -> int:
        """Apply a record and queue it for the journal (caller holds self.lock)."""
        if self.readonly is not None:
            raise FsError(errno.EROFS, self.readonly)
        try:
            seq = self.journal.add(encode_record(rec))
        except JournalBroken as exc:
            self._go_readonly(str(exc))
            raise FsError(errno.EIO) from None
        freed = self.ns.apply(rec)
        if freed:
            with self._free_lock:
                self._pending_free.append((seq, freed))
        if self.journal.needs_checkpoint():
            self.journal.add_checkpoint(self.ns.seq, self.ns.snapshot())
        return seq

    def _committed(self, seq: int) -> None:
        """On the volume loop: blocks freed by committed records are trimmed, then reused."""
        with self._free_lock:
            ready = [b for s, blocks in self._pending_free if s <= seq for b in blocks]
            self._pending_free = [(s, b) for s, b in self._pending_free if s > seq]
        if ready:
            with self._free_lock:
                self._freeing += 1
            self.bvol.loop.create_task(self._trim_then_free(ready))

    async def _trim_then_free(self, blocks: list[int]) -> None:
        with contextlib.suppress(MirrorfsError):  # untrimmed: wasted space until reused
            await self.bvol.volume.trim_many(blocks)
        self.alloc.release(blocks)
        with self._free_lock:
            self._freeing -= 1
            self._freed.notify_all()

    def _allocate(self, n: int) -> list[int]:
        """Blocks for new data; when full, first wait for space that is being freed."""
        try:
            return self.alloc.alloc(n)
        except FsError:
            with self._free_lock:
                pending = bool(self._pending_free) or self._freeing > 0
            if not pending:
                raise
        self.sync()  # commits the records that free blocks
        with self._free_lock:
            self._freed.wait_for(lambda: self._freeing == 0, timeout=60)
        return self.alloc.alloc(n)

    def _go_readonly(self, why: str) -> None:
        if self.readonly is None:
            self.readonly = why

    def _io(self, func, *args):
        """Run volume I/O, turning volume failures into errnos."""
        try:
            return func(*args)
        except Fenced as exc:
            self._go_readonly(str(exc))
            raise FsError(errno.EROFS) from None
        except NoSpace:
            raise FsError(errno.ENOSPC) from None
        except MirrorfsError as exc:
            raise FsError(exc.errno, str(exc)) from None

    # -- lookups ------------------------------------------------------------------------

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        parent, _, name = path.rstrip("/").rpartition("/")
        return parent or "/", name

    def _check_name(self, name: str) -> None:
        if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)

    def _lookup(self, path: str) -> Inode:
        node = self.ns.inodes[ROOT]
        for part in path.split("/"):
            if not part:
                continue
            if node.entries is None:
                raise FsError(errno.ENOTDIR)
            self._check_name(part)
            ino = node.entries.get(part)
            if ino is None:
                raise FsError(errno.ENOENT)
            node = self.ns.inodes[ino]
        return node

    def _dir(self, path: str) -> Inode:
        node = self._lookup(path)
        if node.entries is None:
            raise FsError(errno.ENOTDIR)
        return node

    def _node(self, path: str | None, fh: int | None) -> Inode:
        if fh is not None and fh in self.handles:
            return self.ns.inodes[self.handles[fh].ino]
        if path is None:
            raise FsError(errno.EBADF)
        return self._lookup(path)

    # -- attributes -----------------------------------------------------------------------

    def _size(self, node: Inode) -> int:
        st = self.states.get(node.ino)
        return st.size if st is not None and st.size is not None else node.size

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        with self.lock:
            node = self._node(path, fh)
            st = self.states.get(node.ino)
            size = self._size(node)
            mtime = st.mtime if st is not None and st.mtime is not None else node.mtime
            stored = min(size, len(node.blocks) * self.bs) if node.blocks else 0
            if st is not None:
                stored = max(stored, min(size, len(st.dirty) * self.bs))
            return {
                "st_ino": node.ino,
                "st_mode": node.mode,
                "st_nlink": node.nlink,
                "st_uid": node.uid,
                "st_gid": node.gid,
                "st_size": size,
                "st_atime": node.atime,
                "st_mtime": mtime,
                "st_ctime": max(node.ctime, mtime),
                "st_rdev": node.rdev,
                "st_blksize": self.bs,
                "st_blocks": (stored + 511) // 512,
            }

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> None:
        with self.lock:
            node = self._node(path, fh)
            new = (node.mode & ~0o7777) | (mode & 0o7777)
            self._commit(["attr", node.ino, {"mode": new, "ctime": now_ns()}])

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> None:
        with self.lock:
            node = self._node(path, fh)
            change: dict[str, int] = {"ctime": now_ns()}
            if uid != -1 and uid != 0xFFFFFFFF:
                change["uid"] = uid
            if gid != -1 and gid != 0xFFFFFFFF:
                change["gid"] = gid
            if not node.is_dir and node.mode & (stat.S_ISUID | stat.S_ISGID):
                change["mode"] = (
                    node.mode & ~stat.S_ISUID & ~(stat.S_ISGID if node.mode & stat.S_IXGRP else 0)
                )
            self._commit(["attr", node.ino, change])

    def utimens(
        self,
        path: str | None,
        times: tuple[int | None, int | None] | None,
        fh: int | None = None,
    ) -> None:
        """Set access and modification times in ns; None leaves one as it is.

        Pending writes go out first, or their flush would stamp a later mtime.
        """
        with self.lock:
            node = self._node(path, fh)
            st = self.states.get(node.ino)
        if st is not None:
            with st.lock:
                self._flush(node.ino, st)
        with self.lock:
            t = now_ns()
            atime, mtime = times if times is not None else (t, t)
            change: dict[str, int] = {"ctime": t}
            if atime is not None:
                change["atime"] = atime
            if mtime is not None:
                change["mtime"] = mtime
            self._commit(["attr", node.ino, change])

    # -- directories ------------------------------------------------------------------------

    def readdir(self, path: str | None, fh: int | None = None) -> list[tuple[str, int, int]]:
        """(name, inode, mode) of every entry, "." and ".." first."""
        with self.lock:
            node = self._node(path, fh)
            if node.entries is None:
                raise FsError(errno.ENOTDIR)
            inodes = self.ns.inodes
            out = [(".", node.ino, node.mode), ("..", node.parent, inodes[node.parent].mode)]
            out += [(name, ino, inodes[ino].mode) for name, ino in node.entries.items()]
            return out

    def _new(
        self, path: str, mode: int, ctx: Context, rdev: int = 0, target: str | None = None
    ) -> Inode:
        """Create an inode at ``path`` (caller holds self.lock)."""
        parent_path, name = self._split(path)
        self._check_name(name)
        parent = self._dir(parent_path)
        if name in parent.entries:
            raise FsError(errno.EEXIST)
        if parent.nlink == 0:
            raise FsError(errno.ENOENT)
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        ino = self.ns.next_ino
        rec = ["mk", parent.ino, name, ino, mode, ctx.uid, gid, rdev, now_ns(), target]
        self._commit(rec)
        return self.ns.inodes[ino]

    def mkdir(self, path: str, mode: int, ctx: Context) -> None:
        with self.lock:
            self._new(path, stat.S_IFDIR | (mode & 0o7777), ctx)

    def mknod(self, path: str, mode: int, rdev: int, ctx: Context) -> None:
        with self.lock:
            if stat.S_IFMT(mode) == 0:
                mode |= stat.S_IFREG
            self._new(path, mode, ctx, rdev)

    def symlink(self, target: str, path: str, ctx: Context) -> None:
        with self.lock:
            if len(target.encode("utf-8", "surrogateescape")) > 4095:
                raise FsError(errno.ENAMETOOLONG)
            self._new(path, stat.S_IFLNK | 0o777, ctx, target=target)

    def readlink(self, path: str) -> str:
        with self.lock:
            node = self._lookup(path)
            if node.target is None:
                raise FsError(errno.EINVAL)
            return node.target

    def link(self, existing: str, new: str) -> None:
        with self.lock:
            node = self._lookup(existing)
            if node.is_dir:
                raise FsError(errno.EPERM)
            parent_path, name = self._split(new)
            self._check_name(name)
            parent = self._dir(parent_path)
            if name in parent.entries:
                raise FsError(errno.EEXIST)
            if node.nlink == 0:
                raise FsError(errno.ENOENT)
            self._commit(["ln", parent.ino, name, node.ino, now_ns()])

    def _release_if_gone(self, ino: int) -> None:
        """Drop an inode that has no name left and is not open (caller holds self.lock)."""
        node = self.ns.inodes.get(ino)
        st = self.states.get(ino)
        if node is not None and node.nlink == 0 and (st is None or st.opens == 0):
            self.states.pop(ino, None)
            self._commit(["free", ino])

    def unlink(self, path: str) -> None:
        with self.lock:
            parent_path, name = self._split(path)
            parent = self._dir(parent_path)
            self._check_name(name)
            ino = parent.entries.get(name)
            if ino is None:
                raise FsError(errno.ENOENT)
            if self.ns.inodes[ino].is_dir:
                raise FsError(errno.EISDIR)
            self._commit(["rm", parent.ino, name, now_ns()])
            self._release_if_gone(ino)

    def rmdir(self, path: str) -> None:
        with self.lock:
            parent_path, name = self._split(path)
            if name in (".", ""):
                raise FsError(errno.EINVAL)
            if name == "..":
                raise FsError(errno.ENOTEMPTY)
            parent = self._dir(parent_path)
            ino = parent.entries.get(name)
            if ino is None:
                raise FsError(errno.ENOENT)
            node = self.ns.inodes[ino]
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if node.entries:
                raise FsError(errno.ENOTEMPTY)
            self._commit(["rm", parent.ino, name, now_ns()])
            self._release_if_gone(ino)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        with self.lock:
            if flags & ~RENAME_NOREPLACE:
                raise FsError(errno.EINVAL)  # RENAME_EXCHANGE and WHITEOUT are not supported
            sp_path, sn = self._split(old)
            dp_path, dn = self._split(new)
            self._check_name(dn)
            sp, dp = self._dir(sp_path), self._dir(dp_path)
            ino = sp.entries.get(sn)
            if ino is None:
                raise FsError(errno.ENOENT)
            node = self.ns.inodes[ino]
            target = dp.entries.get(dn)
            if target == ino:
                return  # two names of one inode: POSIX says do nothing
            if node.is_dir:
                # a directory cannot move into its own subtree
                walk = dp
                while True:
                    if walk.ino == ino:
                        raise FsError(errno.EINVAL)
                    if walk.ino == ROOT:
                        break
                    walk = self.ns.inodes[walk.parent]
            if target is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST)
                tnode = self.ns.inodes[target]
                if node.is_dir and not tnode.is_dir:
                    raise FsError(errno.ENOTDIR)
                if not node.is_dir and tnode.is_dir:
                    raise FsError(errno.EISDIR)
                if tnode.is_dir and tnode.entries:
                    raise FsError(errno.ENOTEMPTY)
            self._commit(["mv", sp.ino, sn, dp.ino, dn, now_ns()])
            if target is not None:
                self._release_if_gone(target)

    # -- extended attributes --------------------------------------------------------------

    @staticmethod
    def _xname(name: str) -> None:
        if name.startswith("system."):
            raise FsError(errno.EOPNOTSUPP)
        if not name or len(name) > 255:
            raise FsError(errno.ERANGE)

    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        with self.lock:
            self._xname(name)
            node = self._lookup(path)
            if flags & XATTR_CREATE and name in node.xattrs:
                raise FsError(errno.EEXIST)
            if flags & XATTR_REPLACE and name not in node.xattrs:
                raise FsError(errno.ENODATA)
            if len(value) > 65536:
                raise FsError(errno.E2BIG)
            self._commit(["xset", node.ino, name, bytes(value), now_ns()])

    def getxattr(self, path: str, name: str) -> bytes:
        with self.lock:
            node = self._lookup(path)
            if name not in node.xattrs:
                raise FsError(errno.ENODATA)
            return node.xattrs[name]

    def listxattr(self, path: str) -> list[str]:
        with self.lock:
            return list(self._lookup(path).xattrs)

    def removexattr(self, path: str, name: str) -> None:
        with self.lock:
            node = self._lookup(path)
            if name not in node.xattrs:
                raise FsError(errno.ENODATA)
            self._commit(["xdel", node.ino, name, now_ns()])

    # -- open files -----------------------------------------------------------------------

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
            existing = parent.entries.get(name)
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
                            self._commit(["free", h.ino])

    def flush(self, fh: int) -> None:
        h = self.handles.get(fh)
        if h is None:
            return
        st = self.states.get(h.ino)
        if st is not None:
            with st.lock:
                self._flush(h.ino, st)

    def fsync(self, fh: int | None, datasync: bool = False) -> None:
        """Return when the file's data and every record so far are on every live replica."""
        if fh is not None:
            self.flush(fh)
        self.sync()

    def sync(self) -> None:
        try:
            self.journal.wait()
        except JournalBroken as exc:
            self._go_readonly(str(exc))
            raise FsError(errno.EIO) from None
        self._io(self.bvol.sync)

    # -- data -----------------------------------------------------------------------------

    def _block(self, node: Inode, index: int) -> Future[bytes] | None:
        """The committed content of one block, fetched (or being fetched) through the cache."""
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
        wanted = [
            (i, *node.blocks[i])
            for i in indexes
            if i in node.blocks and self.cache.get(node.blocks[i]) is None
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
            if first == last and futures.get(first) is not None:
                # the common case: within one committed block, one slice, one copy
                data = self._result(futures[first])
                lo, hi = offset - first * self.bs, end - first * self.bs
                if len(data) >= hi:
                    return data[lo:hi]
            out = bytearray()
            for idx in range(first, last + 1):
                if st is not None and idx in st.dirty:
                    data: bytes | bytearray = st.dirty[idx]
                else:
                    fut = futures[idx]
                    data = self._result(fut) if fut is not None else b""
                lo = max(offset, idx * self.bs) - idx * self.bs
                hi = min(end, (idx + 1) * self.bs) - idx * self.bs
                piece = data[lo:hi]
                out += piece
                if len(piece) < hi - lo:
                    out += bytes(hi - lo - len(piece))
            return bytes(out)

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
        new = {idx: [blk, csum] for (idx, _), blk, csum in zip(items, blocks, sums, strict=True)}
        with self.lock:
            t = st.mtime or now_ns()
            self._commit(["data", ino, size, t, new, st.cut])
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
        new = {i: [b, c] for i, (b, c) in enumerate(zip(blocks, sums, strict=True))}
        with self.lock:
            self._commit(["data", node.ino, len(data), now_ns(), new, 0])
        return blocks

    # -- the whole file system ------------------------------------------------------------

    def statfs(self) -> dict[str, int]:
        with self.lock:
            files = len(self.ns.inodes)
        total = self.alloc.limit
        free = max(total - self.alloc.in_use, 0)
        return {
            "f_bsize": self.bs,
            "f_frsize": self.bs,
            "f_blocks": total,
            "f_bfree": free,
            "f_bavail": free,
            "f_files": files + (1 << 24),
            "f_ffree": 1 << 24,
            "f_favail": 1 << 24,
            "f_namemax": NAME_MAX,
        }

    def shutdown(self) -> None:
        """Write out everything, checkpoint, and stop the journal."""
        with self.lock:
            states = list(self.states.items())
        for ino, st in states:
            with st.lock:
                node = self.ns.inodes.get(ino)
                if node is not None and node.nlink > 0:
                    self._flush(ino, st)
        with self.lock:
            for ino in self.ns.orphans():
                self.states.pop(ino, None)
                self._commit(["free", ino])
            self.journal.add_checkpoint(self.ns.seq, self.ns.snapshot())
        self.journal.close()
