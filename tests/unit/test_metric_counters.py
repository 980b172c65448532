"""Metrics as plain counters: the histogram's buckets, and a block server scraped in-process."""

from __future__ import annotations

import asyncio

import pytest
from helpers import free_ports
from scrape import scrape, value

from mirrorfuse.client.blocking import run_async
from mirrorfuse.client.connection import Connection
from mirrorfuse.core.stats import BUCKETS, OpStat, OpStats
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import new_key
from mirrorfuse.wire.checksums import block_checksum
from mirrorfuse.wire.errors import ServerError
from mirrorfuse.wire.messages import Read, Sync, Write
from servers import metrics
from servers.block.server import BlockServer, listen
from servers.block.store import Store

KEY = new_key()


def test_a_histogram_counts_each_time_at_or_below_its_bounds():
    st = OpStat()
    for s in (0.00005, 0.0001, 0.003, 0.003, 20.0):
        st.record(s, request_bytes=10, reply_bytes=1)
    buckets = dict(st.cumulative())
    assert buckets["0.0001"] == 2  # "le": 0.0001 itself is in
    assert buckets["0.0025"] == 2
    assert buckets["0.005"] == 4
    assert buckets[repr(BUCKETS[-1])] == 4
    assert buckets["+Inf"] == 5 == st.count
    assert (st.request_bytes, st.reply_bytes) == (50, 5)
    assert st.seconds == pytest.approx(20.00615)


def test_failures_are_counted_by_code_and_a_reader_adds_nothing():
    stats = OpStats()
    stats.failed("write", "EIO", 0.01)
    stats.failed("write", "EIO", 0.01)
    stats.failed("write", "ENOSPC", 0.01)
    assert stats.of("write").errors == 3 and stats.of("write").count == 3
    assert dict(stats.failure_items()) == {("write", "EIO"): 2, ("write", "ENOSPC"): 1}
    assert stats.get("read").count == 0
    assert "read" not in stats.ops


def test_a_block_server_reports_requests_bytes_failures_and_fsyncs(tmp_path):
    store = Store(tmp_path / "d", 0)
    store.format("v", 4, 4096, KEY)
    server = BlockServer(store)
    (port,) = free_ports(1)
    httpd = metrics.serve(Address("127.0.0.1", port), metrics.block_server(server))
    data = bytes(range(256)) * 16

    async def go() -> str:
        listener = await listen(store, "127.0.0.1", 0, server=server)
        addr = Address("127.0.0.1", listener.sockets[0].getsockname()[1])
        conn = await Connection.open(0, addr, 5.0, keys=lambda _: KEY)
        try:
            csum = block_checksum(data, store.chunk)
            await conn.call(Write(slot=3, checksum=csum, gen=100, epoch=0), data)
            try:
                await conn.call(Write(slot=4, checksum=csum + 1, gen=100, epoch=0), data)
            except ServerError as exc:
                code = exc.code
            reply = await conn.call(Read(slot=3))
            assert bytes(reply.payload) == data
            await conn.call(Sync())
            await asyncio.sleep(0)
            return code
        finally:
            conn.close()
            listener.close()

    try:
        assert run_async(go()) == "CHECKSUM"
        got = scrape(port)
    finally:
        httpd.stop()
        store.close()
    assert value(got, "mirrorfs_server_requests_total", op="write") == 2
    assert value(got, "mirrorfs_server_request_errors_total", op="write", code="CHECKSUM") == 1
    assert value(got, "mirrorfs_server_request_bytes_total", op="write") == len(data)
    assert value(got, "mirrorfs_server_reply_bytes_total", op="read") == len(data)
    assert value(got, "mirrorfs_server_request_seconds_count", op="read") == 1
    assert value(got, "mirrorfs_server_request_seconds_bucket", op="read", le="+Inf") == 1
    assert value(got, "mirrorfs_server_block_writes_total") == 1
    assert value(got, "mirrorfs_server_written_bytes_total") == len(data)
    assert value(got, "mirrorfs_server_fsync_seconds_count") == 1
    assert value(got, "mirrorfs_server_blocks") == 1
    assert value(got, "mirrorfs_server_info", server="0", volume="v") == 1


def test_a_metrics_port_in_use_is_one_clear_error():
    (port,) = free_ports(1)
    first = metrics.serve(Address("127.0.0.1", port), lambda: iter(()))
    try:
        with pytest.raises(
            metrics.ListenError, match=f"metrics port {port} on 127.0.0.1 is in use"
        ):
            metrics.serve(Address("127.0.0.1", port), lambda: iter(()))
    finally:
        first.stop()
    with pytest.raises(metrics.ListenError, match="cannot serve metrics on no.such.host.invalid"):
        metrics.serve(Address("no.such.host.invalid", port), lambda: iter(()))
