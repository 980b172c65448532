"""mirrorfs-peer: share a directory with the index group and serve its files to other peers.

The peer registers, then every interval: heartbeat, advertise files that
appeared or changed, revoke files that went away. It serves by name only
the files the index accepted (plain files directly in the shared directory,
or single files a local user shared with ``mirrorfs-cli index share``: no
path can escape), over the same FILE_INFO / FILE_READ messages as
serve-file, so downloads go through the segmented downloader.

It keeps a copy of the whole index (refreshed when it changed). When no
replica answers, peers go on without the group (seed 001, step 2): each
one asks the peers it knows for theirs (PEER_INDEX), learning peers it did
not know and the files they hold, forgetting peers that stop answering,
and serves its cached index to clients that ask it. When a replica is back,
the peer registers and advertises everything again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from mirrorfuse.client.connection import request_once
from mirrorfuse.core.group import IndexState
from mirrorfuse.index.client import IndexClient
from mirrorfuse.tools.registry import peer_dir
from mirrorfuse.wire.addresses import parse_address, parse_address_list
from mirrorfuse.wire.errors import MirrorfsError, UsageError
from mirrorfuse.wire.frames import (
    MAX_PAYLOAD,
    BadRequest,
    Flag,
    Frame,
    FrameServer,
    Msg,
    encode,
    encode_error,
    need,
)
from servers.fileserver import VirtualServer, file_checksum

CACHE_EVERY = 5.0  # at most this often, a changed index is copied again
GOSSIP_MISSES = 3  # a peer that misses this many exchanges in a row is forgotten


class PeerServer(FrameServer):
    def __init__(self, peer: Peer) -> None:
        super().__init__()
        self.peer = peer

    def on_frame(self, frame: Frame) -> None:
        try:
            if frame.defect or frame.is_reply:
                raise BadRequest(frame.defect or "a reply where a request was expected")
            if frame.type in (Msg.FILE_INFO, Msg.FILE_READ):
                self.serve_file(frame)
            elif frame.type == Msg.PEER_INDEX:
                self.send(self.peer.exchange(frame))
            elif frame.type in (Msg.PEER_SHARE, Msg.PEER_UNSHARE):
                self.control(frame)
            else:
                self.send(
                    encode_error(
                        frame.req_id,
                        frame.type,
                        "UNKNOWN_TYPE",
                        f"unknown message type {frame.type}",
                    )
                )
        except BadRequest as exc:
            self.send(encode_error(frame.req_id, frame.type, "BAD_REQUEST", str(exc)))

    def serve_file(self, frame: Frame) -> None:
        name = frame.body.get("name")
        srv = self.peer.files.get(name) if isinstance(name, str) else None
        if srv is None:
            self.send(
                encode_error(
                    frame.req_id, frame.type, "NOT_FOUND", f"this peer does not share {name!r}"
                )
            )
            return
        self.send(srv.handle(frame))

    def control(self, frame: Frame) -> None:
        """share / unshare, only from this machine: a remote peer cannot make us serve a path."""
        host = (self.transport.get_extra_info("peername") or ("",))[0]
        if host not in ("127.0.0.1", "::1"):
            raise BadRequest("share and unshare are taken only from this machine")
        name = need(frame.body, "name", str)
        if frame.type == Msg.PEER_SHARE:
            path = need(frame.body, "path", str)
            job = lambda: self.peer.share_file(Path(path), name)  # noqa: E731
        else:
            job = lambda: self.peer.unshare_file(name)  # noqa: E731
        loop = asyncio.get_running_loop()

        def done(fut: asyncio.Future[dict[str, Any]]) -> None:
            self.send(encode(frame.type, frame.req_id, fut.result(), flags=Flag.REPLY))

        loop.run_in_executor(None, job).add_done_callback(done)


class Peer:
    def __init__(
        self, args: argparse.Namespace, replicas: list[tuple[str, int]] | None = None
    ) -> None:
        self.args = args
        self.id: str = args.id
        self.share = Path(args.share).resolve()
        self.files: dict[str, VirtualServer] = {}  # what the index accepted, served
        self.known: dict[str, tuple[int, float]] = {}  # name -> size, mtime advertised
        self.extra: dict[str, Path] = {}  # single files shared by name (index share)
        group, _, port = args.index.rpartition(":")
        self.index = IndexClient(group, int(port), replicas, client_id=f"peer-{self.id}")
        self.index.timeout, self.index.tries = 1.0, 4  # notice soon (2.75 s) that it is gone
        self.lock = threading.Lock()  # one user of the index client at a time
        self.registered = False
        self.addr = ""  # host:port it serves on, known once listening
        self.loop: asyncio.AbstractEventLoop | None = None
        # the cached index, replaced whole (never changed in place by the step thread)
        self.cache = IndexState()
        self.cached_at = 0.0
        self.online = True
        self.ever_online = False
        # peer id -> address, all known (cache + exchanges); --peers seeds it by address
        self.peers: dict[str, str] = {
            f"?{a}": a for a in (args.peers.split(",") if args.peers else []) if a
        }
        self.misses: dict[str, int] = {}

    def say(self, msg: str) -> None:
        print(f"mirrorfs-peer {self.id}: {msg}", flush=True)

    # -- what this peer shares ----------------------------------------------------------------

    def scan(self) -> dict[str, tuple[Path, int, float]]:
        out = {}
        for entry in os.scandir(self.share):
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                st = entry.stat()
                out[entry.name] = (Path(entry.path), st.st_size, st.st_mtime)
        for name, path in self.extra.items():
            try:
                st = path.stat()
            except OSError:
                continue  # gone: revoked below like a removed file
            out[name] = (path, st.st_size, st.st_mtime)
        return out

    def advertise(self, name: str, path: Path, size: int, mtime: float) -> dict[str, Any]:
        csum = file_checksum(path)
        reply = self.index.request(
            "advertise", {"peer": self.id, "name": name, "size": size, "checksum": csum}
        )
        self.known[name] = (size, mtime)
        if reply.get("ok"):
            self.serve(name, path, size, csum)
            self.say(f"shares {name}")
        else:
            self.stop_serving(name)
            self.say(f"cannot share {name}: {reply.get('error')}")
        return reply

    def serve(self, name: str, path: Path, size: int, csum: int) -> None:
        old = self.files.get(name)
        self.files[name] = VirtualServer(0, 0, path, size, csum)
        if old is not None:
            os.close(old.fd)

    def stop_serving(self, name: str) -> None:
        srv = self.files.pop(name, None)
        if srv is not None:
            os.close(srv.fd)

    def serve_unconfirmed(self) -> None:
        """Without the group, serve what the directory holds now; the group decides
        about the names (unique or not) when it is back."""
        now = self.scan()
        for name, (path, size, _) in now.items():
            held = self.files.get(name)
            if held is None or held.size != size:
                try:
                    self.serve(name, path, size, file_checksum(path))
                except OSError:
                    continue
        for name in [n for n in self.files if n not in now]:
            self.stop_serving(name)

    def revoke(self, name: str) -> None:
        self.index.request("revoke", {"peer": self.id, "name": name})
        self.known.pop(name, None)
        self.stop_serving(name)
        self.say(f"stopped sharing {name}")

    def share_file(self, path: Path, name: str) -> dict[str, Any]:
        """mirrorfs-cli index share: one more file, under a name of its own."""
        if not name or "/" in name or name.startswith("."):
            return {"ok": False, "error": f"{name!r} is not a name to share under"}
        if not path.is_absolute() or not path.is_file():
            return {"ok": False, "error": f"{path} is not a regular file"}
        if name in self.files:
            return {"ok": False, "error": f"this peer already shares {name!r}"}
        with self.lock:
            try:
                st = path.stat()
                reply = self.advertise(name, path, st.st_size, st.st_mtime)
            except MirrorfsError as exc:
                return {"ok": False, "error": str(exc)}
            except OSError as exc:
                return {"ok": False, "error": f"{path}: {exc.strerror}"}
            if reply.get("ok"):
                self.extra[name] = path
            else:
                self.known.pop(name, None)
        return reply

    def unshare_file(self, name: str) -> dict[str, Any]:
        if name not in self.extra:
            if name in self.files:
                return {
                    "ok": False,
                    "error": f"{name!r} is in the shared directory {self.share}: "
                    "move it out to stop sharing it",
                }
            return {"ok": False, "error": f"this peer does not share {name!r}"}
        with self.lock:
            del self.extra[name]
            try:
                self.revoke(name)
            except MirrorfsError as exc:
                return {"ok": False, "error": str(exc)}
        return {"ok": True}

    # -- one round with the index group -------------------------------------------------------

    def step(self) -> None:
        if not self.registered:
            reply = self.index.request(
                "register", {"peer": self.id, "addr": self.addr, "interval": self.args.interval}
            )
            self.registered = reply.get("ok", False)
            # the group may have lost our files, or hold some we no longer have (we were
            # away, or restarted): advertise everything again, revoke what went
            held = self.index.query_pages("held", "files", peer=self.id)
            self.known = {n: (-1, 0.0) for n in held}  # no real file has size -1
        reply = self.index.request("heartbeat", {"peer": self.id})
        if not reply.get("ok"):  # dropped by the master (we were silent): start over
            self.registered = False
            return
        now = self.scan()
        for name, (path, size, mtime) in now.items():
            if self.known.get(name) != (size, mtime):
                self.advertise(name, path, size, mtime)
        for name in [n for n in self.known if n not in now]:
            self.extra.pop(name, None)
            self.revoke(name)
        self.refresh_cache()

    def refresh_cache(self) -> None:
        """Copy the whole index when it changed, at most every CACHE_EVERY seconds."""
        if time.monotonic() - self.cached_at < CACHE_EVERY:
            return
        seq = self.index.query("status").get("seq")
        if seq != self.cache.seq:
            self.cache = self.index.snapshot()
            self.peers = {p: i["addr"] for p, i in self.cache.peers.items() if p != self.id}
        self.cached_at = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with self.lock:
                    self.step()
                if not self.online:
                    self.say("an index replica answers: registered and advertised")
                self.online = self.ever_online = True
            except MirrorfsError as exc:
                if not self.ever_online and self.online:
                    self.say(f"no index replica answers yet ({exc}); serving, will retry")
                elif self.online:
                    self.say(
                        f"index unreachable ({exc}); serving on from the cached index "
                        f"(sequence {self.cache.seq}) and {len(self.peers)} known peer(s)"
                    )
                self.online = False
                self.registered = False
                with self.lock:
                    self.serve_unconfirmed()
                asyncio.run_coroutine_threadsafe(self.gossip(), self.loop).result()
            stop.wait(self.args.interval)

    # -- without the group: peers exchange what they know ------------------------------------

    def mine(self) -> dict[str, Any]:
        return {n: {"size": s.size, "checksum": s.checksum} for n, s in self.files.items()}

    def named_peers(self) -> dict[str, str]:
        return {p: a for p, a in self.peers.items() if not p.startswith("?")}

    def exchange(self, frame: Frame) -> list[bytes]:
        """PEER_INDEX: learn the asker (if it says who it is), answer with what we know."""
        body = frame.body
        if isinstance(body.get("peer"), str) and isinstance(body.get("addr"), str):
            self.learn(body["peer"], body["addr"], body.get("peers"), body.get("mine"))
        files = msgpack.packb(self.cache.files, use_bin_type=True)
        if len(files) > MAX_PAYLOAD:
            files = msgpack.packb({}, use_bin_type=True)
        reply = {
            "peer": self.id,
            "peers": {**self.named_peers(), self.id: self.addr},
            "seq": self.cache.seq,
            "online": self.online,
            "mine": self.mine(),
        }
        return encode(Msg.PEER_INDEX, frame.req_id, reply, files, flags=Flag.REPLY)

    def learn(self, peer: str, addr: str, peers: Any, mine: Any) -> None:
        """Another peer's list and files, merged into ours (runs on the event loop)."""
        if peer == self.id:
            return
        self.peers[peer] = addr
        self.misses.pop(peer, None)
        if isinstance(peers, dict):
            for p, a in peers.items():
                if isinstance(p, str) and isinstance(a, str) and p != self.id:
                    self.peers.setdefault(p, a)
        if self.online or not isinstance(mine, dict):
            return  # while the group answers, it alone says who holds what
        files = self.cache.files
        for name, meta in mine.items():
            if not isinstance(meta, dict):
                continue
            held = files.get(name)
            if held is None:
                files[name] = {**meta, "owner": peer, "holders": [peer]}
            elif peer not in held["holders"]:
                held["holders"].append(peer)

    def forget(self, peer: str) -> None:
        self.peers.pop(peer, None)
        self.misses.pop(peer, None)
        for name in [n for n, f in self.cache.files.items() if peer in f["holders"]]:
            self.cache.drop_holder(name, peer)
        self.say(f"forgot peer {peer}: it did not answer {GOSSIP_MISSES} times")

    async def gossip(self) -> None:
        """Ask every known peer for its list; forget the ones that keep not answering."""
        body = {
            "peer": self.id,
            "addr": self.addr,
            "peers": self.named_peers(),
            "mine": self.mine(),
        }
        for peer, addr in list(self.peers.items()):
            if peer == self.id:
                continue
            try:
                reply = await request_once(parse_address(addr), Msg.PEER_INDEX, body, 3.0)
            except (MirrorfsError, ValueError, OSError):
                self.misses[peer] = self.misses.get(peer, 0) + 1
                if self.misses[peer] >= GOSSIP_MISSES:
                    self.forget(peer)
                continue
            real = reply.body.get("peer")
            if isinstance(real, str) and real != peer:  # a --peers address: now we know its id
                self.peers.pop(peer, None)
                peer = real
            self.learn(peer, addr, reply.body.get("peers"), reply.body.get("mine"))

    # -- a record so local commands find this peer -------------------------------------------

    def write_record(self) -> Path:
        path = peer_dir() / f"{self.id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        rec = {"id": self.id, "addr": self.addr, "pid": os.getpid(), "index": self.args.index}
        path.write_text(json.dumps(rec))
        return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mirrorfs-peer", description="Share a directory through the mirrorfs index."
    )
    p.add_argument("--index", required=True, metavar="GROUP:PORT", help="the index group")
    p.add_argument("--share", required=True, help="directory whose files are shared")
    p.add_argument("--port", type=int, default=0, help="TCP port to serve on (any free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    p.add_argument("--id", default=f"{socket.gethostname()}-{os.getpid()}", help="peer name")
    p.add_argument("--replicas", help="host:port,... of the index replicas (unicast)")
    p.add_argument("--interval", type=float, default=3.0, help="seconds between heartbeats (3)")
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
    if not (args.port == 0 or 1024 <= args.port <= 65535):
        p.error(f"--port {args.port} is outside 1024-65535")
    for addr in filter(None, (args.peers or "").split(",")):
        try:
            parse_address(addr)
        except UsageError:
            p.error(f"--peers: {addr!r} is not HOST:PORT")
    try:
        replicas = parse_address_list(args.replicas, "--replicas") if args.replicas else None
    except UsageError as exc:
        p.error(str(exc))
    if not 0.2 <= args.interval <= 3600:
        p.error(f"--interval {args.interval:g} is outside 0.2-3600 seconds")
    if "/" in args.id or not args.id:
        p.error(f"--id {args.id!r} cannot be used as a peer name")
    peer = Peer(args, replicas)
    loop = asyncio.new_event_loop()
    try:
        server = loop.run_until_complete(
            loop.create_server(lambda: PeerServer(peer), args.host, args.port)
        )
    except OSError as exc:
        print(
            f"mirrorfs-peer: error: cannot listen on {args.host}:{args.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    port_used = server.sockets[0].getsockname()[1]
    peer.addr = f"{args.host}:{port_used}"
    peer.loop = loop
    threading.Thread(target=loop.run_forever, daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    record = peer.write_record()
    peer.say(f"serving {peer.share} on {peer.addr} (pid {os.getpid()})")
    try:
        peer.run(stop)
    finally:
        record.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
