"""mirrorfs-cli download and get: one file from many sources at once."""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath

from mirrorfuse.client.blocking import run_async
from mirrorfuse.transfer.download import Download
from mirrorfuse.transfer.get import get
from mirrorfuse.transfer.sources import FileServerSource, HttpSource, Source
from mirrorfuse.wire.addresses import Address, parse_port
from mirrorfuse.wire.errors import UsageError

from .args import cluster_from_args, seconds_arg
from .hosts import resolve_host


def cmd_download(args: argparse.Namespace) -> int:
    # URLs may stand anywhere, also among the ports after -p
    words = [*(args.ports or []), *args.urls]
    urls = [w for w in words if "://" in w]
    ports = [parse_port(w) for w in words if "://" not in w]
    given = [f"port {p}" for p in ports] + urls
    twice = sorted({w for w in given if given.count(w) > 1})
    if twice:
        raise UsageError(f"{twice[0]} is listed twice: each source must be another server")
    if args.count is not None and args.count != len(ports) + len(urls):
        raise UsageError(
            f"-n {args.count} does not match the {len(ports) + len(urls)} source(s) given"
        )
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise UsageError(f"{u!r} is not an http:// URL")
    if not ports and not urls:
        raise UsageError("give the servers (-a ADDR -p PORT ...) and/or http:// URLs")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise UsageError(f"directory {out.parent} does not exist")
    if ports:
        resolve_host(args.address, "-a")
    sources: list[Source] = [FileServerSource(Address(args.address, p)) for p in ports]
    sources += [HttpSource(u) for u in urls]
    return run_async(Download(sources, out, args.interval, args.resume).run())


def cmd_get(args: argparse.Namespace) -> int:
    spec = cluster_from_args(args)
    out = Path(args.output)
    if out.is_dir():  # as cp does: in it, under the file's own name
        out = out / PurePosixPath(args.path).name
    return run_async(get(spec, args.path, out, args.interval, args.resume, args.timeout))


def add_download_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "-i",
        dest="interval",
        type=seconds_arg,
        default=1.0,
        help="seconds between progress reports (1)",
    )
    sp.add_argument(
        "-o",
        dest="output",
        required=True,
        help="where to save the file (a directory: in it, under the served name)",
    )
    sp.add_argument("-n", dest="count", type=int, help="number of sources (checked)")
    sp.add_argument("-a", dest="address", default="127.0.0.1", help="address of the servers")
    sp.add_argument("-p", dest="ports", nargs="+", help="ports of the servers")
    sp.add_argument("-r", dest="resume", action="store_true", help="resume a download")
    sp.add_argument("urls", nargs="*", metavar="URL", help="http:// mirrors of the same file")
    sp.set_defaults(func=cmd_download)


def add_get_args(sp: argparse.ArgumentParser) -> None:
    """(the cluster arguments and --timeout come with every cluster command)"""
    sp.add_argument("path", help="path of the file inside the volume")
    sp.add_argument("-o", dest="output", required=True, help="where to save it")
    sp.add_argument(
        "-i", dest="interval", type=seconds_arg, default=1.0, help="progress interval (1)"
    )
    sp.add_argument("-r", dest="resume", action="store_true", help="resume an interrupted get")
    sp.set_defaults(func=cmd_get)
