"""The server end of a framed connection, shared by every daemon.

Frames come in through the sans-I/O decoder; each daemon decodes the body
of a request into its typed message (``wire.messages``) and answers. A
corrupt stream gets one error frame (request id 0) and the connection
closes; the daemon's other connections are not affected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, cast

from mirrorfuse.wire.errors import MirrorfsError
from mirrorfuse.wire.frames import Frame, FrameDecoder, Msg, ProtocolError
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


def dispatch(frame: Frame, handlers: Mapping[type[Request[Any]], Handler]) -> Out:
    """Decode a request, run its handler, frame the reply; every failure is an error reply."""
    if frame.is_reply:
        return encode_error(frame.req_id, frame.type, "BAD_REQUEST", "unexpected reply frame")
    kind = REQUESTS.get(frame.type)
    handler = handlers.get(kind) if kind is not None else None
    if kind is None or handler is None:
        msg = f"unknown message type {frame.type}"
        return encode_error(frame.req_id, frame.type, "UNKNOWN_TYPE", msg)
    try:
        body, data = handler(decode(kind, frame.body), frame.payload, frame.flags)
    except BadMessage as exc:
        msg = f"bad {Msg(frame.type).name} request: {exc}"
        return encode_error(frame.req_id, frame.type, "BAD_REQUEST", msg)
    except Refused as exc:
        return encode_error(frame.req_id, frame.type, exc.code, str(exc), exc.last)
    except OSError as exc:
        log.error("I/O error: %s", exc)
        return encode_error(frame.req_id, frame.type, "EIO", f"I/O error: {exc.strerror}")
    return encode_reply(frame.type, frame.req_id, body, data)


class FrameServer(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.buffer_updated(nbytes)
        try:
            while (frame := self.decoder.next_frame()) is not None:
                self.on_frame(frame)
        except ProtocolError as exc:
            self.send(encode_error(0, Msg.ERROR, "PROTOCOL", str(exc)))
            if self.transport is not None:
                self.transport.close()

    def send(self, out: Out) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def peer_host(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else ""

    def on_frame(self, frame: Frame) -> None:
        raise NotImplementedError
