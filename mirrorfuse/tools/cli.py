"""mirrorfs-cli: administer a mirrorfs cluster (format, status, rebuild)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

from mirrorfuse.tools import admin, shell
from mirrorfuse.tools import indexcmd as indexcli
from mirrorfuse.wire.addresses import add_cluster_args, cluster_from_args
from mirrorfuse.wire.errors import MirrorfsError, UsageError
from mirrorfuse.wire.sizes import check_block_size, human, parse_size
from servers import fileserver

PROG = "mirrorfs-cli"


def cmd_format(args: argparse.Namespace) -> int:
    spec = cluster_from_args(args)
    size = check_block_size(parse_size(args.block_size))
    volume = asyncio.run(admin.format_volume(spec, size, args.force))
    print(
        f"formatted volume {volume}: {spec.count} servers in {spec.count // 2} mirror pairs, "
        f"block size {human(size)}"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.where:
        args.mount = args.where
    spec = cluster_from_args(args)
    st = asyncio.run(admin.status(spec, args.timeout))
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(admin.format_status(st))
    return 0 if st["volume"] is not None else 1


def cmd_rebuild(args: argparse.Namespace) -> int:
    spec = cluster_from_args(args)
    asyncio.run(admin.rebuild(spec, args.id, lambda m: print(m, flush=True), args.timeout))
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from mirrorfuse.tools.fsck import fsck

    spec = cluster_from_args(args)
    rep = asyncio.run(fsck(spec, args.deep, args.timeout))
    for problem in rep.problems:
        print(f"PROBLEM: {problem}")
    what = "namespace and every data block" if args.deep else "namespace"
    verdict = f"{len(rep.problems)} problem(s)" if rep.problems else "clean"
    print(
        f"fsck ({what}): {verdict}; {rep.inodes} inodes, {rep.blocks} blocks, "
        f"{rep.orphans} open-but-unlinked"
    )
    return 1 if rep.problems else 0


def cmd_download(args: argparse.Namespace) -> int:
    from mirrorfuse.transfer.download import Download, FileServerSource, HttpSource, run
    from mirrorfuse.wire.addresses import Address, parse_port

    # URLs may stand anywhere, also among the ports after -p
    words = [*(args.ports or []), *args.urls]
    args.urls = [w for w in words if "://" in w]
    ports = [parse_port(w) for w in words if "://" not in w]
    if args.count is not None and args.count != len(ports) + len(args.urls):
        raise UsageError(f"-n {args.count} but {len(ports) + len(args.urls)} sources were given")
    for u in args.urls:
        if not u.startswith(("http://", "https://")):
            raise UsageError(f"{u!r} is not an http:// URL")
    if not ports and not args.urls:
        raise UsageError("give the servers (-a ADDR -p PORT ...) and/or http:// URLs")
    if args.interval <= 0:
        raise UsageError("-i must be a positive number of seconds")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise UsageError(f"directory {out.parent} does not exist")
    sources = [FileServerSource(Address(args.address, p)) for p in ports]
    sources += [HttpSource(u) for u in args.urls]
    return run(Download(sources, out, args.interval, args.resume))


def cmd_get(args: argparse.Namespace) -> int:
    from mirrorfuse.client.volume import Volume
    from mirrorfuse.core.scheduler import split
    from mirrorfuse.tools.mount import read_namespace
    from mirrorfuse.transfer.download import Download, VolumeServerSource

    spec = cluster_from_args(args)

    async def go() -> int:
        vol = Volume(spec, args.timeout)
        await vol.open()
        try:
            ns = await read_namespace(vol)
            node = ns.inodes[1]
            for part in [p for p in args.path.split("/") if p]:
                if node.entries is None or part not in node.entries:
                    raise UsageError(f"{args.path}: no such file in the volume")
                node = ns.inodes[node.entries[part]]
            if node.entries is not None:
                raise UsageError(f"{args.path} is a directory")
            blocks = dict(node.blocks)
            eligible = {
                i: {
                    f"server {s} ({spec.addresses[s]})" for s in vol.readable(vol.layout.pair_of(b))
                }
                for i, (b, _) in blocks.items()
            }
            servers = sorted({s for p in range(vol.layout.pairs) for s in vol.readable(p)})
            sources = [VolumeServerSource(vol, s, blocks, node.size) for s in servers]
            dl = Download(
                sources,
                Path(args.output),
                args.interval,
                args.resume,
                segments=lambda size: split(size, vol.block_size),
                eligible=eligible,
            )
            for i in range(-(-node.size // vol.block_size)):
                eligible.setdefault(i, set())
            dl.holes = {i for i in eligible if i not in blocks}
            return await dl.run()
        finally:
            await vol.close()

    return asyncio.run(go())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Administer a mirrorfs cluster.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=text, description=text)
        add_cluster_args(sp)
        sp.add_argument(
            "--timeout", type=float, default=3.0, help="seconds before a silent server is down (3)"
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
    sp.add_argument("where", nargs="?", metavar="MOUNTPOINT", help="same as --mount")

    sp = command("fsck", cmd_fsck, "check the namespace (and with --deep every block) of a volume")
    sp.add_argument("--deep", action="store_true", help="also read and verify every data block")

    sp = sub.add_parser(
        "shell",
        help="the interactive client of seed 000 (mkdir, create, write, read, ...)",
        description="An interactive client that shows each replica being written and read.",
    )
    shell.add_arguments(sp)
    sp.set_defaults(func=shell.main)

    sp = sub.add_parser(
        "serve-file",
        help="serve one file from N virtual servers (seed 003)",
        description="N file servers, one per port, each serving FILE. Console: N pauses "
        "server N, rN resumes it, eN ends a paused server.",
    )
    fileserver.add_arguments(sp)
    sp.set_defaults(func=fileserver.main)

    sp = sub.add_parser(
        "download",
        help="download one file from many sources at once (seeds 003/004)",
        description="Segmented parallel download from mirrorfs file servers (-a/-p) and/or "
        "http:// mirrors. A paused server's segments are taken over by the others; a dead "
        "server's are divided equally among the live ones. -r resumes.",
    )
    sp.add_argument(
        "-i", dest="interval", type=float, default=1.0, help="seconds between progress reports (1)"
    )
    sp.add_argument("-o", dest="output", required=True, help="where to save the file")
    sp.add_argument("-n", dest="count", type=int, help="number of sources (checked)")
    sp.add_argument("-a", dest="address", default="127.0.0.1", help="address of the servers")
    sp.add_argument("-p", dest="ports", nargs="+", help="ports of the servers")
    sp.add_argument("-r", dest="resume", action="store_true", help="resume a download")
    sp.add_argument("urls", nargs="*", metavar="URL", help="http:// mirrors of the same file")
    sp.set_defaults(func=cmd_download)

    sp = command("get", cmd_get, "read a volume's file through every live server at once")
    sp.add_argument("path", help="path of the file inside the volume")
    sp.add_argument("-o", dest="output", required=True, help="where to save it")
    sp.add_argument("-i", dest="interval", type=float, default=1.0, help="progress interval (1)")
    sp.add_argument("-r", dest="resume", action="store_true", help="resume an interrupted get")

    sp = sub.add_parser(
        "index",
        help="the P2P index group: status, peers, files, search, fetch, share, unshare",
        description="Ask the index group; the first reply is shown.",
    )
    indexcli.add_group_args(sp)
    sp.add_argument(
        "what",
        choices=["status", "peers", "files", "search", "fetch", "share", "unshare"],
    )
    sp.add_argument("rest", nargs="*", metavar="PATTERN|NAME|FILE")
    sp.add_argument("-o", dest="output", help="where fetch saves the file")
    sp.add_argument("--name", help="the name share gives the file (default: its own)")
    sp.set_defaults(func=indexcli.cmd_index)

    sp = sub.add_parser("index-shell", help="interactive client of the index group (seed 002)")
    indexcli.add_group_args(sp)
    sp.set_defaults(func=indexcli.cmd_index_shell)

    sp = command("rebuild", cmd_rebuild, "copy a failed server's blocks back from its mirror")
    sp.add_argument("id", type=int, help="id of the failed server (running, old or empty data dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MirrorfsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
