"""Thin pyfuse3 adapter: kernel requests -> FileSystem calls. All semantics live in
filesystem.py and files.py.

pyfuse3 is libfuse's low-level (inode-based) API, run in asyncio mode: every
request is a coroutine on the loop that also runs the volume's connections.
Names arrive as bytes and are stored as UTF-8: one whose bytes are not fails
here with EILSEQ, before it reaches the file system.

One mount writes a volume at a time (the lease), so everything the kernel
caches changes only through this mount: entries and attributes may be cached
for long, the page cache is kept across opens, and the kernel's writeback
cache is on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3

from mirrorfuse.core.stats import OpStats

from . import fuse_reader
from .base import Context, FsError
from .filesystem import Attrs, FileSystem

log = logging.getLogger("mirrorfs-mount")

ENTRY_TIMEOUT = 300.0
ATTR_TIMEOUT = 300.0
READ_AHEAD_KB = 1024  # the kernel's read-ahead for the mount (its default is 128)
DIRTY_RATIO = 20  # % of the dirty-page limit the mount's pages may take (FUSE's default: 1)
T = TypeVar("T")


def _name(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EILSEQ) from None


def _ctx(ctx: Any) -> Context:
    return Context(ctx.uid, ctx.gid)


def _entry(a: Attrs) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = 0
    e.entry_timeout = ENTRY_TIMEOUT
    e.attr_timeout = ATTR_TIMEOUT
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = a.blksize
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime
    e.st_mtime_ns = a.mtime
    e.st_ctime_ns = a.ctime
    return e


_inflight: dict[int, tuple[str, Any]] = {}  # requests being served: SIGUSR1 shows them


# the kernel's requests by name: counts, time, errors by errno (the mount's metrics)
STATS = OpStats()
_READ, _WRITE = STATS.of("read"), STATS.of("write")  # their bytes too


def _failed(name: str, start: float, code: int) -> pyfuse3.FUSEError:
    STATS.failed(name, errno.errorcode.get(code, str(code)), time.perf_counter() - start)
    return pyfuse3.FUSEError(code)


async def _call(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    name = func.__name__
    start = time.perf_counter()
    coro = func(*args)
    _inflight[id(coro)] = (name, coro)
    try:
        result = await coro
    except FsError as exc:
        raise _failed(name, start, exc.errno or errno.EIO) from None
    except Exception:
        # unanswered, the caller would hang in the kernel for ever: EIO, and say why
        log.exception("%s failed", name)
        raise _failed(name, start, errno.EIO) from None
    finally:
        del _inflight[id(coro)]
    STATS.of(name).record(time.perf_counter() - start)
    return result


def _sync(func: Callable[..., T], *args: Any) -> T:
    start = time.perf_counter()
    try:
        result = func(*args)
    except FsError as exc:
        raise _failed(func.__name__, start, exc.errno or errno.EIO) from None
    except Exception:
        log.exception("%s failed", func.__name__)
        raise _failed(func.__name__, start, errno.EIO) from None
    STATS.of(func.__name__).record(time.perf_counter() - start)
    return result


class MirrorOps(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, fs: FileSystem, mountpoint: str) -> None:
        super().__init__()
        self.fs = fs
        self.mountpoint = mountpoint
        fs.writeback = True

    def init(self) -> None:
        # called while FUSE's INIT is answered; the kernel applies the answer at once
        asyncio.get_running_loop().call_soon(tune_kernel, self.mountpoint)

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        return _entry(_sync(self.fs.getattr, ino))

    # -- names and attributes ------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        node = _sync(self.fs.lookup, parent_inode, _name(name))
        return self._attrs(node.ino)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inodes live until unlinked and closed, not while the kernel knows them

    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        a = await _call(
            self.fs.setattr,
            inode,
            attr.st_mode if fields.update_mode else None,
            attr.st_uid if fields.update_uid else None,
            attr.st_gid if fields.update_gid else None,
            attr.st_size if fields.update_size else None,
            attr.st_atime_ns if fields.update_atime else None,
            attr.st_mtime_ns if fields.update_mtime else None,
        )
        return _entry(a)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return _sync(self.fs.readlink, inode).encode("utf-8", "surrogateescape")

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = _sync(self.fs.mknod, parent_inode, _name(name), mode, rdev, _ctx(ctx))
        return self._attrs(node.ino)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = _sync(self.fs.mkdir, parent_inode, _name(name), mode, _ctx(ctx))
        return self._attrs(node.ino)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        _sync(self.fs.unlink, parent_inode, _name(name))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        _sync(self.fs.rmdir, parent_inode, _name(name))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = _sync(self.fs.symlink, parent_inode, _name(name), _name(target), _ctx(ctx))
        return self._attrs(node.ino)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        _sync(
            self.fs.rename,
            parent_inode_old,
            _name(name_old),
            parent_inode_new,
            _name(name_new),
            flags,
        )

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        node = _sync(self.fs.link, inode, new_parent_inode, _name(new_name))
        return self._attrs(node.ino)

    # -- extended attributes -----------------------------------------------------------------

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        # pyfuse3 checks XATTR_CREATE / XATTR_REPLACE itself (through getxattr)
        _sync(self.fs.setxattr, inode, _name(name), value)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return _sync(self.fs.getxattr, inode, _name(name))

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [n.encode() for n in _sync(self.fs.listxattr, inode)]

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        _sync(self.fs.removexattr, inode, _name(name))

    # -- directories ------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any) -> int:
        return _sync(self.fs.opendir, inode)

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for k, (name, ino) in enumerate(_sync(self.fs.readdir, fh, start_id)):
            try:
                attrs = _entry(self.fs.getattr(ino))
            except FsError:
                continue  # removed since opendir
            raw = name.encode("utf-8", "surrogateescape")
            if not pyfuse3.readdir_reply(token, raw, attrs, start_id + k + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await _call(self.fs.sync)

    # -- files -----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        fh = await _call(self.fs.open, inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, node = await _call(self.fs.create, parent_inode, _name(name), mode, flags, _ctx(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attrs(node.ino)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = await _call(self.fs.read, fh, off, size)
        _READ.reply_bytes += len(data)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        n = await _call(self.fs.write, fh, off, buf)
        _WRITE.request_bytes += n
        return n

    async def flush(self, fh: int) -> None:
        await _call(self.fs.flush, fh)

    async def release(self, fh: int) -> None:
        await _call(self.fs.release, fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await _call(self.fs.fsync, fh, datasync)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        for key, value in self.fs.statfs().items():
            setattr(st, key, value)
        return st


def tune_kernel(mountpoint: str) -> None:
    """Let the kernel read ahead 1 MiB at a time instead of 128 KiB, and hold more than
    the 1% of dirty memory it allows a FUSE mount (root only; after FUSE's INIT, which
    sets the read-ahead).

    The device is found in mountinfo: a stat of the mount point would be a request
    to this very process, which is not serving yet.
    """
    dev = None
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == mountpoint and " - fuse.mirrorfs " in line:
                dev = fields[2]
        bdi = Path(f"/sys/class/bdi/{dev}")
        (bdi / "read_ahead_kb").write_text(f"{READ_AHEAD_KB}\n")
        (bdi / "max_ratio").write_text(f"{DIRTY_RATIO}\n")
    except (OSError, IndexError) as exc:
        log.info("kernel read-ahead and dirty limit left at their defaults (%s)", exc)


def _chain(coro: Any) -> str:
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None)
    return "\n".join(lines)


def dump_tasks() -> None:
    """SIGUSR1: what every request and background task is waiting for, into the log."""
    for name, coro in list(_inflight.values()):
        log.warning("request %s:\n%s", name, _chain(coro))
    for task in asyncio.all_tasks():
        log.warning("task %s:\n%s", task.get_name(), _chain(task.get_coro()))


async def serve(fs: FileSystem, mountpoint: str, fsname: str, on_ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted; then write everything out."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    fuse_reader.enable()
    options = set(pyfuse3.default_options)
    options |= {f"fsname={fsname}", "subtype=mirrorfs", "allow_other"}
    pyfuse3.init(MirrorOps(fs, mountpoint), mountpoint, options)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        # stop serving, write everything out, unmount (libfuse's own handlers are not
        # installed by pyfuse3)
        loop.add_signal_handler(sig, pyfuse3.terminate)
    try:
        on_ready()
        await pyfuse3.main()
    finally:
        try:
            await fs.shutdown()
        finally:
            pyfuse3.close(unmount=True)
