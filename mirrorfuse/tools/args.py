"""What every command shares: argument types, naming a cluster, and how a command ends.

A command's bad input is one line, ``PROG: error: ...``, and a non-zero exit
(1, or 2 for bad usage where a command says so), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path

from mirrorfuse.wire.addresses import (
    DEFAULT_HOST,
    ClusterSpec,
    from_base_port,
    parse_address,
    parse_port,
    parse_servers,
)
from mirrorfuse.wire.errors import MirrorfsError, UsageError
from mirrorfuse.wire.sizes import parse_size

from .hosts import checked_cluster


def _argtype(parse: Callable[[str], object]) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            return parse(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


port_arg = _argtype(parse_port)
size_arg = _argtype(parse_size)
metrics_arg = _argtype(lambda text: parse_address(text, "metrics address"))

METRICS_HELP = (
    "serve Prometheus metrics on HOST:PORT (/metrics; e.g. 127.0.0.1:9100); off by default"
)


def listen_port_arg(text: str) -> int:
    """A port to listen on; 0 means any free one."""
    return 0 if text.strip() == "0" else int(str(port_arg(text)))


def _positive(text: str, unit: str) -> float:
    """A positive, finite number (not nan, inf or -1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of {unit}")
    return value


def seconds_arg(text: str) -> float:
    """A positive, finite number of seconds."""
    return _positive(text, "seconds")


def rate_arg(text: str) -> float:
    """A positive, finite number of MiB/s."""
    return _positive(text, "MiB/s")


def add_cluster_args(parser: argparse.ArgumentParser, mount: bool = False) -> None:
    """How a command names its cluster; with ``mount``, also by a mountpoint (--mount)."""
    title = "cluster (one of; default: the only mirrorfs mount)" if mount else "cluster (one of)"
    group = parser.add_argument_group(title)
    if mount:
        group.add_argument(
            "--mount",
            metavar="MOUNTPOINT",
            help="the cluster behind this mirrorfs mount of this machine",
        )
    group.add_argument(
        "--servers", metavar="HOST:PORT,...", help="every server, in id order (server 0 first)"
    )
    group.add_argument("--base-port", type=int, metavar="B", help="server i listens on B+i")
    group.add_argument("--count", type=int, metavar="N", help="number of servers with --base-port")
    group.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"host of the servers with --base-port ({DEFAULT_HOST})",
    )
    add_key_args(parser)


def add_key_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-file",
        metavar="FILE",
        help="the volume's key (default: <volume id>.key in ~/.config/mirrorfs/keys)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="encrypt traffic (the servers run with --tls)"
    )


def add_mountpoint_arg(parser: argparse.ArgumentParser, option: bool = False) -> None:
    """MOUNTPOINT, last on the line: the same as --mount (which ``option`` adds)."""
    if option:
        parser.add_argument(
            "--mount", metavar="MOUNTPOINT", help="the mount whose cluster it is (same as below)"
        )
    parser.add_argument(
        "where",
        nargs="?",
        metavar="MOUNTPOINT",
        help="a mirrorfs mount of this machine: its cluster (same as --mount)",
    )


def mountpoint_of(args: argparse.Namespace) -> str | None:
    """The mountpoint a command was given, positional or --mount (None: not given)."""
    where, option = getattr(args, "where", None), getattr(args, "mount", None)
    if where is not None and option is not None and where != option:
        raise UsageError(f"two mountpoints given ({where} and --mount {option}): give one")
    return where if where is not None else option


def cluster_from_args(args: argparse.Namespace) -> ClusterSpec:
    mountpoint = mountpoint_of(args)
    if args.servers and args.base_port is not None:
        raise UsageError("give either --servers or --base-port/--count, not both")
    if mountpoint is not None and (args.servers or args.base_port is not None):
        raise UsageError("give either a mountpoint or --servers or --base-port/--count")
    if args.servers:
        spec = checked_cluster(parse_servers(args.servers), "--servers")
    elif args.base_port is not None:
        if args.count is None:
            raise UsageError("--base-port needs --count (the number of servers)")
        spec = checked_cluster(from_base_port(args.base_port, args.count, args.host), "--host")
    else:
        from . import registry

        spec = registry.default_cluster(mountpoint)
    key_file = getattr(args, "key_file", None)
    if key_file:
        spec = dataclasses.replace(spec, key_file=str(Path(key_file).resolve()))
    if getattr(args, "tls", False):
        spec = dataclasses.replace(spec, tls=True)
    return spec


def run(
    prog: str,
    command: Callable[[], int],
    usage_exit: int = 2,
    usage: Callable[[], str] | None = None,
) -> int:
    """Run a command's body; its errors become one line and an exit code (bad usage:
    the command's usage line first, when given, as argparse does)."""
    try:
        return command()
    except UsageError as exc:
        if usage is not None:
            print(usage(), end="", file=sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return usage_exit
    except MirrorfsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
