"""Healing a server: copy from its mirror what it lacks, while reads and writes go on.

A server that failed and comes back with its own directory, as it left it,
gets only the slots its mirror noted as changed meanwhile; any other (an
empty, another or an older directory) is formatted anew and gets every slot.
The order makes the copy complete: the server first learns it is being
healed (a copy then never overwrites a newer write), then the table counts
it healing (new writes reach it), and only then is the list of slots taken.
The mount runs ``AutoHealer`` in the background; ``mirrorfs-cli heal`` and
``rebuild`` call ``heal`` when no mount is there.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable

from mirrorfuse.core import failures
from mirrorfuse.core.failures import Event
from mirrorfuse.wire.errors import MirrorfsError, ServerError
from mirrorfuse.wire.frames import Flag
from mirrorfuse.wire.messages import (
    Format,
    HealBegin,
    Hello,
    Identity,
    ListSlots,
    Read,
    Stat,
    State,
    Sync,
    Trim,
    Write,
)

from .connection import ServerDown
from .keys import open_server
from .metastore import MetaStore
from .retry import TryAgain, retry
from .volume import Volume

log = logging.getLogger("mirrorfs")
CONCURRENCY = 8  # copies in flight: enough to fill a disk, few enough to leave it to users


async def list_slots(vol: Volume, server: int, dirty: bool = False) -> list[int]:
    slots: list[int] = []
    start: int | None = 0
    while start is not None:
        reply = await vol.call(server, ListSlots(start=start, limit=65536, dirty=dirty))
        slots += reply.body.slots
        start = reply.body.next
    return slots


async def _look(vol: Volume, target: int) -> None:
    try:
        await vol.call(target, Stat())
    except (ServerDown, ServerError) as exc:
        await vol.handle_error(target, exc)


async def _claim(vol: Volume, target: int, full: bool, healer: str) -> tuple[Identity, bool]:
    """On a connection of its own (the volume's would refuse a directory it does not
    count yet): check the target, format it unless it can catch up, and tell it a heal
    begins. Returns its identity and whether it only catches up."""
    try:
        conn = await open_server(vol.spec, target, vol.timeout, keys=vol.cluster.keys)
    except ServerDown as exc:
        raise MirrorfsError(f"cannot heal: {exc} (start it first)") from None
    try:
        info = (await conn.call(Hello())).body
        if info.server != target:
            raise MirrorfsError(
                f"{vol.spec.addresses[target]} is server {info.server}, not {target}"
            )
        if info.formatted and info.volume != vol.volume_id:
            raise MirrorfsError(
                f"server {target} holds another volume ({info.volume}); "
                "give it an empty data directory"
            )
        catch_up = (
            not full
            and info.formatted
            and failures.can_catch_up(vol.table.table, target, info.ident, info.gen)
        )
        if not catch_up:
            assert vol.volume_id is not None
            req = Format(
                volume=vol.volume_id,
                server=target,
                count=vol.spec.count,
                block_size=vol.block_size,
                force=info.formatted,
                key=None if conn.keyed else vol.cluster.keys(vol.volume_id),
                chunk=vol.chunk,  # the volume's checksum scheme, whatever a new one gets
            )
            info = (await conn.call(req)).body
        await conn.call(HealBegin(healer=healer))
    except ServerError as exc:
        raise MirrorfsError(f"cannot heal server {target}: {exc}") from None
    except ServerDown as exc:
        raise MirrorfsError(f"heal of server {target} stopped: {exc}") from None
    finally:
        conn.close()
    return info, catch_up


async def reachable(vol: Volume, target: int) -> bool:
    """Whether the target answers at all (the mount heals only servers that are back)."""
    try:
        conn = await open_server(vol.spec, target, vol.timeout, keys=vol.cluster.keys)
    except ServerDown:
        return False
    conn.close()
    return True


async def heal(
    vol: Volume,
    target: int,
    full: bool = False,
    progress: Callable[[str], None] = lambda _m: None,
    concurrency: int = CONCURRENCY,
    metadata: Callable[[int], Awaitable[None]] | None = None,
    healer: str = "",
) -> int:
    """Heal ``target`` (in full with ``full``); returns the slots copied. ``metadata``
    brings its journal and checkpoint up to date before it counts alive again;
    ``healer`` names who heals (the same one may begin again at once)."""
    mirror = vol.layout.mirror_of(target)
    if vol.states[target] == State.ALIVE:
        await _look(vol, target)  # a directory swapped under the table is found stale here
    if vol.states[target] == State.ALIVE:
        raise MirrorfsError(f"server {target} is alive: there is nothing to heal")
    if vol.states[mirror] != State.ALIVE:
        raise MirrorfsError(
            f"server {target}'s mirror, server {mirror}, is {vol.states[mirror].value}: "
            "there is no copy to heal from"
        )
    healer = healer or uuid.uuid4().hex[:12]
    info, catch_up = await _claim(vol, target, full, healer)
    vol.cluster.revived(target)  # connect anew: to the directory the table is about to name
    await vol.update_table(target, Event.BEGIN_HEAL, info.ident, full=not catch_up)
    if vol.states[target] != State.HEALING:
        raise MirrorfsError(f"server {target} could not be marked healing")
    try:
        wanted = await list_slots(vol, mirror, dirty=catch_up)
        extra = [] if catch_up else sorted(set(await list_slots(vol, target)) - set(wanted))
        await vol.call(target, HealBegin(healer=healer, total=len(wanted) + len(extra)))
        how = "what changed" if catch_up else "everything"
        progress(f"healing server {target} from server {mirror}: {how}, {len(wanted)} blocks")
        copied = await _copy(vol, mirror, target, wanted, extra, progress, concurrency)
        await vol.call(target, Sync())
        if metadata is not None:
            await metadata(target)
    except (ServerDown, ServerError) as exc:
        raise MirrorfsError(f"heal of server {target} stopped: {exc}; run it again") from None
    await vol.update_table(target, Event.HEALED)
    if vol.states[target] != State.ALIVE:
        raise MirrorfsError(f"server {target} failed during the heal; run it again")
    progress(f"server {target} healed: {copied} blocks copied; it is alive again")
    return copied


async def copy_metadata(meta: MetaStore, target: int) -> None:
    """The checkpoint and journal, from the server holding the longest, to the target (a
    healer holding the lease: nothing else changes them meanwhile)."""
    seq, blob, batches = await meta.load()
    if blob is not None:
        await meta.put_checkpoint(seq, blob, target)
    await meta.send_batches(target, batches)


async def _copy(
    vol: Volume,
    source: int,
    target: int,
    wanted: list[int],
    extra: list[int],
    progress: Callable[[str], None],
    concurrency: int,
) -> int:
    """Copy the source's slots; trim the target's extra ones. Newer writes win (Flag.COPY);
    the first failure stops every other copy (none may land after the heal gave up)."""
    done = 0
    step = max(len(wanted) // 10, 1)

    async def send(slot: int, data: bytes | None, csum: int = 0) -> None:
        """A copy (or a trim, for None) to the target, against the newest table."""

        async def attempt() -> None:
            try:
                if data is None:
                    await vol.call(target, Trim(slot=slot, **vol.stamp()), flags=Flag.COPY)
                else:
                    req = Write(slot=slot, checksum=csum, **vol.stamp())
                    await vol.call(target, req, data, Flag.COPY)
            except ServerError as exc:
                if exc.code != "STALE":
                    raise
                await vol.refresh_table()
                if vol.states[target] != State.HEALING:
                    raise MirrorfsError(
                        f"server {target} was marked {vol.states[target].value}"
                    ) from None
                raise TryAgain from None

        await retry(attempt, f"copying slot {slot}: the failure table kept changing")

    async def copy(slot: int) -> None:
        nonlocal done
        reply = await vol.call(source, Read(slot=slot))
        if reply.body.absent:
            await send(slot, None)
        else:
            await send(slot, bytes(reply.payload), reply.body.checksum or 0)
        done += 1
        if done % step == 0:
            progress(f"  {done}/{len(wanted)} blocks")

    work = itertools.chain(((s, True) for s in wanted), ((s, False) for s in extra))

    async def worker() -> None:
        for slot, keep in work:  # shared: each slot is taken by one worker
            await (copy(slot) if keep else send(slot, None))

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
    except* (ServerDown, ServerError, MirrorfsError) as group:
        first = group.exceptions[0]
        raise MirrorfsError(f"heal interrupted: {first}; run it again") from None
    return len(wanted)


class AutoHealer:
    """The mount's own healer: every few seconds, a server that is not alive and answers,
    with a live mirror, is healed, one at a time. ``metadata`` is the mount journal's way
    to bring a server's metadata up to date (it alone writes it)."""

    def __init__(
        self,
        vol: Volume,
        metadata: Callable[[int], Awaitable[None]] | None = None,
        interval: float = 2.0,
    ) -> None:
        self.vol = vol
        self.metadata = metadata
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._said: dict[int, str] = {}  # server -> why its last heal stopped
        self.healed = 0  # heals finished (the server alive again)
        self.stopped = 0  # heals that stopped before the end
        self.copied = 0  # blocks copied by the finished heals
        self.name = f"mount-{uuid.uuid4().hex[:8]}"  # its heals, begun again, are its own

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if all(st == State.ALIVE for st in self.vol.states):
                continue
            await self.vol.refresh_table()  # another client may have healed it meanwhile
            for server in range(self.vol.spec.count):
                if await self._wanted(server):
                    try:
                        self.copied += await heal(
                            self.vol,
                            server,
                            progress=log.info,
                            metadata=self.metadata,
                            healer=self.name,
                        )
                        self.healed += 1
                        self._said.pop(server, None)
                    except MirrorfsError as exc:
                        self.stopped += 1
                        if self._said.get(server) != str(exc):  # not again every round
                            log.warning("healing server %d stopped: %s", server, exc)
                        self._said[server] = str(exc)

    async def _wanted(self, server: int) -> bool:
        vol = self.vol
        if vol.states[server] == State.ALIVE:
            return False
        if vol.states[vol.layout.mirror_of(server)] != State.ALIVE:
            return False
        return await reachable(vol, server)
