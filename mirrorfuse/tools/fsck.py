"""mirrorfs-cli fsck: the namespace's invariants; with --deep every copy of every block,
compared with the checksum the block map holds; with --repair bad copies rewritten.

A read through the volume stops at the first good copy, so a mirror that
lacks a block goes unseen until the day it is the only copy: the deep check
reads each live replica itself (on a volume with chunk sums, with every sum the
server keeps, so a damaged sum is found before a small read trips on it). A
repair takes the mount lease (nothing else may write meanwhile) and rewrites a
bad copy from the one that matches.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from mirrorfuse.client.connection import ServerDown
from mirrorfuse.client.metastore import MetaStore, holder_info, read_namespace
from mirrorfuse.client.volume import Volume
from mirrorfuse.core.checks import Report, check_namespace
from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.checksums import check_read
from mirrorfuse.wire.errors import MirrorfsError, ServerError
from mirrorfuse.wire.messages import Read, State

CONCURRENCY = 16
SHOWN = 50  # block problems listed one by one; the rest are counted per server


@dataclass
class Deep:
    """What the deep check found, per server, beyond the namespace's report."""

    copies: int = 0  # copies read and compared
    missing: Counter[int] = field(default_factory=Counter)
    differing: Counter[int] = field(default_factory=Counter)
    unreadable: Counter[int] = field(default_factory=Counter)
    repaired: Counter[int] = field(default_factory=Counter)
    lost: int = 0  # blocks with no good copy at all
    skipped: dict[int, str] = field(default_factory=dict)  # server -> its state
    lines: list[str] = field(default_factory=list)  # the first SHOWN bad copies
    listed: int = 0

    @property
    def unrepaired(self) -> int:
        bad = self.missing + self.differing + self.unreadable
        return sum(bad.values()) - sum(self.repaired.values())


async def fsck(
    spec: ClusterSpec, deep: bool = False, timeout: float = 3.0, repair: bool = False
) -> tuple[Report, Deep | None]:
    vol = Volume(spec, timeout)
    await vol.open()
    try:
        if repair:  # no mount may write while copies are rewritten
            await MetaStore(vol).take_lease(holder_info("fsck --repair"), force=False)
        try:
            ns = await read_namespace(vol)  # the same replay a mount does
        except MirrorfsError as exc:
            rep = Report()
            rep.problems.append(f"the journal does not replay: {exc}")
            return rep, None
        rep = check_namespace(ns)
        if not (deep or repair):
            return rep, None
        entries = [
            (ino, i, b, c) for ino, n in ns.inodes.items() for i, (b, c) in sorted(n.blocks.items())
        ]
        found = Deep()
        await _every_copy(vol, entries, rep, found, repair)
        return rep, found
    finally:
        await vol.close()


async def _every_copy(
    vol: Volume, entries: list[tuple[int, int, int, int]], rep: Report, found: Deep, repair: bool
) -> None:
    sem = asyncio.Semaphore(CONCURRENCY)

    def note(text: str) -> None:
        found.listed += 1
        if found.listed <= SHOWN:
            found.lines.append(text)

    async def read_copy(server: int, slot: int, want: int) -> tuple[str, bytes]:
        """'ok', 'missing', 'differs' or 'unreadable: why', and the bytes read."""
        whole = (0, vol.block_size) if vol.chunk else None  # every chunk, and every sum
        req = Read(slot=slot) if whole is None else Read(slot=slot, offset=0, length=whole[1])
        try:
            reply = await vol.call(server, req)
        except (ServerDown, ServerError) as exc:
            return f"unreadable: {exc}", b""
        if reply.body.absent and want != vol.checksum(b""):
            return "missing", b""
        good = check_read(reply.body, reply.payload, want, vol.chunk, whole)
        return ("differs", b"") if good is None else ("ok", good.data)

    async def check(ino: int, index: int, block: int, want: int) -> None:
        pair, slot, _ = vol.layout.place(block)
        where = f"inode {ino} block {index} (#{block})"
        servers = []
        for s in vol.layout.replicas(pair):
            if vol.states[s] == State.ALIVE:
                servers.append(s)
            else:
                found.skipped[s] = vol.states[s].value
        async with sem:
            results = await asyncio.gather(*(read_copy(s, slot, want) for s in servers))
        good = next((data for how, data in results if how == "ok"), None)
        for s, (how, _data) in zip(servers, results, strict=True):
            found.copies += 1
            if how == "ok":
                continue
            tally = {"missing": found.missing, "differs": found.differing}
            tally.get(how, found.unreadable)[s] += 1
            if repair and good is not None and await vol.repair(s, block, good):
                found.repaired[s] += 1
                note(f"REPAIRED: {where}: {how} on server {s}; rewritten from its mirror")
            else:
                note(f"PROBLEM: {where}: {how} on server {s}")
        if good is None:
            found.lost += 1
            if servers:
                rep.problems.append(f"{where}: no copy matches its checksum (data lost)")
            else:
                rep.problems.append(f"{where}: mirror pair {pair} has no live server")

    await asyncio.gather(*(check(*e) for e in entries))


def summary(found: Deep | None) -> list[str]:
    """The bad copies, what was not checked, and the counts per server."""
    if found is None:
        return []
    out = list(found.lines)
    for s, state in sorted(found.skipped.items()):
        out.append(f"server {s} is {state}: its copies were not checked (heal it first)")
    for s in sorted(set(found.missing) | set(found.differing) | set(found.unreadable)):
        parts = [
            f"{n} {what}"
            for what, n in (
                ("missing", found.missing[s]),
                ("differing", found.differing[s]),
                ("unreadable", found.unreadable[s]),
            )
            if n
        ]
        fixed = f"; {found.repaired[s]} repaired" if found.repaired[s] else ""
        out.append(f"server {s}: {', '.join(parts)} copies{fixed}")
    if found.listed > SHOWN:
        out.append(f"({found.listed - SHOWN} more bad copies not listed one by one)")
    return out
