"""One block server's store: a superblock, a sparse slot file and a slot index.

The slot file holds block data at ``slot * block_size`` (holes where nothing
was written, so a large block size costs no disk for small blocks). The index
holds a fixed 16-byte entry per slot (checksum, length, flags) and is kept in
memory; it is what ``LIST`` walks during a rebuild. With chunk sums
(``wire.checksums``) a sparse sums file holds a fixed record of a slot's sums,
written with the block, so a small read reads its chunks and sums, never the
whole block. The failure table lives beside them so every client can learn
which servers were marked failed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mirrorfuse.core import failures
from mirrorfuse.wire.auth import KEY_NAME, KeyFileError
from mirrorfuse.wire.checksums import SUM_SIZE, WHOLE, chunk_sums, count, covering, valid_chunk
from mirrorfuse.wire.frames import Flag
from mirrorfuse.wire.messages import State, Table

from ..files import atomic_write, read_key, write_key
from .healing import BeingHealed, DirtySet, NotHealing
from .meta import Meta
from .superblock import StoreError, Superblock, format_name, new_ident, read_superblock

ENTRY = struct.Struct("<QII")  # checksum, length, flags
USED = 0x1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give a trimmed slot's space back to the file system (best effort)."""
    _libc.fallocate(fd, _FALLOC_PUNCH, ctypes.c_longlong(offset), ctypes.c_longlong(length))


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a block to the disk now, without waiting (best effort).

    Left to the kernel, nothing is written until a tenth of memory is dirty, so the
    client's fsync found the whole file still to write: measured on cp of 256 MiB,
    0.4 s of fsync after 0.8 s of copy. Started here, the disk works during the copy.
    """
    _libc.sync_file_range(
        fd, ctypes.c_longlong(offset), ctypes.c_longlong(length), _SYNC_FILE_RANGE_WRITE
    )


@dataclass
class Counters:
    reads: int = 0
    writes: int = 0
    trims: int = 0
    repairs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    copies: int = 0  # writes that are a heal's copies


@dataclass
class Ranged:
    """A range read: the chunks touched, from ``start`` of a block of ``size`` bytes."""

    data: bytes
    start: int
    size: int
    checksum: int
    sums: bytes


class Store:
    def __init__(
        self,
        path: Path,
        server_id: int,
        volume: str | None = None,
        capacity: int | None = None,
        key: bytes | None = None,
    ) -> None:
        self.path = path
        self.server_id = server_id
        self.capacity = capacity
        self.superblock: Superblock | None = None
        self.table = Table(gen=0, states=())
        self.counters = Counters()
        self.healing: BeingHealed | None = None
        self.dirty: DirtySet | None = None
        self._index = bytearray()
        self._used = 0
        self._data_fd = -1
        self._index_fd = -1
        self._sums_fd = -1
        self._lock_fd = -1
        self.meta: Meta | None = None
        self.key: bytes | None = None  # the volume's: every connection must prove it
        try:
            self._open(volume)
        except StoreError:
            self.close()  # the directory is not left locked
            raise
        self.pinned = key is not None  # given with --key-file: a format may not change it
        if key is not None:
            self.adopt_key(key)
        if self.superblock is not None and self.key is None:
            self.close()
            raise StoreError(
                f"{self.path} holds volume {self.superblock.volume} but no key ({KEY_NAME}, "
                "made by an older mirrorfs): copy the volume's key there, or start the "
                "server with --key-file"
            )

    # -- opening and formatting -------------------------------------------------

    def _open(self, volume: str | None) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create data directory {self.path}: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK):
            raise StoreError(f"data directory {self.path} is not writable")
        self._lock()
        self._load_key()
        sb = read_superblock(self.path)
        if sb is None:
            return
        if sb.server != self.server_id:
            raise StoreError(
                f"data directory {self.path} belongs to server {sb.server} of volume "
                f"{sb.volume}, not to server {self.server_id}"
            )
        if volume is not None and sb.volume != volume:
            raise StoreError(
                f"data directory {self.path} belongs to volume {sb.volume}, not {volume}"
            )
        self.superblock = sb
        self._load()

    def _load_key(self) -> None:
        path = self.path / KEY_NAME
        try:
            self.key = read_key(path) if path.exists() else None
        except KeyFileError as exc:
            raise StoreError(str(exc)) from None

    def adopt_key(self, key: bytes) -> None:
        """Keep ``key`` (--key-file) in the directory: a directory with another is refused."""
        self._load_key()
        if self.key is not None and self.key != key:
            raise StoreError(
                f"{self.path / KEY_NAME} holds another key than the one given with --key-file"
            )
        if self.key is None:
            write_key(self.path / KEY_NAME, key)
        self.key = key

    def _lock(self) -> None:
        self._lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise StoreError(
                f"data directory {self.path} is in use by another mirrorfs-server (pid {holder})"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _load(self) -> None:
        assert self.superblock is not None
        flags = os.O_RDWR | os.O_CREAT
        self._data_fd = os.open(self.path / "slots.dat", flags, 0o644)
        self._index_fd = os.open(self.path / "slots.idx", flags, 0o644)
        if self.chunk:
            self._sums_fd = os.open(self.path / "slots.sum", flags, 0o644)
        size = os.fstat(self._index_fd).st_size
        size -= size % ENTRY.size
        self._index = bytearray(os.pread(self._index_fd, size, 0)) if size else bytearray()
        self._used = sum(
            1 for off in range(0, len(self._index), ENTRY.size) if self._index[off + 12] & USED
        )
        self.meta = Meta(self.path)
        self.dirty = DirtySet(self.path / "dirty.log")
        table_path = self.path / "table.json"
        if table_path.exists():
            raw = table_path.read_bytes().replace(b'"rebuilding"', b'"healing"')  # mirrorfs-1
            self.table = failures.normalized(msgspec.json.decode(raw, type=Table))
        else:
            self.table = failures.fresh(self.superblock.count)

    def _close_files(self) -> None:
        for fd in (self._data_fd, self._index_fd, self._sums_fd):
            if fd >= 0:
                os.close(fd)
        self._data_fd = self._index_fd = self._sums_fd = -1
        if self.meta is not None:
            self.meta.close()
            self.meta = None
        if self.dirty is not None:
            self.dirty.close()
            self.dirty = None

    def format(
        self, volume: str, count: int, block_size: int, key: bytes | None, chunk: int = WHOLE
    ) -> None:
        """Make this directory a fresh, empty member of ``volume`` (erases everything), with
        ``key`` (None: keep the one it has) and the checksum scheme ``chunk``."""
        if not valid_chunk(chunk, block_size):
            raise StoreError(f"chunk {chunk} does not fit block size {block_size}")
        if key is None and self.key is None:
            raise StoreError("a format must give a server without a key its volume's key")
        if self.pinned and key is not None and key != self.key:
            raise StoreError(
                f"server {self.server_id} was started with --key-file: format with "
                "--key-file naming the same key"
            )
        self._close_files()
        for name in (
            "slots.dat",
            "slots.idx",
            "slots.sum",
            "table.json",
            "superblock.json",
            "journal.log",
            "checkpoint.bin",
            "checkpoint.tmp",
            "lease.json",
            "dirty.log",
        ):
            (self.path / name).unlink(missing_ok=True)
        sb = Superblock(
            format_name(chunk), volume, self.server_id, count, block_size, new_ident(), chunk
        )
        if key is not None and key != self.key:
            write_key(self.path / KEY_NAME, key)
            self.key = key
        self.table = failures.fresh(count)
        atomic_write(self.path / "table.json", msgspec.json.encode(self.table))
        atomic_write(self.path / "superblock.json", msgspec.json.encode(sb))
        self.superblock = sb
        self._index = bytearray()
        self._used = 0
        self.healing = None
        self._load()

    @property
    def formatted(self) -> bool:
        return self.superblock is not None

    @property
    def block_size(self) -> int:
        assert self.superblock is not None
        return self.superblock.block_size

    @property
    def chunk(self) -> int:
        return self.superblock.chunk if self.superblock else WHOLE

    @property
    def _sums_record(self) -> int:
        """Bytes of the sums file per slot: room for the sums of a whole block."""
        return count(self.block_size, self.chunk) * SUM_SIZE

    @property
    def blocks_used(self) -> int:
        return self._used

    @property
    def bytes_on_disk(self) -> int:
        if self._data_fd < 0:
            return 0
        return os.fstat(self._data_fd).st_blocks * 512

    # -- the failure table --------------------------------------------------------

    @property
    def ident(self) -> str:
        return self.superblock.ident if self.superblock else ""

    def set_table(self, table: Table) -> bool:
        """Adopt a newer table; an older or equal generation is ignored."""
        if table.gen <= self.table.gen:
            return False
        self.table = failures.normalized(table)
        atomic_write(self.path / "table.json", msgspec.json.encode(self.table))
        states = self.table.states
        if self.healing is not None and states[self.server_id] == State.ALIVE:
            self.healing = None  # healed: no more copies to tell apart
        if states[self.server_id ^ 1] == State.ALIVE and self.dirty and self.dirty.slots:
            self.dirty.clear()  # the mirror has all of it again
        return True

    def begin_heal(self, healer: str, total: int) -> None:
        """From now on, a normal write or trim of a slot wins over any copy of it.

        The metadata is dropped too: the healer or the mounted client sends it anew.
        """
        if self.healing is None:
            self.healing = BeingHealed(healer, total)
            assert self.meta is not None
            self.meta.wipe()
        else:
            self.healing = self.healing.takeover(healer, total)

    def _mirror_out(self) -> bool:
        states = self.table.states
        return bool(states) and states[self.server_id ^ 1] in (State.FAILED, State.STALE)

    # -- slots --------------------------------------------------------------------

    def _entry(self, slot: int) -> tuple[int, int, int]:
        off = slot * ENTRY.size
        if off + ENTRY.size > len(self._index):
            return 0, 0, 0
        return ENTRY.unpack_from(self._index, off)

    def _set_entry(self, slot: int, checksum: int, length: int, flags: int) -> None:
        off = slot * ENTRY.size
        if off + ENTRY.size > len(self._index):
            self._index.extend(bytes(off + ENTRY.size - len(self._index)))
        was_used = self._index[off + 12] & USED
        ENTRY.pack_into(self._index, off, checksum, length, flags)
        os.pwrite(self._index_fd, self._index[off : off + ENTRY.size], off)
        self._used += bool(flags & USED) - bool(was_used)

    def _skip_copy(self, slot: int, flags: Flag) -> bool:
        """Whether this write is stale (a heal's copy of a slot written anew since); and a
        normal change while the mirror is out (by our table or the writer's) is noted for
        its heal. A copy to a server not being healed (it restarted) is refused."""
        copy = bool(flags & Flag.COPY)
        if copy and self.healing is None:
            raise NotHealing(f"server {self.server_id} is not being healed (it restarted?)")
        if not copy and self.dirty is not None and (flags & Flag.DEGRADED or self._mirror_out()):
            self.dirty.add(slot)
        return self.healing is not None and self.healing.skip(slot, copy)

    def capacity_slots(self) -> int:
        """How many slots this server can hold: its --capacity, else what its disk allows."""
        if not self.formatted:
            return 0
        if self.capacity is not None:
            return self.capacity // self.block_size
        vfs = os.statvfs(self.path)
        free = vfs.f_bavail * vfs.f_frsize
        return self._used + free // self.block_size

    def read(self, slot: int) -> tuple[bytes, int] | None:
        checksum, length, flags = self._entry(slot)
        if not flags & USED:
            return None
        data = os.pread(self._data_fd, length, slot * self.block_size)
        if len(data) < length:  # the slot file was cut short behind our back
            data += bytes(length - len(data))
        self.counters.reads += 1
        self.counters.bytes_read += length
        return data, checksum

    def read_range(self, slot: int, offset: int, length: int) -> Ranged | None:
        """The chunks bytes [offset, offset + length) of a slot touch, and its sums (a
        volume with chunk sums); None: nothing was written there."""
        checksum, size, flags = self._entry(slot)
        if not flags & USED:
            return None
        chunk = self.chunk
        assert chunk
        want = count(size, chunk) * SUM_SIZE
        sums = os.pread(self._sums_fd, want, slot * self._sums_record)
        sums += bytes(want - len(sums))  # cut short: the client finds them wrong
        start, end = covering(offset, length, size, chunk)
        data = os.pread(self._data_fd, end - start, slot * self.block_size + start)
        data += bytes(end - start - len(data))
        self.counters.reads += 1
        self.counters.bytes_read += len(data)
        return Ranged(data, start, size, checksum, sums)

    def write(
        self,
        slot: int,
        data: bytes | bytearray,
        checksum: int,
        flags: Flag,
        sums: bytes | None = None,
    ) -> bool:
        """Write a slot; on a volume with chunk sums also its ``sums`` (computed here when
        the caller has not)."""
        if (slot + 1) * ENTRY.size > len(self._index) and slot >= self.capacity_slots():
            # checked before the slot table grows to reach it: a far slot costs memory
            raise StoreError(f"slot {slot} is beyond this server's capacity")
        if self._skip_copy(slot, flags):
            return False
        try:
            os.pwrite(self._data_fd, data, slot * self.block_size)
            start_writeback(self._data_fd, slot * self.block_size, len(data))
            if self.chunk:
                sums = chunk_sums(data, self.chunk) if sums is None else sums
                os.pwrite(self._sums_fd, sums, slot * self._sums_record)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreError("no space left on the server's disk") from None
            raise
        self._set_entry(slot, checksum, len(data), USED)
        self.counters.writes += 1
        self.counters.bytes_written += len(data)
        self.counters.repairs += bool(flags & Flag.REPAIR)
        self.counters.copies += bool(flags & Flag.COPY)
        return True

    def trim(self, slot: int, flags: Flag) -> bool:
        if self._skip_copy(slot, flags):
            return False
        if self._entry(slot)[2] & USED:
            self._set_entry(slot, 0, 0, 0)
            punch_hole(self._data_fd, slot * self.block_size, self.block_size)
        self.counters.trims += 1
        return True

    def list_dirty(self, start: int, limit: int) -> tuple[list[int], int | None]:
        return self.dirty.page(start, limit) if self.dirty else ([], None)

    def list_used(self, start: int, limit: int) -> tuple[list[int], int | None]:
        """Used slots from ``start``, at most ``limit``, and where to continue (None: done)."""
        out: list[int] = []
        total = len(self._index) // ENTRY.size
        slot = max(start, 0)
        while slot < total and len(out) < limit:
            if self._index[slot * ENTRY.size + 12] & USED:
                out.append(slot)
            slot += 1
        return out, (slot if slot < total else None)

    def sync(self) -> None:
        for fd in (self._data_fd, self._index_fd, self._sums_fd):
            if fd >= 0:
                os.fdatasync(fd)
        if self.meta is not None:
            self.meta.sync()
        if self.dirty is not None:
            self.dirty.sync()

    def close(self) -> None:
        if self.formatted:
            self.sync()
        self._close_files()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
