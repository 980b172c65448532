"""A volume opened as a file system: lease, replay, a fresh checkpoint, the journal."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from mirrorfuse.client.heal import AutoHealer
from mirrorfuse.client.journal import Journal
from mirrorfuse.client.metastore import MetaStore, holder_info
from mirrorfuse.client.volume import Volume
from mirrorfuse.core.replay import replay
from mirrorfuse.wire.records import Free

from .filesystem import FileSystem


async def open_filesystem(
    volume: Volume, mountpoint: str, force: bool = False, heal: bool = False
) -> FileSystem:
    """Take the lease (``force``: from another mount) of an open volume and build the
    namespace it changes; with ``heal``, servers that come back are healed in the
    background."""
    meta = MetaStore(volume)
    await meta.take_lease(holder_info(mountpoint), force)
    _seq, blob, batches = await meta.load()
    ns = replay(volume.block_size, blob, batches, os.getuid(), os.getgid(), time.time_ns())
    for ino in ns.orphans():  # unlinked while open when the last mount ended
        ns.apply(Free(ino))
    snapshot = ns.snapshot()
    await meta.put_checkpoint(ns.seq, snapshot)
    limit = await volume.capacity_blocks()
    seq = ns.seq

    def journal(on_committed: Callable[[int], None]) -> Journal:
        return Journal(meta, seq, snapshot, on_committed)

    fs = FileSystem(volume, ns, journal, limit)
    if heal:
        fs.healer = AutoHealer(volume, fs.journal.bring_up)
        fs.healer.start()
    return fs
