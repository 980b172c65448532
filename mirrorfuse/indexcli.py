"""mirrorfs-cli index ... and index-shell: ask the index group (seed 002's client)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from .errors import UsageError
from .indexclient import IndexClient

HELP = """commands: status | peers | files | search PATTERN | help | quit
(each waits for the first reply; duplicates and late replies are ignored)"""


def client(args: argparse.Namespace) -> IndexClient:
    replicas = None
    if args.replicas:
        replicas = []
        for r in args.replicas.split(","):
            host, _, port = r.rpartition(":")
            if not host or not port.isdigit():
                raise UsageError(f"replica {r!r} is not host:port")
            replicas.append((host, int(port)))
    if not 1024 <= args.port <= 65535:
        raise UsageError(f"port {args.port} is outside 1024-65535")
    return IndexClient(args.group, args.port, replicas)


def fetch(c: IndexClient, name: str, output: str, say: Callable[[str], None]) -> None:
    """Download a shared file from every peer holding it, through the segmented downloader."""
    from pathlib import Path

    from .cluster import parse_address
    from .download import Download, FileServerSource, run

    files = c.query("files")["files"]
    if name not in files:
        raise UsageError(f"no peer shares {name!r}")
    peers = c.query("peers")["peers"]
    holders = [peers[h] for h in files[name]["holders"] if h in peers]
    say(f"fetching {name} from {len(holders)} peer(s): {', '.join(holders)}")
    sources = [FileServerSource(parse_address(a), name) for a in holders]
    if run(Download(sources, Path(output), 1.0, False, say=say)) != 0:
        raise UsageError(f"could not fetch {name}")


def run_command(
    c: IndexClient, words: list[str], say: Callable[[str], None], output: str | None = None
) -> None:
    cmd, rest = words[0], words[1:]
    if cmd == "status":
        replies = c.query_all("status", wait=1.0)
        if not replies:
            say("no replica answered")
        for r in sorted(replies, key=lambda r: r["replica"]):
            say(
                f"replica {r['replica']}: sequence {r['seq']}, master {r['master']}, "
                f"state {r['digest']}, dropped datagrams {r['dropped']}"
            )
    elif cmd == "peers":
        peers = c.query("peers")["peers"]
        say("\n".join(f"{p} at {a}" for p, a in sorted(peers.items())) or "no peers")
    elif cmd in ("files", "search"):
        if cmd == "search" and len(rest) != 1:
            raise UsageError("usage: search PATTERN (shell wildcards, e.g. *.mp3)")
        reply = c.query("search", pattern=rest[0]) if cmd == "search" else c.query("files")
        files = reply["files"]
        say(
            "\n".join(
                f"{n}  {f['size']} bytes  held by {', '.join(f['holders'])}"
                for n, f in sorted(files.items())
            )
            or "no files"
        )
    elif cmd == "fetch":
        if len(rest) != 1 or not output:
            raise UsageError("usage: index GROUP PORT fetch NAME -o OUTPUT")
        fetch(c, rest[0], output, say)
    elif cmd == "json":
        say(json.dumps(c.query(rest[0] if rest else "state"), indent=2))
    else:
        raise UsageError(f"unknown command {cmd!r}; {HELP}")


def cmd_index(args: argparse.Namespace) -> int:
    c = client(args)
    try:
        run_command(c, [args.what, *args.rest], print, args.output)
    finally:
        c.close()
    return 0


def cmd_index_shell(args: argparse.Namespace) -> int:
    c = client(args)
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
            try:
                run_command(c, line, lambda m: print(m, flush=True))
            except Exception as exc:  # the shell never dies on one bad command
                print(f"error: {exc}")
    finally:
        c.close()


def add_group_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("group", help="multicast group address, e.g. 235.1.1.1")
    p.add_argument("port", type=int, help="UDP port of the group")
    p.add_argument("--replicas", help="host:port,... of the replicas (unicast, no multicast)")
