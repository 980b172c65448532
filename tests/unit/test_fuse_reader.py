"""The FUSE descriptor's waiter, on a pipe: wakes a worker per request, stays
registered between requests, never spins when every worker is busy."""

from __future__ import annotations

import asyncio
import os

import pytest

from mirrorfuse.fs.fuse_reader import FuseReader


class Closed(Exception):
    pass


async def _spin(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _worker(reader: FuseReader, fd: int) -> bytes:
    """As pyfuse3's: the request is read as soon as the wait returns, before any await."""
    await reader.wait_readable(fd)
    return os.read(fd, 10)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)
    os.close(w)


def test_wakes_a_worker_and_stays_registered_between_requests(pipe):
    r, w = pipe

    async def main() -> None:
        reader = FuseReader(Closed)
        for i in range(3):
            waiter = asyncio.ensure_future(_worker(reader, r))
            await _spin()
            assert not waiter.done()
            os.write(w, b"x")
            assert await asyncio.wait_for(waiter, 2) == b"x"
            await _spin()
            assert reader.registered, i  # not taken out and put back per request

    asyncio.run(main())


def test_readable_with_every_worker_busy_does_not_spin(pipe):
    r, w = pipe
    calls = 0

    async def main() -> None:
        nonlocal calls
        reader = FuseReader(Closed)
        real = reader._ready

        def counted() -> None:
            nonlocal calls
            calls += 1
            real()

        reader._ready = counted  # type: ignore[method-assign]
        waiter = asyncio.ensure_future(_worker(reader, r))
        os.write(w, b"a")
        assert await asyncio.wait_for(waiter, 2) == b"a"
        os.write(w, b"b")  # a request comes while the only worker is busy
        await _spin(50)
        assert not reader.registered and calls <= 3  # taken out after two looks
        waiter = asyncio.ensure_future(_worker(reader, r))  # the worker is back
        assert await asyncio.wait_for(waiter, 2) == b"b"  # put back in, woken at once
        assert reader.registered

    asyncio.run(main())


def test_closing_ends_the_waiter_and_a_cancelled_waiter_is_forgotten(pipe):
    r, w = pipe

    async def main() -> None:
        reader = FuseReader(Closed)
        gone = asyncio.ensure_future(reader.wait_readable(r))
        await _spin()
        gone.cancel()
        await _spin()
        waiter = asyncio.ensure_future(reader.wait_readable(r))
        await _spin()
        os.write(w, b"x")
        await asyncio.wait_for(waiter, 2)  # the cancelled one did not take the wake-up
        os.read(r, 1)
        waiter = asyncio.ensure_future(reader.wait_readable(r))
        await _spin()
        reader.notify_closing(r)
        with pytest.raises(Closed):
            await asyncio.wait_for(waiter, 2)
        assert not reader.registered

    asyncio.run(main())
