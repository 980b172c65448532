"""mirrorfs-cli index ... and index-shell: ask the index group (seed 002's client).

Lists come from the group, page by page. When no replica answers, they come
from a peer's cached copy of the index (``--peer``, or the peers running on
this machine), so files can still be found and fetched (seed 001, step 2).
``share`` and ``unshare`` ask a running mirrorfs-peer on this machine to
share one more file, or to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from mirrorfuse.client.connection import request_once
from mirrorfuse.index.client import IndexClient
from mirrorfuse.tools.registry import live_peers
from mirrorfuse.wire.addresses import parse_address, parse_address_list
from mirrorfuse.wire.errors import MirrorfsError, ServerError, UsageError
from mirrorfuse.wire.frames import Frame, Msg

HELP = """commands: status | peers | files | search PATTERN | fetch NAME OUTPUT |
  share FILE [NAME] | unshare NAME | help | quit
(each waits for the first reply; duplicates and late replies are ignored)"""


def client(args: argparse.Namespace) -> IndexClient:
    if not 1024 <= args.port <= 65535:
        raise UsageError(f"port {args.port} is outside 1024-65535")
    replicas = parse_address_list(args.replicas, "replica") if args.replicas else None
    return IndexClient(args.group, args.port, replicas)


def _peer_call(addr: str, type_: int, body: dict[str, Any]) -> Frame:
    return asyncio.run(request_once(parse_address(addr), type_, body, 30.0))


class Index:
    """What the commands ask: the group, or failing that a peer's cached index."""

    def __init__(self, c: IndexClient, peers: list[str], say: Callable[[str], None]) -> None:
        self.c = c
        self.peer_addrs = peers  # --peer, else the peers running on this machine
        self.say = say
        self.cached: tuple[dict[str, Any], dict[str, str]] | None = None

    def local_peers(self) -> list[str]:
        return self.peer_addrs or [r["addr"] for r in live_peers()]

    def from_peer(self, why: MirrorfsError) -> tuple[dict[str, Any], dict[str, str]]:
        if self.cached is not None:
            return self.cached
        addrs = self.local_peers()
        for addr in addrs:
            try:
                frame = _peer_call(addr, Msg.PEER_INDEX, {})
            except MirrorfsError:
                continue
            files = msgpack.unpackb(frame.payload, raw=False)
            self.say(
                f"(no index replica answered; from the cached index of peer "
                f"{frame.body.get('peer')} at {addr}, sequence {frame.body.get('seq')})"
            )
            self.cached = (files, dict(frame.body.get("peers", {})))
            return self.cached
        hint = "" if addrs else " (and no peer to ask: give --peer HOST:PORT)"
        raise MirrorfsError(f"{why}{hint}")

    def files(self, pattern: str | None = None) -> dict[str, Any]:
        try:
            if pattern is None:
                return self.c.query_pages("files", "files")
            return self.c.query_pages("search", "files", pattern=pattern)
        except MirrorfsError as exc:
            files = self.from_peer(exc)[0]
            if pattern is None:
                return files
            return {n: f for n, f in files.items() if fnmatch.fnmatchcase(n, pattern)}

    def peers(self) -> dict[str, str]:
        try:
            return self.c.query_pages("peers", "peers")
        except MirrorfsError as exc:
            return self.from_peer(exc)[1]

    def control(self, type_: int, body: dict[str, Any]) -> dict[str, Any]:
        """share/unshare, through the one peer running here (or --peer)."""
        addrs = self.local_peers()
        if not addrs:
            raise UsageError(
                "no mirrorfs-peer runs on this machine: start one "
                "(mirrorfs-peer --index GROUP:PORT --share DIR) or give --peer HOST:PORT"
            )
        if len(addrs) > 1:
            raise UsageError(f"several peers run here ({', '.join(addrs)}): choose with --peer")
        try:
            return _peer_call(addrs[0], type_, body).body
        except ServerError as exc:
            return {"ok": False, "error": exc.body.get("msg", str(exc))}


def fetch(ix: Index, name: str, output: str) -> None:
    """Download a shared file from every peer holding it, through the segmented downloader."""
    from mirrorfuse.transfer.download import Download, FileServerSource, run

    files = ix.files()
    if name not in files:
        raise UsageError(f"no peer shares {name!r}")
    peers = ix.peers()
    holders = [peers[h] for h in files[name]["holders"] if h in peers]
    if not holders:
        raise UsageError(f"no known peer holds {name!r} now")
    ix.say(f"fetching {name} from {len(holders)} peer(s): {', '.join(holders)}")
    sources = [FileServerSource(parse_address(a), name) for a in holders]
    if run(Download(sources, Path(output), 1.0, False, say=ix.say)) != 0:
        raise UsageError(f"could not fetch {name}")


def listing(files: dict[str, Any]) -> str:
    return (
        "\n".join(
            f"{n}  {f['size']} bytes  held by {', '.join(f['holders'])}"
            for n, f in sorted(files.items())
        )
        or "no files"
    )


def share(ix: Index, rest: list[str]) -> None:
    if not 1 <= len(rest) <= 2:
        raise UsageError("usage: share FILE [--name NAME] (in the shell: share FILE [NAME])")
    path = Path(rest[0])
    if not path.is_file():
        raise UsageError(f"{rest[0]} is not a regular file")
    name = rest[1] if len(rest) == 2 else path.name
    reply = ix.control(Msg.PEER_SHARE, {"path": str(path.resolve()), "name": name})
    if not reply.get("ok"):
        raise UsageError(f"cannot share {name!r}: {reply.get('error')}")
    ix.say(f"shared {path} as {name!r}")


def run_command(ix: Index, words: list[str], output: str | None = None) -> None:
    cmd, rest = words[0], words[1:]
    say = ix.say
    if cmd == "status":
        replies = ix.c.query_all("status", wait=1.0)
        if not replies:
            say("no replica answered")
        for r in sorted(replies, key=lambda r: r["replica"]):
            say(
                f"replica {r['replica']}: sequence {r['seq']}, master {r['master']}, "
                f"{r.get('peers', '?')} peers, {r.get('files', '?')} files, "
                f"state {r['digest']}, dropped datagrams {r['dropped']}"
            )
    elif cmd == "peers":
        say("\n".join(f"{p} at {a}" for p, a in sorted(ix.peers().items())) or "no peers")
    elif cmd == "files":
        say(listing(ix.files()))
    elif cmd == "search":
        if len(rest) != 1:
            raise UsageError("usage: search PATTERN (shell wildcards, e.g. *.mp3)")
        say(listing(ix.files(rest[0])))
    elif cmd == "fetch":
        if output is None and len(rest) == 2:
            rest, output = rest[:1], rest[1]
        if len(rest) != 1 or not output:
            raise UsageError("usage: fetch NAME -o OUTPUT")
        fetch(ix, rest[0], output)
    elif cmd == "share":
        share(ix, rest)
    elif cmd == "unshare":
        if len(rest) != 1:
            raise UsageError("usage: unshare NAME")
        reply = ix.control(Msg.PEER_UNSHARE, {"name": rest[0]})
        if not reply.get("ok"):
            raise UsageError(f"cannot unshare {rest[0]!r}: {reply.get('error')}")
        say(f"no longer shared: {rest[0]}")
    elif cmd == "json":
        say(json.dumps(ix.c.query(rest[0] if rest else "state"), indent=2))
    else:
        raise UsageError(f"unknown command {cmd!r}; {HELP}")


def peer_list(args: argparse.Namespace) -> list[str]:
    peers = [a for a in (args.peer or "").split(",") if a]
    for a in peers:
        parse_address(a)  # a clear UsageError for a malformed one
    return peers


def cmd_index(args: argparse.Namespace) -> int:
    c = client(args)
    ix = Index(c, peer_list(args), print)
    words = [args.what, *args.rest]
    if args.name and args.what != "share":
        raise UsageError("--name goes with share")
    if args.output and args.what != "fetch":
        raise UsageError("-o goes with fetch")
    if args.what == "share" and args.name:
        words.append(args.name)
    try:
        run_command(ix, words, args.output)
    finally:
        c.close()
    return 0


def cmd_index_shell(args: argparse.Namespace) -> int:
    c = client(args)
    ix = Index(c, peer_list(args), lambda m: print(m, flush=True))
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
                run_command(ix, line)
            except Exception as exc:  # the shell never dies on one bad command
                print(f"error: {exc}")
    finally:
        c.close()


def add_group_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("group", help="multicast group address, e.g. 235.1.1.1")
    p.add_argument("port", type=int, help="UDP port of the group")
    p.add_argument("--replicas", help="host:port,... of the replicas (unicast, no multicast)")
    p.add_argument(
        "--peer",
        metavar="HOST:PORT[,...]",
        help="a peer to ask when no replica answers, and the one share/unshare talk to "
        "(default: the peers running on this machine)",
    )
