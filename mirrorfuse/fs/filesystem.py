"""POSIX semantics over the namespace and the mirrored volume (knows nothing of FUSE).

Every change is a journal record applied to the in-memory namespace under
``self.lock``; blocks a record frees are trimmed and reused only after that
record is committed. This module holds names, attributes and extended
attributes; open files and their data are ``files.OpenFiles``.

Paths are absolute strings as FUSE gives them; errors are FsError(errno).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mirrorfuse.client.blocking import BlockingVolume
from mirrorfuse.client.heal import AutoHealer
from mirrorfuse.client.journal import Journal, JournalBroken, JournalUnavailable
from mirrorfuse.client.table import Fenced, NoSpace
from mirrorfuse.core.namespace import NAME_MAX, ROOT, LookupFailed, Namespace, name_too_long
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.records import (
    AnyRecord,
    Attr,
    Free,
    Inode,
    Ln,
    Mk,
    Mv,
    Rm,
    Xdel,
    Xset,
    encode_record,
)

from .base import Context, FsError, names, now_ns
from .cache import Allocator, BlockCache
from .files import CACHE_BYTES, READAHEAD_BYTES, FileState, Handle, OpenFiles

T = TypeVar("T")
log = logging.getLogger("mirrorfs-mount")
XATTR_CREATE, XATTR_REPLACE = 1, 2
FREE_EVERY = 0.5  # seconds between the syncs that make freed blocks reusable
RENAME_NOREPLACE = 1


class FileSystem(OpenFiles):
    def __init__(
        self,
        bvol: BlockingVolume,
        ns: Namespace,
        journal_factory: Callable[[Callable[[int], None]], Journal],
        capacity_blocks: int,
    ) -> None:
        self.bvol = bvol
        self.ns = ns
        self.bs = ns.block_size
        self.lock = threading.RLock()
        self.alloc = Allocator(ns.used_blocks(), capacity_blocks)
        self.states: dict[int, FileState] = {}
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._pending_free: list[tuple[int, list[int]]] = []  # (record, blocks it freed)
        self._free_lock = threading.Lock()
        self._journaled = ns.seq  # records up to here are on every live server
        self._freer: asyncio.Task[None] | None = None
        self._free_round_lock = asyncio.Lock()
        self.cache = BlockCache(CACHE_BYTES // self.bs)
        self.readonly: str | None = None
        # bytes fetched ahead of a sequential reader; 0 reads block by block
        self.readahead = int(os.environ.get("MIRRORFS_READAHEAD", READAHEAD_BYTES))
        self._turns: dict[tuple[str, ...], int] = {}
        self.healer: AutoHealer | None = None  # the mount's own, set when it heals
        self.journal: Journal = journal_factory(self._committed)

    # -- records ------------------------------------------------------------------------

    def _commit(self, rec: AnyRecord) -> int:
        """Encode and apply a record, then queue it for the journal (caller holds self.lock):
        one that cannot be encoded, or that the namespace refuses, changes nothing and is
        never journaled, where it would break every later replay."""
        if self.readonly is not None:
            raise FsError(errno.EROFS, self.readonly)
        data = encode_record(rec)
        freed = self.ns.apply(rec)
        try:
            seq = self.journal.add(data)
        except JournalBroken as exc:
            self._go_readonly(str(exc))
            raise FsError(errno.EIO) from None
        if freed:
            with self._free_lock:
                self._pending_free.append((seq, freed))
        if self.journal.needs_checkpoint():
            self.journal.add_checkpoint(self.ns.seq, self.ns.snapshot())
        return seq

    def _committed(self, seq: int) -> None:
        """On the volume loop: records up to ``seq`` are on every live server."""
        self._journaled = seq
        if self._pending_free and (self._freer is None or self._freer.done()):
            self._freer = self.bvol.loop.create_task(self._free_when_durable())

    async def _free_when_durable(self) -> None:
        while await self._free_round():
            await asyncio.sleep(FREE_EVERY)  # deletions in a row share one sync

    async def _free_round(self) -> bool:
        """The blocks freed by journaled records, once a sync made those records durable on
        every live server: trimmed, then reused. (Reused before, a crash could bring back
        a record's old block map over a block that holds other data.) False: none left."""
        async with self._free_round_lock:
            with self._free_lock:
                upto = self._journaled
                ready = [b for s, blocks in self._pending_free if s <= upto for b in blocks]
            if not ready:
                return False
            try:
                await self.bvol.volume.sync()
            except MirrorfsError:
                return True  # not durable yet: they stay pending, tried again later
            with self._free_lock:
                self._pending_free = [(s, b) for s, b in self._pending_free if s > upto]
            with contextlib.suppress(MirrorfsError):  # untrimmed: wasted space until reused
                await self.bvol.volume.trim_many(ready)
            self.alloc.release(ready)
            return True

    def _allocate(self, n: int) -> list[int]:
        """Blocks for new data, on pairs that take writes now (a lost pair fails only what
        it holds); when full, first wait for space that is being freed."""
        vol = self.bvol.volume

        def usable(block: int) -> bool:
            return vol.pair_usable(vol.layout.pair_of(block))

        try:
            return self.alloc.alloc(n, usable, vol.layout.pairs)
        except FsError:
            pass
        self.sync()  # journals the records that free blocks
        self.bvol.run(self._free_round())  # (after a round in progress, if there is one)
        return self.alloc.alloc(n, usable, vol.layout.pairs)

    def _go_readonly(self, why: str) -> None:
        if self.readonly is None:
            self.readonly = why

    def _io(self, func: Callable[..., T], *args: Any) -> T:
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
        """A name to create or replace: "/" (an empty name), "." and ".." always exist."""
        if name in ("", ".", ".."):
            raise FsError(errno.EEXIST)
        if name_too_long(name):
            raise FsError(errno.ENAMETOOLONG)

    def _lookup(self, path: str) -> Inode:
        try:
            return self.ns.lookup(path)
        except LookupFailed as exc:
            raise FsError(exc.errno) from None

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
            self._commit(Attr(node.ino, now_ns(), mode=new))

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> None:
        with self.lock:
            node = self._node(path, fh)
            mode = None
            if not node.is_dir and node.mode & (stat.S_ISUID | stat.S_ISGID):
                mode = (
                    node.mode & ~stat.S_ISUID & ~(stat.S_ISGID if node.mode & stat.S_IXGRP else 0)
                )
            self._commit(
                Attr(
                    node.ino,
                    now_ns(),
                    mode=mode,
                    uid=None if uid in (-1, 0xFFFFFFFF) else uid,
                    gid=None if gid in (-1, 0xFFFFFFFF) else gid,
                )
            )

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
            self._commit(Attr(node.ino, t, atime=atime, mtime=mtime))

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
        if name in names(parent):
            raise FsError(errno.EEXIST)
        if parent.nlink == 0:
            raise FsError(errno.ENOENT)
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        ino = self.ns.next_ino
        self._commit(Mk(parent.ino, name, ino, mode, ctx.uid, gid, rdev, now_ns(), target))
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
            if name in names(parent):
                raise FsError(errno.EEXIST)
            if node.nlink == 0:
                raise FsError(errno.ENOENT)
            self._commit(Ln(parent.ino, name, node.ino, now_ns()))

    def _release_if_gone(self, ino: int) -> None:
        """Drop an inode that has no name left and is not open (caller holds self.lock)."""
        node = self.ns.inodes.get(ino)
        st = self.states.get(ino)
        if node is not None and node.nlink == 0 and (st is None or st.opens == 0):
            self.states.pop(ino, None)
            self._commit(Free(ino))

    def unlink(self, path: str) -> None:
        with self.lock:
            parent_path, name = self._split(path)
            if name in ("", ".", ".."):
                raise FsError(errno.EISDIR)
            parent = self._dir(parent_path)
            self._check_name(name)
            ino = names(parent).get(name)
            if ino is None:
                raise FsError(errno.ENOENT)
            if self.ns.inodes[ino].is_dir:
                raise FsError(errno.EISDIR)
            self._commit(Rm(parent.ino, name, now_ns()))
            self._release_if_gone(ino)

    def rmdir(self, path: str) -> None:
        with self.lock:
            parent_path, name = self._split(path)
            if name in (".", ""):
                raise FsError(errno.EINVAL)
            if name == "..":
                raise FsError(errno.ENOTEMPTY)
            parent = self._dir(parent_path)
            ino = names(parent).get(name)
            if ino is None:
                raise FsError(errno.ENOENT)
            node = self.ns.inodes[ino]
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if node.entries:
                raise FsError(errno.ENOTEMPTY)
            self._commit(Rm(parent.ino, name, now_ns()))
            self._release_if_gone(ino)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        with self.lock:
            if flags & ~RENAME_NOREPLACE:
                raise FsError(errno.EINVAL)  # RENAME_EXCHANGE and WHITEOUT are not supported
            sp_path, sn = self._split(old)
            dp_path, dn = self._split(new)
            self._check_name(dn)
            sp, dp = self._dir(sp_path), self._dir(dp_path)
            ino = names(sp).get(sn)
            if ino is None:
                raise FsError(errno.ENOENT)
            node = self.ns.inodes[ino]
            target = names(dp).get(dn)
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
            self._commit(Mv(sp.ino, sn, dp.ino, dn, now_ns()))
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
            self._commit(Xset(node.ino, name, bytes(value), now_ns()))

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
            self._commit(Xdel(node.ino, name, now_ns()))

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
        if self.healer is not None:
            self.bvol.loop.call_soon_threadsafe(self.healer.stop)
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
                self._commit(Free(ino))
            self.journal.add_checkpoint(self.ns.seq, self.ns.snapshot())
        try:
            self.journal.close()
        except (JournalBroken, JournalUnavailable, TimeoutError) as exc:
            log.error("unmounted with changes not stored on the servers: %s", exc)
