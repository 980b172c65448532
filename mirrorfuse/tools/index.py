"""mirrorfs-index GROUP PORT: run one replica of the P2P index group."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from mirrorfuse.client.blocking import run_async
from mirrorfuse.core.group import LOG_KEEP
from mirrorfuse.index.blobs import fetch_blob
from mirrorfuse.wire.addresses import DEFAULT_HOST, parse_address_list
from mirrorfuse.wire.errors import MirrorfsError, UsageError
from servers.index import Options, serve

from . import logs
from .args import port_arg, run

PROG = "mirrorfs-index"


def parse_args(argv: list[str] | None) -> Options:
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
        help="address for unicast and for handing large snapshots to other replicas "
        f"({DEFAULT_HOST}; on a LAN give this machine's address)",
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
    try:  # every replica's address, for unicast
        replicas = parse_address_list(args.replicas, "--replicas") if args.replicas else []
    except UsageError as exc:
        p.error(str(exc))
    if args.log_keep < 1:
        p.error("--log-keep must be at least 1")
    return Options(args.group, args.port, args.id, args.host, replicas, args.data, args.log_keep)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logs.setup(PROG, timestamps=True)

    def ready(loaded: str) -> None:
        print(
            f"{PROG} replica {opts.id} on {opts.group}:{opts.port} (pid {os.getpid()}{loaded})",
            flush=True,
        )

    async def go() -> int:
        try:
            return await serve(opts, fetch_blob, ready)
        except OSError as exc:  # the group's port, or its TCP port, cannot be had
            raise MirrorfsError(f"cannot listen: {exc.strerror or exc}") from None

    return run(PROG, lambda: run_async(go()), usage_exit=1)


if __name__ == "__main__":
    sys.exit(main())
