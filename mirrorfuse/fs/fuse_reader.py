"""Waiting for FUSE requests with the /dev/fuse descriptor registered once.

pyfuse3's asyncio mode adds a reader for the descriptor before every request and
removes it after: with uvloop that is a new poll handle each time (an ioctl, three
epoll_ctl calls, an io_uring submission). Measured on a 2-core VM, a getxattr round
trip cost the mount 14 system calls and ~120 us of CPU; ``ls -l`` of a directory is
two of them per file. Here the descriptor stays registered while requests come; it is
taken out only when it stays readable with every worker busy (so the loop does not
spin), and put back when a worker waits again.
"""

from __future__ import annotations

import asyncio
import types
from collections import deque


class FuseReader:
    """pyfuse3's ``wait_readable``/``notify_closing`` for one descriptor."""

    def __init__(self, closed: type[BaseException]) -> None:
        self._closed = closed
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._registered = False
        # woken workers that have not read yet: the descriptor stays readable until
        # they do, which is not a reason to take it out
        self._woken = 0
        # readable with nobody waiting: once is usual (a worker that has just answered
        # is about to wait again), twice in a row means every worker is busy
        self._unwaited = 0

    async def wait_readable(self, fd: int) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._fd = fd
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        if not self._registered:
            loop.add_reader(fd, self._ready)
            self._registered = True
        try:
            await fut
        except BaseException:
            if fut in self._waiters:
                self._waiters.remove(fut)
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                self._woken -= 1
            raise
        self._woken -= 1

    def _ready(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self._woken += 1
                self._unwaited = 0
                return
        if self._woken > 0:
            return
        self._unwaited += 1
        if self._unwaited > 1 and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._registered = False
            self._unwaited = 0

    def notify_closing(self, fd: int) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(self._closed())
        if self._registered and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._registered = False

    @property
    def registered(self) -> bool:
        return self._registered


def enable() -> FuseReader:
    """Switch pyfuse3 to asyncio mode, waiting through one ``FuseReader``."""
    import pyfuse3
    import pyfuse3.asyncio as compat

    compat.enable()
    reader = FuseReader(compat.ClosedResourceError)
    shim = types.ModuleType("mirrorfuse_pyfuse3_asyncio")
    shim.__dict__.update(vars(compat))
    shim.__dict__.update(wait_readable=reader.wait_readable, notify_closing=reader.notify_closing)
    shim.__dict__.update(lowlevel=shim, from_thread=shim)
    pyfuse3.trio = shim  # type: ignore[attr-defined]
    return reader
