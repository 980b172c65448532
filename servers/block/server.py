"""One block server: slot reads and writes, the failure table, the metadata, statistics.

Block I/O is a pread or pwrite into the page cache, done inline as requests
arrive. The metadata requests (journal, checkpoint, lease), syncs and
format go through one queue, in arrival order, and those that wait on the
disk (fsync, a whole checkpoint) run in a worker thread: a long fsync never
stops the event loop, so it cannot outlast a client's timeout and get a
healthy server marked failed. Replies are matched by request id, so a slow
one holds up no other. Every request is decoded into its typed message
first: a malformed one gets an error reply naming the field, and the
connection goes on.
"""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
from typing import Any

import msgspec

from mirrorfuse.core import failures
from mirrorfuse.core.stats import OpStats
from mirrorfuse.wire.addresses import MAX_SERVERS, MIN_SERVERS
from mirrorfuse.wire.auth import ServerHandshake
from mirrorfuse.wire.checksums import (
    WHOLE,
    block_checksum,
    chunk_sums,
    default_chunk,
    sums_checksum,
    valid_chunk,
)
from mirrorfuse.wire.frames import MAX_PAYLOAD, Flag, Frame, Msg
from mirrorfuse.wire.messages import (
    AppendReply,
    Applied,
    BadMessage,
    CheckpointGet,
    CheckpointGetReply,
    CheckpointPut,
    CheckpointPutReply,
    Format,
    GenReply,
    GetTable,
    HealBegin,
    Hello,
    Identity,
    JournalAppend,
    JournalRead,
    JournalReadReply,
    Lease,
    ListReply,
    ListSlots,
    MetaInfo,
    MetaInfoReply,
    Read,
    ReadReply,
    Request,
    SetTable,
    SetTableReply,
    Stat,
    StatReply,
    Sync,
    Table,
    Trim,
    Write,
)

from ..net import (
    Answer,
    FrameServer,
    Handler,
    Limits,
    ListenError,
    Out,
    Refused,
    dispatch,
    in_background,
)
from .healing import NotHealing, Refusal
from .meta import Meta
from .store import Store, StoreError

LIST_LIMIT = 65536
# in arrival order, one at a time; the second set in a worker thread
IN_ORDER = {
    Msg.FORMAT,
    Msg.SYNC,
    Msg.HEAL_BEGIN,
    Msg.META_INFO,
    Msg.LEASE,
    Msg.JOURNAL_APPEND,
    Msg.JOURNAL_READ,
    Msg.CHECKPOINT_PUT,
    Msg.CHECKPOINT_GET,
}
# what a connection that proved no key may ask of a server that has none
KEYLESS = {Msg.HELLO, Msg.STAT, Msg.FORMAT}
OFF_LOOP = {
    Msg.FORMAT,
    Msg.SYNC,
    Msg.LEASE,
    Msg.JOURNAL_READ,
    Msg.CHECKPOINT_PUT,
    Msg.CHECKPOINT_GET,
}


class BlockServer:
    def __init__(self, store: Store, binding: bytes = b"") -> None:
        self.store = store
        self.binding = binding  # the SHA-256 of its TLS certificate, when it has one
        self.limits = Limits()
        self.stats = OpStats()  # per message type: counts, bytes, latency (metrics)
        self.handlers: dict[type[Request[Any]], Handler] = {
            Hello: self.hello,
            Stat: self.stat,
            Format: self.format,
            Read: self.read,
            Write: self.write,
            Trim: self.trim,
            ListSlots: self.list_slots,
            GetTable: self.get_table,
            SetTable: self.set_table,
            HealBegin: self.heal_begin,
            MetaInfo: self.meta_info,
            Lease: self.take_lease,
            JournalAppend: self.journal_append,
            JournalRead: self.journal_read,
            CheckpointPut: self.checkpoint_put,
            CheckpointGet: self.checkpoint_get,
            Sync: self.sync,
        }
        # The connection of the mounted client holding the lease: while it is
        # open, the mount is alive and a second mount is refused.
        self.lease_conn: object | None = None
        self.in_order_conn: object | None = None  # whose request the queue is serving
        self.queue: asyncio.Queue[tuple[Connection, Frame]] = asyncio.Queue()

    # -- helpers ------------------------------------------------------------------

    def _formatted(self) -> Store:
        if not self.store.formatted:
            raise Refused("UNFORMATTED", f"server {self.store.server_id} is not formatted")
        return self.store

    def _meta(self) -> Meta:
        meta = self._formatted().meta
        assert meta is not None
        return meta

    def _check_gen(self, gen: int, epoch: int | None) -> None:
        """Fence writers whose failure table is older than ours: they may skip a replica.

        And every change names the mount epoch it acts for: a client without
        the lease, or that lost it to a newer mount, must not change anything.
        """
        if gen < self.store.table.gen:
            raise Refused("STALE", f"failure table generation {gen} < {self.store.table.gen}")
        self._check_epoch(epoch)

    def _check_epoch(self, epoch: int | None) -> None:
        if epoch is None:
            raise Refused("FENCED", "a change without a mount epoch: take the volume's lease")
        self._meta().check_epoch(epoch)

    def identity(self) -> Identity:
        sb = self.store.superblock
        return Identity(
            server=self.store.server_id,
            pid=os.getpid(),
            formatted=sb is not None,
            ident=self.store.ident,
            volume=sb.volume if sb else None,
            count=sb.count if sb else None,
            block_size=sb.block_size if sb else None,
            gen=self.store.table.gen,
            chunk=sb.chunk if sb else WHOLE,
        )

    # -- handlers -----------------------------------------------------------------

    def hello(self, req: Hello, payload: bytes | bytearray, flags: int) -> Answer:
        sb = self.store.superblock
        if req.volume is not None and sb is not None and req.volume != sb.volume:
            raise Refused(
                "WRONG_VOLUME",
                f"server {self.store.server_id} belongs to volume {sb.volume}, not {req.volume}",
            )
        return self.identity(), b""

    def stat(self, req: Stat, payload: bytes | bytearray, flags: int) -> Answer:
        c = self.store.counters
        healing = self.store.healing
        reply = StatReply(
            **msgspec.structs.asdict(self.identity()),
            table=self.store.table if self.store.formatted else None,
            blocks=self.store.blocks_used,
            bytes=self.store.bytes_on_disk,
            reads=c.reads,
            writes=c.writes,
            trims=c.trims,
            repairs=c.repairs,
            bytes_read=c.bytes_read,
            bytes_written=c.bytes_written,
            capacity_slots=self.store.capacity_slots(),
            dirty=len(self.store.dirty.slots) if self.store.dirty else 0,
            heal_total=healing.total if healing else 0,
            heal_done=healing.done if healing else 0,
            heal_seconds=healing.seconds if healing else 0.0,
        )
        return reply, b""

    def format(self, req: Format, payload: bytes | bytearray, flags: int) -> Answer:
        if req.server != self.store.server_id:
            raise Refused(
                "WRONG_SERVER", f"this is server {self.store.server_id}, not server {req.server}"
            )
        if not MIN_SERVERS <= req.count <= MAX_SERVERS or req.count % 2 or req.server >= req.count:
            raise BadMessage(f"bad server count {req.count}")
        bs = req.block_size
        if bs < 4096 or bs > (4 << 20) or bs & (bs - 1):
            raise BadMessage(f"bad block size {bs}")
        chunk = default_chunk(bs) if req.chunk is None else req.chunk
        if not valid_chunk(chunk, bs):
            raise BadMessage(f"bad chunk {chunk} for block size {bs}")
        sb = self.store.superblock
        if sb is not None and not req.force:
            raise Refused(
                "FORMATTED",
                f"server {req.server} already holds volume {sb.volume} "
                f"({self.store.blocks_used} blocks)",
            )
        try:
            self.store.format(req.volume, req.count, bs, req.key, chunk)
        except StoreError as exc:
            raise Refused("NO_KEY", str(exc)) from None
        asker = self.in_order_conn
        if isinstance(asker, Connection):
            asker.trusted = True  # it gave the key (to a server that had none)
        return self.identity(), b""

    def read(self, req: Read, payload: bytes | bytearray, flags: int) -> Answer:
        store = self._formatted()
        if store.chunk and (req.offset is not None or req.length is not None):
            offset = req.offset or 0
            length = store.block_size if req.length is None else req.length
            part = store.read_range(req.slot, offset, length)
            if part is None:
                return ReadReply(absent=True, gen=store.table.gen), b""
            reply = ReadReply(
                checksum=part.checksum,
                gen=store.table.gen,
                size=part.size,
                start=part.start,
                sums=part.sums,
            )
            return reply, part.data
        found = store.read(req.slot)  # a volume of whole-block checksums ignores a range
        if found is None:
            return ReadReply(absent=True, gen=store.table.gen), b""
        data, checksum = found
        return ReadReply(checksum=checksum, gen=store.table.gen), data

    def write(self, req: Write, payload: bytes | bytearray, flags: int) -> Answer:
        store = self._formatted()
        self._check_gen(req.gen, req.epoch)
        if len(payload) > store.block_size:
            raise BadMessage(f"{len(payload)} bytes exceed the block size {store.block_size}")
        sums = chunk_sums(payload, store.chunk) if store.chunk else None
        actual = block_checksum(payload, WHOLE) if sums is None else sums_checksum(sums)
        if actual != req.checksum:
            raise Refused("CHECKSUM", "block data does not match its checksum")
        try:
            applied = store.write(req.slot, payload, req.checksum, Flag(flags), sums)
        except NotHealing as exc:
            raise Refused("NOT_HEALING", str(exc)) from None
        except StoreError as exc:
            raise Refused("ENOSPC", str(exc)) from None
        return Applied(applied=applied, gen=store.table.gen), b""

    def trim(self, req: Trim, payload: bytes | bytearray, flags: int) -> Answer:
        store = self._formatted()
        self._check_gen(req.gen, req.epoch)
        try:
            applied = store.trim(req.slot, Flag(flags))
        except NotHealing as exc:
            raise Refused("NOT_HEALING", str(exc)) from None
        return Applied(applied=applied, gen=store.table.gen), b""

    def list_slots(self, req: ListSlots, payload: bytes | bytearray, flags: int) -> Answer:
        store = self._formatted()
        listing = store.list_dirty if req.dirty else store.list_used
        slots, nxt = listing(req.start, min(req.limit, LIST_LIMIT))
        return ListReply(slots=slots, next=nxt, gen=store.table.gen), b""

    def get_table(self, req: GetTable, payload: bytes | bytearray, flags: int) -> Answer:
        table: Table = self._formatted().table
        return table, b""

    def set_table(self, req: SetTable, payload: bytes | bytearray, flags: int) -> Answer:
        store = self._formatted()
        self._check_epoch(req.epoch)
        assert store.superblock is not None
        problem = failures.problem(req.table, store.superblock.count)
        if problem:
            raise BadMessage(f"not a failure table of this volume: {problem}")
        accepted = store.set_table(req.table)
        return SetTableReply(accepted=accepted, table=store.table), b""

    def _meta_info(self) -> MetaInfoReply:
        meta = self._meta()
        return MetaInfoReply(
            epoch=meta.lease.epoch,
            holder=meta.lease.holder,
            checkpoint_seq=meta.checkpoint_seq,
            last_seq=meta.last_seq,
            holder_active=self.lease_conn is not None,
            gen=self.store.table.gen,
        )

    def meta_info(self, req: MetaInfo, payload: bytes | bytearray, flags: int) -> Answer:
        return self._meta_info(), b""

    def take_lease(self, req: Lease, payload: bytes | bytearray, flags: int) -> Answer:
        meta = self._meta()
        same = req.holder.id == meta.lease.holder.id
        asker = self.in_order_conn
        held_elsewhere = self.lease_conn is not None and self.lease_conn is not asker
        if held_elsewhere and not req.force and not same:
            raise Refused("LEASED", "the volume is mounted by another client")
        meta.take_lease(req.epoch, req.holder)
        self.lease_conn = asker
        return self._meta_info(), b""

    def journal_append(self, req: JournalAppend, payload: bytes | bytearray, flags: int) -> Answer:
        meta = self._meta()
        self._check_gen(req.gen, req.epoch)
        applied = meta.append(req.first, req.count, req.epoch, payload)
        return AppendReply(applied=applied, last=meta.last_seq, gen=self.store.table.gen), b""

    def journal_read(self, req: JournalRead, payload: bytes | bytearray, flags: int) -> Answer:
        meta = self._meta()
        data, nxt = meta.read(req.start, min(req.max_bytes, MAX_PAYLOAD // 2))
        reply = JournalReadReply(next=nxt, last=meta.last_seq, checkpoint_seq=meta.checkpoint_seq)
        return reply, data

    def checkpoint_put(self, req: CheckpointPut, payload: bytes | bytearray, flags: int) -> Answer:
        meta = self._meta()
        if req.gen is not None:
            self._check_gen(req.gen, req.epoch)
        else:
            self._check_epoch(req.epoch)
        done = meta.put_checkpoint(req.seq, req.offset, req.total, payload, req.final)
        return CheckpointPutReply(done=done, last=meta.last_seq), b""

    def checkpoint_get(self, req: CheckpointGet, payload: bytes | bytearray, flags: int) -> Answer:
        length = min(req.length, MAX_PAYLOAD // 2)
        seq, total, crc, chunk = self._meta().get_checkpoint(req.offset, length)
        return CheckpointGetReply(seq=seq, total=total, crc=crc), chunk

    def sync(self, req: Sync, payload: bytes | bytearray, flags: int) -> Answer:
        try:
            self.store.sync()
        except OSError as exc:
            raise Refused("EIO", f"fsync failed: {exc.strerror}") from None
        return GenReply(gen=self.store.table.gen), b""

    def heal_begin(self, req: HealBegin, payload: bytes | bytearray, flags: int) -> Answer:
        try:
            self._formatted().begin_heal(req.healer, req.total)
        except Refusal as exc:
            raise Refused("HEALING", str(exc)) from None
        return GenReply(gen=self.store.table.gen), b""

    def handle(self, frame: Frame) -> Out:
        return dispatch(frame, self.handlers, self.stats)

    async def serve_in_order(self) -> None:
        """The queue of metadata requests: one at a time, the disk-bound ones off the loop."""
        loop = asyncio.get_running_loop()
        while True:
            conn, frame = await self.queue.get()
            self.in_order_conn = conn
            try:
                if frame.type in OFF_LOOP:
                    out = await loop.run_in_executor(None, self.handle, frame)
                else:
                    out = self.handle(frame)
                conn.send(out)
            finally:
                self.limits.release(frame.held)
                conn.queued -= 1
                if conn.queued < self.limits.queued:
                    conn.unhold("queue")

    def handshake(self) -> ServerHandshake:
        sb = self.store.superblock
        return ServerHandshake(self.store.key, sb.volume if sb else None, self.binding)


class Connection(FrameServer):
    def __init__(self, server: BlockServer) -> None:
        super().__init__(server.handshake, server.limits)
        self.server = server
        self.trusted = False  # formatted a server that had no key, giving it the key
        self.queued = 0  # of its frames in the server's in-order queue

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.server.lease_conn is self:
            self.server.lease_conn = None

    def _allowed(self, frame: Frame) -> bool:
        if self.authenticated or self.trusted:
            return True
        # proven nothing: a server without a key answers who it is, and takes a format
        return self.server.store.key is None and frame.type in KEYLESS

    def on_frame(self, frame: Frame) -> bool:
        if not self._allowed(frame):
            self.refuse("AUTH", "this connection has not proven the volume's key")
            return False
        if frame.type in IN_ORDER and not frame.is_reply:
            self.queued += 1
            if self.queued >= self.limits.queued:
                self.hold("queue")
            self.server.queue.put_nowait((self, frame))
            return True
        self.send(self.server.handle(frame))
        return False


async def listen(
    store: Store,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    binding: bytes = b"",
    server: BlockServer | None = None,
) -> asyncio.Server:
    """Serve ``server`` (a new one for ``store`` if not given) on host:port."""
    loop = asyncio.get_running_loop()
    server = server if server is not None else BlockServer(store, binding)
    in_background(server.serve_in_order())
    try:
        return await loop.create_server(
            lambda: Connection(server), host, port, reuse_address=True, ssl=tls
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"port {port} on {host} is already in use") from None
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
