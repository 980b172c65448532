"""mirrorfs-cli: administer a cluster, use a volume, download, ask the index group.

The parser knows every command; a command's code is imported when it runs, so
that a download (or any --help) does not wait for the volume client, the file
system, the index client and rich to be imported.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.errors import UsageError
from mirrorfuse.wire.sizes import check_block_size, human, parse_size

from . import commandargs, logs
from .args import (
    add_cluster_args,
    add_mountpoint_arg,
    cluster_from_args,
    mountpoint_of,
    run,
    seconds_arg,
)

PROG = "mirrorfs-cli"


def cmd_format(args: argparse.Namespace) -> int:
    from mirrorfuse.client.loop import run_async

    from . import admin

    spec = cluster_from_args(args)
    size = check_block_size(parse_size(args.block_size))
    volume = run_async(admin.format_volume(spec, size, args.force, args.timeout))
    print(
        f"formatted volume {volume}: {spec.count} servers in {spec.count // 2} mirror pairs, "
        f"block size {human(size)}"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from mirrorfuse.client.loop import run_async

    from . import admin

    spec = cluster_from_args(args)
    if args.watch:
        if args.json:
            raise UsageError("--watch shows a table: it does not go with --json")
        from .watch import watch

        return watch(lambda: run_async(admin.status(spec, args.timeout)), args.interval, sys.stdout)
    st = run_async(admin.status(spec, args.timeout))
    st["mount"] = mount_info(spec)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(admin.format_status(st))
        if st["mount"]:
            print(mount_line(st["mount"]))
    return 0 if st["volume"] is not None else 1


def mount_info(spec: ClusterSpec) -> dict[str, Any] | None:
    """The mount of this machine that uses the cluster: where, its pid, its log."""
    from . import registry

    rec = registry.mount_of(spec)
    if rec is None:
        return None
    return {"mountpoint": rec["mountpoint"], "pid": rec.get("mount_pid"), "log": rec.get("log")}


def mount_line(m: dict[str, Any]) -> str:
    log = m["log"] or "its standard error (mounted with -f)"
    return f"mounted at {m['mountpoint']} (pid {m['pid']}), log {log}"


def cmd_start(args: argparse.Namespace) -> int:
    from . import registry
    from .up import start_server  # the mount's code, only for this command

    where = mountpoint_of(args)
    if where is None and not registry.live_records():
        raise UsageError(
            "no mirrorfs mount on this machine: ./mount.sh MOUNTPOINT starts the servers it needs"
        )
    print(start_server(registry.find(where), args.id))
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from mirrorfuse.client.loop import run_async

    from . import admin

    spec = cluster_from_args(args)
    run_async(admin.rebuild(spec, args.id, lambda m: print(m, flush=True), args.timeout))
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from mirrorfuse.client.loop import run_async

    from . import admin

    if args.id is not None and not args.id.lstrip("-").isdigit():  # heal MOUNTPOINT
        if args.where is not None:
            raise UsageError(f"server id {args.id!r} is not a number")
        args.id, args.where = None, args.id
    args.id = None if args.id is None else int(args.id)
    spec = cluster_from_args(args)
    say = lambda m: print(m, flush=True)  # noqa: E731
    run_async(admin.heal_servers(spec, args.id, say, args.timeout, args.full))
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from mirrorfuse.client.loop import run_async

    from .fsck import fsck
    from .fsck import summary as fsck_summary

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


# the commands whose code is a module of its own, imported when one of them runs


def cmd_shell(args: argparse.Namespace) -> int:
    from . import shell

    return shell.main(args)


def cmd_serve_file(args: argparse.Namespace) -> int:
    from . import servefile

    return servefile.main(args)


def cmd_download(args: argparse.Namespace) -> int:
    from . import download

    return download.cmd_download(args)


def cmd_get(args: argparse.Namespace) -> int:
    from . import download

    return download.cmd_get(args)


def cmd_index(args: argparse.Namespace) -> int:
    from . import indexcmd

    return indexcmd.cmd_index(args)


def cmd_index_shell(args: argparse.Namespace) -> int:
    from . import indexcmd

    return indexcmd.cmd_index_shell(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Administer and use a mirrorfs cluster.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        """A command on a cluster: its servers are named the same way everywhere."""
        sp = sub.add_parser(name, help=text, description=text)
        add_cluster_args(sp, mount=True)
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
    add_mountpoint_arg(sp)

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
    add_mountpoint_arg(sp)

    sp = sub.add_parser(
        "shell",
        help="an interactive client that shows each mirrored write and read",
        description="An interactive client that shows each replica being written and read.",
    )
    commandargs.add_shell_args(sp)
    sp.set_defaults(func=cmd_shell)

    sp = sub.add_parser(
        "serve-file",
        help="serve one file from N virtual servers, with a console to pause and end them",
        description="N file servers, one per port, each serving FILE. Console: N pauses "
        "server N, rN resumes it, eN ends a paused server.",
    )
    commandargs.add_serve_file_args(sp)
    sp.set_defaults(func=cmd_serve_file)

    sp = sub.add_parser(
        "download",
        help="download one file from many sources at once (file servers, http:// mirrors)",
        description="Segmented parallel download from mirrorfs file servers (-a/-p) and/or "
        "http:// mirrors. A paused server's segments are taken over by the others; a dead "
        "server's are divided equally among the live ones. -r resumes.",
    )
    commandargs.add_download_args(sp)
    sp.set_defaults(func=cmd_download)

    sp = command("get", cmd_get, "read a volume's file through every live server at once")
    commandargs.add_get_args(sp)

    sp = sub.add_parser(
        "index",
        help="the P2P index group: status, peers, files, search, fetch, share, unshare",
        description="Ask the index group; the first reply is shown.",
    )
    commandargs.add_group_args(sp)
    sp.add_argument(
        "what",
        choices=["status", "peers", "files", "search", "fetch", "share", "unshare"],
    )
    sp.add_argument("rest", nargs="*", metavar="PATTERN|NAME|FILE")
    sp.add_argument("-o", dest="output", help="where fetch saves the file")
    sp.add_argument("--name", help="the name share gives the file (default: its own)")
    sp.set_defaults(func=cmd_index)

    sp = sub.add_parser("index-shell", help="interactive client of the index group")
    commandargs.add_group_args(sp)
    sp.set_defaults(func=cmd_index_shell)

    sp = command(
        "heal",
        cmd_heal,
        "bring failed or stale servers back: only what changed, or everything when their "
        "directory is empty, another or older (a mount does this by itself)",
    )
    sp.add_argument("id", nargs="?", help="one server (default: every one that needs it)")
    sp.add_argument("--full", action="store_true", help="copy everything, whatever it holds")
    add_mountpoint_arg(sp)

    sp = command("rebuild", cmd_rebuild, "copy all of a server's mirror onto it (a full heal)")
    sp.add_argument("id", type=int, help="id of the server (running, old or empty data dir)")
    add_mountpoint_arg(sp)

    sp = sub.add_parser(
        "start",
        help="start a server of a ./mount.sh cluster again (./mount.sh -u stops it)",
        description="Start server ID of the cluster that ./mount.sh started for a mount, "
        "as ./mount.sh starts it (its data directory, port and log); the mount heals it, "
        "and ./mount.sh -u stops it with the others.",
    )
    sp.add_argument("id", type=int, help="id of the server")
    add_mountpoint_arg(sp, option=True)
    sp.set_defaults(func=cmd_start)
    for each in sub.choices.values():  # a command's errors show its own usage
        each.set_defaults(usage=each.format_usage, prog=each.prog)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(PROG, logging.WARNING)
    return run(args.prog, lambda: int(args.func(args)), usage_exit=1, usage=args.usage)


if __name__ == "__main__":
    sys.exit(main())
