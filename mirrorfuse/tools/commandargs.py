"""The arguments of the mirrorfs-cli commands whose code is a module of its own.

Argparse only: the parser is built for every command (and every --help), so
defining download's options must not import the downloader, nor shell's the
file system. The commands' modules are imported when they run (cli.py).
"""

from __future__ import annotations

import argparse

from mirrorfuse.index.keys import default_key_path
from mirrorfuse.wire.errors import UsageError

from .args import port_arg, rate_arg, seconds_arg


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


def add_get_args(sp: argparse.ArgumentParser) -> None:
    """(the cluster arguments and --timeout come with every cluster command)"""
    sp.add_argument("path", help="path of the file inside the volume")
    sp.add_argument("-o", dest="output", required=True, help="where to save it")
    sp.add_argument(
        "-i", dest="interval", type=seconds_arg, default=1.0, help="progress interval (1)"
    )
    sp.add_argument("-r", dest="resume", action="store_true", help="resume an interrupted get")


def add_serve_file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i", dest="interval", type=seconds_arg, required=True, help="seconds between status lines"
    )
    p.add_argument("-f", dest="file", required=True, help="the file to serve")
    p.add_argument("-n", dest="count", type=int, help="number of servers (must match -p)")
    p.add_argument("-a", dest="address", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "-p",
        dest="ports",
        type=port_arg,
        nargs="+",
        required=True,
        help="one port per server (1024-65535)",
    )
    p.add_argument(
        "--rate",
        type=rate_arg,
        help="limit each server to this many MiB/s (to watch a transfer, pause and resume it)",
    )


def parse_delay(text: str) -> float:
    """The shell's waiting time, from its options or its prompt."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise UsageError("the waiting time must be between 0 and 3600 seconds")
    return value


def parse_delay_arg(text: str) -> float:
    try:
        return parse_delay(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_shell_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=4, help="number of servers (4)")
    p.add_argument("--delay", type=parse_delay_arg, help="waiting time t between replicas, s")
    p.add_argument("--base-port", type=int, help="4-digit starting port (server i on B+i)")
    p.add_argument(
        "--read-delay", type=parse_delay_arg, default=5.0, help="wait before a read, s (5)"
    )
    p.add_argument("--yes", action="store_true", help="do not wait for Enter")
    p.add_argument(
        "--timeout",
        type=seconds_arg,
        default=3.0,
        help="seconds before a silent server is marked failed (3)",
    )


def add_group_args(p: argparse.ArgumentParser) -> None:
    """How index and index-shell name the index group."""
    p.add_argument("group", help="multicast group address, e.g. 235.1.1.1")
    p.add_argument("port", type=port_arg, help="UDP port of the group")
    p.add_argument("--replicas", help="host:port,... of the replicas (unicast, no multicast)")
    p.add_argument(
        "--host",
        help="this machine's address on the group's network, as the replicas' --host "
        "(127.0.0.1 for a multicast group, the default of the replicas)",
    )
    p.add_argument(
        "--key-file",
        metavar="FILE",
        help=f"the group's key (default {default_key_path()})",
    )
    p.add_argument(
        "--peer",
        metavar="HOST:PORT[,...]",
        help="a peer to ask when no replica answers, and the one share/unshare talk to "
        "(default: the peers running on this machine)",
    )
