"""A server's copy of the metadata: journal, checkpoint and mount lease.

The journal is an append-only file of entries, each a batch of records the
client numbered ``first .. first+count-1`` and checksummed (CRC-32). Appends
must be contiguous, so a server that missed a batch says so (GAP) instead of
silently holding a journal with a hole. A checkpoint at sequence S replaces
the journal: the namespace as it was after record S. The server never
interprets records; replaying them is the client's job.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mirrorfuse.wire.messages import Holder
from mirrorfuse.wire.records import CHECKPOINT_HEADER, JOURNAL_ENTRY

from ..files import atomic_write, replace_durably
from ..net import Refused


@dataclass
class Entry:
    first: int
    count: int
    offset: int  # of the header in journal.log
    length: int  # of the data

    @property
    def last(self) -> int:
        return self.first + self.count - 1


class LeaseFile(msgspec.Struct):
    epoch: int = 0
    holder: Holder = msgspec.field(default_factory=Holder)


log = logging.getLogger("mirrorfs-server")


class Meta:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lease = LeaseFile()
        self.checkpoint_seq = 0
        self.entries: list[Entry] = []
        self._fd = -1
        self._ckpt_tmp: Path = path / "checkpoint.tmp"
        self.load()

    # -- loading --------------------------------------------------------------------

    def load(self) -> None:
        lease = self.path / "lease.json"
        if lease.exists():
            self.lease = msgspec.json.decode(lease.read_bytes(), type=LeaseFile)
        ckpt = self.path / "checkpoint.bin"
        self.checkpoint_seq = 0
        if ckpt.exists():
            seq = self._whole_checkpoint(ckpt)
            if seq is None:  # never offered: the client takes another server's copy
                ckpt.replace(self.path / "checkpoint.damaged")
                log.warning("%s is damaged: set aside as checkpoint.damaged", ckpt)
            else:
                self.checkpoint_seq = seq
        self._open_journal()

    @staticmethod
    def _whole_checkpoint(path: Path) -> int | None:
        """Its sequence number, or None when it is cut short or its checksum is wrong."""
        with open(path, "rb") as f:
            head = f.read(CHECKPOINT_HEADER.size)
            if len(head) < CHECKPOINT_HEADER.size:
                return None
            seq, total, crc = CHECKPOINT_HEADER.unpack(head)
            body = f.read(total + 1)
        return seq if len(body) == total and zlib.crc32(body) == crc else None

    def _open_journal(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path / "journal.log", os.O_RDWR | os.O_CREAT, 0o644)
        self.entries = []
        size = os.fstat(self._fd).st_size
        pos = 0
        expect = self.checkpoint_seq + 1
        while pos + JOURNAL_ENTRY.size <= size:
            head = os.pread(self._fd, JOURNAL_ENTRY.size, pos)
            first, count, length, _epoch, crc = JOURNAL_ENTRY.unpack(head)
            data = os.pread(self._fd, length, pos + JOURNAL_ENTRY.size)
            if len(data) < length or zlib.crc32(data) != crc or count == 0:
                break  # a torn tail: the append never completed
            if first + count - 1 >= expect:
                if first != expect:
                    break
                self.entries.append(Entry(first, count, pos, length))
                expect = first + count
            pos += JOURNAL_ENTRY.size + length
        if pos != size:
            os.ftruncate(self._fd, pos)

    @property
    def last_seq(self) -> int:
        return self.entries[-1].last if self.entries else self.checkpoint_seq

    # -- lease ----------------------------------------------------------------------

    def check_epoch(self, epoch: int) -> None:
        if epoch < self.lease.epoch:
            raise Refused(
                "FENCED",
                f"mount epoch {epoch} is older than {self.lease.epoch}: another client "
                "took over the volume",
            )

    def take_lease(self, epoch: int, holder: Holder) -> None:
        if epoch < self.lease.epoch or (
            epoch == self.lease.epoch and holder.id != self.lease.holder.id
        ):
            raise Refused("FENCED", f"lease epoch {epoch} is not newer than {self.lease.epoch}")
        if epoch != self.lease.epoch:
            self.lease = LeaseFile(epoch, holder)
            atomic_write(self.path / "lease.json", msgspec.json.encode(self.lease))

    # -- journal --------------------------------------------------------------------

    def append(self, first: int, count: int, epoch: int, data: bytes | bytearray) -> bool:
        """Append a batch; False when it is already held (a retry). Raises GAP on a hole."""
        last = self.last_seq
        if first + count - 1 <= last:
            return False
        if first != last + 1:
            raise Refused("GAP", f"journal ends at {last}, batch starts at {first}", last=last)
        offset = os.lseek(self._fd, 0, os.SEEK_END)
        head = JOURNAL_ENTRY.pack(first, count, len(data), epoch, zlib.crc32(data))
        os.pwrite(self._fd, head + data, offset)
        self.entries.append(Entry(first, count, offset, len(data)))
        return True

    def read(self, from_seq: int, max_bytes: int) -> tuple[bytes, int | None]:
        """Whole entries holding records >= from_seq, up to max_bytes (at least one entry)."""
        out = bytearray()
        for i, e in enumerate(self.entries):
            if e.last < from_seq:
                continue
            if out and len(out) + JOURNAL_ENTRY.size + e.length > max_bytes:
                return bytes(out), e.first
            out += os.pread(self._fd, JOURNAL_ENTRY.size + e.length, e.offset)
            if i == len(self.entries) - 1:
                return bytes(out), None
        return bytes(out), None

    def sync(self) -> None:
        os.fdatasync(self._fd)

    # -- checkpoints ----------------------------------------------------------------

    def put_checkpoint(
        self, seq: int, offset: int, total: int, data: bytes | bytearray, final: bool
    ) -> bool:
        """Receive a chunk of a checkpoint; on the final one it replaces journal and old one."""
        if seq < self.last_seq:
            raise Refused(
                "STALE_CHECKPOINT", f"checkpoint {seq} is older than journal end {self.last_seq}"
            )
        mode = "r+b" if offset and self._ckpt_tmp.exists() else "wb"
        with open(self._ckpt_tmp, mode) as f:
            if offset == 0:
                f.write(CHECKPOINT_HEADER.pack(seq, total, 0))
            f.seek(CHECKPOINT_HEADER.size + offset)
            f.write(data)
        if not final:
            return False
        with open(self._ckpt_tmp, "r+b") as f:
            f.seek(CHECKPOINT_HEADER.size)
            body = f.read()
            if len(body) != total:
                raise Refused("BAD_REQUEST", f"checkpoint has {len(body)} bytes, not {total}")
            f.seek(0)
            f.write(CHECKPOINT_HEADER.pack(seq, total, zlib.crc32(body)))
            f.flush()
            os.fsync(f.fileno())
        replace_durably(self._ckpt_tmp, self.path / "checkpoint.bin")
        self.checkpoint_seq = seq
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.entries = []
        return True

    def get_checkpoint(self, offset: int, length: int) -> tuple[int, int, int, bytes]:
        """(seq, total length, crc32, chunk) of the current checkpoint; seq 0 when none."""
        path = self.path / "checkpoint.bin"
        if not path.exists():
            return 0, 0, 0, b""
        with open(path, "rb") as f:
            seq, total, crc = CHECKPOINT_HEADER.unpack(f.read(CHECKPOINT_HEADER.size))
            f.seek(CHECKPOINT_HEADER.size + offset)
            return seq, total, crc, f.read(min(length, max(total - offset, 0)))

    def wipe(self) -> None:
        """Forget journal and checkpoint (a rebuild target gets them anew)."""
        (self.path / "checkpoint.bin").unlink(missing_ok=True)
        self.checkpoint_seq = 0
        os.ftruncate(self._fd, 0)
        self.entries = []

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
