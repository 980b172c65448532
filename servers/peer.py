"""A peer: share a directory with the index group and serve its files to other peers.

The peer registers, then every interval: heartbeat, advertise files that
appeared or changed, revoke files that went away. It serves by name only
the files the index accepted (plain files directly in the shared directory,
or single files a local user shared with ``mirrorfs-cli index share``: no
path can escape), over the same FILE_INFO / FILE_READ messages as
serve-file, so downloads go through the segmented downloader.

Who may ask for ``share`` and ``unshare``, and how shared files are opened
so that a symbolic link or a swapped file is never served, is in
``sharing``.

It keeps a copy of the whole index (refreshed when it changed). When no
replica answers, peers go on without the group: each one asks the peers it
knows for theirs (PEER_INDEX), learning peers it did not know and the files
they hold, forgetting peers that stop answering, and serves its cached index
to clients that ask it, with its own files as they are in its directory
now. When a replica is back, the peer registers and advertises everything
again. Stopped by SIGTERM or SIGINT, it leaves the group (it and its files
are dropped at once), waiting for that a bounded time.

Everything runs on one event loop; checksums of large files are computed in
a worker thread that shares nothing. The index client and the call to
another peer are given by the command that starts the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec

from mirrorfuse.core.group import IndexState
from mirrorfuse.wire.datagrams import FileEntry, UpdateResult
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.frames import MAX_PAYLOAD, Frame
from mirrorfuse.wire.messages import (
    FileInfo,
    FileRead,
    Outcome,
    PeerIndex,
    PeerIndexReply,
    PeerShare,
    PeerUnshare,
    SharedFile,
)

from .fileserver import VirtualServer
from .net import Answer, FrameServer, Limits, Refused, ServerAuth, dispatch, in_background
from .sharing import (
    CONTROL_TYPES,
    Caller,
    NotShareable,
    Single,
    answer,
    loopback_caller,
    open_checked,
)

CACHE_EVERY = 5.0  # at most this often, a changed index is copied again
LEAVE_WITHIN = 5.0  # seconds a stopping peer waits for the group to drop it
GOSSIP_MISSES = 3  # a peer that misses this many exchanges in a row is forgotten
_encoder = msgspec.msgpack.Encoder()


class GroupClient(Protocol):
    """What the peer needs of an index client."""

    async def request(self, op: str, args: dict[str, Any]) -> UpdateResult: ...

    async def query(self, q: str, **kw: Any) -> Any: ...

    async def query_pages(self, q: str, **kw: Any) -> dict[str, Any]: ...

    async def snapshot(self) -> IndexState: ...


AskPeer = Callable[[str, PeerIndex], Awaitable[PeerIndexReply]]


@dataclass
class PeerOptions:
    id: str
    share: Path
    interval: float
    peers: list[str]  # host:port of peers to start exchanging with


class PeerServer(FrameServer):
    """A connection from another peer or a downloader; with ``auth``, it proves the group
    key before any frame is read."""

    def __init__(
        self, peer: Peer, auth: ServerAuth | None = None, limits: Limits | None = None
    ) -> None:
        super().__init__(auth, limits)
        self.peer = peer
        self.reading: VirtualServer | None = None  # the shared file a read is answered from

    def on_frame(self, frame: Frame) -> None:
        if frame.type in CONTROL_TYPES and not frame.is_reply:
            in_background(answer(self, frame, self.tcp_caller(), self.peer.control))
            return
        self.reading = None
        out = dispatch(
            frame,
            {
                FileInfo: self.serve_file,
                FileRead: self.serve_file,
                PeerIndex: self.peer.exchange,
            },
        )
        if self.reading is not None:
            self.reading.send_reply(self, out)
        else:
            self.send(out)

    def tcp_caller(self) -> Caller | None:
        """Who asks over TCP: a connection that proved the group key, from a socket of
        this machine whose owner the kernel names; None for any other."""
        if not self.authenticated or self.transport is None:
            return None
        local = self.transport.get_extra_info("sockname")
        remote = self.transport.get_extra_info("peername")
        return loopback_caller(local[:2], remote[:2]) if local and remote else None

    def serve_file(
        self, req: FileInfo | FileRead, payload: bytes | bytearray, flags: int
    ) -> Answer:
        srv = self.peer.files.get(req.name or "")
        if srv is None:
            raise Refused("NOT_FOUND", f"this peer does not share {req.name!r}")
        if isinstance(req, FileInfo):
            return srv.info(req, payload, flags)
        self.reading = srv
        return srv.read(req, payload, flags)


class Peer:
    def __init__(self, opts: PeerOptions, index: GroupClient, ask: AskPeer) -> None:
        self.opts = opts
        self.id = opts.id
        self.share = opts.share.resolve()
        self.index = index
        self.ask = ask
        self.files: dict[str, VirtualServer] = {}  # what the index accepted, served
        self.known: dict[str, tuple[int, float]] = {}  # name -> size, mtime advertised
        self.extra: dict[str, Single] = {}  # single files shared by path (index share)
        self.changing = asyncio.Lock()  # one change to what is shared at a time
        self.registered = False
        self.addr = ""  # host:port it serves on, known once listening
        self.cache = IndexState()  # the cached index, replaced whole
        self.cached_at = 0.0
        self.online = True
        self.ever_online = False
        # peer id -> address, all known (cache + exchanges); --peers seeds it by address
        self.peers: dict[str, str] = {f"?{a}": a for a in opts.peers}
        self.misses: dict[str, int] = {}

    def say(self, msg: str) -> None:
        print(f"mirrorfs-peer {self.id}: {msg}", flush=True)

    # -- what this peer shares ----------------------------------------------------------------

    def scan(self) -> dict[str, tuple[int, float]]:
        """name -> (size, mtime) of what this peer shares now: regular files directly in its
        directory (not hidden; never a symbolic link), and each file shared by path while it
        is still the file that was shared (replaced or gone: revoked like a removed file)."""
        out = {}
        for entry in os.scandir(self.share):
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                st = entry.stat(follow_symlinks=False)
                out[entry.name] = (st.st_size, st.st_mtime)
        for name, single in self.extra.items():
            try:
                st = os.lstat(single.path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == single.identity:
                out[name] = (st.st_size, st.st_mtime)
        return out

    def where(self, name: str) -> tuple[Path, tuple[int, int] | None]:
        single = self.extra.get(name)
        return (single.path, single.identity) if single else (self.share / name, None)

    async def advertise(self, name: str, size: int, mtime: float) -> UpdateResult:
        try:
            fd, st, csum = await open_checked(*self.where(name))
        except NotShareable as exc:
            self.known[name] = (size, mtime)  # tried again once it changes
            self.stop_serving(name)
            self.say(f"cannot share {name}: {exc}")
            return UpdateResult(ok=False, error=str(exc))
        return await self.publish(name, fd, st, csum)

    async def publish(self, name: str, fd: int, st: os.stat_result, csum: int) -> UpdateResult:
        """Advertise an opened file; serve it from that descriptor if the group accepts it."""
        try:
            args = {"peer": self.id, "name": name, "size": st.st_size, "checksum": csum}
            reply = await self.index.request("advertise", args)
        except BaseException:
            os.close(fd)
            raise
        self.known[name] = (st.st_size, st.st_mtime)
        if reply.ok:
            self.serve(name, fd, st.st_size, csum)
            self.say(f"shares {name}")
        else:
            os.close(fd)
            self.stop_serving(name)
            self.say(f"cannot share {name}: {reply.error}")
        return reply

    def serve(self, name: str, fd: int, size: int, csum: int) -> None:
        old = self.files.get(name)
        self.files[name] = VirtualServer(0, 0, self.where(name)[0], size, csum, fd=fd)
        if old is not None:
            old.close()

    def stop_serving(self, name: str) -> None:
        srv = self.files.pop(name, None)
        if srv is not None:
            srv.close()

    async def serve_unconfirmed(self) -> None:
        """Without the group, serve what the directory holds now, and list it so in the
        cached index others are answered from; the group decides about the names
        (unique or not) when it is back."""
        now = self.scan()
        for name, (size, _) in now.items():
            held = self.files.get(name)
            if held is None or held.size != size:
                try:
                    fd, st, csum = await open_checked(*self.where(name))
                except NotShareable:
                    self.stop_serving(name)
                    continue
                self.serve(name, fd, st.st_size, csum)
        for name in [n for n in self.files if n not in now]:
            self.stop_serving(name)
        self.cache_own_files()

    def cache_own_files(self) -> None:
        """The cached index lists this peer as holder of exactly the files it serves
        (a name another peer holds with other content is left to the group)."""
        files = self.cache.files
        for name in [n for n, f in files.items() if self.id in f.holders]:
            srv = self.files.get(name)
            if srv is None or (files[name].size, files[name].checksum) != (srv.size, srv.checksum):
                self.cache.drop_holder(name, self.id)
        for name, srv in self.files.items():
            held = files.get(name)
            if held is None:
                files[name] = FileEntry(self.id, srv.size, srv.checksum, [self.id])
            elif self.id not in held.holders and (held.size, held.checksum) == (
                srv.size,
                srv.checksum,
            ):
                held.holders.append(self.id)

    async def revoke(self, name: str) -> None:
        await self.index.request("revoke", {"peer": self.id, "name": name})
        self.known.pop(name, None)
        self.stop_serving(name)
        self.say(f"stopped sharing {name}")

    async def control(self, req: PeerShare | PeerUnshare, caller: Caller) -> Outcome:
        """share / unshare, from a caller sharing.answer accepted (this peer's user or root)."""
        if isinstance(req, PeerShare):
            return await self.share_file(Path(req.path), req.name, caller)
        return await self.unshare_file(req.name)

    async def share_file(self, path: Path, name: str, caller: Caller | None = None) -> Outcome:
        """mirrorfs-cli index share: one more file, under a name of its own. The peer opens
        it itself (never through a final symbolic link, only a regular file) and serves
        that file only: the device and inode are checked at every later open."""
        if not name or "/" in name or name.startswith("."):
            return Outcome(ok=False, error=f"{name!r} is not a name to share under")
        if not path.is_absolute():
            return Outcome(ok=False, error=f"{path} is not an absolute path")
        if "\0" in str(path):  # os.open raises ValueError, not OSError, for these
            return Outcome(ok=False, error=f"{str(path)!r} holds a null byte")
        if name in self.files or name in self.extra:
            return Outcome(ok=False, error=f"this peer already shares {name!r}")
        async with self.changing:
            try:
                fd, st, csum = await open_checked(path, None)
            except NotShareable as exc:
                return Outcome(ok=False, error=str(exc))
            self.extra[name] = Single(path, (st.st_dev, st.st_ino))
            try:
                reply = await self.publish(name, fd, st, csum)
            except MirrorfsError as exc:
                reply = UpdateResult(ok=False, error=str(exc))
            if reply.ok:
                self.say(f"{path} shared as {name} for {caller or 'this process'}")
            else:
                self.extra.pop(name, None)
                self.known.pop(name, None)
        return Outcome(ok=reply.ok, error=reply.error)

    async def unshare_file(self, name: str) -> Outcome:
        if name not in self.extra:
            if name in self.files:
                return Outcome(
                    ok=False,
                    error=f"{name!r} is in the shared directory {self.share}: "
                    "move it out to stop sharing it",
                )
            return Outcome(ok=False, error=f"this peer does not share {name!r}")
        async with self.changing:
            del self.extra[name]
            try:
                await self.revoke(name)
            except MirrorfsError as exc:
                return Outcome(ok=False, error=str(exc))
        return Outcome(ok=True)

    # -- one round with the index group -------------------------------------------------------

    async def step(self) -> None:
        if not self.registered:
            args = {"peer": self.id, "addr": self.addr, "interval": self.opts.interval}
            reply = await self.index.request("register", args)
            self.registered = reply.ok
            # the group may have lost our files, or hold some we no longer have (we were
            # away, or restarted): advertise everything again, revoke what went
            held = await self.index.query_pages("held", peer=self.id)
            self.known = {n: (-1, 0.0) for n in held}  # no real file has size -1
        reply = await self.index.request("heartbeat", {"peer": self.id})
        if not reply.ok:  # dropped by the master (we were silent): start over
            self.registered = False
            return
        now = self.scan()
        for name, (size, mtime) in now.items():
            if self.known.get(name) != (size, mtime):
                await self.advertise(name, size, mtime)
        for name in [n for n in {*self.known, *self.files} if n not in now]:
            self.extra.pop(name, None)  # gone, or replaced since it was shared
            await self.revoke(name)
        await self.refresh_cache()

    async def refresh_cache(self) -> None:
        """Copy the whole index when it changed, at most every CACHE_EVERY seconds."""
        if time.monotonic() - self.cached_at < CACHE_EVERY:
            return
        status = await self.index.query("status")
        if status.seq != self.cache.seq:
            self.cache = await self.index.snapshot()
            self.peers = {p: i.addr for p, i in self.cache.peers.items() if p != self.id}
        self.cached_at = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds with the group until ``stop``; a round under way then is cut short."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                one = asyncio.ensure_future(self.round())
                await asyncio.wait({one, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not one.done():
                    one.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await one
                    break
                one.result()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.opts.interval)
        finally:
            stopping.cancel()
        await self.leave()

    async def round(self) -> None:
        try:
            if not self.online or not self.ever_online:
                await self.index.query("status")  # a quick look: is a replica back?
            async with self.changing:
                await self.step()
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
            async with self.changing:
                await self.serve_unconfirmed()
            await self.gossip()

    async def leave(self) -> None:
        """Stopping: the group drops this peer and its files now, not when it falls silent."""
        if not (self.registered or self.ever_online):
            return  # the group never heard of this peer
        try:
            reply = await asyncio.wait_for(
                self.index.request("leave", {"peer": self.id}), LEAVE_WITHIN
            )
        except (MirrorfsError, TimeoutError) as exc:
            self.say(f"could not leave the index group ({exc or 'no reply'}); it drops us later")
            return
        self.say("left the index group" if reply.ok else f"leaving: {reply.error}")

    # -- without the group: peers exchange what they know ------------------------------------

    def mine(self) -> dict[str, SharedFile]:
        return {n: SharedFile(size=s.size, checksum=s.checksum) for n, s in self.files.items()}

    def named_peers(self) -> dict[str, str]:
        return {p: a for p, a in self.peers.items() if not p.startswith("?")}

    def exchange(self, req: PeerIndex, payload: bytes | bytearray, flags: int) -> Answer:
        """PEER_INDEX: learn the asker (if it says who it is), answer with what we know."""
        if req.peer is not None and req.addr is not None:
            self.learn(req.peer, req.addr, req.peers, req.mine)
        files = _encoder.encode(self.cache.files)
        if len(files) > MAX_PAYLOAD:
            files = _encoder.encode({})
        reply = PeerIndexReply(
            peer=self.id,
            peers={**self.named_peers(), self.id: self.addr},
            seq=self.cache.seq,
            online=self.online,
            mine=self.mine(),
        )
        return reply, files

    def learn(
        self, peer: str, addr: str, peers: dict[str, str], mine: dict[str, SharedFile]
    ) -> None:
        """Another peer's list and files, merged into ours."""
        if peer == self.id:
            return
        self.peers[peer] = addr
        self.misses.pop(peer, None)
        for p, a in peers.items():
            if p != self.id:
                self.peers.setdefault(p, a)
        if self.online:
            return  # while the group answers, it alone says who holds what
        files = self.cache.files
        for name, meta in mine.items():
            held = files.get(name)
            if held is None:
                files[name] = FileEntry(peer, meta.size, meta.checksum, [peer])
            elif peer not in held.holders:
                held.holders.append(peer)

    def forget(self, peer: str) -> None:
        self.peers.pop(peer, None)
        self.misses.pop(peer, None)
        for name in [n for n, f in self.cache.files.items() if peer in f.holders]:
            self.cache.drop_holder(name, peer)
        self.say(f"forgot peer {peer}: it did not answer {GOSSIP_MISSES} times")

    async def gossip(self) -> None:
        """Ask every known peer for its list; forget the ones that keep not answering."""
        req = PeerIndex(peer=self.id, addr=self.addr, peers=self.named_peers(), mine=self.mine())
        for peer, addr in list(self.peers.items()):
            if peer == self.id:
                continue
            try:
                reply = await self.ask(addr, req)
            except (MirrorfsError, ValueError, OSError):
                self.misses[peer] = self.misses.get(peer, 0) + 1
                if self.misses[peer] >= GOSSIP_MISSES:
                    self.forget(peer)
                continue
            if reply.peer != peer:  # a --peers address: now we know its id
                self.peers.pop(peer, None)
                peer = reply.peer
            self.learn(peer, addr, reply.peers, reply.mine)
