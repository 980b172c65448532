"""mirrorfs-peer: share a directory through the index group (the daemon is servers/peer.py).

This command wires the daemon to its collaborators: the index client, the
call to another peer, the record that lets local commands find it, and the
group's key, which every TCP connection to the peer proves (both ways).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from mirrorfuse.client.connection import request_once
from mirrorfuse.client.loop import run_async
from mirrorfuse.index.client import IndexClient
from mirrorfuse.index.keys import default_key_path, group_key
from mirrorfuse.wire.addresses import (
    DEFAULT_HOST,
    Address,
    parse_address,
    parse_address_list,
    parse_port,
)
from mirrorfuse.wire.auth import ServerHandshake
from mirrorfuse.wire.errors import MirrorfsError, UsageError
from mirrorfuse.wire.messages import PeerIndex, PeerIndexReply
from servers.files import atomic_write
from servers.net import Limits
from servers.peer import Peer, PeerOptions, PeerServer
from servers.sharing import ControlServer, bind_control

from . import logs
from .args import listen_port_arg, run
from .hosts import check_hosts, ipv4_addresses, resolve_host
from .registry import control_socket, peer_dir

PROG = "mirrorfs-peer"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description="Share a directory through the mirrorfs index."
    )
    p.add_argument("--index", required=True, metavar="GROUP:PORT", help="the index group")
    p.add_argument("--share", required=True, help="directory whose files are shared")
    p.add_argument(
        "--port", type=listen_port_arg, default=0, help="TCP port to serve on (0: any free one)"
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to serve on ({DEFAULT_HOST})")
    p.add_argument("--id", default=f"{socket.gethostname()}-{os.getpid()}", help="peer name")
    p.add_argument("--replicas", help="host:port,... of the index replicas (unicast)")
    p.add_argument("--interval", type=float, default=3.0, help="seconds between heartbeats (3)")
    p.add_argument(
        "--key-file",
        metavar="FILE",
        help=f"the index group's key (default {default_key_path()}); other peers and "
        "downloaders prove it too",
    )
    p.add_argument(
        "--peers",
        metavar="HOST:PORT,...",
        help="other peers to exchange lists with while no index replica answers",
    )
    args = p.parse_args(argv)
    if not Path(args.share).is_dir():
        p.error(f"--share {args.share} is not a directory")
    group, sep, port = args.index.rpartition(":")
    if not sep or not port.isdigit():
        p.error(f"--index {args.index!r} is not GROUP:PORT")
    args.group, args.group_port = group, int(port)
    args.peer_list = [a for a in (args.peers or "").split(",") if a]
    for addr in args.peer_list:
        try:
            parse_address(addr)
        except UsageError:
            p.error(f"--peers: {addr!r} is not HOST:PORT")
    try:
        args.replica_list = (
            parse_address_list(args.replicas, "--replicas") if args.replicas else None
        )
        if args.replica_list:  # datagrams go to IPv4 addresses
            args.replica_list = ipv4_addresses(args.replica_list, "--replicas")
        args.group = resolve_host(group, "--index", socket.AF_INET)
        args.group_port = parse_port(port, "--index port")
        check_hosts(map(parse_address, args.peer_list), "--peers")
    except UsageError as exc:
        p.error(str(exc))
    if not 0.2 <= args.interval <= 3600:
        p.error(f"--interval {args.interval:g} is outside 0.2-3600 seconds")
    if "/" in args.id or not args.id:
        p.error(f"--id {args.id!r} cannot be used as a peer name")
    return args


def peer_asker(key: bytes) -> Callable[[str, PeerIndex], Awaitable[PeerIndexReply]]:
    """PEER_INDEX to another peer of the group, over a connection that proves its key."""

    async def ask(addr: str, req: PeerIndex) -> PeerIndexReply:
        return (await request_once(parse_address(addr), req, 3.0, keys=lambda _: key)).body

    return ask


def write_record(peer: Peer, index: str, control: Path) -> Path:
    path = peer_dir() / f"{peer.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    rec = {
        "id": peer.id,
        "addr": peer.addr,
        "pid": os.getpid(),
        "index": index,
        "control": str(control),
    }
    atomic_write(path, json.dumps(rec).encode())
    return path


async def serve(args: argparse.Namespace) -> int:
    key = group_key(args.key_file)  # the group's datagrams and every TCP connection prove it
    # the client id gets a random part: this process is not taken for an earlier one
    # the group is joined on the interface the peer listens on (a replica does the same)
    interface = None if args.host in ("", "0.0.0.0", "::") else args.host
    index = IndexClient(
        args.group,
        args.group_port,
        args.replica_list,
        client_id=f"peer-{args.id}",
        key=key,
        interface=interface,
    )
    # updates outlast a change of master; a query finds soon (0.75 s) that none answers
    index.timeout, index.tries = 1.0, 2
    opts = PeerOptions(args.id, Path(args.share), args.interval, args.peer_list)
    peer = Peer(opts, index, peer_asker(key))
    loop = asyncio.get_running_loop()
    auth = lambda: ServerHandshake(key, None)  # noqa: E731
    limits = Limits(max_payload=0)  # for all its connections; no request carries a payload
    try:
        server = await loop.create_server(
            lambda: PeerServer(peer, auth, limits), args.host, args.port
        )
    except OSError as exc:
        raise MirrorfsError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    peer.addr = str(Address(args.host, server.sockets[0].getsockname()[1]))
    control_path = control_socket(peer.id)
    try:
        control = await loop.create_unix_server(
            lambda: ControlServer(peer.control, limits), sock=bind_control(control_path)
        )
    except BaseException:
        server.close()
        raise
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    record = write_record(peer, args.index, control_path)
    peer.say(f"serving {peer.share} on {peer.addr} (pid {os.getpid()})")
    try:
        await peer.run(stop)
    finally:
        record.unlink(missing_ok=True)
        control.close()
        control_path.unlink(missing_ok=True)
        server.close()
        index.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(PROG, timestamps=True)
    return run(PROG, lambda: run_async(serve(args)), usage_exit=1)


if __name__ == "__main__":
    sys.exit(main())
