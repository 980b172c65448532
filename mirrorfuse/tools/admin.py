"""Cluster administration: format, status and rebuild, shared by the CLI, the shell and tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from mirrorfuse.client.connection import ServerDown
from mirrorfuse.client.heal import copy_metadata, heal
from mirrorfuse.client.keys import Keyring, open_server
from mirrorfuse.client.metastore import Leased, MetaStore, describe_holder, holder_info
from mirrorfuse.client.volume import Volume
from mirrorfuse.core import failures
from mirrorfuse.core.layout import Layout
from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.errors import MirrorfsError, ServerError, UsageError
from mirrorfuse.wire.messages import (
    Format,
    Message,
    Request,
    SetTable,
    Stat,
    State,
    StatReply,
    Table,
)
from mirrorfuse.wire.sizes import check_block_size, human

R = TypeVar("R", bound=Message)
DEFAULT_BLOCK = 1 << 20
PROBE_TIMEOUT = 2.0


async def probe(spec: ClusterSpec, timeout: float = PROBE_TIMEOUT) -> list[StatReply | str]:
    """STAT every server at once: its reply, or why it could not be reached."""

    async def one(i: int) -> StatReply | str:
        try:
            conn = await open_server(spec, i, timeout)
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
    spec: ClusterSpec,
    block_size: int = DEFAULT_BLOCK,
    force: bool = False,
    timeout: float = PROBE_TIMEOUT,
) -> str:
    """Create a fresh volume on every server; returns its id. ``timeout``: how long a
    server may take to answer (the command's --timeout: a far or busy host)."""
    check_block_size(block_size)
    probes = await probe(spec, timeout)
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
    key = Keyring(spec.key_file).create(volume)  # kept where clients look for it
    idents = []
    for i in range(spec.count):
        req = Format(
            volume=volume, server=i, count=spec.count, block_size=block_size, force=force, key=key
        )
        idents.append((await _ask(spec, i, req, timeout)).ident)
    table = Table(gen=2, states=(State.ALIVE,) * spec.count, idents=tuple(idents))
    for i in range(spec.count):  # which directory is each server's, from the start
        await _ask(spec, i, SetTable(table=table, epoch=0), timeout)
    return volume


async def _ask(
    spec: ClusterSpec, server: int, req: Request[R], timeout: float = PROBE_TIMEOUT
) -> R:
    conn = await open_server(spec, server, timeout)
    try:
        return (await conn.call(req)).body
    finally:
        conn.close()


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
            out = known in (State.FAILED, State.STALE)
            row.update(state=known if out else "unreachable", error=found, pid=None)
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
                dirty=found.dirty,
            )
            why = _misfit(table, i, found)
            if why:  # the table has not caught up with it yet
                row.update(state=State.STALE.value, error=f"{why}; it will be healed in full")
            if known == State.HEALING and found.heal_total:
                row.update(healing=heal_progress(found))
                row["state"] = f"healing {row['healing']['percent']}%"
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


def _misfit(table: Table | None, server: int, found: StatReply) -> str | None:
    """Why a server the table counts alive cannot be (the check a client makes)."""
    if table is None or table.states[server] != State.ALIVE:
        return None
    if not found.formatted:
        return "holds an empty data directory"
    gen = found.table.gen if found.table else 0
    return failures.misfit(table, server, found.ident, gen + 1)


def heal_progress(found: StatReply) -> dict[str, Any]:
    """How far a heal is, and about how long it has to go at the rate so far."""
    done, total, secs = found.heal_done, found.heal_total, found.heal_seconds
    left = (total - done) * secs / done if done else None
    return {
        "done": done,
        "total": total,
        "percent": 100 * done // max(total, 1),
        "seconds_left": round(left) if left is not None else None,
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
        if r.get("healing"):
            h = r["healing"]
            eta = f", about {h['seconds_left']} s left" if h["seconds_left"] is not None else ""
            out.append(f"server {r['id']}: healing, {h['done']} of {h['total']} blocks{eta}")
        if r.get("dirty"):
            mirror = r["id"] ^ 1
            out.append(
                f"server {r['id']}: {r['dirty']} blocks changed while server {mirror} was out "
                "(what its heal copies)"
            )
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
) -> int:
    """Copy every block of ``target``'s mirror onto it and re-admit it; returns blocks copied."""
    return await heal_servers(spec, target, progress, timeout, full=True)


async def heal_servers(
    spec: ClusterSpec,
    target: int | None = None,
    progress: Callable[[str], None] = print,
    timeout: float = 3.0,
    full: bool = False,
) -> int:
    """Heal ``target``, or every server that needs it and answers; returns blocks copied."""
    if target is not None and not 0 <= target < spec.count:
        raise UsageError(f"there is no server {target} (servers are 0-{spec.count - 1})")
    vol = Volume(spec, timeout)
    await vol.open()
    try:
        meta = MetaStore(vol)
        try:  # the only writer while it heals: no mount may change anything meanwhile
            await meta.take_lease(holder_info("mirrorfs-cli heal"), force=False)
        except Leased:
            infos = (await meta.infos()).values()
            holder = next((i.holder for i in infos if i.holder_active), None)
            by = describe_holder(holder) if holder else "another client"
            raise MirrorfsError(
                f"the volume is mounted ({by}): the mount heals servers "
                "that come back by itself; `mirrorfs-cli status` shows how far it is"
            ) from None

        async def metadata(server: int) -> None:
            await copy_metadata(meta, server)

        if target is not None:
            return await heal(vol, target, full, progress, metadata=metadata)
        todo = [s for s in range(spec.count) if vol.states[s] != State.ALIVE]
        if not todo:
            progress("every server is alive: there is nothing to heal")
        copied = 0
        for s in todo:
            copied += await heal(vol, s, full, progress, metadata=metadata)
        return copied
    finally:
        await vol.close()
