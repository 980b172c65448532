"""Small servers for the fetchers' unit tests, each stopped by its test's fixture:
a TCP server whose connections are served by a function in threads of their own, and
an asyncio event loop in a thread (to run the real servers' pieces next to a blocking
client)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def recv_exact(conn: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer if the peer closed first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def holds_only(got: bytes, data: bytes, start: int, length: int, fill: int) -> None:
    """An output the size of ``data`` holds data's [start, start+length) there and
    ``fill`` everywhere else (compared by sha256: a failure prints two short lines)."""

    def sha(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()

    assert len(got) == len(data)
    assert sha(got[start : start + length]) == sha(data[start : start + length])
    assert got[:start] == bytes([fill]) * start
    assert got[start + length :] == bytes([fill]) * (len(data) - start - length)


class TcpServer:
    """Listens on 127.0.0.1 (a free port); each connection is served by
    ``handler(server, conn, number)`` in a thread (connections are numbered from 1).
    A handler that stalls waits on ``stopped``, so ``close`` ends it at once."""

    def __init__(self, handler: Callable[[TcpServer, socket.socket, int], None]) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self.stopped = threading.Event()
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []  # what a handler raised (other than OSError)
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                if self.stopped.is_set():
                    conn.close()
                    return
                self.accepted += 1
                self.conns.append(conn)
                t = threading.Thread(target=self._serve, args=(conn, self.accepted), daemon=True)
                self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        try:
            self.handler(self, conn, number)
        except OSError:
            pass
        except BaseException as exc:  # noqa: BLE001 (kept for the test to see)
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.listener.close()
        self._acceptor.join(5)
        with self._lock:
            conns, threads = list(self.conns), list(self.threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked on it
        for t in threads:
            t.join(5)
        for conn in conns:
            conn.close()
        assert not self._acceptor.is_alive() and not any(t.is_alive() for t in threads)


class LoopThread:
    """An asyncio event loop (made by ``factory``) running in a thread of its own."""

    def __init__(self, factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.loop = factory()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10) -> T:
        """Call ``fn()`` on the loop's thread and wait for its result."""

        async def call() -> T:
            return fn()

        return self.run(call(), timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        assert not self._thread.is_alive()
        self.loop.close()
