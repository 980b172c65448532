"""Who may change what a peer shares, and opening shared files so that nothing else is served.

A peer takes ``share`` and ``unshare`` from its own user (or root) only. On
this machine they come over the peer's control socket, a Unix socket of
mode 0600 in a directory of mode 0700, and the kernel says who is calling
(SO_PEERCRED). Over TCP they need a connection that proved the group key,
from this machine, whose socket belongs to the same users (the kernel's
socket table says whose it is): a key held by other members of the group
does not let them make this peer serve its files.

Whoever asks, the file is opened by the peer itself: its own user asks, or
root, who may read anything the peer may. Every open of a shared file is
``O_NOFOLLOW`` and must give a regular file; a single file shared by path
must keep the device and inode it had when it was shared, so replacing it
with a symbolic link (to /etc/shadow, say) or with another file stops the
sharing instead of serving something else.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.frames import Frame, Msg
from mirrorfuse.wire.messages import (
    BadMessage,
    Outcome,
    PeerShare,
    PeerUnshare,
    decode_request,
    encode_error,
    encode_reply,
)

from .net import FrameServer, Limits, in_background

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
CONTROL_TYPES = (Msg.PEER_SHARE, Msg.PEER_UNSHARE)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotShareable(Exception):
    """A file this peer will not share or serve; the text says why."""


@dataclass(frozen=True)
class Caller:
    """Who asks for a change: a user of this machine, as the kernel names it."""

    uid: int
    pid: int = 0

    def __str__(self) -> str:
        return f"uid {self.uid}" + (f" (pid {self.pid})" if self.pid else "")


@dataclass(frozen=True)
class Single:
    """A file shared by path (index share), and the (device, inode) it had then."""

    path: Path
    identity: tuple[int, int]


def may_control(caller: Caller) -> bool:
    """This peer's own user, or root."""
    return caller.uid in (0, os.geteuid())


def refusal(caller: Caller | None) -> str:
    if caller is None:
        return (
            "share and unshare are taken over TCP only from this machine, with the group "
            "key; use the peer's control socket"
        )
    return f"share and unshare are taken only from uid {os.geteuid()} or root, not {caller}"


def unix_caller(sock: socket.socket) -> Caller:
    pid, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return Caller(uid, pid)


def _proc_address(host: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host order, in hex."""
    packed = ipaddress.ip_address(host).packed
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def loopback_caller(local: tuple[str, int], remote: tuple[str, int]) -> Caller | None:
    """The owner of the socket at the other end of a TCP connection from this machine,
    from the kernel's socket table; None when it is not from here or not listed."""
    host = remote[0]
    if not ipaddress.ip_address(host).is_loopback:
        return None
    theirs, ours = _proc_address(host, remote[1]), _proc_address(local[0], local[1])
    table = "/proc/net/tcp6" if ":" in host else "/proc/net/tcp"
    try:
        with open(table) as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) > 7 and cols[1] == theirs and cols[2] == ours:
                    return Caller(int(cols[7]))
    except OSError:
        return None
    return None


def open_file(path: Path, identity: tuple[int, int] | None = None) -> tuple[int, os.stat_result]:
    """Open a file to share or serve: never through a final symbolic link, only a regular
    file, and (when given) only the one with this (device, inode)."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotShareable(f"{path} is a symbolic link") from None
        raise NotShareable(f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotShareable(f"{path} is not a regular file")
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise NotShareable(f"{path} was replaced since it was shared")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def fd_checksum(fd: int, size: int) -> int:
    """xxh3-64 of a file's first ``size`` bytes, read through its descriptor."""
    h = xxhash.xxh3_64()
    pos = 0
    while pos < size and (chunk := os.pread(fd, min(4 << 20, size - pos), pos)):
        h.update(chunk)
        pos += len(chunk)
    return h.intdigest()


async def open_checked(
    path: Path, identity: tuple[int, int] | None
) -> tuple[int, os.stat_result, int]:
    """``open_file`` and the file's checksum, off the event loop; the descriptor is the
    caller's to close (or closed here when the caller is cancelled meanwhile)."""

    def work() -> tuple[int, os.stat_result, int]:
        fd, st = open_file(path, identity)
        try:
            return fd, st, fd_checksum(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise

    fut = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_close_opened)
        raise
    except OSError as exc:  # a read error while checksumming
        raise NotShareable(f"{path}: {exc.strerror}") from None


def _close_opened(fut: asyncio.Future[tuple[int, os.stat_result, int]]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        os.close(fut.result()[0])


# what the peer does with a request it accepted
Control = Callable[[PeerShare | PeerUnshare, Caller], Awaitable[Outcome]]


async def answer(server: FrameServer, frame: Frame, caller: Caller | None, act: Control) -> None:
    """One share/unshare request: refused unless ``caller`` may change what is shared."""
    if caller is None or not may_control(caller):
        server.send(encode_error(frame.req_id, frame.type, "DENIED", refusal(caller)))
        return
    try:
        req = decode_request(frame)
    except BadMessage as exc:
        server.send(encode_error(frame.req_id, frame.type, "BAD_REQUEST", str(exc)))
        return
    assert isinstance(req, PeerShare | PeerUnshare)
    server.send(encode_reply(frame.type, frame.req_id, await act(req, caller)))


class ControlServer(FrameServer):
    """The control socket: share and unshare only, from the peer's own user or root."""

    def __init__(self, act: Control, limits: Limits | None = None) -> None:
        super().__init__(limits=limits)
        self.act = act
        self.caller: Caller | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        try:
            self.caller = unix_caller(sock) if sock is not None else None
        except OSError:
            self.caller = None

    def on_frame(self, frame: Frame) -> None:
        if frame.is_reply or frame.type not in CONTROL_TYPES:
            msg = "the control socket takes share and unshare only"
            self.send(encode_error(frame.req_id, frame.type, "BAD_REQUEST", msg))
            return
        in_background(answer(self, frame, self.caller, self.act))


def bind_control(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the start, in a directory of
    this user's; a socket left by a peer that died is replaced, a live one is not."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise MirrorfsError(f"{folder} is not a directory of uid {os.geteuid()}")
    if st.st_mode & 0o022:
        os.chmod(folder, 0o700)  # nobody else may put a socket of theirs in our place
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise MirrorfsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise MirrorfsError(f"a peer already listens on {path} (another with this --id?)")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left behind by a peer that was killed
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise MirrorfsError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock
