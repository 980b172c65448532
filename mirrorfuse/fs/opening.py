"""A volume opened as a file system: lease, replay, a fresh checkpoint, the journal."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from mirrorfuse.client.blocking import BlockingVolume
from mirrorfuse.client.heal import AutoHealer
from mirrorfuse.client.journal import Journal
from mirrorfuse.client.metastore import MetaStore, holder_info
from mirrorfuse.core.replay import replay
from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.records import Free

from .filesystem import FileSystem


def open_filesystem(
    spec: ClusterSpec,
    mountpoint: str,
    force: bool = False,
    timeout: float = 3.0,
    heal: bool = False,
) -> FileSystem:
    """Take the lease (``force``: from another mount) and build the namespace it changes;
    with ``heal``, servers that come back are healed in the background."""
    bvol = BlockingVolume(spec, timeout)
    try:
        meta = MetaStore(bvol.volume)
        bvol.run(meta.take_lease(holder_info(mountpoint), force))
        _seq, blob, batches = bvol.run(meta.load())
        ns = replay(bvol.volume.block_size, blob, batches, os.getuid(), os.getgid(), time.time_ns())
        for ino in ns.orphans():  # unlinked while open when the last mount ended
            ns.apply(Free(ino))
        snapshot = ns.snapshot()
        bvol.run(meta.put_checkpoint(ns.seq, snapshot))
        limit = bvol.run(bvol.volume.capacity_blocks())
        seq = ns.seq

        def journal(on_committed: Callable[[int], None]) -> Journal:
            return Journal(bvol, meta, seq, snapshot, on_committed)

        fs = FileSystem(bvol, ns, journal, limit)
        if heal:
            fs.healer = AutoHealer(bvol.volume, fs.journal.bring_up)
            bvol.loop.call_soon_threadsafe(fs.healer.start)
        return fs
    except BaseException:
        bvol.close()
        raise
