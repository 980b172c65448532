"""mirrorfs-peer: share a directory with the index group and serve its files to other peers.

The peer registers, then every interval: heartbeat, advertise files that
appeared or changed, revoke files that went away. It serves by name only
the files the index accepted (plain files directly in the shared directory:
no path can escape it), over the same FILE_INFO / FILE_READ messages as
serve-file, so downloads go through the segmented downloader.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from mirrorfuse.errors import MirrorfsError
from mirrorfuse.fileserver import VirtualServer, file_checksum
from mirrorfuse.indexclient import IndexClient
from mirrorfuse.protocol import Frame, FrameServer, encode_error


class PeerServer(FrameServer):
    def __init__(self, files: dict[str, VirtualServer]) -> None:
        super().__init__()
        self.files = files

    def on_frame(self, frame: Frame) -> None:
        name = frame.body.get("name")
        srv = self.files.get(name) if isinstance(name, str) else None
        if srv is None:
            self.send(
                encode_error(
                    frame.req_id, frame.type, "NOT_FOUND", f"this peer does not share {name!r}"
                )
            )
            return
        self.send(srv.handle(frame))


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.share = Path(args.share).resolve()
        self.files: dict[str, VirtualServer] = {}  # what the index accepted, served
        self.known: dict[str, tuple[int, float]] = {}  # name -> size, mtime advertised
        group, _, port = args.index.rpartition(":")
        replicas = None
        if args.replicas:
            replicas = [
                (h, int(p)) for h, _, p in (r.rpartition(":") for r in args.replicas.split(","))
            ]
        self.index = IndexClient(group, int(port), replicas, client_id=f"peer-{args.id}")
        self.registered = False
        self.addr = ""  # host:port it serves on, known once listening

    def scan(self) -> dict[str, tuple[int, float]]:
        out = {}
        for entry in os.scandir(self.share):
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                st = entry.stat()
                out[entry.name] = (st.st_size, st.st_mtime)
        return out

    def say(self, msg: str) -> None:
        print(f"mirrorfs-peer {self.args.id}: {msg}", flush=True)

    def step(self) -> None:
        """One round with the index: register, heartbeat, advertise, revoke."""
        if not self.registered:
            reply = self.index.request("register", {"peer": self.args.id, "addr": self.addr})
            self.registered = reply.get("ok", False)
        reply = self.index.request("heartbeat", {"peer": self.args.id})
        if not reply.get("ok"):  # dropped by the master (we were silent): start over
            self.registered = False
            self.known.clear()
            return
        now = self.scan()
        for name, meta in now.items():
            if self.known.get(name) == meta:
                continue
            path = self.share / name
            csum = file_checksum(path)
            reply = self.index.request(
                "advertise", {"peer": self.args.id, "name": name, "size": meta[0], "checksum": csum}
            )
            self.known[name] = meta
            if reply.get("ok"):
                old = self.files.get(name)
                self.files[name] = VirtualServer(0, 0, path, meta[0], csum)
                if old is not None:
                    os.close(old.fd)
                self.say(f"shares {name}")
            else:
                self.say(f"cannot share {name}: {reply.get('error')}")
        for name in [n for n in self.known if n not in now]:
            self.index.request("revoke", {"peer": self.args.id, "name": name})
            del self.known[name]
            srv = self.files.pop(name, None)
            if srv is not None:
                os.close(srv.fd)
            self.say(f"stopped sharing {name}")

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except MirrorfsError as exc:
                self.say(f"index unreachable ({exc}); still serving, will retry")
                self.registered = False
            stop.wait(self.args.interval)


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
    args = p.parse_args(argv)
    if not Path(args.share).is_dir():
        p.error(f"--share {args.share} is not a directory")
    group, sep, port = args.index.rpartition(":")
    if not sep or not port.isdigit():
        p.error(f"--index {args.index!r} is not GROUP:PORT")
    peer = Peer(args)
    loop = asyncio.new_event_loop()
    try:
        server = loop.run_until_complete(
            loop.create_server(lambda: PeerServer(peer.files), args.host, args.port)
        )
    except OSError as exc:
        print(
            f"mirrorfs-peer: error: cannot listen on {args.host}:{args.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    port_used = server.sockets[0].getsockname()[1]
    peer.addr = f"{args.host}:{port_used}"
    threading.Thread(target=loop.run_forever, daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    peer.say(f"serving {peer.share} on {peer.addr} (pid {os.getpid()})")
    peer.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
