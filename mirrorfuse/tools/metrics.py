"""What a mount reports to Prometheus (``mirrorfs-mount --metrics HOST:PORT``).

The kernel's requests (FUSE), the requests the mount sends to each server, the
chunk cache, the journal, failures and heals. The numbers are the plain
counters the mount keeps anyway; they become metric families only when scraped
(``servers/metrics.py`` serves them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mirrorfuse.client.volume import Volume
from mirrorfuse.fs import fuse_driver
from mirrorfuse.fs.filesystem import FileSystem
from mirrorfuse.wire.messages import State
from servers.metrics import counter, gauge, histogram, labelled, msg_name, op_families

P = "mirrorfs_mount"


def mount_metrics(
    volume: Volume, fs: Callable[[], FileSystem | None]
) -> Callable[[], Iterator[Metric]]:
    """A collector of the mount's numbers; ``fs`` gives the file system once it is open."""

    def collect() -> Iterator[Metric]:
        yield from op_families(f"{P}_fuse", "the kernel's requests", fuse_driver.STATS)
        yield from op_families(
            f"{P}_server", "requests to the servers", volume.cluster.stats, msg_name
        )
        servers = range(volume.spec.count)
        st = volume.stats
        per_server = (
            ("block_reads", "blocks (or chunks) read, by the server that served them", st.reads),
            ("bad_copies", "copies found damaged (checksum), by server", st.bad),
            ("repairs", "damaged copies rewritten from the mirror, by server", st.repaired),
            ("server_failures", "times this mount marked a server failed", volume.table.failures),
            (
                "server_hangs",
                "times a server went silent (a stopped or wedged process)",
                volume.cluster.hangs,
            ),
        )
        for name, doc, counts in per_server:
            yield labelled(
                CounterMetricFamily,
                f"{P}_{name}",
                doc,
                "server",
                zip(servers, list(counts), strict=False),
            )
        states = GaugeMetricFamily(
            f"{P}_server_state",
            "each server's state in the failure table",
            labels=["server", "state"],
        )
        for i, now in enumerate(volume.states):
            for s in State:
                states.add_metric([str(i), s.value], int(now == s))
        yield states
        yield gauge(f"{P}_table_generation", "failure table generation", volume.gen)
        filesystem = fs()
        if filesystem is None:
            return
        cache = filesystem.cache
        yield counter(f"{P}_cache_hits", "chunk cache hits", cache.hits)
        yield counter(f"{P}_cache_misses", "chunk cache misses", cache.misses)
        yield gauge(f"{P}_cache_chunks", "chunks in the cache", len(cache.items))
        journal = filesystem.journal
        yield counter(f"{P}_journal_records", "metadata records committed", journal.records)
        yield counter(
            f"{P}_journal_appends", "journal batches on every server", journal.appends.count
        )
        yield counter(
            f"{P}_journal_bytes",
            "journal bytes appended (each server)",
            journal.appends.request_bytes,
        )
        yield histogram(
            f"{P}_journal_append_seconds",
            "time for a journal batch to be on every live server",
            journal.appends,
        )
        yield histogram(
            f"{P}_fsync_seconds",
            "time to answer fsync (data and records on every live server, synced)",
            fuse_driver.STATS.get("fsync"),
        )
        healer = filesystem.healer
        if healer is not None:
            yield counter(f"{P}_heals", "heals of a server finished", healer.healed)
            yield counter(f"{P}_heals_stopped", "heals that stopped before the end", healer.stopped)
            yield counter(f"{P}_heal_blocks", "blocks copied by the finished heals", healer.copied)

    return collect
