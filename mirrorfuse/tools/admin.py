"""Cluster administration: format, status and rebuild, shared by the CLI, the shell and tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from mirrorfuse.client.connection import Connection, ServerDown
from mirrorfuse.client.retry import TryAgain, retry
from mirrorfuse.client.volume import Volume
from mirrorfuse.core import failures
from mirrorfuse.core.failures import Event
from mirrorfuse.core.layout import Layout
from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.errors import MirrorfsError, ServerError, UsageError
from mirrorfuse.wire.frames import Flag
from mirrorfuse.wire.messages import (
    Format,
    Hello,
    ListSlots,
    Read,
    RebuildBegin,
    Stat,
    State,
    StatReply,
    Sync,
    Trim,
    Write,
)
from mirrorfuse.wire.sizes import check_block_size, human

DEFAULT_BLOCK = 1 << 20
PROBE_TIMEOUT = 2.0


async def probe(spec: ClusterSpec, timeout: float = PROBE_TIMEOUT) -> list[StatReply | str]:
    """STAT every server at once: its reply, or why it could not be reached."""

    async def one(i: int) -> StatReply | str:
        try:
            conn = await Connection.open(i, spec.addresses[i], timeout)
        except ServerDown as exc:
            return exc.reason
        try:
            return (await conn.call(Stat())).body
        except (ServerDown, ServerError) as exc:
            return str(exc)
        finally:
            conn.close()

    return list(await asyncio.gather(*(one(i) for i in range(spec.count))))


def _check_identity(spec: ClusterSpec, i: int, body: StatReply) -> None:
    if body.server != i:
        raise MirrorfsError(
            f"{spec.addresses[i]} is server {body.server}, expected server {i} "
            "(list the servers in id order)"
        )


async def format_volume(
    spec: ClusterSpec, block_size: int = DEFAULT_BLOCK, force: bool = False
) -> str:
    """Create a fresh volume on every server; returns its id."""
    check_block_size(block_size)
    probes = await probe(spec)
    bodies: list[StatReply] = []
    missing = []
    for i, p in enumerate(probes):
        if isinstance(p, str):
            missing.append(f"server {i} ({spec.addresses[i]}) {p}")
        else:
            bodies.append(p)
    if missing:
        raise MirrorfsError("cannot format: " + "; ".join(missing))
    for i, body in enumerate(bodies):
        _check_identity(spec, i, body)
    holding = [i for i, b in enumerate(bodies) if b.formatted]
    if holding and not force:
        vols = sorted({str(bodies[i].volume) for i in holding})
        blocks = sum(bodies[i].blocks for i in holding)
        raise MirrorfsError(
            f"servers {','.join(map(str, holding))} already hold volume {', '.join(vols)} "
            f"({blocks} blocks); add --force to erase it"
        )
    volume = str(uuid.uuid4())
    for i in range(spec.count):
        conn = await Connection.open(i, spec.addresses[i], PROBE_TIMEOUT)
        try:
            req = Format(
                volume=volume, server=i, count=spec.count, block_size=block_size, force=force
            )
            await conn.call(req)
        finally:
            conn.close()
    return volume


async def status(spec: ClusterSpec, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """What every server reports, with the state from the newest failure table."""
    probes = await probe(spec, timeout)
    bodies = [p for p in probes if isinstance(p, StatReply) and p.formatted]
    table = failures.newest(*(b.table for b in bodies))
    newest = next((b for b in bodies if b.table is table), None)
    layout = Layout(spec.count)
    rows = []
    for i, found in enumerate(probes):
        row: dict[str, Any] = {"id": i, "address": str(spec.addresses[i]), "pair": i // 2}
        known = table.states[i].value if table else "unknown"
        if isinstance(found, str):
            failed = known == State.FAILED
            row.update(state="failed" if failed else "unreachable", error=found, pid=None)
        else:
            row.update(
                state=known if found.formatted or known == State.FAILED else "unformatted",
                pid=found.pid,
                blocks=found.blocks,
                bytes=found.bytes,
                reads=found.reads,
                writes=found.writes,
                repairs=found.repairs,
                bytes_read=found.bytes_read,
                bytes_written=found.bytes_written,
            )
            if found.formatted and newest is not None and found.volume != newest.volume:
                row["state"] = "foreign"
                row["error"] = f"belongs to volume {found.volume}"
            elif found.server != i:
                row["state"] = "misplaced"
                row["error"] = f"answers as server {found.server}"
        rows.append(row)
    return {
        "volume": newest.volume if newest else None,
        "block_size": newest.block_size if newest else None,
        "servers": spec.count,
        "pairs": layout.pairs,
        "table_gen": table.gen if table else None,
        "rows": rows,
    }


def format_status(st: dict[str, Any]) -> str:
    if st["volume"] is None:
        head = f"no formatted volume found on {st['servers']} servers"
    else:
        head = (
            f"volume {st['volume']}: {st['servers']} servers in {st['pairs']} mirror pairs, "
            f"block size {human(st['block_size'])}, failure table generation {st['table_gen']}"
        )
    cols = (
        "ID",
        "ADDRESS",
        "PID",
        "PAIR",
        "STATE",
        "BLOCKS",
        "STORED",
        "READS",
        "WRITES",
        "REPAIRS",
    )
    lines = []
    for r in st["rows"]:
        has = "blocks" in r
        lines.append(
            (
                str(r["id"]),
                r["address"],
                str(r["pid"] or "-"),
                str(r["pair"]),
                r["state"],
                str(r["blocks"]) if has else "-",
                human(r["bytes"]) if has else "-",
                str(r["reads"]) if has else "-",
                str(r["writes"]) if has else "-",
                str(r["repairs"]) if has else "-",
            )
        )
    widths = [max(len(c), *(len(line[k]) for line in lines)) for k, c in enumerate(cols)]
    out = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines]
    for r in st["rows"]:
        if r.get("error"):
            out.append(f"server {r['id']}: {r['error']}")
    pairs_down = [
        p
        for p in range(st["pairs"])
        if all(st["rows"][s]["state"] != State.ALIVE for s in (2 * p, 2 * p + 1))
    ]
    if pairs_down and st["volume"] is not None:
        out.append(f"DATA UNAVAILABLE: mirror pair(s) {pairs_down} have no live server")
    return "\n".join(out)


async def rebuild(
    spec: ClusterSpec,
    target: int,
    progress: Callable[[str], None] = print,
    timeout: float = 3.0,
    concurrency: int = 16,
) -> int:
    """Copy every block of ``target``'s mirror onto it and re-admit it; returns blocks copied."""
    if not 0 <= target < spec.count:
        raise UsageError(f"there is no server {target} (servers are 0-{spec.count - 1})")
    vol = Volume(spec, timeout)
    await vol.open()
    try:
        return await _rebuild(vol, target, progress, concurrency)
    finally:
        await vol.close()


async def _prepare(vol: Volume, target: int) -> None:
    """The target formatted for this volume, in rebuild mode (newer writes beat copies)."""
    addr = vol.spec.addresses[target]
    try:
        conn = await Connection.open(target, addr, vol.timeout)
    except ServerDown as exc:
        raise MirrorfsError(f"cannot rebuild: {exc} (start it first)") from None
    try:
        info = (await conn.call(Hello())).body
        if info.server != target:
            raise MirrorfsError(f"{addr} is server {info.server}, not server {target}")
        if info.formatted and info.volume != vol.volume_id:
            raise MirrorfsError(
                f"server {target} holds another volume ({info.volume}); "
                "give it an empty data directory"
            )
        if not info.formatted:
            assert vol.volume_id is not None
            req = Format(
                volume=vol.volume_id,
                server=target,
                count=vol.spec.count,
                block_size=vol.block_size,
            )
            await conn.call(req)
        await conn.call(RebuildBegin())
    finally:
        conn.close()


async def _rebuild(
    vol: Volume, target: int, progress: Callable[[str], None], concurrency: int
) -> int:
    mirror = vol.layout.mirror_of(target)
    if vol.states[target] == State.ALIVE:
        raise MirrorfsError(f"server {target} is alive: there is nothing to rebuild")
    if vol.states[mirror] != State.ALIVE:
        raise MirrorfsError(
            f"server {target}'s mirror, server {mirror}, is {vol.states[mirror].value}: "
            "there is no copy to rebuild from"
        )
    await _prepare(vol, target)
    await vol.update_table(target, Event.BEGIN_REBUILD)
    if vol.states[target] != State.REBUILDING:
        raise MirrorfsError(f"server {target} could not be marked rebuilding")
    progress(f"rebuilding server {target} from server {mirror}")
    copied = await _copy_slots(vol, mirror, target, progress, concurrency)
    await vol.call(target, Sync())
    await vol.update_table(target, Event.REBUILT)
    if vol.states[target] != State.ALIVE:
        raise MirrorfsError(f"server {target} failed during the rebuild; run it again")
    progress(f"server {target} rebuilt: {copied} blocks copied; it is alive again")
    return copied


async def _list_all(vol: Volume, server: int) -> list[int]:
    slots: list[int] = []
    start: int | None = 0
    while start is not None:
        reply = await vol.call(server, ListSlots(start=start, limit=65536))
        slots += reply.body.slots
        start = reply.body.next
    return slots


async def _copy_slots(
    vol: Volume, source: int, target: int, progress: Callable[[str], None], concurrency: int
) -> int:
    """Copy the source's slots; trim the target's extra ones. Newer writes win (Flag.COPY)."""
    wanted = await _list_all(vol, source)
    extra = set(await _list_all(vol, target)) - set(wanted)
    sem = asyncio.Semaphore(concurrency)
    done = 0
    step = max(len(wanted) // 10, 1)

    async def send(slot: int, data: bytes | None, csum: int = 0) -> None:
        """A copy (or a trim, for None) to the target, against the newest table."""

        async def attempt() -> None:
            try:
                if data is None:
                    await vol.call(target, Trim(slot=slot, gen=vol.gen), flags=Flag.COPY)
                else:
                    req = Write(slot=slot, checksum=csum, gen=vol.gen)
                    await vol.call(target, req, data, Flag.COPY)
            except ServerError as exc:
                if exc.code != "STALE":
                    raise
                await vol.refresh_table()
                if vol.states[target] != State.REBUILDING:
                    raise MirrorfsError(
                        f"server {target} was marked {vol.states[target].value}"
                    ) from None
                raise TryAgain from None

        await retry(attempt, f"copying slot {slot}: the failure table kept changing")

    async def copy(slot: int) -> None:
        nonlocal done
        async with sem:
            reply = await vol.call(source, Read(slot=slot))
            if reply.body.absent:
                await send(slot, None)
            else:
                await send(slot, bytes(reply.payload), reply.body.checksum or 0)
            done += 1
            if done % step == 0:
                progress(f"  {done}/{len(wanted)} blocks")

    async def drop(slot: int) -> None:
        async with sem:
            await send(slot, None)

    try:
        await asyncio.gather(*(copy(s) for s in wanted), *(drop(s) for s in extra))
    except (ServerDown, ServerError) as exc:
        raise MirrorfsError(f"rebuild interrupted: {exc}; run it again") from None
    return len(wanted)
