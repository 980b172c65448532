"""Naming a cluster: ``--servers host:port,...`` or ``--base-port B --count N``.

Shared by every command that talks to block servers so that they all accept
the same forms and reject bad ones with the same messages.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mirrorfuse.core.layout import check_count
from mirrorfuse.wire.errors import UsageError

MIN_PORT = 1024
MAX_PORT = 65535
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The servers of one volume, in id order (server i is ``addresses[i]``)."""

    addresses: tuple[Address, ...]

    @property
    def count(self) -> int:
        return len(self.addresses)


def check_port(port: int, what: str = "port") -> int:
    if not MIN_PORT <= port <= MAX_PORT:
        raise UsageError(f"{what} {port} is outside {MIN_PORT}-{MAX_PORT}")
    return port


def parse_port(text: str, what: str = "port") -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number") from None
    return check_port(port, what)


def parse_address(text: str, what: str = "server address") -> Address:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise UsageError(f"{what} {text!r} is not host:port")
    try:
        return Address(host.strip("[]"), parse_port(port))
    except UsageError as exc:
        raise UsageError(f"{what} {text.strip()!r}: {exc}") from None


def parse_address_list(text: str, what: str) -> list[tuple[str, int]]:
    """host:port,... (index replicas, peers) as the (host, port) pairs sockets take."""
    return [(a.host, a.port) for a in (parse_address(t, what) for t in text.split(",") if t)]


def parse_servers(text: str) -> ClusterSpec:
    parts = [p for p in text.split(",") if p.strip()]
    addresses = tuple(parse_address(p) for p in parts)
    check_count(len(addresses))
    seen = set()
    for a in addresses:
        if a in seen:
            raise UsageError(f"server {a} is listed twice")
        seen.add(a)
    return ClusterSpec(addresses)


def from_base_port(base_port: int, count: int, host: str = DEFAULT_HOST) -> ClusterSpec:
    check_count(count)
    check_port(base_port, "base port")
    check_port(base_port + count - 1, f"last port (base {base_port} + {count - 1})")
    return ClusterSpec(tuple(Address(host, base_port + i) for i in range(count)))


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (one of)")
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


def cluster_from_args(args: argparse.Namespace) -> ClusterSpec:
    if args.servers and args.base_port is not None:
        raise UsageError("give either --servers or --base-port/--count, not both")
    if args.servers:
        return parse_servers(args.servers)
    if args.base_port is not None:
        if args.count is None:
            raise UsageError("--base-port needs --count (the number of servers)")
        return from_base_port(args.base_port, args.count, args.host)
    from mirrorfuse.tools import registry

    return registry.default_cluster(getattr(args, "mount", None))
