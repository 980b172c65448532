"""Host names from the command line, resolved before anything starts.

A name that resolves to nothing is one line naming the option that gave it,
not a connection that fails later with a bare errno. Servers reached over TCP
keep their names (each connection resolves them again); the index group's
datagrams go to IPv4 addresses, so its replicas and group are resolved here.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from mirrorfuse.wire.addresses import Address, ClusterSpec
from mirrorfuse.wire.errors import UsageError


def resolve_host(host: str, what: str, family: int = socket.AF_UNSPEC) -> str:
    """The first address ``host`` resolves to (with AF_INET, an IPv4 one)."""
    try:
        found = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        ipv4 = " to an IPv4 address" if family == socket.AF_INET else ""
        raise UsageError(f"{what}: cannot resolve host {host!r}{ipv4} ({exc.strerror})") from None
    except (OSError, ValueError) as exc:  # a NUL, an empty or over-long label
        raise UsageError(f"{what}: {host!r} is not a host name ({exc})") from None
    return str(found[0][4][0])


def check_hosts(addresses: Iterable[Address], what: str) -> None:
    """Every host of ``addresses`` resolves (each asked once)."""
    for host in dict.fromkeys(a.host for a in addresses):
        resolve_host(host, what)


def checked_cluster(spec: ClusterSpec, what: str) -> ClusterSpec:
    check_hosts(spec.addresses, what)
    return spec


def ipv4_addresses(addresses: Iterable[Address], what: str) -> list[Address]:
    """``addresses`` with their hosts resolved to IPv4, for datagrams."""
    return [Address(resolve_host(a.host, what, socket.AF_INET), a.port) for a in addresses]
