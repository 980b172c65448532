"""A Volume driven from ordinary threads (the FUSE driver, the shell, tests).

The volume lives on a private event loop in a daemon thread; each call hands
a coroutine to it and waits for the result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from mirrorfuse.wire.addresses import ClusterSpec

from .loop import new_event_loop
from .loop import run_async as run_async  # the tools import it from here
from .metastore import MetaStore, holder_info
from .volume import DEFAULT_TIMEOUT, Volume

T = TypeVar("T")


class BlockingVolume:
    def __init__(
        self, spec: ClusterSpec, timeout: float = DEFAULT_TIMEOUT, writer: str | None = None
    ) -> None:
        """``writer``: take the volume's lease under that name (the servers refuse
        writes from anyone else)."""
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="volume")
        self._thread.start()
        self.volume = Volume(spec, timeout)
        try:
            self.run(self.volume.open())
            if writer is not None:
                self.run(MetaStore(self.volume).take_lease(holder_info(writer), force=False))
        except BaseException:
            self.close()
            raise

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start a coroutine on the volume's loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the volume's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _shutdown(self) -> None:
        await self.volume.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def write(self, block: int, data: bytes) -> int:
        return self.run(self.volume.write(block, data))

    def read(self, block: int, expected: int | None = None) -> bytes:
        return self.run(self.volume.read(block, expected))

    def trim(self, block: int) -> None:
        self.run(self.volume.trim(block))

    def write_many(self, items: Iterable[tuple[int, bytes]]) -> list[int]:
        return self.run(self.volume.write_many(list(items)))

    def read_many(
        self, blocks: Sequence[int], expected: Sequence[int | None] | None = None
    ) -> list[bytes]:
        return self.run(self.volume.read_many(blocks, expected))

    def sync(self, pairs: Iterable[int] = ()) -> None:
        self.run(self.volume.sync(pairs))

    def close(self) -> None:
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                self.run(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> BlockingVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
