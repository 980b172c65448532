"""A daemon's limits, on a tiny echo daemon in this process: the key first, a cap on
connections, timeouts for the silent, and a budget that holds big payloads back."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from mirrorfuse.client import connection
from mirrorfuse.client.blocking import run_async
from mirrorfuse.client.connection import Connection, KeyRefused, ServerDown
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.auth import ServerHandshake, new_key
from mirrorfuse.wire.frames import Frame, FrameDecoder, Msg, encode
from mirrorfuse.wire.messages import GenReply, Sync, encode_reply
from servers.net import FrameServer, Limits

KEY = new_key()


class Echo(FrameServer):
    """Answers every frame as a SYNC is answered; TRIM frames are kept until told."""

    kept: list[tuple[Echo, Frame]] = []

    def on_frame(self, frame: Frame) -> bool:
        if frame.type == Msg.TRIM:
            Echo.kept.append((self, frame))
            return True
        self.send(encode_reply(frame.type, frame.req_id, GenReply(gen=0), b""))
        return False


async def serve(limits: Limits, key: bytes | None = KEY) -> tuple[Any, Address]:
    auth = (lambda: ServerHandshake(key, "v")) if key is not None else None
    server = await asyncio.get_running_loop().create_server(
        lambda: Echo(auth, limits), "127.0.0.1", 0
    )
    return server, Address("127.0.0.1", server.sockets[0].getsockname()[1])


def test_beyond_the_cap_a_connection_is_told_so() -> None:
    async def go() -> str:
        server, addr = await serve(Limits(max_connections=2))
        conns = [await Connection.open(0, addr, 2.0, keys=lambda _v: KEY) for _ in range(2)]
        try:
            with pytest.raises(ServerDown) as err:
                await Connection.open(0, addr, 2.0, keys=lambda _v: KEY)
            conns[0].close()
            await asyncio.sleep(0.1)  # its place is free again
            again = await Connection.open(0, addr, 2.0, keys=lambda _v: KEY)
            again.close()
            return str(err.value)
        finally:
            for c in conns:
                c.close()
            server.close()

    assert "too many connections (2)" in run_async(go())


def test_a_wrong_key_is_refused_on_both_sides() -> None:
    async def go() -> str:
        server, addr = await serve(Limits())
        try:
            with pytest.raises(KeyRefused) as err:
                await Connection.open(0, addr, 2.0, keys=lambda _v: new_key())
            return str(err.value)
        finally:
            server.close()

    assert "did not prove the key of volume v" in run_async(go())


def test_silent_connections_are_closed_and_a_kept_one_stays(monkeypatch) -> None:
    monkeypatch.setattr(connection, "KEEPALIVE", 0.2)

    async def go() -> tuple[bytes, bool, bool]:
        limits = Limits(handshake_timeout=0.4, idle_timeout=0.6)
        server, addr = await serve(limits)
        try:
            loop = asyncio.get_running_loop()
            raw = socket.create_connection((addr.host, addr.port))
            raw.setblocking(False)
            silent = await asyncio.wait_for(loop.sock_recv(raw, 4096), 3)  # no handshake
            raw.close()
            idle = await Connection.open(0, addr, 2.0, keys=lambda _v: KEY)
            kept = await Connection.open(0, addr, 2.0, keys=lambda _v: KEY)
            kept.keepalive = Sync()
            await asyncio.sleep(1.5)
            return silent, idle.closed, kept.closed
        finally:
            server.close()

    Echo.kept.clear()
    silent, idle_closed, kept_closed = run_async(go())
    dec = FrameDecoder()
    dec.feed(silent)
    (frame,) = dec.frames()
    assert frame.is_error and b"no key proven" in frame.body
    assert idle_closed and not kept_closed


def test_the_budget_holds_a_payload_back_until_another_is_done() -> None:
    async def go() -> tuple[int, int, int]:
        limits = Limits(budget=1 << 20)
        server, addr = await serve(limits, key=None)
        loop = asyncio.get_running_loop()
        socks = []
        sending = []  # a held connection is not read: its sender waits, in the background
        try:
            Echo.kept.clear()
            for _ in range(3):  # each a 600 KiB payload: one fits the budget at a time
                s = socket.create_connection((addr.host, addr.port))
                s.setblocking(False)
                frame = b"".join(encode(Msg.TRIM, 1, {}, bytes(600 << 10)))
                sending.append(asyncio.ensure_future(loop.sock_sendall(s, frame)))
                socks.append(s)
            await asyncio.sleep(0.5)
            first = len(Echo.kept)
            held = limits.in_flight
            conn, frame = Echo.kept.pop(0)
            limits.release(frame.held)  # done with it: the next one comes in
            await asyncio.sleep(0.5)
            return first, held, len(Echo.kept)
        finally:
            for task in sending:
                task.cancel()
            for s in socks:
                s.close()
            server.close()

    first, held, after = run_async(asyncio.wait_for(go(), 30))
    assert first == 1 and held <= 1 << 20 and after == 1
