"""mirrorfs-server: run one block server until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from mirrorfuse.client.loop import run_async
from mirrorfuse.wire.addresses import DEFAULT_HOST, MAX_SERVERS
from servers.block.server import BlockServer, listen
from servers.block.store import Store
from servers.files import read_key

from . import logs
from .args import METRICS_HELP, metrics_arg, port_arg, run, size_arg

PROG = "mirrorfs-server"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Run one mirrorfs block server.")
    p.add_argument("--id", type=int, required=True, help="server id (0..N-1); 2k and 2k+1 mirror")
    p.add_argument("--port", type=port_arg, required=True, help="TCP port (1024-65535)")
    p.add_argument("--data", type=Path, required=True, help="data directory of this server")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on ({DEFAULT_HOST})")
    p.add_argument("--volume", help="refuse a data directory of any other volume id")
    p.add_argument(
        "--key-file",
        type=Path,
        help="the volume's key, kept in the data directory as volume.key (default: the one "
        "there, or the one the format gives)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="TLS on every connection (its certificate is made in the data directory)",
    )
    p.add_argument(
        "--capacity",
        type=size_arg,
        help="most data this server may hold, e.g. 64M or 10G (default: its disk)",
    )
    p.add_argument("--metrics", type=metrics_arg, metavar="HOST:PORT", help=METRICS_HELP)
    args = p.parse_args(argv)
    if not 0 <= args.id < MAX_SERVERS:
        p.error(f"argument --id: {args.id} is outside 0-{MAX_SERVERS - 1}")
    return args


async def serve(args: argparse.Namespace, store: Store) -> int:
    tls, binding = None, b""
    if args.tls:  # imported when asked: cryptography and prometheus_client cost a server
        from servers.tls import server_tls  # (four of them at once) a tenth of a second to start

        tls, binding = server_tls(args.data)
    server = BlockServer(store, binding)
    listener = await listen(store, args.host, args.port, tls, binding, server)
    exporter = None
    if args.metrics is not None:
        from servers import metrics

        try:
            exporter = metrics.serve(args.metrics, metrics.block_server(server))
        except metrics.ListenError:
            listener.close()
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sb = store.superblock
    state = f"volume {sb.volume}" if sb else "unformatted"
    served = f", metrics on http://{args.metrics}/metrics" if args.metrics else ""
    line = (
        f"{PROG} {args.id} listening on {args.host}:{args.port} "
        f"(pid {os.getpid()}, data {args.data}, {state}{served})"
    )
    print(line, flush=True)
    if not os.isatty(sys.stdout.fileno()):
        # whoever started it may stop reading once it is up (mount.sh does): the rest
        # goes where the errors go, its log, never into a closed pipe
        print(line, file=sys.stderr, flush=True)
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    await stop.wait()
    listener.close()
    if exporter is not None:
        exporter.stop()
    store.close()
    print(f"{PROG} {args.id} stopped", flush=True)
    return 0


def start(args: argparse.Namespace) -> int:
    key = read_key(args.key_file) if args.key_file else None
    store = Store(args.data, args.id, args.volume, args.capacity, key)
    return run_async(serve(args, store))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(PROG, timestamps=True)
    return run(PROG, lambda: start(args), usage_exit=1)


if __name__ == "__main__":
    sys.exit(main())
