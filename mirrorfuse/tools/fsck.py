"""mirrorfs-cli fsck: the namespace's invariants, and with --deep every data block."""

from __future__ import annotations

import asyncio

from mirrorfuse.client.metastore import read_namespace
from mirrorfuse.client.volume import Volume
from mirrorfuse.core.checks import Report, check_namespace
from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.errors import MirrorfsError


async def fsck(spec: ClusterSpec, deep: bool = False, timeout: float = 3.0) -> Report:
    vol = Volume(spec, timeout)
    await vol.open()
    try:
        try:
            ns = await read_namespace(vol)  # the same replay a mount does
        except MirrorfsError as exc:
            rep = Report()
            rep.problems.append(f"the journal does not replay: {exc}")
            return rep
        rep = check_namespace(ns)
        if deep:
            entries = [
                (ino, i, b, c) for ino, n in ns.inodes.items() for i, (b, c) in n.blocks.items()
            ]
            sem = asyncio.Semaphore(32)

            async def verify(ino: int, index: int, blk: int, csum: int) -> None:
                async with sem:
                    try:
                        await vol.read(blk, csum)
                    except MirrorfsError as exc:
                        rep.problems.append(f"inode {ino} block {index} (#{blk}): {exc}")

            await asyncio.gather(*(verify(*e) for e in entries))
        return rep
    finally:
        await vol.close()
