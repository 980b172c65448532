"""Thin mfusepy adapter: syscalls -> FileSystem calls. All semantics live in filesystem.py.

FsError is an OSError, so mfusepy turns it into the errno it carries. Names are
stored as UTF-8: one whose bytes are not (mfusepy decodes them with
surrogateescape) fails here with EILSEQ, before it reaches the file system.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import mfusepy

from .base import Context, FsError
from .filesystem import FileSystem

log = logging.getLogger("mirrorfs")

# Names may be cached; attributes may not: libfuse's path API gives each name of a
# hard-linked file its own kernel inode, so a cached nlink or size would go stale.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 0.0
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
MAX_WRITE = 1 << 20
P = TypeVar("P", bound=str | None)


def _utf8(path: P) -> P:
    """A path or name as it is, if it can be stored; EILSEQ if its bytes are not UTF-8."""
    if path is not None and not path.isascii():
        try:
            path.encode()
        except UnicodeEncodeError:
            raise FsError(errno.EILSEQ) from None
    return path


def _time_ns(ts: Any) -> int | None:
    """A timespec as nanoseconds; None for UTIME_OMIT (leave it)."""
    if ts.tv_nsec == UTIME_OMIT:
        return None
    if ts.tv_nsec == UTIME_NOW:
        return time.time_ns()
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


def _ctx() -> Context:
    uid, gid, _pid = mfusepy.fuse_get_context()
    return Context(uid, gid)


class MirrorOps(mfusepy.Operations):
    use_ns = True
    # read/write/release/... get a file handle; with hard_remove, an unlinked
    # file that is still open has no path any more
    flag_nullpath_ok = True
    flag_nopath = True

    def __init__(self, fs: FileSystem, on_ready: Callable[[], None] | None = None) -> None:
        self.fs = fs
        self.on_ready = on_ready

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            conn.max_write = MAX_WRITE
            conn.max_readahead = MAX_WRITE
        if config is not None:
            config.attr_timeout = ATTR_TIMEOUT
            config.entry_timeout = ENTRY_TIMEOUT
            config.negative_timeout = ENTRY_TIMEOUT
            config.use_ino = 1
            config.hard_remove = 1
            config.kernel_cache = 1
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path: str) -> None:
        self.fs.shutdown()

    # -- attributes --------------------------------------------------------------------

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        return self.fs.getattr(_utf8(path), fh)

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> None:
        self.fs.chmod(_utf8(path), mode, fh)

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> None:
        self.fs.chown(_utf8(path), uid, gid, fh)

    def utimens(self, path: str | None, times: Any = None, fh: int | None = None) -> None:
        self.fs.utimens(_utf8(path), times, fh)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        self.fs.truncate(_utf8(path), length, fh)

    def statfs(self, path: str) -> dict[str, int]:
        return self.fs.statfs()

    # -- names --------------------------------------------------------------------------

    def opendir(self, path: str) -> int:
        return self.fs.opendir(_utf8(path))

    def releasedir(self, path: str | None, fh: int) -> None:
        self.fs.releasedir(fh)

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # the inode must be set: readdir(3) skips entries whose d_ino is 0
        return [
            (name, {"st_ino": ino, "st_mode": mode}, 0)
            for name, ino, mode in self.fs.readdir(path, fh)
        ]

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> None:
        self.fs.sync()

    def mkdir(self, path: str, mode: int) -> None:
        self.fs.mkdir(_utf8(path), mode, _ctx())

    def mknod(self, path: str, mode: int, dev: int) -> None:
        self.fs.mknod(_utf8(path), mode, dev, _ctx())

    def rmdir(self, path: str) -> None:
        self.fs.rmdir(_utf8(path))

    def unlink(self, path: str) -> None:
        self.fs.unlink(_utf8(path))

    def symlink(self, target: str, source: str) -> None:
        # mfusepy: symlink(link path, what it points to)
        self.fs.symlink(_utf8(source), _utf8(target), _ctx())

    def readlink(self, path: str) -> str:
        return self.fs.readlink(_utf8(path))

    def link(self, target: str, source: str) -> None:
        # mfusepy: link(new name, existing name)
        self.fs.link(_utf8(source), _utf8(target))

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self.fs.rename(_utf8(old), _utf8(new), flags)

    # -- extended attributes -----------------------------------------------------------------

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> None:
        self.fs.setxattr(_utf8(path), _utf8(name), value, options)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.fs.getxattr(_utf8(path), _utf8(name))

    def listxattr(self, path: str) -> list[str]:
        return self.fs.listxattr(_utf8(path))

    def removexattr(self, path: str, name: str) -> None:
        self.fs.removexattr(_utf8(path), _utf8(name))

    # -- files -----------------------------------------------------------------------------

    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        return self.fs.create(_utf8(path), mode, flags, _ctx())

    def open(self, path: str, flags: int) -> int:
        return self.fs.open(_utf8(path), flags)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self.fs.read(fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self.fs.write(fh, data, offset)

    def flush(self, path: str | None, fh: int) -> None:
        self.fs.flush(fh)

    def fsync(self, path: str | None, datasync: int, fh: int) -> None:
        self.fs.fsync(fh, bool(datasync))

    def release(self, path: str | None, fh: int) -> None:
        self.fs.release(fh)


class MirrorFUSE(mfusepy.FUSE):
    """mfusepy drops rename flags and the file handle of a few calls; pass them on."""

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    @staticmethod
    def _fh(fip: Any) -> int | None:
        return fip.contents.fh if fip else None

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(self._path(old), self._path(new), flags)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.operations.truncate(self._path(path), length, self._fh(fip))

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return self.operations.chmod(self._path(path), mode, self._fh(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        return self.operations.chown(self._path(path), uid, gid, self._fh(fip))

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        times = None
        if buf:
            times = (_time_ns(buf.contents.actime), _time_ns(buf.contents.modtime))
        return self.operations.utimens(self._path(path), times, self._fh(fip))


def run(fs: FileSystem, mountpoint: str, fsname: str, on_ready: Callable[[], None]) -> None:
    """Serve the mount until it is unmounted (blocks)."""
    MirrorFUSE(
        MirrorOps(fs, on_ready),
        mountpoint,
        foreground=True,
        allow_other=True,
        default_permissions=True,
        fsname=fsname,
        subtype="mirrorfs",
        hard_remove=True,
        use_ino=True,
    )
