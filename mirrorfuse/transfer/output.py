"""The file a download writes, as the sources' fetches see it."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from mirrorfuse.wire.errors import MirrorfsError

T = TypeVar("T")


class OutputError(Exception):
    """Writing the output file failed (a full disk): the download stops, no source is
    blamed."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def write_at(fd: int, data: bytes | memoryview, pos: int) -> None:
    """All of ``data`` into the output at ``pos``; OutputError when the file refuses."""
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, pos)
        except OSError as exc:  # the output file's (a full disk): not the source's
            raise OutputError(exc) from None
        view, pos = view[n:], pos + n


class CannotWrite(MirrorfsError):
    """The download stops: its file cannot be written (the message says what to do)."""


class Output:
    """The file being written, as the sources' fetches see it: its descriptor, a mapping
    to check bytes spliced into it, and the threads that run blocking fetches."""

    def __init__(self, fd: int, size: int, threads: int) -> None:
        self.fd = fd
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._map: mmap.mmap | None = None
        if size and hasattr(os, "splice"):
            try:
                self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            except (OSError, ValueError):  # a file system without mappings: buffered
                self._map = None

    @property
    def can_splice(self) -> bool:
        return self._map is not None

    def view(self, start: int, end: int) -> memoryview:
        assert self._map is not None
        return memoryview(self._map)[start:end]

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` in a thread of its own (one per worker: they block for long)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fetch")
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # every fetch has returned: nothing waits long
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held: closed when freed
                self._map.close()
