"""mirrorfs-index GROUP PORT: one replica of the P2P index group, reached by UDP multicast.

Datagrams are msgpack maps with a kind ``t``: client requests (``req``) and
read-only queries (``query``) from clients; ``order``, ``hb`` (heartbeat),
``ask`` and ``snap`` between replicas. The ordering logic is
mirrorfuse.group.Replica; this module only moves datagrams and keeps time.
A malformed or oversized datagram is dropped and counted, never fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

import msgpack

from mirrorfuse.group import (
    AskFor,
    Heartbeat,
    Order,
    Replica,
    Request,
    SendOrder,
    SendReply,
    SendSnapshot,
)

MAX_DATAGRAM = 60_000
HEARTBEAT = 1.0
PEER_TIMEOUT = 3 * HEARTBEAT * 3  # three peer heartbeat intervals (peers beat every 3 s)


def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any] | None:
    if len(data) > MAX_DATAGRAM:
        return None
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # garbage of any kind is dropped
        return None
    return msg if isinstance(msg, dict) and isinstance(msg.get("t"), str) else None


def order_to_wire(o: Order) -> dict[str, Any]:
    r = o.request
    return {
        "t": "order",
        "seq": o.seq,
        "master": o.master,
        "time": o.t,
        "client": r.client,
        "req": r.req,
        "op": r.op,
        "args": r.args,
    }


def order_from_wire(m: dict[str, Any]) -> Order:
    return Order(
        int(m["seq"]),
        int(m["master"]),
        Request(str(m["client"]), int(m["req"]), str(m["op"]), dict(m["args"])),
        float(m["time"]),
    )


class IndexReplica(asyncio.DatagramProtocol):
    def __init__(self, rid: int, targets: list[tuple[str, int]]) -> None:
        self.replica = Replica(rid, time.monotonic())
        self.targets = targets  # the group address, or every replica's (unicast)
        self.transport: asyncio.DatagramTransport | None = None
        self.clients: dict[tuple[str, int], tuple[str, int]] = {}  # request -> its sender
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send_group(self, msg: dict[str, Any]) -> None:
        data = pack(msg)
        if len(data) > MAX_DATAGRAM:
            print(
                f"mirrorfs-index: {msg['t']} of {len(data)} bytes is too large to send",
                file=sys.stderr,
                flush=True,
            )
            return
        for target in self.targets:
            self.transport.sendto(data, target)

    def route(self, actions: list[Any]) -> None:
        for act in actions:
            if isinstance(act, SendOrder):
                self.send_group(order_to_wire(act.order))
            elif isinstance(act, SendReply):
                addr = self.clients.pop((act.client, act.req), None)
                if addr is not None:
                    self.transport.sendto(
                        pack(
                            {
                                "t": "reply",
                                "client": act.client,
                                "req": act.req,
                                "reply": act.reply,
                                "replica": self.replica.id,
                            }
                        ),
                        addr,
                    )
            elif isinstance(act, AskFor):
                self.send_group({"t": "ask", "replica": self.replica.id, "first": act.first})
            elif isinstance(act, SendSnapshot):
                self.send_group({"t": "snap", "to": act.to, "seq": act.seq, "blob": act.blob})
            elif isinstance(act, Heartbeat):
                self.send_group({"t": "hb", "replica": act.replica, "seq": act.seq})

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        msg = unpack(data)
        if msg is None:
            self.dropped += 1
            return
        try:
            self.handle(msg, addr)
        except (KeyError, TypeError, ValueError, AssertionError):
            self.dropped += 1

    def handle(self, m: dict[str, Any], addr: tuple[str, int]) -> None:
        now = time.monotonic()
        rep = self.replica
        kind = m["t"]
        if kind == "req":
            req = Request(str(m["client"]), int(m["req"]), str(m["op"]), dict(m["args"]))
            self.clients[(req.client, req.req)] = addr
            self.route(rep.on_request(req, now))
        elif kind == "query":
            self.transport.sendto(
                pack(
                    {
                        "t": "reply",
                        "client": m["client"],
                        "req": m["req"],
                        "reply": self.answer(m),
                        "replica": rep.id,
                    }
                ),
                addr,
            )
        elif kind == "order" and int(m["master"]) != rep.id:
            self.route(rep.on_order(order_from_wire(m), now))
        elif kind == "hb" and int(m["replica"]) != rep.id:
            self.route(rep.on_heartbeat(Heartbeat(int(m["replica"]), int(m["seq"])), now))
        elif kind == "ask" and int(m["replica"]) != rep.id:
            self.route(rep.on_ask(int(m["replica"]), int(m["first"])))
        elif kind == "snap" and int(m["to"]) == rep.id:
            self.route(rep.on_snapshot(int(m["seq"]), bytes(m["blob"]), now))

    def answer(self, m: dict[str, Any]) -> dict[str, Any]:
        st = self.replica.state
        q = m.get("q")
        if q == "peers":
            return {"ok": True, "peers": {p: i["addr"] for p, i in st.peers.items()}}
        if q == "files":
            return {"ok": True, "files": st.files}
        if q == "search":
            pattern = str(m.get("pattern", "*"))
            return {
                "ok": True,
                "files": {n: f for n, f in st.files.items() if fnmatch.fnmatch(n, pattern)},
            }
        if q == "status":
            now = time.monotonic()
            return {
                "ok": True,
                "replica": self.replica.id,
                "seq": st.seq,
                "master": self.replica.master(now),
                "digest": st.digest(),
                "dropped": self.dropped,
            }
        if q == "state":  # the whole replicated state, to compare replicas
            return {
                "ok": True,
                "seq": st.seq,
                "peers": st.peers,
                "files": st.files,
                "clients": st.clients,
            }
        return {"ok": False, "error": f"unknown query {q!r}"}


def multicast_socket(group: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", port))
    mreq = struct.pack("4sl", socket.inet_aton(group), socket.INADDR_ANY)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return sock


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    if args.replicas:
        targets = [(h, int(p)) for h, _, p in (r.rpartition(":") for r in args.replicas.split(","))]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", args.port))
    else:
        targets = [(args.group, args.port)]
        sock = multicast_socket(args.group, args.port)
    transport, proto = await loop.create_datagram_endpoint(
        lambda: IndexReplica(args.id, targets), sock=sock
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"mirrorfs-index replica {args.id} on {args.group}:{args.port} (pid {os.getpid()})",
        flush=True,
    )
    proto.route(proto.replica.tick(time.monotonic()))
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), HEARTBEAT)
        except TimeoutError:
            proto.route(proto.replica.tick(time.monotonic(), PEER_TIMEOUT))
    transport.close()
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mirrorfs-index", description="One replica of the mirrorfs P2P index group."
    )
    p.add_argument("group", help="multicast group address, e.g. 235.1.1.1")
    p.add_argument("port", type=int, help="UDP port of the group")
    p.add_argument(
        "--id",
        type=int,
        default=os.getpid() % 1_000_000,
        help="replica id; the lowest live id is the master (default: from the pid)",
    )
    p.add_argument(
        "--replicas",
        help="host:port,... of every replica (unicast instead of "
        "multicast); this one listens on 127.0.0.1:PORT",
    )
    args = p.parse_args(argv)
    try:
        if socket.inet_aton(args.group)[0] not in range(224, 240) and not args.replicas:
            p.error(f"{args.group} is not a multicast address (224.0.0.0-239.255.255.255)")
    except OSError:
        p.error(f"{args.group!r} is not an IPv4 address")
    if not 1024 <= args.port <= 65535:
        p.error(f"port {args.port} is outside 1024-65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(serve(args))
    except OSError as exc:
        print(f"mirrorfs-index: error: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
