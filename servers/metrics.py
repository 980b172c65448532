"""Prometheus metrics, served over HTTP when asked (``--metrics HOST:PORT``).

The numbers are kept where the work happens, as plain counters
(``core/stats.py``, a store's counters); a collector turns them into metric
families only when /metrics is scraped, on prometheus_client's own HTTP thread.
So a request pays for a few integer additions, never for a label lookup or a
lock, and with metrics off nothing at all is served.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from mirrorfuse.core.stats import OpStat, OpStats
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.frames import Msg
from mirrorfuse.wire.messages import State

from .net import ListenError


def msg_name(key: object) -> str:
    """A message type as an ``op`` label: "write", "journal_append"."""
    if isinstance(key, int) and key in Msg._value2member_map_:
        return Msg(key).name.lower()
    return str(key)


def op_families(
    prefix: str, what: str, stats: OpStats, name: Callable[[object], str] = str
) -> Iterator[Metric]:
    """Requests, failures (by code), payload bytes and a latency histogram per operation."""
    requests = CounterMetricFamily(f"{prefix}_requests", f"{what} by operation", labels=["op"])
    failed = CounterMetricFamily(
        f"{prefix}_request_errors",
        f"{what} that failed, by operation and error",
        labels=["op", "code"],
    )
    sent = CounterMetricFamily(
        f"{prefix}_request_bytes", f"data carried by {what}, by operation", labels=["op"]
    )
    back = CounterMetricFamily(
        f"{prefix}_reply_bytes", f"data carried by the replies to {what}", labels=["op"]
    )
    seconds = HistogramMetricFamily(
        f"{prefix}_request_seconds", f"time to answer {what}, by operation", labels=["op"]
    )
    for key, st in stats.items():
        op = name(key)
        requests.add_metric([op], st.count)
        sent.add_metric([op], st.request_bytes)
        back.add_metric([op], st.reply_bytes)
        seconds.add_metric([op], st.cumulative(), st.seconds)
    for (key, code), n in stats.failure_items():
        failed.add_metric([name(key), code], n)
    yield from (requests, failed, sent, back, seconds)


def histogram(name: str, text: str, st: OpStat) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, text)
    h.add_metric([], st.cumulative(), st.seconds)
    return h


def counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def labelled(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    text: str,
    label: str,
    values: Iterable[tuple[object, float]],
) -> Metric:
    family = kind(name, text, labels=[label])
    for key, value in values:
        family.add_metric([str(key)], value)
    return family


class Collected:
    """A collector made of a function that yields metric families."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class Exporter:
    """/metrics served from a thread of its own, until ``stop()``."""

    def __init__(self, address: Address, collect: Callable[[], Iterable[Metric]]) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collected(collect))
        ProcessCollector(registry=registry)  # cpu, memory, open files of this process
        try:
            self.httpd, self.thread = start_http_server(
                address.port, addr=address.host, registry=registry
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"metrics port {address.port} on {address.host} is in use"
                ) from None
            raise ListenError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def serve(address: Address, collect: Callable[[], Iterable[Metric]]) -> Exporter:
    """Serve /metrics on ``address``; ListenError for an address that cannot be had."""
    return Exporter(address, collect)


# -- a block server ---------------------------------------------------------------------


def block_server(server: Any) -> Callable[[], Iterator[Metric]]:
    """What a block server (``servers.block.server.BlockServer``) reports."""

    def collect() -> Iterator[Metric]:
        store = server.store
        c = store.counters
        p = "mirrorfs_server"
        yield from op_families(p, "requests", server.stats, msg_name)
        yield counter(f"{p}_block_reads", "block reads (whole or ranged)", c.reads)
        yield counter(f"{p}_block_writes", "block writes", c.writes)
        yield counter(f"{p}_block_trims", "blocks freed", c.trims)
        yield counter(f"{p}_repairs", "bad copies rewritten from the mirror", c.repairs)
        yield counter(f"{p}_read_bytes", "block data read from disk", c.bytes_read)
        yield counter(f"{p}_written_bytes", "block data written to disk", c.bytes_written)
        yield counter(f"{p}_heal_copies", "blocks copied here by a heal", c.copies)
        yield counter(
            f"{p}_heals_begun",
            "heals of this server begun",
            server.stats.get(Msg.HEAL_BEGIN).count,
        )
        healing = store.healing
        yield gauge(f"{p}_healing", "1 while this server is being healed", int(healing is not None))
        yield gauge(
            f"{p}_heal_blocks", "blocks the heal under way copies", healing.total if healing else 0
        )
        yield gauge(
            f"{p}_heal_blocks_done",
            "blocks the heal under way copied",
            healing.done if healing else 0,
        )
        dirty = store.dirty
        yield gauge(
            f"{p}_dirty_blocks",
            "blocks changed while the mirror was out (what its heal copies)",
            len(dirty.slots) if dirty else 0,
        )
        yield counter(
            f"{p}_journal_appends",
            "journal batches appended",
            server.stats.get(Msg.JOURNAL_APPEND).count,
        )
        yield histogram(
            f"{p}_fsync_seconds",
            "time to put data and journal on stable storage (SYNC)",
            server.stats.get(Msg.SYNC),
        )
        yield gauge(f"{p}_blocks", "blocks held", store.blocks_used)
        yield gauge(f"{p}_stored_bytes", "bytes the data file takes on disk", store.bytes_on_disk)
        yield gauge(f"{p}_connections", "open client connections", server.limits.connections)
        yield gauge(f"{p}_table_generation", "failure table generation", store.table.gen)
        info = GaugeMetricFamily(f"{p}_info", "this server", labels=["server", "volume"])
        sb = store.superblock
        info.add_metric([str(store.server_id), sb.volume if sb else ""], 1)
        yield info
        states = GaugeMetricFamily(
            f"{p}_table_state",
            "state of each server in this server's failure table",
            labels=["server", "state"],
        )
        if store.formatted:
            for i, st in enumerate(store.table.states):
                for s in State:
                    states.add_metric([str(i), s.value], int(st == s))
        yield states

    return collect
