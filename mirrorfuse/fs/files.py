"""Open files: handles, reads through the chunk cache, write-back, truncation.

Writes land in a per-file ``Layer`` (pending.py) and go out copy-on-write:
the new blocks are written to fresh block numbers on both mirrors first,
then one ``Data`` record switches the block map, so a crash leaves the old
or the new content, never a mix. A file whose content fits in INLINE_MAX
bytes goes out as that content inside its record: no block at all. Data is
written out when the file is fsynced or closed, when it has FLUSH_BYTES
pending (in the background, while the writer goes on into the next layer),
when it has waited WRITEBACK_AGE seconds, and when all files together hold
WRITEBACK_BYTES.

This is the data half of ``FileSystem`` (a base class of it); names and
attributes are the other half. Everything runs on the volume's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from mirrorfuse.client.journal import Journal, JournalBroken, JournalUnavailable
from mirrorfuse.client.volume import Volume
from mirrorfuse.core.namespace import Namespace
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.records import AnyRecord, Data, Free, Inode

from .base import Context, FsError, names, now_ns
from .cache import Allocator, ChunkCache
from .pending import Layer
from .reading import Reader

FLUSH_BYTES = 32 << 20  # pending in one file: written out in the background
WRITEBACK_BYTES = 256 << 20  # pending in all files: writers wait for the biggest to go out
WRITEBACK_AGE = 5.0  # seconds data may wait in memory
INLINE_MAX = 4096  # files up to this size live in their metadata record


@dataclass
class FileState:
    """An inode's runtime state: open handles and changes not yet written out.

    ``layers`` oldest first; writes go to the last. ``lock`` lets one write-out
    run at a time; ``task`` is a write-out started in the background.
    """

    opens: int = 0
    layers: list[Layer] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    error: OSError | None = None  # a background write-out failed: the next flush says so

    def top(self) -> Layer:
        if not self.layers:
            self.layers.append(Layer(since=time.monotonic()))
        return self.layers[-1]

    @property
    def pending(self) -> bool:
        return any(not layer.empty for layer in self.layers)


@dataclass
class Handle:
    ino: int
    flags: int
    next_read: int = 0  # where a sequential reader will read next


class OpenFiles(Reader, ABC):
    """The data half of the file system; FileSystem provides the rest."""

    volume: Volume
    ns: Namespace
    bs: int
    alloc: Allocator
    cache: ChunkCache
    readonly: str | None
    journal: Journal
    states: dict[int, FileState]
    handles: dict[int, Handle]
    writeback: bool  # the kernel caches writes (and handles O_APPEND)
    dirty_bytes: int
    _next_fh: int

    @abstractmethod
    def _commit(self, rec: AnyRecord) -> int: ...

    @abstractmethod
    async def _allocate(self, n: int) -> list[int]: ...

    @abstractmethod
    def _go_readonly(self, why: str) -> None: ...

    @abstractmethod
    def _errno(self, exc: MirrorfsError) -> FsError: ...

    @abstractmethod
    def _inode(self, ino: int) -> Inode: ...

    @abstractmethod
    def _dir(self, ino: int) -> Inode: ...

    @abstractmethod
    def _new(
        self,
        parent: int,
        name: str,
        mode: int,
        ctx: Context,
        rdev: int = 0,
        target: str | None = None,
    ) -> Inode: ...

    # -- sizes as the user sees them -------------------------------------------------------

    def _pending(self, ino: int, field: str) -> int | None:
        """The newest pending value of a layer's ``size`` or ``mtime``, if any."""
        for layer in reversed(self._layers(ino)):
            value: int | None = getattr(layer, field)
            if value is not None:
                return value
        return None

    def _size(self, node: Inode) -> int:
        size = self._pending(node.ino, "size")
        return node.size if size is None else size

    def _mtime(self, node: Inode) -> int:
        mtime = self._pending(node.ino, "mtime")
        return node.mtime if mtime is None else mtime

    def _layers(self, ino: int) -> list[Layer]:
        st = self.states.get(ino)
        return st.layers if st is not None else []

    # -- opening and closing ----------------------------------------------------------------

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

    def _fh(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        return h

    async def open(self, ino: int, flags: int) -> int:
        node = self._inode(ino)
        if node.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
            raise FsError(errno.EISDIR)
        fh = self._handle(node, flags)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            await self.truncate(ino, 0)
        return fh

    async def create(
        self, parent: int, name: str, mode: int, flags: int, ctx: Context
    ) -> tuple[int, Inode]:
        pdir = self._dir(parent)
        existing = names(pdir).get(name)
        if existing is not None:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            node = self.ns.inodes[existing]
            if node.is_dir:
                raise FsError(errno.EISDIR)
        else:
            node = self._new(parent, name, stat.S_IFREG | (mode & 0o7777), ctx)
        fh = self._handle(node, flags)
        if existing is not None and flags & os.O_TRUNC:
            await self.truncate(node.ino, 0)
        return fh, node

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        st = self.states.get(h.ino)
        if st is None:
            return
        node = self.ns.inodes.get(h.ino)
        try:
            if node is not None and node.nlink > 0 and st.opens == 1:
                await self._write_out(h.ino, st)
        except OSError:
            # close() already got this error from flush; release cannot report it,
            # and data that cannot be written must not pin the file forever
            self._drop_pending(st)
        finally:
            st.opens -= 1
            if st.opens == 0 and (node is None or node.nlink == 0):
                self._drop_pending(st)  # nobody can read it any more
            self._forget_if_idle(h.ino)

    def _drop_pending(self, st: FileState) -> None:
        for layer in st.layers:
            self.dirty_bytes -= layer.nbytes
        st.layers.clear()
        st.error = None

    def _forget_if_idle(self, ino: int) -> None:
        """Drop the runtime state of a file nobody has open and nothing is pending for;
        an inode with no name left goes then."""
        st = self.states.get(ino)
        if st is None or st.opens > 0 or st.pending or st.lock.locked():
            return
        if st.task is not None and not st.task.done() and st.task is not asyncio.current_task():
            return
        del self.states[ino]
        node = self.ns.inodes.get(ino)
        if node is not None and node.nlink == 0 and self.readonly is None:
            self._commit(Free(ino))

    async def flush(self, fh: int) -> None:
        h = self._fh(fh)
        st = self.states.get(h.ino)
        if st is not None:
            node = self.ns.inodes.get(h.ino)
            if node is not None and node.nlink > 0:
                await self._write_out(h.ino, st)

    async def fsync(self, fh: int | None, datasync: bool = False) -> None:
        """Return when the file's data and every record so far are on every live replica
        (EIO when a pair holding the file's data is lost)."""
        pairs: set[int] = set()
        if fh is not None:
            h = self._fh(fh)
            st = self.states.get(h.ino)
            if st is not None:
                await self._write_out(h.ino, st)
            node = self.ns.inodes.get(h.ino)
            if node is not None:
                layout = self.volume.layout
                pairs = {layout.pair_of(blk) for blk, _ in node.blocks.values()}
        await self.sync(pairs)

    async def sync(self, pairs: set[int] | None = None) -> None:
        try:
            await self.journal.wait()
        except JournalBroken as exc:
            self._go_readonly(str(exc))
            raise FsError(errno.EIO) from None
        except JournalUnavailable as exc:  # no server takes the metadata now: not for good
            raise FsError(errno.EIO, str(exc)) from None
        try:
            await self.volume.sync(pairs or set())
        except MirrorfsError as exc:
            raise self._errno(exc) from None

    # -- writing ------------------------------------------------------------------------------

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        h = self._fh(fh)
        if self.readonly is not None:
            raise FsError(errno.EROFS)
        node = self._inode(h.ino)
        st = self._state(h.ino)
        if h.flags & os.O_APPEND and not self.writeback:
            offset = self._size(node)
        size = self._size(node)
        layer = st.top()
        if layer.empty:
            layer.since = time.monotonic()  # the age of its oldest change
        self.dirty_bytes += layer.write(self.bs, offset, data)
        layer.size = max(size, offset + len(data))
        layer.mtime = now_ns()
        if layer.nbytes >= FLUSH_BYTES and layer is st.layers[-1]:
            await self._start_write_out(h.ino, st, layer)
        if self.dirty_bytes > WRITEBACK_BYTES:
            await self._relieve()
        return len(data)

    async def truncate(self, ino: int, length: int) -> None:
        if length < 0:
            raise FsError(errno.EINVAL)
        if self.readonly is not None:
            raise FsError(errno.EROFS)
        node = self._inode(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        st = self._state(ino)
        layer = st.top()
        if layer.empty:
            layer.since = time.monotonic()
        before = layer.nbytes
        layer.truncate(self.bs, self._size(node), length)
        self.dirty_bytes += layer.nbytes - before
        layer.size = length
        layer.mtime = now_ns()
        if st.opens == 0:
            # nobody will close this file: write the truncation out now. With the file
            # open it waits for the close, so a truncate-and-rewrite lands as one
            # record (after a crash: old content or new, never empty)
            await self._write_out(ino, st)  # (which forgets a file now idle)

    async def _start_write_out(self, ino: int, st: FileState, layer: Layer) -> None:
        """Write the file's pending layers out in the background; wait for the one
        before if it still runs (two layers in memory at most)."""
        if st.task is not None and not st.task.done():
            await asyncio.wait([st.task])
        if not st.layers or st.layers[-1] is not layer:
            return  # another writer (or a flush) sealed it meanwhile
        st.layers.append(Layer())  # later writes go there
        st.task = asyncio.get_running_loop().create_task(self._background(ino, st))

    async def _background(self, ino: int, st: FileState) -> None:
        try:
            await self._write_out(ino, st, seal=False)
        except OSError as exc:
            st.error = exc
        finally:
            st.task = None
            self._forget_if_idle(ino)

    async def _relieve(self) -> None:
        """Too much pending in all: write out the file holding most."""
        candidates = [
            (ino, st)
            for ino, st in self.states.items()
            if not st.lock.locked() and ino in self.ns.inodes and self.ns.inodes[ino].nlink
        ]
        biggest = max(candidates, key=lambda kv: sum(x.nbytes for x in kv[1].layers), default=None)
        if biggest is not None:
            ino, st = biggest
            try:
                await self._write_out(ino, st)
            except OSError as exc:
                st.error = exc  # that file's own fsync or close reports it

    async def expire(self) -> None:
        """Write out what waited more than WRITEBACK_AGE (called every second)."""
        old = time.monotonic() - WRITEBACK_AGE
        for ino, st in list(self.states.items()):
            if (
                st.layers
                and not st.layers[0].empty
                and st.layers[0].since < old
                and not st.lock.locked()
            ):
                node = self.ns.inodes.get(ino)
                if node is not None and node.nlink > 0:
                    with contextlib.suppress(OSError):
                        await self._write_out(ino, st)  # (which forgets a file now idle)

    async def _write_out(self, ino: int, st: FileState, seal: bool = True) -> None:
        """Write out the layers pending now, oldest first; ``seal``: the newest too (later
        writes go to a new layer). Raises the error of an earlier background write-out."""
        async with st.lock:
            if seal and st.layers and not st.layers[-1].empty:
                st.layers.append(Layer(since=time.monotonic()))
            n = len(st.layers) - 1  # every layer but the open one
            for _ in range(n):
                if not st.layers:
                    break  # dropped meanwhile (the file is gone)
                layer = st.layers[0]
                if not layer.empty:
                    await self._send(ino, layer)
                if st.layers and st.layers[0] is layer:
                    st.layers.pop(0)
                    self.dirty_bytes -= layer.nbytes
            err, st.error = st.error, None
        self._forget_if_idle(ino)
        if err is not None:
            raise err

    async def _send(self, ino: int, layer: Layer) -> None:
        """One layer out: its blocks copy-on-write, then one record (or its bytes inline)."""
        node = self.ns.inodes.get(ino)
        if node is None:
            return
        if self.readonly is not None:
            raise FsError(errno.EROFS, self.readonly)
        size = layer.size if layer.size is not None else node.size
        t = layer.mtime or now_ns()
        if size <= min(INLINE_MAX, self.bs):
            content = await self._block_after(node, layer, 0, size)
            if ino in self.ns.inodes:
                self._commit(Data(ino, size, t, {}, 0, inline=bytes(content)))
            return
        wanted = sorted(layer.dirty)
        if node.inline and 0 not in layer.dirty and not layer.hides(0):
            wanted.insert(0, 0)  # a small file grew: its bytes move to a block
        wanted = [i for i in wanted if min(self.bs, size - i * self.bs) > 0]
        contents = await asyncio.gather(
            *(self._block_after(node, layer, i, min(self.bs, size - i * self.bs)) for i in wanted)
        )
        blocks = await self._allocate(len(wanted)) if wanted else []
        try:
            sums = await self.volume.write_many(list(zip(blocks, contents, strict=True)))
        except MirrorfsError as exc:
            self.alloc.release(blocks)
            raise self._errno(exc) from None
        except BaseException:
            self.alloc.release(blocks)
            raise
        if ino not in self.ns.inodes:  # freed while its blocks were on the way
            self.alloc.release(blocks)
            return
        new = {i: (b, c) for i, b, c in zip(wanted, blocks, sums, strict=True)}
        self._commit(Data(ino, size, t, new, layer.cut))

    async def _block_after(
        self, node: Inode, layer: Layer, idx: int, length: int
    ) -> bytes | bytearray:
        """Block ``idx``'s first ``length`` bytes once ``layer`` (the oldest pending one) is
        applied to what is committed."""
        blk = layer.dirty.get(idx)
        if blk is not None and blk.covers(0, length):
            if len(blk.data) == length:
                return blk.data  # the layer is sealed: nothing writes to it any more
            return blk.data[:length]
        below: bytes | bytearray = b""
        if not layer.hides(idx):
            below = await self._committed_range(node, idx, 0, length)
        return blk.over(below, 0, length) if blk is not None else bytearray(below)

    # -- reading --------------------------------------------------------------------------------

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._fh(fh)
        node = self._inode(h.ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        end = min(offset + size, self._size(node))
        if offset >= end:
            return b""
        sequential = h.next_read == offset
        h.next_read = end
        # a copy: a write-out may pop a layer while a part of this read waits (a layer
        # applied again over what it committed gives the same bytes)
        layers = list(self._layers(h.ino))
        first, last = offset // self.bs, (end - 1) // self.bs
        if sequential:
            self._read_ahead(node, layers, last + 1)
        parts = []
        for idx in range(first, last + 1):
            lo = max(offset, idx * self.bs) - idx * self.bs
            hi = min(end, (idx + 1) * self.bs) - idx * self.bs
            parts.append(self._through(node, layers, len(layers), idx, lo, hi))
        if len(parts) == 1:
            return bytes(await parts[0])
        return b"".join(await asyncio.gather(*parts))

    async def _through(
        self, node: Inode, layers: list[Layer], upto: int, idx: int, lo: int, hi: int
    ) -> bytes | bytearray:
        """Bytes [lo, hi) of block ``idx`` as the first ``upto`` layers leave it."""
        for k in range(upto - 1, -1, -1):
            layer = layers[k]
            blk = layer.dirty.get(idx)
            if blk is not None:
                if blk.covers(lo, hi):
                    return blk.data[lo:hi]
                if layer.hides(idx):  # written after a truncation: zeros around it
                    return blk.over(b"", lo, hi)
                below = await self._through(node, layers, k, idx, lo, hi)
                return blk.over(below, lo, hi)
            if layer.hides(idx):
                return bytes(hi - lo)
        data = await self._committed_range(node, idx, lo, hi)
        if len(data) < hi - lo:
            return bytes(data) + bytes(hi - lo - len(data))
        return data

    def _failed(self, exc: Any) -> FsError:
        return self._errno(exc) if isinstance(exc, MirrorfsError) else FsError(errno.EIO)
