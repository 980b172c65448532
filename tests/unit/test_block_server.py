"""A block server in this process: what waits on the disk does not stop the others."""

from __future__ import annotations

import asyncio
import threading

from mirrorfuse.client.blocking import run_async
from mirrorfuse.client.connection import Connection
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import new_key
from mirrorfuse.wire.messages import CheckpointPut, MetaInfo, Read, Sync
from servers.block.server import listen
from servers.block.store import Store

KEY = new_key()


def test_a_slow_fsync_holds_up_neither_block_reads_nor_the_loop(tmp_path):
    store = Store(tmp_path / "d", 0)
    store.format("v", 4, 4096, KEY)
    release = threading.Event()
    synced = threading.Event()

    def slow_sync() -> None:  # a disk that takes its time
        release.wait(10)
        synced.set()

    store.sync = slow_sync  # type: ignore[method-assign]

    async def go() -> tuple[bool, bool, bool]:
        server = await listen(store, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = await Connection.open(0, Address("127.0.0.1", port), 5.0, keys=lambda _: KEY)
        try:
            sync = asyncio.ensure_future(conn.call(Sync()))
            await asyncio.sleep(0.05)
            await conn.call(Read(slot=3))  # answered while the fsync runs
            read_during_sync = not synced.is_set()
            meta = asyncio.ensure_future(conn.call(MetaInfo()))  # metadata: after the sync
            await asyncio.sleep(0.05)
            meta_waited = not meta.done()
            release.set()
            await sync
            await meta
            return read_during_sync, meta_waited, synced.is_set()
        finally:
            conn.close()
            server.close()

    assert run_async(go()) == (True, True, True)


def test_a_checkpoint_being_written_out_does_not_stop_block_reads(tmp_path):
    store = Store(tmp_path / "d", 0)
    store.format("v", 4, 4096, KEY)
    assert store.meta is not None
    release = threading.Event()
    real = store.meta.put_checkpoint

    def slow_put(*args: object) -> bool:  # its fsync and rename take their time
        release.wait(10)
        return real(*args)  # type: ignore[arg-type]

    store.meta.put_checkpoint = slow_put  # type: ignore[method-assign]

    async def go() -> bool:
        server = await listen(store, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = await Connection.open(0, Address("127.0.0.1", port), 5.0, keys=lambda _: KEY)
        try:
            put = CheckpointPut(seq=0, offset=0, total=3, final=True, gen=1, epoch=0)
            pending = asyncio.ensure_future(conn.call(put, b"abc"))
            await asyncio.sleep(0.05)
            await asyncio.wait_for(conn.call(Read(slot=1)), 2.0)
            answered_during = not pending.done()
            release.set()
            assert (await pending).body.done
            return answered_during
        finally:
            release.set()
            conn.close()
            server.close()

    assert run_async(go())
