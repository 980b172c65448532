"""The client connection against a scripted server in this process: a reply of another
version or schema is a clear failure of that server, never a KeyError or a hang."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from mirrorfuse.client.blocking import run_async
from mirrorfuse.client.connection import Connection, ServerDown
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.errors import ServerError
from mirrorfuse.wire.frames import HEADER, MAGIC, VERSION, Flag, FrameDecoder, Msg
from mirrorfuse.wire.messages import Read, ReadReply, Write, encode_error, encode_reply


def raw_reply(req_id: int, body: dict, version: int = VERSION) -> bytes:
    raw = msgpack.packb(body)
    return HEADER.pack(MAGIC, version, Msg.READ, req_id, Flag.REPLY, len(raw), 0) + raw


async def ask_scripted(answer) -> Exception | ReadReply:
    """One READ against a server that answers with ``answer(req_id)`` (bytes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        while not (frames := dec.frames()):
            dec.feed(await reader.read(65536))
        writer.write(answer(frames[0].req_id))
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = await Connection.open(3, Address("127.0.0.1", port), timeout=5.0)
    try:
        return (await conn.call(Read(slot=1))).body
    except Exception as exc:  # noqa: BLE001 - the test looks at what it was
        return exc
    finally:
        conn.close()
        server.close()


def test_a_well_formed_reply_is_typed():
    got = asyncio.run(ask_scripted(lambda r: b"".join(encode_reply(Msg.READ, r, ReadReply(gen=7)))))
    assert got == ReadReply(gen=7)


def test_a_reply_of_another_schema_is_that_server_failing():
    got = asyncio.run(ask_scripted(lambda r: raw_reply(r, {"gen": "seven"})))
    assert isinstance(got, ServerDown)
    assert "server 3" in str(got) and "sent a reply this client cannot read" in str(got)
    assert "Expected `int`, got `str` - at `$.gen`" in str(got)


def test_a_peer_of_another_protocol_version_is_refused_at_its_first_frame():
    got = asyncio.run(ask_scripted(lambda r: raw_reply(r, {"gen": 7}, version=1)))
    assert isinstance(got, ServerDown)
    assert f"protocol version 1 is not supported (this side speaks {VERSION})" in str(got)


def test_an_error_reply_keeps_its_code_and_where_a_journal_ends():
    got = asyncio.run(
        ask_scripted(lambda r: b"".join(encode_error(r, Msg.READ, "GAP", "journal ends", last=41)))
    )
    assert isinstance(got, ServerError)
    assert (got.code, got.detail, got.last, got.server) == ("GAP", "journal ends", 41, 3)


@pytest.mark.parametrize("body", [{"msg": "no code"}, {"code": 5}])
def test_an_unreadable_error_reply_is_still_an_error(body):
    def answer(req_id: int) -> bytes:
        raw = msgpack.packb(body)
        flags = Flag.REPLY | Flag.ERROR
        return HEADER.pack(MAGIC, VERSION, Msg.READ, req_id, flags, len(raw), 0) + raw

    got = asyncio.run(ask_scripted(answer))
    assert isinstance(got, ServerError) and got.code == "ERROR"
    assert "an unreadable error reply" in str(got)


def test_a_connection_lost_while_requests_wait_to_write_is_that_server_down():
    """Requests queued behind a full socket wake up to a closed transport: each is a
    ServerDown, never uvloop's RuntimeError (which reached users as EINVAL)."""

    async def go() -> list[BaseException | object]:
        stop = asyncio.Event()

        async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            await stop.wait()
            writer.transport.abort()

        server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = await Connection.open(1, Address("127.0.0.1", port), timeout=30.0)
        block = bytes(8 << 20)
        calls = [
            asyncio.ensure_future(conn.call(Write(slot=i, checksum=0, gen=1), block))
            for i in range(24)
        ]
        while conn._proto is not None and conn._proto.writable.is_set():
            await asyncio.sleep(0.01)  # until the socket is full and writers wait
        stop.set()
        got = await asyncio.gather(*calls, return_exceptions=True)
        conn.close()
        server.close()
        return got

    got = run_async(go())
    assert got and all(isinstance(g, ServerDown) for g in got), {type(g) for g in got}
