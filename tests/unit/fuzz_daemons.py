"""The daemons that tests/unit/test_daemon_fuzz.py throws garbage at, each listening in
this process as its daemon builds it, on a loop in a thread of its own."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from test_peer_daemon import Group, nobody

from mirrorfuse.client.blocking import new_event_loop
from mirrorfuse.wire.auth import (
    ServerHandshake,
    new_key,
)
from servers import net
from servers.blobs import BlobServer, BlobStore
from servers.fileserver import VirtualServer, file_checksum, listen
from servers.net import Limits
from servers.peer import Peer, PeerOptions, PeerServer

T = TypeVar("T")
KEY = new_key()  # the group's: the peer's and the index replica's connections prove it
WAIT = 3.0  # seconds one exchange may take before the connection counts as wedged
PLAIN = b"plain text, advertised. " * 120  # the one file the peer shares
SERVED = b"served by serve-file. " * 130
BLOB = b"a snapshot of the index. " * 150
SECRETS = (b"SECRET", b"HIDDEN", b"INNER")  # in files no daemon may serve


# -- the daemons, on a loop of their own ---------------------------------------------------------


class LoopThread:
    """The event loop every mirrorfs process runs on, in a thread; what escapes is kept:
    to its exception handler (a protocol callback that raised) or out of a task."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.escaped: list[str] = []
        self.loop.set_exception_handler(self._escaped)
        self.loop.set_task_factory(self._task)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fuzzed")
        self.thread.start()

    def _escaped(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.escaped.append(f"{context.get('message')}: {context.get('exception')!r}")

    def _task(
        self, loop: asyncio.AbstractEventLoop, coro: Any, context: Any = None
    ) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, context=context)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.escaped.append(f"task {task.get_coro()!r} raised {task.exception()!r}")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def on_loop() -> T:
            return fn()

        return self.run(on_loop())

    def close(self) -> None:
        """Cancel what still runs (a block server's queue runs for ever), then stop."""

        async def cancel_all() -> None:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Daemons:
    tmp: Path
    runner: LoopThread
    peer: Peer
    group: Group
    peer_limits: Limits
    peer_port: int
    store: BlobStore
    token: str
    blob_limits: Limits
    blob_port: int
    file: VirtualServer
    file_port: int
    closers: list[Callable[[], None]] = field(default_factory=list)


def port_of(server: asyncio.AbstractServer) -> int:
    return int(cast(asyncio.Server, server).sockets[0].getsockname()[1])


def close_all(closers: list[Callable[[], None]]) -> None:
    for close in closers:
        close()


def shared_tree(tmp: Path) -> Path:
    """A shared directory with one plain file, and around it what must never be served."""
    share = tmp / "share"
    share.mkdir()
    (share / "plain.txt").write_bytes(PLAIN)
    (share / ".hidden").write_bytes(b"HIDDEN" * 50)
    (tmp / "secret").write_bytes(b"SECRET" * 50)
    (share / "escape.txt").symlink_to(tmp / "secret")
    (share / "sub").mkdir()
    (share / "sub" / "inner").write_bytes(b"INNER" * 50)
    (tmp / "secret-link").symlink_to(tmp / "secret")
    os.mkfifo(tmp / "fifo")
    return share


async def start_peer(share: Path) -> tuple[Peer, Group, Limits, asyncio.Server]:
    """As mirrorfuse.tools.peer.serve builds its listener, with a stand-in for the group."""
    group = Group(up=True)
    peer = Peer(PeerOptions("pa", share, 0.5, []), group, nobody)
    await peer.round()  # registered, plain.txt advertised
    auth = lambda: ServerHandshake(KEY, None)  # noqa: E731
    limits = Limits(max_payload=0)
    server = await asyncio.get_running_loop().create_server(
        lambda: PeerServer(peer, auth, limits), "127.0.0.1", 0
    )
    return peer, group, limits, server


async def start(tmp: Path, runner: LoopThread) -> Daemons:
    loop = asyncio.get_running_loop()
    share = shared_tree(tmp)
    peer, group, peer_limits, peer_server = await start_peer(share)
    assert sorted(peer.files) == ["plain.txt"]
    # as servers.index.serve builds the snapshot server
    store = BlobStore()
    token = store.put(BLOB)
    blob_limits = Limits(max_connections=64)
    blob_server = await loop.create_server(
        lambda: BlobServer(store, KEY, blob_limits), "127.0.0.1", 0
    )
    # as serve-file: one virtual server, on a port of its own
    served = tmp / "served.bin"
    served.write_bytes(SERVED)
    file = VirtualServer(1, 0, served, len(SERVED), file_checksum(served))
    await listen([file], "127.0.0.1")
    assert file.listener is not None
    d = Daemons(
        tmp,
        runner=runner,
        peer=peer,
        group=group,
        peer_limits=peer_limits,
        peer_port=port_of(peer_server),
        store=store,
        token=token,
        blob_limits=blob_limits,
        blob_port=port_of(blob_server),
        file=file,
        file_port=port_of(file.listener),
    )
    d.closers = [peer_server.close, blob_server.close, file.end, file.close]
    d.closers += [srv.close for srv in peer.files.values()]
    return d


def settle(d: Daemons, limits: Limits) -> None:
    """Wait until the daemon closed every connection and finished what it ran in the
    background; then nothing may have escaped, and no byte of its budget is still held."""

    async def quiet() -> None:
        deadline = time.monotonic() + WAIT
        loop = asyncio.get_running_loop()
        while (busy := [t for t in net._running if t.get_loop() is loop]) or limits.connections:
            assert time.monotonic() < deadline, (
                f"{len(busy)} background tasks, {limits.connections} connections left"
            )
            await asyncio.sleep(0.002)

    d.runner.run(quiet())
    escaped, d.runner.escaped = d.runner.escaped, []
    assert not escaped, escaped
    assert d.runner.call(lambda: limits.in_flight) == 0
