"""mirrorfs-cli shell: an interactive client that shows every mirrored step.

It works on the same volume and file system library as the mount (not
through FUSE), so the two always agree, and it makes the RAID-1 behaviour
visible: which servers hold a block, each replica written in turn after a
programmable delay, which server served each read.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shlex
import time
from collections.abc import Callable, Iterator
from typing import Any

from mirrorfuse.client.blocking import BlockingVolume, run_async
from mirrorfuse.client.connection import ServerDown
from mirrorfuse.client.retry import TryAgain, retry
from mirrorfuse.fs.base import Context, FsError
from mirrorfuse.fs.filesystem import FileSystem
from mirrorfuse.fs.opening import open_filesystem
from mirrorfuse.fs.whole import block_map, finish, give_back, make_room
from mirrorfuse.wire.addresses import ClusterSpec, check_count, from_base_port
from mirrorfuse.wire.errors import MirrorfsError, ServerError, UsageError, VolumeIOError

from . import admin
from .commandargs import parse_delay

HELP = """commands (paths are absolute):
  mkdir /A/B            make a directory (and missing parents)
  create /a.txt         make an empty file
  write /a.txt TEXT     replace the file's content with TEXT (creates it if needed)
  read /a.txt           show the file's content and the server that served each block
  mv /a.txt /B/a.txt    rename or move
  rm /a.txt             remove a file or an empty directory
  status                servers, mirror pairs, alive/failed, reads and writes
  help                  this text
  exit                  leave (end of input too)"""


class Quit(Exception):
    pass


def parse_start_port(text: str) -> int:
    text = text.strip()
    if len(text) != 4 or not text.isdigit():
        raise UsageError(f"{text!r} is not a 4-digit port number (like 1111)")
    port = int(text)
    if port < 1024:
        raise UsageError(f"port {port} is reserved for the system: use 1024-9999")
    return port


class Shell:
    def __init__(
        self,
        fs: FileSystem,
        bvol: BlockingVolume,
        spec: ClusterSpec,
        delay: float,
        read_delay: float,
        say: Callable[[str], None] = print,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.fs = fs
        self.bvol = bvol
        self.spec = spec
        self.delay = delay
        self.read_delay = read_delay
        self.say = say
        self.sleep = sleep
        self.ctx = Context(os.getuid(), os.getgid())
        self.vol = fs.volume

    def on_loop(self, func: Callable[..., Any], *args: Any) -> Any:
        """Call a file system method on the volume's loop (where it lives) and wait."""

        async def call() -> Any:
            out = func(*args)
            return await out if inspect.isawaitable(out) else out

        return self.bvol.run(call())

    def name(self, server: int) -> str:
        return f"server {server} ({self.spec.addresses[server]})"

    # -- the loop ---------------------------------------------------------------------------

    def run(self, lines: Iterator[str]) -> None:
        for line in lines:
            try:
                self.execute(line)
            except Quit:
                return
            except (MirrorfsError, OSError, ValueError) as exc:
                words = line.split()
                self.say(f"error: {' '.join(words[:2])}: {describe(exc)}")

    def execute(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        cmd, _, rest = line.partition(" ")
        handler = getattr(self, f"do_{cmd}", None)
        if handler is None:
            raise UsageError(f"unknown command {cmd!r} (type help)")
        handler(rest.strip())

    @staticmethod
    def _args(rest: str, names: tuple[str, ...]) -> list[str]:
        args = shlex.split(rest)
        if len(args) != len(names):
            raise UsageError(f"expected {len(names)} argument(s): {' '.join(names)}")
        for a in args:
            if not a.startswith("/"):
                raise UsageError(f"{a!r}: paths are absolute (start with /)")
        return args

    # -- commands ---------------------------------------------------------------------------

    def do_help(self, rest: str) -> None:
        self.say(HELP)

    def do_exit(self, rest: str) -> None:
        raise Quit

    def do_mkdir(self, rest: str) -> None:
        (path,) = self._args(rest, ("PATH",))
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts)):
            sub = "/" + "/".join(parts[:i])
            try:
                self.on_loop(self.fs.resolve, sub)
            except FsError:
                where = self.on_loop(self.fs.resolve_parent, sub)
                self.on_loop(self.fs.mkdir, *where, 0o755, self.ctx)
                self.say(f"made directory {sub}")
        self.on_loop(self.fs.mkdir, *self.on_loop(self.fs.resolve_parent, path), 0o755, self.ctx)
        self.say(f"made directory {path}")

    def do_create(self, rest: str) -> None:
        (path,) = self._args(rest, ("PATH",))
        parent, name = self.on_loop(self.fs.resolve_parent, path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        fh, _node = self.on_loop(self.fs.create, parent, name, 0o644, flags, self.ctx)
        self.on_loop(self.fs.release, fh)
        self.say(f"created {path}")

    def do_mv(self, rest: str) -> None:
        src, dst = self._args(rest, ("FROM", "TO"))
        self.on_loop(
            self.fs.rename,
            *self.on_loop(self.fs.resolve_parent, src),
            *self.on_loop(self.fs.resolve_parent, dst),
        )
        self.say(f"moved {src} to {dst}")

    def do_rm(self, rest: str) -> None:
        (path,) = self._args(rest, ("PATH",))
        node = self.on_loop(self.fs.resolve, path)
        where = self.on_loop(self.fs.resolve_parent, path)
        self.on_loop(self.fs.rmdir if node.is_dir else self.fs.unlink, *where)
        self.say(f"removed {path}")

    def do_status(self, rest: str) -> None:
        st = self.bvol.run(admin.status(self.spec))
        self.say(admin.format_status(st))

    def do_write(self, rest: str) -> None:
        path, _, text = rest.partition(" ")
        if not path.startswith("/"):
            raise UsageError("usage: write /path TEXT")
        data = text.encode()
        ino, blocks = self.on_loop(make_room, self.fs, path, len(data), self.ctx)
        pieces = [data[i : i + self.fs.bs] for i in range(0, len(data), self.fs.bs)]
        try:
            sums = self._write_blocks(list(zip(blocks, pieces, strict=True)))
        except BaseException:
            self.on_loop(give_back, self.fs, blocks)
            raise
        self.on_loop(finish, self.fs, ino, len(data), blocks, sums)
        self.say(f"wrote {len(data)} bytes to {path}")

    def _write_blocks(self, items: list[tuple[int, bytes]]) -> list[int]:
        """Each block to each replica in turn, waiting the delay t before each one."""
        plans = []
        for block, _ in items:
            pair = self.vol.layout.pair_of(block)
            targets = self.vol.writable(pair)
            holders = " and ".join(self.name(s) for s in targets)
            gone = [s for s in self.vol.layout.replicas(pair) if s not in targets]
            note = "".join(f"; {self.name(s)} is failed, so not written" for s in gone)
            self.say(f"block {block} (mirror pair {pair}) will be written to {holders}{note}")
            plans.append(targets)
        self.say(f"waiting {self.delay:g} s before writing")
        self.sleep(self.delay)
        sums = []
        for (block, data), targets in zip(items, plans, strict=True):
            csum = None
            written: list[int] = []
            for k, server in enumerate(targets):
                if k:
                    self.say(f"next replica: {self.name(server)}")
                    self.say(
                        f"waiting to write in another replica: {self.name(server)} "
                        f"({self.delay:g} s)"
                    )
                    self.sleep(self.delay)
                if server not in self.vol.writable(self.vol.layout.pair_of(block)):
                    # found dead meanwhile (by this client's other traffic)
                    self.say(
                        f"{self.name(server)} is down: marked failed; the other replica carries on"
                    )
                    continue
                one = self._write_one(block, data, server)
                if one is not None:
                    csum = one
                    written.append(server)
            if written and len(written) < len(targets):
                for server in written:  # again, now marked degraded: noted for the heal
                    self._write_one(block, data, server, again=True)
            if csum is None:
                raise VolumeIOError(f"block {block}: no replica took the write")
            sums.append(csum)
        return sums

    def _write_one(self, block: int, data: bytes, server: int, again: bool = False) -> int | None:
        """One replica's write; None when it is down (it is marked failed, as the mount does).
        ``again``: a replica written before its mirror failed, so that it notes the block."""
        down: list[BaseException] = []

        async def attempt() -> int | None:
            try:
                return await self.vol.write_replica(block, data, server)
            except (ServerDown, ServerError) as exc:
                if await self.vol.handle_error(server, exc):
                    raise TryAgain from None  # the table was stale: again, against the new one
                down.append(exc)
                return None

        csum = self.bvol.run(retry(attempt, f"writing block {block} to {self.name(server)}"))
        if csum is None:
            self.say(
                f"{self.name(server)} is down ({down[0]}): marked failed; "
                "the other replica carries on"
            )
        elif again:
            self.say(f"written again to {self.name(server)}: it notes the block for its mirror")
        else:
            self.say(f"written to {self.name(server)}")
        return csum

    def do_read(self, rest: str) -> None:
        (path,) = self._args(rest, ("PATH",))
        size, blocks, inline = self.on_loop(block_map, self.fs, path)
        if inline:
            self.say(f"{path} is small: its {size} bytes are in its metadata, on every server")
            self.say(inline.decode("utf-8", "replace"))
            return
        if not blocks:
            self.say(f"{path} is empty")
            return
        for index, block, _ in blocks:
            pair = self.vol.layout.pair_of(block)
            holders = " and ".join(self.name(s) for s in self.vol.readable(pair))
            self.say(f"block {index} of {path} is on {holders}")
        self.say(f"waiting {self.read_delay:g} s before reading")
        self.sleep(self.read_delay)
        content = bytearray(size)
        for index, block, csum in blocks:
            data, server = self.bvol.run(self.vol.read_from(block, csum))
            self.say(f"block {index} read from {self.name(server)}")
            start = index * self.fs.bs
            content[start : start + len(data)] = data
        self.say(content.decode("utf-8", "replace"))


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno) + (
            f" ({exc.strerror})" if exc.strerror and exc.strerror != os.strerror(exc.errno) else ""
        )
    return str(exc)


def ask(prompt: str, parse: Callable[[str], object]) -> object:
    while True:
        try:
            text = input(prompt)
        except EOFError:
            raise Quit from None
        try:
            return parse(text)
        except UsageError as exc:
            print(f"error: {exc}; try again")


async def _missing(spec: ClusterSpec) -> list[int]:
    return [i for i, found in enumerate(await admin.probe(spec)) if isinstance(found, str)]


def wait_for_servers(spec: ClusterSpec, poll: float = 1.0) -> None:
    shown: list[int] | None = None
    while missing := run_async(_missing(spec)):
        if missing != shown:
            names = ", ".join(f"server {i} (port {spec.addresses[i].port})" for i in missing)
            print(f"waiting for {names} to answer...", flush=True)
            shown = missing
        time.sleep(poll)
    for i, addr in enumerate(spec.addresses):
        print(f"connection established from server {i} at {addr}")


def lines(prompt: str) -> Iterator[str]:
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def main(args: argparse.Namespace) -> int:
    check_count(args.count)
    print(f"mirrorfs shell: {args.count} servers")
    try:
        delay = (
            args.delay
            if args.delay is not None
            else ask("waiting time t in seconds (delay between replicas): ", parse_delay)
        )
        base = (
            args.base_port
            if args.base_port is not None
            else ask("starting port (4 digits, e.g. 1111): ", parse_start_port)
        )
    except Quit:
        return 1
    if args.base_port is not None:
        parse_start_port(str(base))
    spec = from_base_port(int(str(base)), args.count)
    ports = ", ".join(str(a.port) for a in spec.addresses)
    print(f"servers 0-{args.count - 1} on ports {ports}")
    if not args.yes:
        try:
            input("start the servers, then press Enter ")
        except EOFError:
            return 1
    wait_for_servers(spec)
    probe = run_async(admin.status(spec))
    if probe["volume"] is None:
        volume = run_async(admin.format_volume(spec))
        print(f"formatted a new volume {volume}")
    bvol = BlockingVolume(spec, args.timeout)
    try:
        fs = bvol.run(open_filesystem(bvol.volume, "mirrorfs-cli shell"))
    except BaseException:
        bvol.close()
        raise
    print(f"file system ready (volume {bvol.volume.volume_id}); type help for commands")
    shell = Shell(
        fs, bvol, spec, float(str(delay)), args.read_delay, lambda m: print(m, flush=True)
    )
    try:
        shell.run(lines("$ "))
    finally:
        try:
            bvol.run(fs.shutdown())
        finally:
            bvol.close()
    return 0
