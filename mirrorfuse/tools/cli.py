"""mirrorfs-cli: administer a cluster, use a volume, download, ask the index group."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from mirrorfuse.client.blocking import run_async
from mirrorfuse.wire.errors import UsageError
from mirrorfuse.wire.sizes import check_block_size, human, parse_size

from . import admin, download, indexcmd, logs, servefile, shell
from .args import add_cluster_args, cluster_from_args, run, seconds_arg
from .fsck import fsck
from .fsck import summary as fsck_summary

PROG = "mirrorfs-cli"


def cmd_format(args: argparse.Namespace) -> int:
    spec = cluster_from_args(args)
    size = check_block_size(parse_size(args.block_size))
    volume = run_async(admin.format_volume(spec, size, args.force))
    print(
        f"formatted volume {volume}: {spec.count} servers in {spec.count // 2} mirror pairs, "
        f"block size {human(size)}"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.where:
        args.mount = args.where
    spec = cluster_from_args(args)
    if args.watch:
        if args.json:
            raise UsageError("--watch shows a table: it does not go with --json")
        from .watch import watch

        return watch(lambda: run_async(admin.status(spec, args.timeout)), args.interval, sys.stdout)
    st = run_async(admin.status(spec, args.timeout))
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(admin.format_status(st))
    return 0 if st["volume"] is not None else 1


def cmd_rebuild(args: argparse.Namespace) -> int:
    spec = cluster_from_args(args)
    run_async(admin.rebuild(spec, args.id, lambda m: print(m, flush=True), args.timeout))
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    spec = cluster_from_args(args)
    say = lambda m: print(m, flush=True)  # noqa: E731
    run_async(admin.heal_servers(spec, args.id, say, args.timeout, args.full))
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    spec = cluster_from_args(args)
    rep, found = run_async(fsck(spec, args.deep, args.timeout, args.repair))
    for problem in rep.problems:
        print(f"PROBLEM: {problem}")
    for line in fsck_summary(found):
        print(line)
    count = len(rep.problems) + (found.unrepaired if found else 0)
    what = "namespace and every copy of every block" if found else "namespace"
    verdict = f"{count} problem(s)" if count else "clean"
    copies = f", {found.copies} copies compared" if found else ""
    fixed = sum(found.repaired.values()) if found else 0
    repaired = f"; {fixed} copies repaired" if fixed else ""
    print(
        f"fsck ({what}): {verdict}{repaired}; {rep.inodes} inodes, {rep.blocks} blocks"
        f"{copies}, {rep.orphans} open-but-unlinked"
    )
    return 1 if count else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Administer and use a mirrorfs cluster.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        """A command on a cluster: its servers are named the same way everywhere."""
        sp = sub.add_parser(name, help=text, description=text)
        add_cluster_args(sp)
        sp.add_argument(
            "--timeout",
            type=seconds_arg,
            default=3.0,
            help="seconds before a silent server is down (3)",
        )
        sp.set_defaults(func=func)
        return sp

    sp = command("format", cmd_format, "create a new, empty volume on the servers")
    sp.add_argument(
        "--block-size", default="1M", help="block size, a power of two from 4K to 4M (1M)"
    )
    sp.add_argument("--force", action="store_true", help="erase a volume the servers already hold")

    sp = command("status", cmd_status, "show servers, mirror pairs, states and usage")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.add_argument(
        "--watch",
        action="store_true",
        help="ask again every interval: redrawn in place on a terminal, a table per "
        "interval when piped; Ctrl-C ends it",
    )
    sp.add_argument(
        "-n", "--interval", type=seconds_arg, default=2.0, help="seconds between updates (2)"
    )
    sp.add_argument("where", nargs="?", metavar="MOUNTPOINT", help="same as --mount")

    sp = command("fsck", cmd_fsck, "check the namespace (and with --deep every block) of a volume")
    sp.add_argument(
        "--deep",
        action="store_true",
        help="also read every copy of every block and compare it with the block map",
    )
    sp.add_argument(
        "--repair",
        action="store_true",
        help="rewrite bad copies from their mirror (implies --deep; not while mounted)",
    )

    sp = sub.add_parser(
        "shell",
        help="an interactive client that shows each mirrored write and read",
        description="An interactive client that shows each replica being written and read.",
    )
    shell.add_arguments(sp)
    sp.set_defaults(func=shell.main)

    sp = sub.add_parser(
        "serve-file",
        help="serve one file from N virtual servers, with a console to pause and end them",
        description="N file servers, one per port, each serving FILE. Console: N pauses "
        "server N, rN resumes it, eN ends a paused server.",
    )
    servefile.add_arguments(sp)
    sp.set_defaults(func=servefile.main)

    sp = sub.add_parser(
        "download",
        help="download one file from many sources at once (file servers, http:// mirrors)",
        description="Segmented parallel download from mirrorfs file servers (-a/-p) and/or "
        "http:// mirrors. A paused server's segments are taken over by the others; a dead "
        "server's are divided equally among the live ones. -r resumes.",
    )
    download.add_download_args(sp)

    sp = command("get", download.cmd_get, "read a volume's file through every live server at once")
    download.add_get_args(sp)

    sp = sub.add_parser(
        "index",
        help="the P2P index group: status, peers, files, search, fetch, share, unshare",
        description="Ask the index group; the first reply is shown.",
    )
    indexcmd.add_group_args(sp)
    sp.add_argument(
        "what",
        choices=["status", "peers", "files", "search", "fetch", "share", "unshare"],
    )
    sp.add_argument("rest", nargs="*", metavar="PATTERN|NAME|FILE")
    sp.add_argument("-o", dest="output", help="where fetch saves the file")
    sp.add_argument("--name", help="the name share gives the file (default: its own)")
    sp.set_defaults(func=indexcmd.cmd_index)

    sp = sub.add_parser("index-shell", help="interactive client of the index group")
    indexcmd.add_group_args(sp)
    sp.set_defaults(func=indexcmd.cmd_index_shell)

    sp = command(
        "heal",
        cmd_heal,
        "bring failed or stale servers back: only what changed, or everything when their "
        "directory is empty, another or older (a mount does this by itself)",
    )
    sp.add_argument("id", type=int, nargs="?", help="one server (default: every one that needs it)")
    sp.add_argument("--full", action="store_true", help="copy everything, whatever it holds")

    sp = command("rebuild", cmd_rebuild, "copy all of a server's mirror onto it (a full heal)")
    sp.add_argument("id", type=int, help="id of the server (running, old or empty data dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(PROG, logging.WARNING)
    return run(PROG, lambda: int(args.func(args)), usage_exit=1)


if __name__ == "__main__":
    sys.exit(main())
