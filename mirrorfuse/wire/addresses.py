"""Ports, addresses and clusters as users write them, checked in one place.

Every command and daemon parses ``host:port``, port numbers and server
lists through these functions, so they all accept the same forms and reject
bad ones with the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

MIN_PORT = 1024
MAX_PORT = 65535
DEFAULT_HOST = "127.0.0.1"
MIN_SERVERS = 4
MAX_SERVERS = 16


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The servers of one volume, in id order (server i is ``addresses[i]``), and how
    to reach them: the key file to prove (None: the key directory's, by volume) and TLS."""

    addresses: tuple[Address, ...]
    key_file: str | None = None
    tls: bool = False

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


def parse_address_list(text: str, what: str) -> list[Address]:
    """host:port,... (index replicas, peers)."""
    return [parse_address(t, what) for t in text.split(",") if t.strip()]


def check_count(count: int) -> None:
    """Reject a server count the layout cannot use, with the reason."""
    if count % 2:
        raise UsageError(
            f"{count} servers is an odd number: servers work in mirror pairs (2k, 2k+1)"
        )
    if not MIN_SERVERS <= count <= MAX_SERVERS:
        raise UsageError(
            f"{count} servers: mirrorfs needs between {MIN_SERVERS} and {MAX_SERVERS} "
            "servers (an even number)"
        )


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
