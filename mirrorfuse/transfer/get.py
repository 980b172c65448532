"""get: read one file of a volume through every live server at once.

Each block is a segment that only the two servers of its pair may serve,
checked against the block map's checksum; holes of a sparse file are zeros
already and are not fetched.
"""

from __future__ import annotations

from pathlib import Path

from mirrorfuse.client.metastore import read_namespace
from mirrorfuse.client.volume import Volume
from mirrorfuse.core.namespace import LookupFailed
from mirrorfuse.core.scheduler import split
from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.errors import UsageError

from .download import Download
from .sources import VolumeServerSource


async def get(
    spec: ClusterSpec,
    path: str,
    output: Path,
    interval: float = 1.0,
    resume: bool = False,
    timeout: float = 3.0,
) -> int:
    vol = Volume(spec, timeout)
    await vol.open()
    try:
        ns = await read_namespace(vol)
        try:
            node = ns.lookup(path)
        except LookupFailed:
            raise UsageError(f"{path}: no such file in the volume") from None
        if node.entries is not None:
            raise UsageError(f"{path} is a directory")
        if node.inline is not None:  # a small file: its bytes are in the metadata
            output.write_bytes(node.inline)
            print(f"{path}: {len(node.inline)} bytes, kept in the volume's metadata: written")
            return 0
        blocks = dict(node.blocks)
        eligible = {
            i: {f"server {s} ({spec.addresses[s]})" for s in vol.readable(vol.layout.pair_of(b))}
            for i, (b, _) in blocks.items()
        }
        servers = sorted({s for p in range(vol.layout.pairs) for s in vol.readable(p)})
        sources = [VolumeServerSource(vol, s, blocks, node.size) for s in servers]
        dl = Download(
            list(sources),
            output,
            interval,
            resume,
            segments=lambda size: split(size, vol.block_size),
            eligible=eligible,
        )
        for i in range(-(-node.size // vol.block_size)):
            eligible.setdefault(i, set())
        dl.holes = {i for i in eligible if i not in blocks}
        return await dl.run()
    finally:
        await vol.close()
