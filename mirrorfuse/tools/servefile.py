"""mirrorfs-cli serve-file: N virtual file servers on N ports, with a console on stdin."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from mirrorfuse.client.loop import run_async
from mirrorfuse.wire.errors import UsageError
from mirrorfuse.wire.sizes import human
from servers.fileserver import (
    VirtualServer,
    console_command,
    file_checksum,
    listen,
)

from .hosts import resolve_host


async def serve(args: argparse.Namespace) -> int:
    path = Path(args.file)
    size = path.stat().st_size
    print(f"computing the checksum of {path} ({human(size)})...", flush=True)
    loop = asyncio.get_running_loop()
    checksum = await loop.run_in_executor(None, file_checksum, path)
    rate = (args.rate or 0) * (1 << 20)
    servers = [
        VirtualServer(i + 1, p, path, size, checksum, rate) for i, p in enumerate(args.ports)
    ]
    await listen(servers, args.address)
    print(
        f"serving {path.name} ({human(size)}) from {len(servers)} servers on "
        f"{args.address}:{','.join(map(str, args.ports))} (pid {os.getpid()})",
        flush=True,
    )
    print("console: N pauses server N, rN resumes it, eN ends a paused server", flush=True)

    async def report() -> None:
        while True:
            await asyncio.sleep(args.interval)
            line = "; ".join(
                f"server {s.number} ({s.port}): {s.state}, {human(s.sent)} sent" for s in servers
            )
            print(line, flush=True)

    reporter = asyncio.ensure_future(report())
    try:
        async for line in console_lines():
            msg = console_command(servers, line.decode(errors="replace"))
            if msg:
                print(msg, flush=True)
        print("console closed (end of input): serving until interrupted or terminated", flush=True)
        await asyncio.Event().wait()
    finally:
        reporter.cancel()
    return 0


async def console_lines() -> AsyncIterator[bytes]:
    """The console's lines, from standard input until it ends (none if it is closed).

    The event loop watches only what it can poll (a pipe, a socket, a terminal), and
    reads a duplicate of the descriptor, which closing leaves standard input alone.
    A file or /dev/null never blocks: it is read as it is.
    """
    try:
        fd = os.dup(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):  # no standard input at all
        return
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
        with open(fd, "rb") as f:
            for line in f:
                yield line
                await asyncio.sleep(0)
        return
    reader = asyncio.StreamReader()
    pipe = open(fd, "rb")  # noqa: SIM115 (the transport owns it and closes it)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe
    )
    try:
        while line := await reader.readline():
            yield line
    finally:
        transport.close()


def check_args(args: argparse.Namespace) -> None:
    if len(set(args.ports)) != len(args.ports):
        raise UsageError("a port is listed twice")
    if args.count is not None and args.count != len(args.ports):
        raise UsageError(f"-n {args.count} but {len(args.ports)} ports were given")
    if not Path(args.file).is_file():
        raise UsageError(f"file {args.file} does not exist (or is not a regular file)")
    if Path(args.file).stat().st_size > (1 << 48):
        raise UsageError(f"file {args.file} is too large")
    resolve_host(args.address, "-a")


def main(args: argparse.Namespace) -> int:
    check_args(args)
    if sys.stdin is None:  # closed: keep descriptor 0 from a socket (libuv aborts closing it)
        os.open(os.devnull, os.O_RDONLY)
    try:
        return run_async(serve(args))
    except KeyboardInterrupt:
        return 0
