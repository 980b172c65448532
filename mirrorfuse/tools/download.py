"""mirrorfs-cli download and get: one file from many sources at once."""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath

from mirrorfuse.client.loop import run_async
from mirrorfuse.transfer.download import Download
from mirrorfuse.transfer.sources import FileServerSource, HttpSource, Source
from mirrorfuse.wire.addresses import Address, parse_port
from mirrorfuse.wire.errors import UsageError

from .args import cluster_from_args
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
    from mirrorfuse.transfer.get import get  # the volume client: only get needs it

    spec = cluster_from_args(args)
    out = Path(args.output)
    if out.is_dir():  # as cp does: in it, under the file's own name
        out = out / PurePosixPath(args.path).name
    return run_async(get(spec, args.path, out, args.interval, args.resume, args.timeout))
