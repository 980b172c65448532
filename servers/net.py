"""The server end of a framed connection, shared by every daemon.

Frames come in through the sans-I/O decoder; each daemon decodes the body
of a request into its typed message (``wire.messages``) and answers. A
corrupt stream gets one error frame (request id 0) and the connection
closes; the daemon's other connections are not affected. A daemon with a key
reads no frame before the connection proved it (``wire.auth``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from mirrorfuse.core.stats import OpStats
from mirrorfuse.wire.auth import HELLO_SIZE, PROOF_SIZE, AuthError, ServerHandshake
from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.frames import (
    MAX_REQUEST_PAYLOAD,
    Frame,
    FrameDecoder,
    Msg,
    ProtocolError,
)
from mirrorfuse.wire.messages import (
    REQUESTS,
    BadMessage,
    Message,
    Request,
    decode,
    encode_error,
    encode_reply,
)

log = logging.getLogger("mirrorfs")

Out = list[bytes | bytearray | memoryview]
Answer = tuple[Message, bytes | bytearray]
# a handler gets the typed request, the payload and the frame's flags
Handler = Callable[[Any, bytes | bytearray, int], Answer]


_running: set[asyncio.Task[Any]] = set()


def in_background(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run a coroutine on its own; it is kept referenced until done (the loop holds
    tasks only weakly, so an unreferenced one may vanish mid-way)."""
    task = asyncio.ensure_future(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


class ListenError(MirrorfsError):
    """A daemon cannot listen where it was told to."""


class Refused(Exception):
    """A request understood but not carried out: an error reply with a code (and for GAP
    where the journal ends)."""

    def __init__(self, code: str, message: str, last: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.last = last


def dispatch(
    frame: Frame, handlers: Mapping[type[Request[Any]], Handler], stats: OpStats | None = None
) -> Out:
    """Decode a request, run its handler, frame the reply; every failure is an error reply.
    With ``stats``, each request of a known type is counted and timed (metrics)."""
    if frame.is_reply:
        return encode_error(frame.req_id, frame.type, "BAD_REQUEST", "unexpected reply frame")
    kind = REQUESTS.get(frame.type)
    handler = handlers.get(kind) if kind is not None else None
    if kind is None or handler is None:
        msg = f"unknown message type {frame.type}"
        return encode_error(frame.req_id, frame.type, "UNKNOWN_TYPE", msg)
    start = time.perf_counter()
    try:
        body, data = handler(decode(kind, frame.body), frame.payload, frame.flags)
    except BadMessage as exc:
        code, msg, last = "BAD_REQUEST", f"bad {Msg(frame.type).name} request: {exc}", None
    except Refused as exc:
        code, msg, last = exc.code, str(exc), exc.last
    except OSError as exc:
        log.error("I/O error: %s", exc)
        code, msg, last = "EIO", f"I/O error: {exc.strerror}", None
    else:
        if stats is not None:
            took = time.perf_counter() - start
            stats.of(frame.type).record(took, len(frame.payload), len(data))
        return encode_reply(frame.type, frame.req_id, body, data)
    if stats is not None:
        stats.failed(frame.type, code, time.perf_counter() - start)
    return encode_error(frame.req_id, frame.type, code, msg, last)


@dataclass
class Limits:
    """What all the connections of one daemon may hold at once, and how long they may idle.

    Memory follows what the daemon allows, never what a peer announces: a
    payload's buffer is taken from ``budget`` before it is allocated, and a
    connection that cannot get it stops being read until another frame is
    done. Replies are not made faster than the peer reads them.
    """

    max_connections: int = 256
    budget: int = 64 << 20  # payload bytes being received or waiting, over all connections
    max_payload: int = MAX_REQUEST_PAYLOAD
    handshake_timeout: float = 10.0  # to prove the key
    stall_timeout: float = 30.0  # to finish a frame once it has begun
    idle_timeout: float = 600.0  # with nothing at all (clients keep theirs alive)
    queued: int = 64  # frames of one connection waiting for the daemon
    connections: int = 0
    in_flight: int = 0
    waiting: deque[FrameServer] = field(default_factory=deque)

    def reserve(self, n: int) -> bool:
        if self.in_flight and self.in_flight + n > self.budget:
            return False
        self.in_flight += n
        return True

    def release(self, n: int) -> None:
        if not n:
            return
        self.in_flight -= n
        for _ in range(len(self.waiting)):  # each waiter once: one that still does not fit
            if self.in_flight >= self.budget:  # goes to the back and waits for the next
                break
            conn = self.waiting.popleft()
            conn.retry()
            if conn.decoder.blocked:
                break


LINGER = 2.0  # seconds a refused connection stays, its input dropped, before it closes

# a fresh handshake for each connection, with the key as it is now (None: no handshake)
ServerAuth = Callable[[], ServerHandshake]


class FrameServer(asyncio.BufferedProtocol):
    """A daemon's side of one connection: the key first, then frames, within ``limits``."""

    def __init__(self, auth: ServerAuth | None = None, limits: Limits | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self.decoder = FrameDecoder(self.limits.max_payload, self.limits.reserve)
        self.handshake = auth() if auth is not None else None
        self._hs_buf = bytearray(max(HELLO_SIZE, PROOF_SIZE))
        self.transport: asyncio.Transport | None = None
        self._holds: set[str] = set()  # why reading is paused
        self._counted = False
        self._since = time.monotonic()  # of the last bytes received
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False  # told why it is closed; whatever else it sends is dropped

    @property
    def authenticated(self) -> bool:
        """The peer proved the key (always False for a daemon without one)."""
        return self.handshake is not None and self.handshake.authenticated

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.limits.connections >= self.limits.max_connections:
            self.refuse("BUSY", f"too many connections ({self.limits.max_connections})")
            return
        self.limits.connections += 1
        self._counted = True
        self._since = time.monotonic()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.limits.connections -= 1
        if self._timer is not None:
            self._timer.cancel()
        if self in self.limits.waiting:
            self.limits.waiting.remove(self)
        self.limits.release(self.decoder.drop())

    def _watch(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        quiet = time.monotonic() - self._since
        lim = self.limits
        if self.handshake is not None and not self.handshake.done:
            if quiet > lim.handshake_timeout:
                return self.refuse("AUTH", f"no key proven within {lim.handshake_timeout:g}s")
        elif self.decoder.partial and quiet > lim.stall_timeout and not self._holds:
            return self.refuse("TIMEOUT", f"a frame unfinished for {lim.stall_timeout:g}s")
        elif quiet > lim.idle_timeout:
            return self.refuse("TIMEOUT", f"idle for {lim.idle_timeout:g}s")
        tick = min(lim.handshake_timeout, lim.stall_timeout, lim.idle_timeout, 4.0) / 4
        self._timer = asyncio.get_running_loop().call_later(tick, self._watch)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._refused:
            return memoryview(self._hs_buf)  # read to be dropped
        if self.handshake is not None and not self.handshake.done:
            return memoryview(self._hs_buf)[: self.handshake.wanted]
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._refused:
            return
        self._since = time.monotonic()
        hs = self.handshake
        if hs is not None and not hs.done:
            try:
                out = hs.receive(bytes(self._hs_buf[:nbytes]))
            except AuthError as exc:
                return self.refuse("AUTH", str(exc))
            if out:
                self.send([out])
            return
        self.decoder.buffer_updated(nbytes)
        self._pump()

    def _pump(self) -> None:
        try:
            while (
                not self._holds
                and not self._refused
                and (frame := self.decoder.next_frame()) is not None
            ):
                if not self.on_frame(frame):
                    self.limits.release(frame.held)
        except ProtocolError as exc:
            return self.refuse("PROTOCOL", str(exc))
        if self.decoder.blocked and "budget" not in self._holds:
            self.hold("budget")
            self.limits.waiting.append(self)

    def retry(self) -> None:
        """The budget has room again: take the frame that waited for it."""
        self._holds.discard("budget")
        self.decoder.retry()
        if self.decoder.blocked:
            self._holds.add("budget")
            self.limits.waiting.append(self)
        else:
            self.unhold("budget")

    def hold(self, why: str) -> None:
        """Stop reading (and handling) this connection's frames until ``unhold(why)``."""
        if not self._holds and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._holds.add(why)

    def unhold(self, why: str) -> None:
        self._holds.discard(why)
        if self._holds or self._refused or self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._pump()

    def pause_writing(self) -> None:
        self.hold("out")

    def resume_writing(self) -> None:
        self.unhold("out")

    def refuse(self, code: str, message: str) -> None:
        """One error frame, then the connection closes: nothing more of it is acted on.

        What the peer sent meanwhile is read and dropped for a moment, so that
        closing does not reset the connection before the error frame is read.
        """
        t = self.transport
        if self._refused or t is None or t.is_closing():
            return
        self.send(encode_error(0, Msg.ERROR, code, message))
        self._refused = True
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        if self._holds:
            self._holds.clear()
            t.resume_reading()
        asyncio.get_running_loop().call_later(LINGER, t.close)

    def send(self, out: Out) -> None:
        """Frames to the peer; none once it was refused (a reply made meanwhile, in the
        background or the in-order queue, is dropped: writing after the refusal's end
        of stream would raise in whoever made it)."""
        if self.transport is not None and not self.transport.is_closing() and not self._refused:
            self.transport.writelines(out)

    def send_from_file(
        self, head: bytes | bytearray | memoryview, fd: int, offset: int, data: bytes
    ) -> None:
        """A reply whose payload ``data`` was read from ``fd`` at ``offset``: sent from the
        file by the kernel (sendfile) when nothing waits to be written before it, else
        as bytes. Why: copying a large payload into the socket is most of what a read
        costs the sender, and sendfile lends the page cache's pages instead."""
        t = self.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if (
            t is None
            or sock is None
            or t.is_closing()
            or self._refused
            or t.get_extra_info("sslcontext") is not None
            or t.get_write_buffer_size()
        ):
            self.send([head, data])
            return
        fileno, sent, wrote = sock.fileno(), 0, 0
        try:
            wrote = os.write(fileno, head)
            if wrote < len(head):
                self.send([memoryview(head)[wrote:], data])
                return
            while sent < len(data):
                n = os.sendfile(fileno, fd, offset + sent, len(data) - sent)
                if n == 0:  # the file is shorter now: the rest as it was read
                    break
                sent += n
        except BlockingIOError:  # the socket is full: the transport sends the rest
            if wrote < len(head):  # the head too: not a byte of it went
                self.send([head, data])
                return
        except OSError:  # the peer went away: as a failed write through the transport
            t.abort()
            return
        if sent < len(data):
            self.send([memoryview(data)[sent:]])

    def peer_host(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else ""

    def on_frame(self, frame: Frame) -> bool | None:
        """Handle one frame; True if it is kept to be handled later (the daemon then
        gives ``frame.held`` back to ``limits`` when done with it)."""
        raise NotImplementedError
