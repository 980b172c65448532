"""serve-file's FILE_READ replies, sent from the file with sendfile (FrameServer.send_from_file)
when nothing waits before them in the transport, else (the socket full) through it.

Whichever way each byte goes, a client gets every reply whole and in order, its payload
the bytes of the file its checksum says; a file that changes between the read and the
send never yields a silently wrong reply (the payload is what was read, or it fails its
checksum). Run on the real VirtualServer, on asyncio's loop and on uvloop (serve-file's).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import xxhash
from fakes import LoopThread, recv_exact

from mirrorfuse.client.loop import new_event_loop
from mirrorfuse.transfer.wirefetch import Fetcher, FetchFailed
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.frames import HEADER, HEADER_SIZE, MAGIC, Flag
from mirrorfuse.wire.messages import FileRead, FileReadReply, decode, encode_request
from servers.fileserver import FileConnection, VirtualServer, listen

MiB = 1 << 20
SIZE = 16 * MiB
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": new_event_loop,
}


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


@dataclass
class Served:
    lt: LoopThread
    srv: VirtualServer
    path: Path

    @property
    def port(self) -> int:
        assert self.srv.listener is not None
        return int(self.srv.listener.sockets[0].getsockname()[1])

    def connection(self) -> FileConnection:
        """The server's one connection (waits for it to be made)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            conns = self.lt.call(lambda: list(self.srv.conns))
            if conns:
                assert len(conns) == 1
                return conns[0]
            time.sleep(0.01)
        raise AssertionError("the server never saw the connection")


@pytest.fixture(params=list(LOOPS))
def served(request, tmp_path: Path, data: bytes) -> Iterator[Served]:
    """serve-file's server of a copy of ``data`` on 127.0.0.1, on an event loop in a thread."""
    path = tmp_path / "served"
    path.write_bytes(data)
    lt = LoopThread(LOOPS[request.param])
    srv = VirtualServer(1, 0, path, SIZE, xxhash.xxh3_64_intdigest(data))
    try:
        lt.run(listen([srv], "127.0.0.1"))
        yield Served(lt, srv, path)
    finally:
        lt.call(srv.end)
        lt.close()
        srv.close()


@dataclass
class SendfileCalls:
    calls: int = 0
    blocked: int = 0  # BlockingIOError: the socket was full, the transport took over
    short: int = 0  # returned 0: the file ended before the payload did


@pytest.fixture
def sendfile_calls(monkeypatch) -> SendfileCalls:
    """os.sendfile, counted (only the server's loop thread calls it)."""
    seen = SendfileCalls()
    real = os.sendfile

    def counted(*args: Any) -> int:
        seen.calls += 1
        try:
            n = real(*args)
        except BlockingIOError:
            seen.blocked += 1
            raise
        seen.short += n == 0
        return n

    monkeypatch.setattr(os, "sendfile", counted)
    return seen


@pytest.fixture
def clients() -> Iterator[Callable[..., socket.socket]]:
    made: list[socket.socket] = []

    def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
        c = socket.socket()
        made.append(c)
        if rcvbuf is not None:  # before connecting: the window is agreed then
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        c.settimeout(30)
        c.connect(("127.0.0.1", port))
        return c

    yield connect
    for c in made:
        c.close()


def ask(c: socket.socket, req_id: int, offset: int, length: int) -> None:
    c.sendall(b"".join(encode_request(req_id, FileRead(offset=offset, length=length))))


def read_reply(c: socket.socket, slowly: bool = False) -> tuple[int, int, bytes]:
    """(request id, checksum, payload) of the next reply; ``slowly``: its payload in small
    reads with pauses, so that the server's socket stays full."""
    head = recv_exact(c, HEADER_SIZE)
    magic, _, _, req_id, flags, body_len, payload_len = HEADER.unpack(head)
    assert magic == MAGIC, f"not a frame's header: {head!r}"
    assert flags & Flag.REPLY and not flags & Flag.ERROR
    checksum = decode(FileReadReply, recv_exact(c, body_len)).checksum
    if not slowly:
        return req_id, checksum, recv_exact(c, payload_len)
    payload = bytearray()
    while len(payload) < payload_len:
        chunk = c.recv(min(32 << 10, payload_len - len(payload)))
        assert chunk, "the server closed the connection mid-payload"
        payload += chunk
        time.sleep(0.0002)
    return req_id, checksum, bytes(payload)


@pytest.mark.parametrize("rcvbuf", [64 << 10, 256 << 10])
def test_pipelined_reads_to_a_slow_reader_arrive_whole_and_in_order(
    served, clients, sendfile_calls, data, rcvbuf
):
    c = clients(served.port, rcvbuf)
    wanted = []
    for i in range(64):  # 64 MiB asked at once, at offsets aligned to nothing
        offset = (i * MiB + i * 4097) % (SIZE - MiB)
        wanted.append((i + 1, offset))
        ask(c, i + 1, offset, MiB)
    time.sleep(0.1)  # nothing read yet: the server's socket fills
    for n, (req_id, offset) in enumerate(wanted):
        got_id, checksum, payload = read_reply(c, slowly=n < 8)
        assert got_id == req_id  # in order
        assert len(payload) == MiB
        assert xxhash.xxh3_64_intdigest(payload) == checksum, f"reply {req_id} damaged"
        assert payload == data[offset : offset + MiB], f"reply {req_id}: other bytes"
    # both ways were taken: from the file, and (the socket full) through the transport
    assert sendfile_calls.calls > 0 and sendfile_calls.blocked > 0, sendfile_calls
    assert served.srv.sent == 64 * MiB


def fill(sock_fd: int) -> int:
    """Write to the socket until the kernel takes no more; the bytes written."""
    total, chunk = 0, bytes(64 << 10)
    while True:
        try:
            total += os.write(sock_fd, chunk)
        except BlockingIOError:
            return total


def test_a_reply_whose_head_finds_the_socket_full_keeps_its_head(served, clients, data):
    """The transport has nothing waiting, but the socket is full (the last sendfile filled
    it): not even the reply's head fits. It must go through the transport, head first."""
    c = clients(served.port, 64 << 10)
    conn = served.connection()

    def fill_socket() -> int:
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() == 0
        return fill(conn.transport.get_extra_info("socket").fileno())

    filled = served.lt.call(fill_socket)
    time.sleep(0.05)  # whatever the peer's window still took, filled again
    filled += served.lt.call(fill_socket)
    ask(c, 1, 12_345, MiB)
    # nothing is read before the server answered (with the socket still full)
    deadline = time.monotonic() + 5
    while served.lt.call(lambda: served.srv.sent) < MiB and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recv_exact(c, filled) == bytes(filled)  # what filled it, then the reply
    req_id, checksum, payload = read_reply(c)
    assert req_id == 1 and payload == data[12_345 : 12_345 + MiB]
    assert xxhash.xxh3_64_intdigest(payload) == checksum


CHANGES = {
    # the file after the read: (its new size: None, none; else that many bytes of the range
    # are left), then bytes appended to it
    "truncated to nothing": (None, b""),
    "truncated in the range": (1000, b""),
    "truncated in the range, then rewritten": (1000, b"\xee" * MiB),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_file_changed_between_read_and_send_is_never_a_silently_wrong_reply(
    served, clients, sendfile_calls, data, change
):
    """The range's first 1000 bytes stay, then the file ends (or goes on with other bytes):
    the first sendfile (a fresh connection takes far more than 1000 bytes) reaches the
    change."""
    offset, length = 3 * MiB + 17, 2 * MiB
    keep, appended = CHANGES[change]
    original = served.srv.handlers[FileRead]

    def read_then_change(req: FileRead, payload: bytes | bytearray, flags: int):  # noqa: ANN202
        answer = original(req, payload, flags)
        os.truncate(served.path, 0 if keep is None else offset + keep)
        with open(served.path, "ab") as f:
            f.write(appended)
        return answer

    served.srv.handlers[FileRead] = read_then_change
    c = clients(served.port)
    ask(c, 1, offset, length)
    req_id, checksum, payload = read_reply(c)
    assert req_id == 1 and len(payload) == length
    assert sendfile_calls.calls > 0  # it went the sendfile way
    right = payload == data[offset : offset + length]
    intact = xxhash.xxh3_64_intdigest(payload) == checksum
    assert right == intact  # never a payload that is wrong yet passes its checksum
    if not appended:  # the file ended early: the rest came as it was read
        assert sendfile_calls.short > 0
        assert right and intact
    else:  # other bytes than were read went: the checksum says so
        assert not right and not intact


def test_the_fetcher_sees_a_file_rewritten_under_the_server_as_damaged(served, data):
    """The same, end to end: the downloader's fetcher refuses such a reply."""
    original = served.srv.handlers[FileRead]

    def read_then_rewrite(req: FileRead, payload: bytes | bytearray, flags: int):  # noqa: ANN202
        answer = original(req, payload, flags)
        with open(served.path, "r+b") as f:
            f.seek(req.offset + 100)
            f.write(b"\x00" * 100)
        return answer

    served.srv.handlers[FileRead] = read_then_rewrite
    f = Fetcher(Address("127.0.0.1", served.port), None, None, 30.0)
    try:
        with pytest.raises(FetchFailed, match="arrived damaged"):
            f.fetch(MiB, MiB, None)
    finally:
        f.close()


def test_a_client_that_goes_away_mid_reply_leaves_the_server_serving(served, clients, data):
    c = clients(served.port, 64 << 10)
    for i in range(8):
        ask(c, i + 1, i * MiB, MiB)
    time.sleep(0.05)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # a reset, with replies still to send
    other = clients(served.port)
    ask(other, 1, 5 * MiB, MiB)
    req_id, checksum, payload = read_reply(other)
    assert req_id == 1 and payload == data[5 * MiB : 6 * MiB]
    assert xxhash.xxh3_64_intdigest(payload) == checksum
