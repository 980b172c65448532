"""mirrorfs-index GROUP PORT: run one replica of the P2P index group.

The group's key is read from --key-file (default: ``mirrorfuse.index.keys``);
when that file does not exist, a new key is made and saved there, and the
replica says once how to give it to the other replicas and to peers.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from mirrorfuse.client.loop import run_async
from mirrorfuse.core.group import LOG_KEEP
from mirrorfuse.index.blobs import fetch_blob
from mirrorfuse.index.keys import create_group_key, default_key_path
from mirrorfuse.wire.addresses import DEFAULT_HOST, parse_address_list
from mirrorfuse.wire.errors import MirrorfsError, UsageError
from servers.index import Options, serve

from . import logs
from .args import port_arg, run
from .hosts import ipv4_addresses, resolve_host

PROG = "mirrorfs-index"


def parse_args(argv: list[str] | None) -> tuple[Options, Path | None]:
    p = argparse.ArgumentParser(prog=PROG, description="One replica of the mirrorfs index group.")
    p.add_argument("group", help="multicast group address, e.g. 235.1.1.1")
    p.add_argument("port", type=port_arg, help="UDP port of the group")
    p.add_argument(
        "--id",
        type=int,
        default=os.getpid() % 1_000_000,
        help="replica id; the lowest live id is the master (default: from the pid)",
    )
    p.add_argument(
        "--log-keep",
        type=int,
        default=LOG_KEEP,
        metavar="N",
        help=f"recent updates kept to fill other replicas' gaps ({LOG_KEEP}); "
        "a replica further behind gets a snapshot",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        help="keep this replica's state in DIR (saved every second), to restart from it",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="this machine's address on the group's network: the group is joined there, "
        f"and large snapshots are handed out there ({DEFAULT_HOST}: the group stays on "
        "this machine; on a LAN give this machine's address)",
    )
    p.add_argument(
        "--key-file",
        type=Path,
        metavar="FILE",
        help=f"the group's key (default {default_key_path()}); made if it does not exist",
    )
    p.add_argument(
        "--replicas",
        help="host:port,... of every replica (unicast instead of "
        "multicast); this one listens on HOST:PORT",
    )
    args = p.parse_args(argv)
    try:
        if socket.inet_aton(args.group)[0] not in range(224, 240) and not args.replicas:
            p.error(f"{args.group} is not a multicast address (224.0.0.0-239.255.255.255)")
    except OSError:
        p.error(f"{args.group!r} is not an IPv4 address")
    try:  # every replica's address, for unicast (datagrams go to IPv4 addresses)
        replicas = parse_address_list(args.replicas, "--replicas") if args.replicas else []
        replicas = ipv4_addresses(replicas, "--replicas")
        resolve_host(args.host, "--host")
    except UsageError as exc:
        p.error(str(exc))
    if args.log_keep < 1:
        p.error("--log-keep must be at least 1")
    opts = Options(
        args.group, args.port, args.id, args.host, replicas, args.data, args.log_keep, b""
    )
    return opts, args.key_file


def load_key(opts: Options, key_file: Path | None) -> None:
    """The group's key into ``opts``; a new one is made, saved and announced if there is none."""
    path, opts.key, made = create_group_key(key_file)
    if made:
        print(
            f"{PROG}: made a new key for the index group: {path} (mode 0600). Every other "
            "replica, peer and 'mirrorfs-cli index' of the group needs the same key: copy "
            "this file to the same place for their user and machine (keep it mode 0600), "
            "or name the copy with --key-file FILE",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    opts, key_file = parse_args(argv)
    logs.setup(PROG, timestamps=True)

    def ready(loaded: str) -> None:
        print(
            f"{PROG} replica {opts.id} on {opts.group}:{opts.port} (pid {os.getpid()}{loaded})",
            flush=True,
        )

    async def go() -> int:
        load_key(opts, key_file)
        try:
            return await serve(opts, fetch_blob, ready)
        except OSError as exc:  # the group's port, or its TCP port, cannot be had
            raise MirrorfsError(f"cannot listen: {exc.strerror or exc}") from None

    return run(PROG, lambda: run_async(go()), usage_exit=1)


if __name__ == "__main__":
    sys.exit(main())
