"""Many calls at once, a bounded number at a time (the volume's batches)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def bounded(calls: Iterable[Callable[[], Awaitable[T]]], concurrency: int) -> list[T]:
    """Make and await every call, at most ``concurrency`` at a time; results in order.

    A call is made only when its turn comes, so a cancelled batch leaves no
    coroutine behind that was never awaited.
    """
    sem = asyncio.Semaphore(concurrency)

    async def run(call: Callable[[], Awaitable[T]]) -> T:
        async with sem:
            return await call()

    return await asyncio.gather(*(run(c) for c in calls))
