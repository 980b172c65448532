"""mirrorfs-cli index ... and index-shell: ask the index group, show the first reply.

Lists come from the group, page by page. When no replica answers, they come
from a peer's cached copy of the index (``--peer``, or the peers running on
this machine), so files can still be found and fetched. ``share`` and
``unshare`` ask a running mirrorfs-peer on this machine to share one more
file, or to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import socket
from collections.abc import Callable
from pathlib import Path

import msgspec

from mirrorfuse.client.blocking import run_async
from mirrorfuse.client.connection import request_once
from mirrorfuse.index.client import IndexClient
from mirrorfuse.index.keys import group_key
from mirrorfuse.transfer.download import Download
from mirrorfuse.transfer.sources import FileServerSource
from mirrorfuse.wire.addresses import parse_address, parse_address_list
from mirrorfuse.wire.auth import KeyLookup
from mirrorfuse.wire.datagrams import FileEntry
from mirrorfuse.wire.errors import MirrorfsError, ServerError, UsageError
from mirrorfuse.wire.messages import Outcome, PeerIndex, PeerShare, PeerUnshare

from .hosts import check_hosts, ipv4_addresses, resolve_host
from .peerctl import ask_control, control_path
from .registry import live_peers

HELP = """commands: status | peers | files | search PATTERN | fetch NAME OUTPUT |
  share FILE [NAME] | unshare NAME | help | quit
(each waits for the first reply; duplicates and late replies are ignored)"""


def client(args: argparse.Namespace) -> IndexClient:
    """(datagrams go to IPv4 addresses: host names are resolved first)"""
    replicas = parse_address_list(args.replicas, "--replicas") if args.replicas else []
    group = resolve_host(args.group, "index group", socket.AF_INET)
    return IndexClient(
        group,
        args.port,
        ipv4_addresses(replicas, "--replicas") or None,
        key=group_key(args.key_file),
        interface=args.host,
    )


class Index:
    """What the commands ask: the group, or failing that a peer's cached index."""

    def __init__(
        self, c: IndexClient, peers: list[str], say: Callable[[str], None], key: bytes
    ) -> None:
        self.c = c
        self.peer_addrs = peers  # --peer, else the peers running on this machine
        self.say = say
        self.keys: KeyLookup = lambda _: key  # peers take connections that prove it
        self.cached: tuple[dict[str, FileEntry], dict[str, str]] | None = None

    def local_peers(self) -> list[str]:
        return self.peer_addrs or [r["addr"] for r in live_peers()]

    async def from_peer(self, why: MirrorfsError) -> tuple[dict[str, FileEntry], dict[str, str]]:
        if self.cached is not None:
            return self.cached
        addrs = self.local_peers()
        for addr in addrs:
            try:
                reply = await request_once(parse_address(addr), PeerIndex(), 30, keys=self.keys)
                files = msgspec.msgpack.decode(reply.payload, type=dict[str, FileEntry])
            except (MirrorfsError, msgspec.DecodeError, msgspec.ValidationError, OSError):
                continue
            self.say(
                f"(no index replica answered; from the cached index of peer "
                f"{reply.body.peer} at {addr}, sequence {reply.body.seq})"
            )
            self.cached = (files, dict(reply.body.peers))
            return self.cached
        hint = "" if addrs else " (and no peer to ask: give --peer HOST:PORT)"
        raise MirrorfsError(f"{why}{hint}")

    async def files(self, pattern: str | None = None) -> dict[str, FileEntry]:
        try:
            if pattern is None:
                return await self.c.query_pages("files")
            return await self.c.query_pages("search", pattern=pattern)
        except MirrorfsError as exc:
            files = (await self.from_peer(exc))[0]
            if pattern is None:
                return files
            return {n: f for n, f in files.items() if fnmatch.fnmatchcase(n, pattern)}

    async def peers(self) -> dict[str, str]:
        try:
            return await self.c.query_pages("peers")
        except MirrorfsError as exc:
            return (await self.from_peer(exc))[1]

    async def control(self, req: PeerShare | PeerUnshare) -> Outcome:
        """share/unshare, through the control socket of the one peer running here (or of
        --peer); a --peer not running here is asked over TCP, which it takes only from its
        own machine and user, with the group key."""
        records = live_peers()
        if self.peer_addrs:
            if len(self.peer_addrs) > 1:
                raise UsageError("share and unshare talk to one peer: give one --peer")
            records = [r for r in records if r["addr"] == self.peer_addrs[0]]
            if not records:
                try:
                    addr = parse_address(self.peer_addrs[0])
                    return (await request_once(addr, req, 30.0, keys=self.keys)).body
                except ServerError as exc:
                    return Outcome(ok=False, error=exc.detail)
        if not records:
            raise UsageError(
                "no mirrorfs-peer runs on this machine: start one "
                "(mirrorfs-peer --index GROUP:PORT --share DIR) or give --peer HOST:PORT"
            )
        if len(records) > 1:
            addrs = ", ".join(r["addr"] for r in records)
            raise UsageError(f"several peers run here ({addrs}): choose with --peer")
        return await ask_control(control_path(records[0]), req, 30.0)


async def fetch(ix: Index, name: str, output: str) -> None:
    """Download a shared file from every peer holding it, through the segmented downloader."""
    files = await ix.files()
    if name not in files:
        raise UsageError(f"no peer shares {name!r}")
    peers = await ix.peers()
    holders = [peers[h] for h in files[name].holders if h in peers]
    if not holders:
        raise UsageError(f"no known peer holds {name!r} now")
    ix.say(f"fetching {name} from {len(holders)} peer(s): {', '.join(holders)}")
    sources = [FileServerSource(parse_address(a), name, ix.keys) for a in holders]
    if await Download(list(sources), Path(output), 1.0, False, say=ix.say).run() != 0:
        raise UsageError(f"could not fetch {name}")


def listing(files: dict[str, FileEntry]) -> str:
    return (
        "\n".join(
            f"{n}  {f.size} bytes  held by {', '.join(f.holders)}" for n, f in sorted(files.items())
        )
        or "no files"
    )


async def share(ix: Index, rest: list[str]) -> None:
    if not 1 <= len(rest) <= 2:
        raise UsageError("usage: share FILE [--name NAME] (in the shell: share FILE [NAME])")
    path = Path(rest[0])
    if not path.is_file():
        raise UsageError(f"{rest[0]} is not a regular file")
    name = rest[1] if len(rest) == 2 else path.name
    reply = await ix.control(PeerShare(path=str(path.resolve()), name=name))
    if not reply.ok:
        raise UsageError(f"cannot share {name!r}: {reply.error}")
    ix.say(f"shared {path} as {name!r}")


async def run_command(ix: Index, words: list[str], output: str | None = None) -> None:
    cmd, rest = words[0], words[1:]
    say = ix.say
    if cmd == "status":
        replies = await ix.c.query_all("status", wait=1.0)
        if not replies:
            say("no replica answered (none runs, or they hold another key: see --key-file)")
        for r in sorted(replies, key=lambda r: r.replica):
            say(
                f"replica {r.replica}: sequence {r.seq}, master {r.master}, "
                f"{r.peers} peers, {r.files} files, "
                f"state {r.digest}, dropped datagrams {r.dropped} ({r.unsealed} without "
                f"the group's key, {r.replayed} replayed), refused snapshots {r.bad_snapshots}"
                + ("" if r.ready else ", catching up (answers no queries yet)")
            )
    elif cmd == "peers":
        peers = await ix.peers()
        say("\n".join(f"{p} at {a}" for p, a in sorted(peers.items())) or "no peers")
    elif cmd == "files":
        say(listing(await ix.files()))
    elif cmd == "search":
        if len(rest) != 1:
            raise UsageError("usage: search PATTERN (shell wildcards, e.g. *.mp3)")
        say(listing(await ix.files(rest[0])))
    elif cmd == "fetch":
        if output is None and len(rest) == 2:
            rest, output = rest[:1], rest[1]
        if len(rest) != 1 or not output:
            raise UsageError("usage: fetch NAME -o OUTPUT")
        await fetch(ix, rest[0], output)
    elif cmd == "share":
        await share(ix, rest)
    elif cmd == "unshare":
        if len(rest) != 1:
            raise UsageError("usage: unshare NAME")
        reply = await ix.control(PeerUnshare(name=rest[0]))
        if not reply.ok:
            raise UsageError(f"cannot unshare {rest[0]!r}: {reply.error}")
        say(f"no longer shared: {rest[0]}")
    elif cmd == "json":
        reply = await ix.c.query(rest[0] if rest else "state")
        say(msgspec.json.format(msgspec.json.encode(reply), indent=2).decode())
    else:
        raise UsageError(f"unknown command {cmd!r}; {HELP}")


def peer_list(args: argparse.Namespace) -> list[str]:
    peers = [a for a in (args.peer or "").split(",") if a]
    check_hosts(map(parse_address, peers), "--peer")  # a clear UsageError for a bad one
    return peers


def cmd_index(args: argparse.Namespace) -> int:
    if args.name and args.what != "share":
        raise UsageError("--name goes with share")
    if args.output and args.what != "fetch":
        raise UsageError("-o goes with fetch")
    words = [args.what, *args.rest]
    if args.what == "share" and args.name:
        words.append(args.name)
    peers = peer_list(args)

    async def go() -> None:
        c = client(args)
        try:
            ix = Index(c, peers, print, group_key(args.key_file))
            await run_command(ix, words, args.output)
        finally:
            c.close()

    run_async(go())
    return 0


def cmd_index_shell(args: argparse.Namespace) -> int:
    peers = peer_list(args)
    with asyncio.Runner() as runner:
        c = client(args)
        ix = Index(c, peers, lambda m: print(m, flush=True), group_key(args.key_file))
        print(f"index group {args.group}:{args.port}; {HELP}")
        try:
            while True:
                try:
                    line = input("index> ").split()
                except EOFError:
                    print()
                    return 0
                if not line:
                    continue
                if line[0] in ("quit", "exit"):
                    return 0
                if line[0] == "help":
                    print(HELP)
                    continue
                ix.cached = None
                try:
                    runner.run(run_command(ix, line))
                except Exception as exc:  # the shell never dies on one bad command
                    print(f"error: {exc}")
        finally:
            c.close()
