"""mirrorfs-server: one block server.

Serves slot reads and writes, the failure table and statistics over the
mirrorfs protocol. Requests on one connection are applied in arrival order
(block I/O is a pwrite into the page cache, done inline); replies are matched
by request id, so a slow fsync does not hold up other replies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from mirrorfuse.core.layout import MAX_SERVERS, MIN_SERVERS
from mirrorfuse.wire.addresses import MAX_PORT, MIN_PORT
from mirrorfuse.wire.errors import UsageError
from mirrorfuse.wire.frames import (
    MAX_PAYLOAD,
    BadRequest,
    Flag,
    Frame,
    FrameServer,
    Msg,
    encode,
    encode_error,
    need,
)
from mirrorfuse.wire.sizes import parse_size
from servers.block.meta import Meta, MetaError
from servers.block.store import Store, StoreError

STATES = ("alive", "failed", "rebuilding")
LIST_LIMIT = 65536


class Refused(Exception):
    """A request the server understands but will not carry out (error reply with a code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class BlockServer:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.handlers: dict[int, Callable[[Frame], tuple[dict[str, Any], bytes]]] = {
            Msg.HELLO: self.hello,
            Msg.STAT: self.stat,
            Msg.FORMAT: self.format,
            Msg.READ: self.read,
            Msg.WRITE: self.write,
            Msg.TRIM: self.trim,
            Msg.LIST: self.list,
            Msg.GET_TABLE: self.get_table,
            Msg.SET_TABLE: self.set_table,
            Msg.REBUILD_BEGIN: self.rebuild_begin,
            Msg.META_INFO: self.meta_info,
            Msg.LEASE: self.take_lease,
            Msg.JOURNAL_APPEND: self.journal_append,
            Msg.JOURNAL_READ: self.journal_read,
            Msg.CHECKPOINT_PUT: self.checkpoint_put,
            Msg.CHECKPOINT_GET: self.checkpoint_get,
        }
        # The connection of the mounted client holding the lease: while it is
        # open, the mount is alive and a second mount is refused.
        self.lease_conn: object | None = None
        self.current_conn: object | None = None

    # -- helpers ------------------------------------------------------------------

    def _formatted(self) -> Store:
        if not self.store.formatted:
            raise Refused("UNFORMATTED", f"server {self.store.server_id} is not formatted")
        return self.store

    def _slot(self, body: dict[str, Any]) -> int:
        slot = need(body, "slot", int)
        if not 0 <= slot < (1 << 40):
            raise BadRequest(f"slot {slot} out of range")
        return slot

    def _check_gen(self, body: dict[str, Any]) -> None:
        """Fence writers whose failure table is older than ours: they may skip a replica.

        Writers that say which mount epoch they act for are fenced by it too:
        a client that lost its lease to a newer mount must not change anything.
        """
        gen = need(body, "gen", int)
        if gen < self.store.table.gen:
            raise Refused("STALE", f"failure table generation {gen} < {self.store.table.gen}")
        if "epoch" in body:
            self._meta().check_epoch(need(body, "epoch", int))

    def _meta(self) -> Meta:
        meta = self._formatted().meta
        assert meta is not None
        return meta

    def identity(self) -> dict[str, Any]:
        sb = self.store.superblock or {}
        return {
            "server": self.store.server_id,
            "pid": os.getpid(),
            "formatted": self.store.formatted,
            "volume": sb.get("volume"),
            "count": sb.get("count"),
            "block_size": sb.get("block_size"),
            "gen": self.store.table.gen,
        }

    # -- handlers -----------------------------------------------------------------

    def hello(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        volume = frame.body.get("volume")
        if (
            volume is not None
            and self.store.formatted
            and volume != self.store.superblock["volume"]
        ):
            raise Refused(
                "WRONG_VOLUME",
                f"server {self.store.server_id} belongs to volume "
                f"{self.store.superblock['volume']}, not {volume}",
            )
        return self.identity(), b""

    def stat(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        c = self.store.counters
        body = self.identity()
        body.update(
            table=self.store.table.as_dict() if self.store.formatted else None,
            blocks=self.store.blocks_used,
            bytes=self.store.bytes_on_disk,
            reads=c.reads,
            writes=c.writes,
            trims=c.trims,
            repairs=c.repairs,
            bytes_read=c.bytes_read,
            bytes_written=c.bytes_written,
            rebuilding=self.store.rebuilding,
            **self.store.space(),
        )
        return body, b""

    def format(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        volume = need(frame.body, "volume", str)
        server = need(frame.body, "server", int)
        count = need(frame.body, "count", int)
        block_size = need(frame.body, "block_size", int)
        force = bool(frame.body.get("force", False))
        if server != self.store.server_id:
            raise Refused(
                "WRONG_SERVER", f"this is server {self.store.server_id}, not server {server}"
            )
        if not MIN_SERVERS <= count <= MAX_SERVERS or count % 2 or server >= count:
            raise BadRequest(f"bad server count {count}")
        if block_size < 4096 or block_size > (4 << 20) or block_size & (block_size - 1):
            raise BadRequest(f"bad block size {block_size}")
        if self.store.formatted and not force:
            raise Refused(
                "FORMATTED",
                f"server {server} already holds volume {self.store.superblock['volume']} "
                f"({self.store.blocks_used} blocks)",
            )
        self.store.format(volume, count, block_size)
        return self.identity(), b""

    def read(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        store = self._formatted()
        found = store.read(self._slot(frame.body))
        if found is None:
            return {"absent": True, "gen": store.table.gen}, b""
        data, checksum = found
        return {"checksum": checksum, "gen": store.table.gen}, data

    def write(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        store = self._formatted()
        slot = self._slot(frame.body)
        checksum = need(frame.body, "checksum", int)
        self._check_gen(frame.body)
        if len(frame.payload) > store.block_size:
            raise BadRequest(f"{len(frame.payload)} bytes exceed the block size {store.block_size}")
        if xxhash.xxh3_64_intdigest(frame.payload) != checksum:
            raise Refused("CHECKSUM", "block data does not match its checksum")
        try:
            applied = store.write(
                slot,
                frame.payload,
                checksum,
                bool(frame.flags & Flag.COPY),
                bool(frame.flags & Flag.REPAIR),
            )
        except StoreError as exc:
            raise Refused("ENOSPC", str(exc)) from None
        return {"applied": applied, "gen": store.table.gen}, b""

    def trim(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        store = self._formatted()
        slot = self._slot(frame.body)
        self._check_gen(frame.body)
        applied = store.trim(slot, bool(frame.flags & Flag.COPY))
        return {"applied": applied, "gen": store.table.gen}, b""

    def list(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        store = self._formatted()
        start = need(frame.body, "start", int)
        limit = min(max(need(frame.body, "limit", int), 1), LIST_LIMIT)
        slots, nxt = store.list_used(start, limit)
        return {"slots": slots, "next": nxt, "gen": store.table.gen}, b""

    def get_table(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        return self._formatted().table.as_dict(), b""

    def set_table(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        store = self._formatted()
        gen = need(frame.body, "gen", int)
        if "epoch" in frame.body:
            self._meta().check_epoch(need(frame.body, "epoch", int))
        states = need(frame.body, "states", list)
        if len(states) != store.superblock["count"] or any(s not in STATES for s in states):
            raise BadRequest("table must give one known state per server")
        accepted = store.set_table(gen, states)
        return {"accepted": accepted, **store.table.as_dict()}, b""

    def meta_info(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        info = self._meta().info()
        info["holder_active"] = self.lease_conn is not None
        info["gen"] = self.store.table.gen
        return info, b""

    def take_lease(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        meta = self._meta()
        epoch = need(frame.body, "epoch", int)
        holder = need(frame.body, "holder", dict)
        force = bool(frame.body.get("force", False))
        same = holder.get("id") == meta.lease.holder.get("id")
        held_elsewhere = self.lease_conn is not None and self.lease_conn is not self.current_conn
        if held_elsewhere and not force and not same:
            raise Refused("LEASED", "the volume is mounted by another client")
        meta.take_lease(epoch, holder)
        self.lease_conn = self.current_conn
        return meta.info(), b""

    def journal_append(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        meta = self._meta()
        self._check_gen(frame.body)
        epoch = need(frame.body, "epoch", int)
        meta.check_epoch(epoch)
        applied = meta.append(
            need(frame.body, "first", int), need(frame.body, "count", int), epoch, frame.payload
        )
        return {"applied": applied, "last": meta.last_seq, "gen": self.store.table.gen}, b""

    def journal_read(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        meta = self._meta()
        max_bytes = min(max(need(frame.body, "max_bytes", int), 1), MAX_PAYLOAD // 2)
        data, nxt = meta.read(need(frame.body, "from", int), max_bytes)
        return {"next": nxt, "last": meta.last_seq, "checkpoint_seq": meta.checkpoint_seq}, data

    def checkpoint_put(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        meta = self._meta()
        if "epoch" in frame.body or "gen" in frame.body:
            self._check_gen(frame.body)
        done = meta.put_checkpoint(
            need(frame.body, "seq", int),
            need(frame.body, "offset", int),
            need(frame.body, "total", int),
            frame.payload,
            bool(frame.body.get("final")),
        )
        return {"done": done, "last": meta.last_seq}, b""

    def checkpoint_get(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        length = min(max(need(frame.body, "length", int), 1), MAX_PAYLOAD // 2)
        seq, total, crc, chunk = self._meta().get_checkpoint(
            need(frame.body, "offset", int), length
        )
        return {"seq": seq, "total": total, "crc": crc}, chunk

    def rebuild_begin(self, frame: Frame) -> tuple[dict[str, Any], bytes]:
        self._formatted().begin_rebuild()
        return {"gen": self.store.table.gen}, b""

    # -- dispatch -----------------------------------------------------------------

    def handle(self, frame: Frame) -> list[bytes]:
        """Apply one request and frame its reply (an error reply for anything refused)."""
        if frame.is_reply:
            return encode_error(frame.req_id, frame.type, "BAD_REQUEST", "unexpected reply frame")
        if frame.defect:
            return encode_error(frame.req_id, frame.type, "BAD_REQUEST", frame.defect)
        handler = self.handlers.get(frame.type)
        if handler is None:
            return encode_error(
                frame.req_id, frame.type, "UNKNOWN_TYPE", f"unknown message type {frame.type}"
            )
        try:
            body, payload = handler(frame)
        except BadRequest as exc:
            return encode_error(frame.req_id, frame.type, "BAD_REQUEST", str(exc))
        except Refused as exc:
            return encode_error(frame.req_id, frame.type, exc.code, str(exc))
        except MetaError as exc:
            return encode(
                frame.type,
                frame.req_id,
                {"code": exc.code, "msg": str(exc), **exc.extra},
                flags=Flag.REPLY | Flag.ERROR,
            )
        except OSError as exc:
            print(f"mirrorfs-server: I/O error: {exc}", file=sys.stderr, flush=True)
            return encode_error(frame.req_id, frame.type, "EIO", f"I/O error: {exc.strerror}")
        return encode(frame.type, frame.req_id, body, payload, Flag.REPLY)


class Connection(FrameServer):
    def __init__(self, server: BlockServer) -> None:
        super().__init__()
        self.server = server

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server.lease_conn is self:
            self.server.lease_conn = None

    def on_frame(self, frame: Frame) -> None:
        if frame.type == Msg.SYNC and not frame.is_reply:
            asyncio.ensure_future(self._sync(frame.req_id))
            return
        self.server.current_conn = self
        self.send(self.server.handle(frame))

    async def _sync(self, req_id: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.server.store.sync)
            out = encode(Msg.SYNC, req_id, {"gen": self.server.store.table.gen}, flags=Flag.REPLY)
        except OSError as exc:
            out = encode_error(req_id, Msg.SYNC, "EIO", f"fsync failed: {exc.strerror}")
        self.send(out)


def port_arg(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not MIN_PORT <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"port {port} is outside {MIN_PORT}-{MAX_PORT}")
    return port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mirrorfs-server", description="Run one mirrorfs block server."
    )
    p.add_argument("--id", type=int, required=True, help="server id (0..N-1); 2k and 2k+1 mirror")
    p.add_argument("--port", type=port_arg, required=True, help="TCP port (1024-65535)")
    p.add_argument("--data", type=Path, required=True, help="data directory of this server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--volume", help="refuse a data directory of any other volume id")
    p.add_argument(
        "--capacity", help="most data this server may hold, e.g. 64M or 10G (default: its disk)"
    )
    args = p.parse_args(argv)
    if not 0 <= args.id < MAX_SERVERS:
        p.error(f"argument --id: {args.id} is outside 0-{MAX_SERVERS - 1}")
    if args.capacity is not None:
        try:
            args.capacity = parse_size(args.capacity)
        except UsageError as exc:
            p.error(f"argument --capacity: {exc}")
    return args


async def serve(args: argparse.Namespace, store: Store) -> int:
    loop = asyncio.get_running_loop()
    server = BlockServer(store)
    try:
        listener = await loop.create_server(
            lambda: Connection(server), args.host, args.port, reuse_address=True
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            msg = f"port {args.port} on {args.host} is already in use"
        else:
            msg = f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        print(f"mirrorfs-server: error: {msg}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state = f"volume {store.superblock['volume']}" if store.formatted else "unformatted"
    print(
        f"mirrorfs-server {args.id} listening on {args.host}:{args.port} "
        f"(pid {os.getpid()}, data {args.data}, {state})",
        flush=True,
    )
    await stop.wait()
    listener.close()
    store.close()
    print(f"mirrorfs-server {args.id} stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        store = Store(args.data, args.id, args.volume, args.capacity)
    except StoreError as exc:
        print(f"mirrorfs-server: error: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(serve(args, store))


if __name__ == "__main__":
    sys.exit(main())
