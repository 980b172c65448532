"""The event loop every mirrorfs process runs on.

Apart from blocking.py so that a daemon (block server, index replica, peer) starts
without importing the volume client it does not use: a tenth of a second each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where available (it writes a frame and its payload with one writev instead
    of joining them)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on the loop every mirrorfs process runs on."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
