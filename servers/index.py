"""mirrorfs-index GROUP PORT: one replica of the P2P index group, reached by UDP multicast.

Datagrams are msgpack maps with a kind ``t``: client requests (``req``) and
read-only queries (``query``) from clients; ``order``, ``hb`` (heartbeat),
``ask`` and ``snap`` between replicas. The ordering logic is
mirrorfuse.group.Replica; this module only moves datagrams and keeps time.
A malformed or oversized datagram is dropped and counted, never fatal.

A snapshot larger than a datagram is offered by token (``snapoffer``) and
read over TCP (mirrorfuse.blobs). Replies that would not fit in a datagram
(``files``, ``search``, ``peers`` of a large index) come in pages: each
carries ``next``, the cursor to ask with for the next page.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import fnmatch
import os
import re
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from mirrorfuse.core.group import (
    LOG_KEEP,
    AskFor,
    Heartbeat,
    IndexState,
    Order,
    Replica,
    Request,
    SendOrder,
    SendReply,
    SendSnapshot,
)
from mirrorfuse.index.blobs import BlobServer, BlobStore, fetch_blob, offered_at
from mirrorfuse.wire.addresses import parse_address_list
from mirrorfuse.wire.errors import MirrorfsError, UsageError

MAX_DATAGRAM = 60_000
PAGE_BYTES = 40_000  # a page of a paged reply stays well inside one datagram
INLINE_SNAPSHOT = 40_000  # larger snapshots go by TCP
HEARTBEAT = 1.0
PEER_INTERVAL = 3.0  # a peer's heartbeat interval, unless it registered with its own


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


def page(
    items: dict[str, Any], keys: list[str], after: str, pattern: str | None = None
) -> tuple[dict[str, Any], str | None]:
    """The entries after the cursor ``after`` (sorted keys) that fit in PAGE_BYTES."""
    out: dict[str, Any] = {}
    size = 0
    # names that match start with the pattern's literal prefix: begin there, stop past it
    prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0] if pattern is not None else ""
    start = bisect.bisect_right(keys, after) if after else 0
    for i in range(max(start, bisect.bisect_left(keys, prefix)), len(keys)):
        key = keys[i]
        if not key.startswith(prefix):
            break
        if pattern is not None and not fnmatch.fnmatchcase(key, pattern):
            continue
        size += len(pack({key: items[key]}))
        if size > PAGE_BYTES and out:
            return out, keys[i - 1]
        out[key] = items[key]
    return out, None


class IndexReplica(asyncio.DatagramProtocol):
    def __init__(
        self,
        rid: int,
        targets: list[tuple[str, int]],
        tcp: tuple[str, int] = ("127.0.0.1", 0),
        state: IndexState | None = None,
        log_keep: int = LOG_KEEP,
    ) -> None:
        self.replica = Replica(rid, time.time(), log_keep=log_keep, state=state)
        self.targets = targets  # the group address, or every replica's (unicast)
        self.transport: asyncio.DatagramTransport | None = None
        self.clients: dict[tuple[str, int], tuple[str, int]] = {}  # request -> its sender
        self.dropped = 0
        self.blobs = BlobStore()
        self.tcp = tcp  # where this replica hands out large snapshots
        self.fetching = False  # a snapshot is on its way by TCP: do not ask again
        self.tcp_snapshots = 0  # snapshots received by TCP (shown in status)
        self._sorted: dict[str, tuple[int, list[str]]] = {}  # what -> (seq, sorted keys)

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
                if not self.fetching:
                    self.send_group({"t": "ask", "replica": self.replica.id, "first": act.first})
            elif isinstance(act, SendSnapshot):
                self.send_group({"t": "snap", "to": act.to, **self.offer(act.seq, act.blob)})
            elif isinstance(act, Heartbeat):
                self.send_group({"t": "hb", "replica": act.replica, "seq": act.seq})

    def offer(self, seq: int, blob: bytes) -> dict[str, Any]:
        """A snapshot in the datagram itself, or a token to read it by over TCP."""
        if len(blob) <= INLINE_SNAPSHOT:
            return {"seq": seq, "blob": blob}
        host, port = self.tcp
        return {"seq": seq, "host": host, "port": port, "token": self.blobs.put(blob)}

    async def fetch_snapshot(self, seq: int, host: str, port: int, token: str) -> None:
        try:
            blob = await fetch_blob(host, port, token)
            self.tcp_snapshots += 1
            self.route(self.replica.on_snapshot(seq, blob, time.time()))
        except (MirrorfsError, ValueError, OSError) as exc:
            print(
                f"mirrorfs-index: cannot read a snapshot from {host}:{port}: {exc} "
                "(on a LAN, start replicas with --host set to their own address)",
                file=sys.stderr,
                flush=True,
            )
        finally:
            self.fetching = False

    def on_snap(self, m: dict[str, Any], addr: tuple[str, int]) -> None:
        seq = int(m["seq"])
        if "blob" in m:
            self.route(self.replica.on_snapshot(seq, bytes(m["blob"]), time.time()))
        elif seq > self.replica.state.seq and not self.fetching:
            self.fetching = True
            asyncio.ensure_future(self.fetch_snapshot(seq, *offered_at(m, addr[0])))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        msg = unpack(data)
        if msg is None:
            self.drop(f"a malformed or oversized datagram of {len(data)} bytes", addr)
            return
        try:
            if not self.handle(msg, addr):
                self.drop(f"an unknown message kind {str(msg['t'])[:20]!r}", addr)
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            self.drop(f"a {str(msg.get('t'))[:20]!r} message lacking {exc}", addr)

    def drop(self, what: str, addr: tuple[str, int]) -> None:
        """Count it; say so for the first and then every hundredth (no log flood)."""
        self.dropped += 1
        if self.dropped % 100 == 1:
            print(
                f"mirrorfs-index {self.replica.id}: dropped {what} from {addr[0]}:{addr[1]} "
                f"({self.dropped} dropped so far)",
                file=sys.stderr,
                flush=True,
            )

    def handle(self, m: dict[str, Any], addr: tuple[str, int]) -> bool:
        """Act on one message; False for a kind this replica does not know."""
        now = time.time()
        rep = self.replica
        kind = m["t"]
        if kind == "req":
            req = Request(str(m["client"]), int(m["req"]), str(m["op"]), dict(m["args"]))
            self.clients[(req.client, req.req)] = addr
            self.route(rep.on_request(req, now))
        elif kind == "query":
            reply = {"t": "reply", "client": m["client"], "req": m["req"], "replica": rep.id}
            data = pack({**reply, "reply": self.answer(m)})
            if len(data) > MAX_DATAGRAM:
                data = pack({**reply, "reply": {"ok": False, "error": "reply too large"}})
            self.transport.sendto(data, addr)
        elif kind == "order" and int(m["master"]) != rep.id:
            self.route(rep.on_order(order_from_wire(m), now))
        elif kind == "hb" and int(m["replica"]) != rep.id:
            self.route(rep.on_heartbeat(Heartbeat(int(m["replica"]), int(m["seq"])), now))
        elif kind == "ask" and int(m["replica"]) != rep.id:
            self.route(rep.on_ask(int(m["replica"]), int(m["first"])))
        elif kind == "snap":
            if int(m["to"]) == rep.id:
                self.on_snap(m, addr)
        elif kind not in ("order", "hb", "ask", "reply"):
            return False
        return True

    def keys(self, what: str, items: dict[str, Any]) -> list[str]:
        """Sorted names, kept while the state does not change (pages of a large index)."""
        seq = self.replica.state.seq
        held = self._sorted.get(what)
        if held is None or held[0] != seq:
            held = self._sorted[what] = (seq, sorted(items))
        return held[1]

    def answer(self, m: dict[str, Any]) -> dict[str, Any]:
        st = self.replica.state
        q = m.get("q")
        after = str(m.get("after") or "")
        if q == "peers":
            peers = {p: i["addr"] for p, i in st.peers.items()}
            got, nxt = page(peers, self.keys("peers", peers), after)
            return {"ok": True, "peers": got, "next": nxt, "seq": st.seq}
        if q in ("files", "search"):
            pattern = str(m.get("pattern", "*")) if q == "search" else None
            got, nxt = page(st.files, self.keys("files", st.files), after, pattern)
            return {"ok": True, "files": got, "next": nxt, "seq": st.seq}
        if q == "held":  # what the index lists for one peer (it reconciles after a restart)
            peer = m.get("peer")
            held = {n: f for n, f in st.files.items() if peer in f["holders"]}
            got, nxt = page(held, sorted(held), after)
            return {"ok": True, "files": got, "next": nxt, "seq": st.seq}
        if q == "snapshot":  # a peer caching the whole index
            return {"ok": True, **self.offer(st.seq, st.snapshot())}
        if q == "status":
            now = time.time()
            return {
                "ok": True,
                "replica": self.replica.id,
                "seq": st.seq,
                "master": self.replica.master(now),
                "digest": st.digest(),
                "dropped": self.dropped,
                "tcp_snapshots": self.tcp_snapshots,
                "peers": len(st.peers),
                "files": len(st.files),
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


def snapshot_path(args: argparse.Namespace) -> Path | None:
    return Path(args.data) / f"replica-{args.id}.snapshot" if args.data else None


def load_state(path: Path | None) -> IndexState | None:
    """The state this replica saved before it stopped, if any (it catches up from there)."""
    if path is None or not path.exists():
        return None
    try:
        return IndexState.from_snapshot(path.read_bytes())
    except Exception as exc:  # a torn or foreign file: start empty, the group fills us in
        print(f"mirrorfs-index: ignoring {path}: {exc}", file=sys.stderr, flush=True)
        return None


def save_state(path: Path, state: IndexState) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(state.snapshot())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    if args.replicas:
        targets = args.targets
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((args.host, args.port))
    else:
        targets = [(args.group, args.port)]
        sock = multicast_socket(args.group, args.port)
    store_path = snapshot_path(args)
    if store_path is not None:
        store_path.parent.mkdir(parents=True, exist_ok=True)
    state = load_state(store_path)
    blobs: list[BlobStore] = []
    tcp = await loop.create_server(lambda: BlobServer(blobs[0]), args.host, 0)
    tcp_addr = (args.host, tcp.sockets[0].getsockname()[1])
    transport, proto = await loop.create_datagram_endpoint(
        lambda: IndexReplica(args.id, targets, tcp_addr, state, args.log_keep), sock=sock
    )
    blobs.append(proto.blobs)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loaded = f", state from {store_path} at sequence {state.seq}" if state else ""
    print(
        f"mirrorfs-index replica {args.id} on {args.group}:{args.port} (pid {os.getpid()}{loaded})",
        flush=True,
    )
    saved = state.seq if state else 0
    proto.route(proto.replica.tick(time.time()))
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), HEARTBEAT)
        except TimeoutError:
            proto.route(proto.replica.tick(time.time(), PEER_INTERVAL))
        if store_path is not None and proto.replica.state.seq != saved:
            try:
                await loop.run_in_executor(None, save_state, store_path, proto.replica.state)
                saved = proto.replica.state.seq
            except OSError as exc:  # a full disk: go on serving from memory, say so
                print(
                    f"mirrorfs-index: cannot save state to {store_path}: {exc.strerror}",
                    file=sys.stderr,
                    flush=True,
                )
    transport.close()
    tcp.close()
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
        help="keep this replica's state in DIR (saved every second), to restart from it",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address for unicast and for handing large snapshots to other replicas "
        "(127.0.0.1; on a LAN give this machine's address)",
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
        args.targets = parse_address_list(args.replicas, "--replicas") if args.replicas else []
    except UsageError as exc:
        p.error(str(exc))
    if args.log_keep < 1:
        p.error("--log-keep must be at least 1")
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
