"""POSIX semantics over the namespace and the mirrored volume (knows nothing of FUSE).

Every change is a journal record applied to the in-memory namespace in one
step of the event loop (validate, apply, journal, with no await between), so
no lock is needed; blocks a record frees are trimmed and reused only after
that record is committed. This module holds names, attributes and extended
attributes; open files and their data are ``files.OpenFiles``.

Files are inode numbers and names within a directory, as the kernel gives
them; errors are FsError(errno).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from mirrorfuse.client.heal import AutoHealer
from mirrorfuse.client.journal import Journal, JournalBroken, JournalUnavailable
from mirrorfuse.client.volume import Volume
from mirrorfuse.core.namespace import NAME_MAX, ROOT, LookupFailed, Namespace, name_too_long
from mirrorfuse.wire.records import (
    Attr,
    Free,
    Inode,
    Ln,
    Mk,
    Mv,
    Rm,
    Xdel,
    Xset,
)

from .base import Context, FsError, names, now_ns
from .cache import Allocator, ChunkCache, cache_bytes
from .committing import Committer
from .files import FileState, Handle, OpenFiles
from .reading import READAHEAD_BYTES

log = logging.getLogger("mirrorfs-mount")
XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE = 1
UNSUPPORTED_XATTRS = ("system.", "security.")


@dataclass
class Attrs:
    """What stat(2) shows of an inode."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime: int
    mtime: int
    ctime: int
    rdev: int
    blksize: int
    blocks: int  # 512-byte units really stored


class FileSystem(Committer, OpenFiles):
    def __init__(
        self,
        volume: Volume,
        ns: Namespace,
        journal_factory: Callable[[Callable[[int], None]], Journal],
        capacity_blocks: int,
    ) -> None:
        self.volume = volume
        self.ns = ns
        self.bs = ns.block_size
        self.alloc = Allocator(ns.used_blocks(), capacity_blocks)
        self.states: dict[int, FileState] = {}
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, list[tuple[str, int]]] = {}  # open directories' listings
        self._next_fh = 1
        self._pending_free: list[tuple[int, list[int]]] = []  # (record, blocks it freed)
        self._journaled = ns.seq  # records up to here are on every live server
        self._freer: asyncio.Task[None] | None = None
        self._free_round_lock = asyncio.Lock()
        self.cache = ChunkCache(cache_bytes())
        self.readonly: str | None = None
        self.writeback = False
        self.dirty_bytes = 0
        self._turns: dict[tuple[str, ...], int] = {}
        self._misses: dict[tuple[int, int], int] = {}
        # bytes fetched ahead of a sequential reader; 0 reads as asked
        self.readahead = int(os.environ.get("MIRRORFS_READAHEAD", READAHEAD_BYTES))
        self._used: tuple[int, int] = (-1, 0)  # (namespace seq, bytes stored) for statfs
        self.healer: AutoHealer | None = None  # the mount's own, set when it heals
        self.journal: Journal = journal_factory(self._committed)
        self._timer = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.expire()
            except Exception:  # a defect: say so, and keep writing data out
                log.exception("writing out data that waited failed")

    # -- lookups ------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        """A name to create or replace: "." and ".." always exist."""
        if name in ("", ".", ".."):
            raise FsError(errno.EEXIST)
        if name_too_long(name):
            raise FsError(errno.ENAMETOOLONG)

    def _vacant(self, parent: int, name: str) -> Inode:
        """The directory a new name goes into, once the name is valid and free there."""
        self._check_name(name)
        pdir = self._dir(parent)
        if name in names(pdir):
            raise FsError(errno.EEXIST)
        return pdir

    def _inode(self, ino: int) -> Inode:
        node = self.ns.inodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> Inode:
        node = self._inode(ino)
        if node.entries is None:
            raise FsError(errno.ENOTDIR)
        return node

    def lookup(self, parent: int, name: str) -> Inode:
        pdir = self._dir(parent)
        if name == ".":
            return pdir
        if name == "..":
            return self.ns.inodes[pdir.parent]
        if name_too_long(name):
            raise FsError(errno.ENAMETOOLONG)
        ino = names(pdir).get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self.ns.inodes[ino]

    def resolve(self, path: str) -> Inode:
        """The inode at an absolute path (the interactive shell names files by path)."""
        try:
            return self.ns.lookup(path)
        except LookupFailed as exc:
            raise FsError(exc.errno) from None

    def resolve_parent(self, path: str) -> tuple[int, str]:
        parent, _, name = path.rstrip("/").rpartition("/")
        return self._dir(self.resolve(parent or "/").ino).ino, name

    # -- attributes -----------------------------------------------------------------------

    def _stored(self, node: Inode, size: int) -> int:
        """Bytes really kept for a file: its inline bytes, or its blocks up to its size."""
        if node.inline is not None:
            return len(node.inline)
        if not node.blocks:
            return 0
        last = (size - 1) // self.bs if size else -1
        total = len(node.blocks) * self.bs
        if last in node.blocks:
            total -= self.bs - (size - last * self.bs)
        return max(min(total, size), 0)

    def getattr(self, ino: int) -> Attrs:
        node = self._inode(ino)
        size = self._size(node)
        mtime = self._mtime(node)
        stored = self._stored(node, size)
        for layer in self._layers(ino):
            stored += layer.nbytes
        return Attrs(
            ino=node.ino,
            mode=node.mode,
            nlink=node.nlink,
            uid=node.uid,
            gid=node.gid,
            size=size,
            atime=node.atime,
            mtime=mtime,
            ctime=max(node.ctime, mtime),
            rdev=node.rdev,
            blksize=self.bs,
            blocks=(min(stored, size) + 511) // 512,
        )

    async def setattr(
        self,
        ino: int,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime: int | None = None,
        mtime: int | None = None,
    ) -> Attrs:
        """chmod, chown, truncate, utimens: what is None stays as it is."""
        node = self._inode(ino)
        if size is not None:
            await self.truncate(ino, size)
            node = self._inode(ino)
        if mode is not None or uid is not None or gid is not None:
            new_mode = None if mode is None else (node.mode & ~0o7777) | (mode & 0o7777)
            if (uid is not None or gid is not None) and not node.is_dir:
                keep = new_mode if new_mode is not None else node.mode
                if keep & (stat.S_ISUID | stat.S_ISGID):  # chown drops set-id bits
                    new_mode = keep & ~stat.S_ISUID & ~(stat.S_ISGID if keep & stat.S_IXGRP else 0)
            self._commit(Attr(ino, now_ns(), mode=new_mode, uid=uid, gid=gid))
        if atime is not None or mtime is not None:
            st = self.states.get(ino)
            if st is not None and st.pending:
                # pending writes go out first, or their flush would stamp a later mtime
                await self._write_out(ino, st)
            self._inode(ino)  # (still there after the wait?)
            self._commit(Attr(ino, now_ns(), atime=atime, mtime=mtime))
        return self.getattr(ino)

    # -- directories ------------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        node = self._dir(ino)
        fh = self._next_fh
        self._next_fh += 1
        self.dirs[fh] = [(".", node.ino), ("..", node.parent), *names(node).items()]
        return fh

    def readdir(self, fh: int, start: int) -> list[tuple[str, int]]:
        """(name, inode) of the entries from ``start`` on, as they were at opendir."""
        listing = self.dirs.get(fh)
        if listing is None:
            raise FsError(errno.EBADF)
        return listing[start:]

    def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    def _new(
        self,
        parent: int,
        name: str,
        mode: int,
        ctx: Context,
        rdev: int = 0,
        target: str | None = None,
    ) -> Inode:
        pdir = self._vacant(parent, name)
        if pdir.nlink == 0:
            raise FsError(errno.ENOENT)
        gid = ctx.gid
        if pdir.mode & stat.S_ISGID:
            gid = pdir.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        ino = self.ns.next_ino
        self._commit(Mk(pdir.ino, name, ino, mode, ctx.uid, gid, rdev, now_ns(), target))
        return self.ns.inodes[ino]

    def mkdir(self, parent: int, name: str, mode: int, ctx: Context) -> Inode:
        return self._new(parent, name, stat.S_IFDIR | (mode & 0o7777), ctx)

    def mknod(self, parent: int, name: str, mode: int, rdev: int, ctx: Context) -> Inode:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        return self._new(parent, name, mode, ctx, rdev)

    def symlink(self, parent: int, name: str, target: str, ctx: Context) -> Inode:
        if len(target.encode("utf-8", "surrogateescape")) > 4095:
            raise FsError(errno.ENAMETOOLONG)
        return self._new(parent, name, stat.S_IFLNK | 0o777, ctx, target=target)

    def readlink(self, ino: int) -> str:
        node = self._inode(ino)
        if node.target is None:
            raise FsError(errno.EINVAL)
        return node.target

    def link(self, ino: int, parent: int, name: str) -> Inode:
        node = self._inode(ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        pdir = self._vacant(parent, name)
        if node.nlink == 0:
            raise FsError(errno.ENOENT)
        self._commit(Ln(pdir.ino, name, node.ino, now_ns()))
        return node

    def _release_if_gone(self, ino: int) -> None:
        """Drop an inode that has no name left and is not open."""
        node = self.ns.inodes.get(ino)
        if node is None or node.nlink > 0:
            return
        st = self.states.get(ino)
        if st is None:
            self._commit(Free(ino))
            return
        # unlinked while open: what is pending will never be read by a name again
        # but stays readable through the handles until the last close
        self._forget_if_idle(ino)

    def unlink(self, parent: int, name: str) -> None:
        if name in ("", ".", ".."):
            raise FsError(errno.EISDIR)
        pdir = self._dir(parent)
        self._check_name(name)
        ino = names(pdir).get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        if self.ns.inodes[ino].is_dir:
            raise FsError(errno.EISDIR)
        self._commit(Rm(pdir.ino, name, now_ns()))
        self._release_if_gone(ino)

    def rmdir(self, parent: int, name: str) -> None:
        if name in (".", ""):
            raise FsError(errno.EINVAL)
        if name == "..":
            raise FsError(errno.ENOTEMPTY)
        pdir = self._dir(parent)
        ino = names(pdir).get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        node = self.ns.inodes[ino]
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if node.entries:
            raise FsError(errno.ENOTEMPTY)
        self._commit(Rm(pdir.ino, name, now_ns()))
        self._release_if_gone(ino)

    def rename(self, sp_ino: int, sn: str, dp_ino: int, dn: str, flags: int = 0) -> None:
        if flags & ~RENAME_NOREPLACE:
            raise FsError(errno.EINVAL)  # RENAME_EXCHANGE and WHITEOUT are not supported
        self._check_name(dn)
        if sn in ("", ".", ".."):
            raise FsError(errno.EBUSY if sn else errno.ENOENT)
        sp, dp = self._dir(sp_ino), self._dir(dp_ino)
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
        # ACLs (system.) would be stored but never enforced, security labels and file
        # capabilities are not used on a FUSE mount (nosuid); a definite "not supported"
        # also lets ls -l stop asking for both on every file
        if name.startswith(UNSUPPORTED_XATTRS):
            raise FsError(errno.EOPNOTSUPP)
        if not name or len(name) > 255:
            raise FsError(errno.ERANGE)

    def setxattr(self, ino: int, name: str, value: bytes, flags: int = 0) -> None:
        self._xname(name)
        node = self._inode(ino)
        if flags & XATTR_CREATE and name in node.xattrs:
            raise FsError(errno.EEXIST)
        if flags & XATTR_REPLACE and name not in node.xattrs:
            raise FsError(errno.ENODATA)
        if len(value) > 65536:
            raise FsError(errno.E2BIG)
        self._commit(Xset(node.ino, name, bytes(value), now_ns()))

    def getxattr(self, ino: int, name: str) -> bytes:
        self._xname(name)
        node = self._inode(ino)
        if name not in node.xattrs:
            raise FsError(errno.ENODATA)
        return node.xattrs[name]

    def listxattr(self, ino: int) -> list[str]:
        return list(self._inode(ino).xattrs)

    def removexattr(self, ino: int, name: str) -> None:
        self._xname(name)
        node = self._inode(ino)
        if name not in node.xattrs:
            raise FsError(errno.ENODATA)
        self._commit(Xdel(node.ino, name, now_ns()))

    # -- the whole file system ------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes of file data really stored (inline or in blocks), for df."""
        seq, used = self._used
        if seq != self.ns.seq:
            used = sum(self._stored(n, n.size) for n in self.ns.inodes.values())
            self._used = (self.ns.seq, used)
        return used

    def statfs(self) -> dict[str, int]:
        """Sizes in 4 KiB units: df shows the bytes files hold, not whole blocks."""
        unit = 4096
        total = self.alloc.limit * self.bs // unit
        used = -(-self.used_bytes() // unit)
        free_slots = max(self.alloc.limit - self.alloc.in_use, 0) * self.bs // unit
        free = max(min(total - used, free_slots), 0)
        files = len(self.ns.inodes)
        return {
            "f_bsize": self.bs,
            "f_frsize": unit,
            "f_blocks": total,
            "f_bfree": free,
            "f_bavail": free,
            "f_files": files + (1 << 24),
            "f_ffree": 1 << 24,
            "f_favail": 1 << 24,
            "f_namemax": NAME_MAX,
        }

    async def shutdown(self) -> None:
        """Write out everything, checkpoint, and stop the journal."""
        self._timer.cancel()
        if self.healer is not None:
            self.healer.stop()
        for ino, st in list(self.states.items()):
            node = self.ns.inodes.get(ino)
            if node is not None and node.nlink > 0:
                try:
                    await self._write_out(ino, st)
                except OSError as exc:
                    log.error("unmounted with data of inode %d not written out: %s", ino, exc)
        if self.readonly is None:
            for ino in self.ns.orphans():
                self.states.pop(ino, None)
                self._commit(Free(ino))
            self.journal.add_checkpoint(self.ns.seq, self.ns.snapshot())
        try:
            await self.journal.close()
        except (JournalBroken, JournalUnavailable, TimeoutError) as exc:
            log.error("unmounted with changes not stored on the servers: %s", exc)
