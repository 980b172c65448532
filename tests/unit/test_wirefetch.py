"""The blocking fetcher of the file servers' protocol (transfer/wirefetch.Fetcher), against
file servers on 127.0.0.1: serve-file's own (VirtualServer on an event loop in a thread)
and hand-written ones that damage, pause, stall, cut short or mislabel a reply.

A spliced fetch writes the segment's bytes into the output file at its offset (and
nothing else) and checks them there; a buffered one returns them. Whatever the source
does wrong is FetchFailed (PAUSED: FetchPaused) and the fetcher connects again for its
next segment; a failure to write the output file is OutputError, never the source's.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xxhash
from fakes import LoopThread, TcpServer, holds_only, recv_exact

from mirrorfuse.client.loop import new_event_loop
from mirrorfuse.transfer.output import Output, OutputError
from mirrorfuse.transfer.wirefetch import Fetcher, FetchFailed, FetchPaused
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.frames import HEADER, HEADER_SIZE, Msg
from mirrorfuse.wire.messages import FileRead, FileReadReply, decode, encode_error, encode_reply
from servers.fileserver import VirtualServer, listen

SIZE = 1 << 20
FILL = 0xA5  # what the output file holds before a fetch
TIMEOUT = 30.0  # the fetchers' (a test that hangs would wait this long)
HANG = 5.0  # far more than anything here takes, far less than TIMEOUT

# (conn, request id, request, connection number, request number on it) -> None
Answer = Callable[[socket.socket, int, FileRead, int, int], None]


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


def encoded(req_id: int, payload: bytes, checksum: int | None = None) -> tuple[bytes, bytes]:
    """A FILE_READ reply's head (header and body) and payload; the checksum is that of
    ``payload`` unless given."""
    if checksum is None:
        checksum = xxhash.xxh3_64_intdigest(payload)
    head, *_ = encode_reply(Msg.FILE_READ, req_id, FileReadReply(checksum=checksum), payload)
    return bytes(head), payload


def reply(conn: socket.socket, req_id: int, payload: bytes, checksum: int | None = None) -> None:
    conn.sendall(b"".join(encoded(req_id, payload, checksum)))


def frame_server(data: bytes, answer: Answer | None = None) -> Callable[..., None]:
    """A TcpServer handler: reads FileRead requests, answers each with ``answer``
    (default: the bytes asked for, with their checksum)."""

    def good(conn: socket.socket, req_id: int, req: FileRead, _c: int, _n: int) -> None:
        reply(conn, req_id, data[req.offset : req.offset + req.length])

    def handle(server: TcpServer, conn: socket.socket, number: int) -> None:
        for n in range(1, 1 << 30):
            head = recv_exact(conn, HEADER_SIZE)
            if len(head) < HEADER_SIZE:
                return
            _, _, type_, req_id, _, body_len, _ = HEADER.unpack(head)
            assert type_ == Msg.FILE_READ
            req = decode(FileRead, recv_exact(conn, body_len))
            (answer or good)(conn, req_id, req, number, n)
            if server.stopped.is_set():  # a stalled answer ends with its connection
                return

    return handle


@pytest.fixture
def serve(data: bytes) -> Iterator[Callable[..., TcpServer]]:
    made: list[TcpServer] = []

    def make(answer: Answer | None = None) -> TcpServer:
        made.append(TcpServer(frame_server(data, answer)))
        return made[-1]

    yield make
    for s in made:
        s.close()
    for s in made:
        assert not s.errors, s.errors


@pytest.fixture
def output(tmp_path: Path) -> Iterator[Output]:
    """A SIZE-byte output file filled with FILL, with its mapping (as a download has)."""
    path = tmp_path / "out"
    path.write_bytes(bytes([FILL]) * SIZE)
    fd = os.open(path, os.O_RDWR)
    out = Output(fd, SIZE, 1)
    yield out
    out.close()
    os.close(fd)


@pytest.fixture
def fetchers() -> Iterator[Callable[..., Fetcher]]:
    made: list[Fetcher] = []

    def make(port: int, out: Output | None = None) -> Fetcher:
        view = out.view if out is not None else None
        made.append(Fetcher(Address("127.0.0.1", port), None, None, TIMEOUT, view))
        return made[-1]

    yield make
    for f in made:
        f.close()


def contents(out: Output) -> bytes:
    return os.pread(out.fd, SIZE + 1, 0)


def sha(b: bytes | memoryview) -> str:
    return hashlib.sha256(b).hexdigest()


def expect_segment(out: Output, data: bytes, start: int, length: int) -> None:
    holds_only(contents(out), data, start, length, FILL)


# -- against serve-file's own server ----------------------------------------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def file_server(request, tmp_path: Path, data: bytes) -> Iterator[VirtualServer]:
    """serve-file's VirtualServer of ``data``, on the loop serve-file runs on (uvloop)
    and on asyncio's."""
    src = tmp_path / "src"
    src.write_bytes(data)
    lt = LoopThread(new_event_loop if request.param == "uvloop" else asyncio.new_event_loop)
    srv = VirtualServer(1, 0, src, SIZE, xxhash.xxh3_64_intdigest(data))
    try:
        lt.run(listen([srv], "127.0.0.1"))
        assert srv.listener is not None
        srv.port = srv.listener.sockets[0].getsockname()[1]
        yield srv
    finally:
        lt.call(srv.end)
        lt.close()
        srv.close()


def test_segments_from_serve_file_spliced_and_buffered(file_server, output, fetchers, data):
    f = fetchers(file_server.port, output)
    start, length = 123_457, 300_001  # neither aligned to a page nor to anything else
    assert f.fetch(start, length, output.fd) is None
    expect_segment(output, data, start, length)
    got = f.fetch(7, 65_536, None)  # the same connection, through its buffer
    assert got is not None and bytes(got) == data[7 : 7 + 65_536]
    expect_segment(output, data, start, length)  # a buffered fetch writes nothing
    assert f.fetch(SIZE - 10, 10, output.fd) is None  # the file's last bytes
    assert contents(output)[SIZE - 10 :] == data[SIZE - 10 :]


# -- against hand-written servers -------------------------------------------------------


def test_a_spliced_fetch_writes_exactly_its_segment_at_its_offset(serve, output, fetchers, data):
    srv = serve()
    f = fetchers(srv.port, output)
    start, length = 4095, 500_000
    assert f.fetch(start, length, output.fd) is None
    expect_segment(output, data, start, length)


def test_a_buffered_fetch_returns_the_bytes_and_writes_nothing(serve, output, fetchers, data):
    srv = serve()
    f = fetchers(srv.port, output)
    for start, length in [(1000, 200_000), (5, 17), (SIZE - 300_000, 300_000)]:
        got = f.fetch(start, length, None)
        assert got is not None and sha(got) == sha(data[start : start + length])
    assert contents(output) == bytes([FILL]) * SIZE


def test_segments_one_after_another_share_one_connection(serve, output, fetchers, data):
    srv = serve()
    f = fetchers(srv.port, output)
    each = SIZE // 8
    for i in range(8):
        fd = output.fd if i % 2 else None
        got = f.fetch(i * each, each, fd)
        if got is not None:
            output_write(output, bytes(got), i * each)
    assert contents(output) == data
    assert srv.accepted == 1


def output_write(out: Output, b: bytes, at: int) -> None:
    os.pwrite(out.fd, b, at)


@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "buffered"])
def test_a_damaged_segment_fails_and_the_next_comes_on_a_new_connection(
    serve, output, fetchers, data, spliced
):
    def answer(conn: socket.socket, req_id: int, req: FileRead, c: int, n: int) -> None:
        payload = bytearray(data[req.offset : req.offset + req.length])
        checksum = xxhash.xxh3_64_intdigest(payload)
        if c == 1 and n == 1:
            payload[len(payload) // 2] ^= 0x01
        reply(conn, req_id, bytes(payload), checksum)

    srv = serve(answer)
    f = fetchers(srv.port, output)
    fd = output.fd if spliced else None
    with pytest.raises(FetchFailed, match="arrived damaged"):
        f.fetch(0, 100_000, fd)
    got = f.fetch(200_000, 100_000, fd)  # the same fetcher, as a download reuses it
    if spliced:
        assert got is None and contents(output)[200_000:300_000] == data[200_000:300_000]
    else:
        assert got is not None and bytes(got) == data[200_000:300_000]
    assert srv.accepted == 2  # the failed reply's connection was not reused


@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "buffered"])
def test_a_paused_server_is_fetch_paused(serve, output, fetchers, spliced):
    def paused(conn: socket.socket, req_id: int, req: FileRead, c: int, n: int) -> None:
        conn.sendall(b"".join(encode_error(req_id, Msg.FILE_READ, "PAUSED", "server 1 is paused")))

    srv = serve(paused)
    f = fetchers(srv.port, output)
    with pytest.raises(FetchPaused, match="server 1 is paused"):
        f.fetch(0, 1000, output.fd if spliced else None)
    assert contents(output) == bytes([FILL]) * SIZE


def test_another_error_reply_is_fetch_failed_with_its_message(serve, output, fetchers):
    def refused(conn: socket.socket, req_id: int, req: FileRead, c: int, n: int) -> None:
        conn.sendall(b"".join(encode_error(req_id, Msg.FILE_READ, "EIO", "I/O error: disk")))

    srv = serve(refused)
    with pytest.raises(FetchFailed, match="I/O error: disk"):
        fetchers(srv.port, output).fetch(0, 1000, output.fd)


STALLS = {
    "before the reply": 0,
    "after the reply's head": 1,
    "mid-payload": 2,
}


@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "buffered"])
@pytest.mark.parametrize("where", list(STALLS))
def test_abort_ends_a_fetch_from_a_stalled_server(serve, output, fetchers, data, where, spliced):
    sent = threading.Event()

    def stall(conn: socket.socket, req_id: int, req: FileRead, c: int, n: int) -> None:
        payload = data[req.offset : req.offset + req.length]
        frames = encoded(req_id, payload)
        if STALLS[where] >= 1:
            conn.sendall(frames[0])
        if STALLS[where] >= 2:
            conn.sendall(payload[: len(payload) // 2])
        sent.set()
        srv.stopped.wait()  # and nothing more, until the test ends

    srv = serve(stall)
    f = fetchers(srv.port, output)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            f.fetch(0, 500_000, output.fd if spliced else None)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (looked at below)
            outcome.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert sent.wait(HANG)
        f.abort()
        t.join(HANG)  # not the fetcher's TIMEOUT: abort ends it
        assert not t.is_alive(), "abort() did not end the fetch"
    finally:
        srv.stopped.set()
        t.join(TIMEOUT)
    assert len(outcome) == 1 and isinstance(outcome[0], FetchFailed), outcome
    assert "no answer" not in str(outcome[0])  # it stopped, it did not time out
    with pytest.raises(FetchFailed, match="stopped"):  # an aborted fetcher stays stopped
        f.fetch(0, 10, None)


@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "buffered"])
def test_a_reply_cut_short_by_a_close_is_fetch_failed(serve, output, fetchers, data, spliced):
    def short(conn: socket.socket, req_id: int, req: FileRead, c: int, n: int) -> None:
        payload = data[req.offset : req.offset + req.length]
        frames = encoded(req_id, payload)
        conn.sendall(frames[0] + payload[:-1000])
        conn.shutdown(socket.SHUT_WR)

    srv = serve(short)
    with pytest.raises(FetchFailed, match="closed the connection"):
        fetchers(srv.port, output).fetch(0, 300_000, output.fd if spliced else None)


@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "buffered"])
@pytest.mark.parametrize("delta", [-1, +1, -100_000])
def test_a_payload_of_another_length_than_asked_is_fetch_failed(
    serve, output, fetchers, data, spliced, delta
):
    def mislabelled(conn: socket.socket, req_id: int, req: FileRead, c: int, n: int) -> None:
        reply(conn, req_id, data[req.offset : req.offset + req.length + delta])

    srv = serve(mislabelled)
    length = 200_000
    with pytest.raises(FetchFailed, match=f"sent {length + delta} bytes for {length}"):
        fetchers(srv.port, output).fetch(1000, length, output.fd if spliced else None)
    assert contents(output) == bytes([FILL]) * SIZE  # nothing was written


def test_a_malformed_or_misaddressed_frame_is_fetch_failed(serve, output, fetchers, data):
    def wrong(conn: socket.socket, req_id: int, req: FileRead, c: int, n: int) -> None:
        if c == 1:
            conn.sendall(b"XX" + bytes(HEADER_SIZE))  # not a frame
        else:
            reply(conn, req_id + 7, data[: req.length])  # another request's reply

    srv = serve(wrong)
    f = fetchers(srv.port, output)
    for _ in range(2):
        with pytest.raises(FetchFailed, match="malformed frame"):
            f.fetch(0, 100, None)
    assert srv.accepted == 2


def test_a_server_that_is_not_there_is_fetch_failed(fetchers, output):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(FetchFailed, match="is not reachable"):
            fetchers(port, output).fetch(0, 100, output.fd)


# -- the output file's failures are not the source's --------------------------------------


def test_an_output_that_cannot_be_written_is_output_error(serve, tmp_path, fetchers, data):
    path = tmp_path / "ro"
    path.write_bytes(bytes(SIZE))
    fd = os.open(path, os.O_RDONLY)
    out = Output(fd, SIZE, 1)
    try:
        srv = serve()
        f = fetchers(srv.port, out)
        with pytest.raises(OutputError) as err:
            f.fetch(0, 100_000, fd)
        assert not isinstance(err.value, FetchFailed)
        assert isinstance(err.value.error, OSError)
        got = f.fetch(0, 100_000, None)  # the source is fine: a new connection serves it
        assert got is not None and bytes(got) == data[:100_000]
    finally:
        out.close()
        os.close(fd)


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_is_output_error_not_the_sources(serve, full_tmpfs, fetchers, data):
    (full_tmpfs / "filler").write_bytes(bytes(768 << 10))  # a quarter of it left
    fd = os.open(full_tmpfs / "out", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, SIZE)  # sparse: no room taken yet
    out = Output(fd, SIZE, 1)
    try:
        srv = serve()
        f = fetchers(srv.port, out)
        each = SIZE // 8
        with pytest.raises(OutputError) as err:
            for start in range(0, SIZE, each):  # fails once the tmpfs is full
                assert f.fetch(start, each, fd) is None
        assert not isinstance(err.value, FetchFailed)
        assert err.value.error.errno == errno.ENOSPC
    finally:
        out.close()
        os.close(fd)


@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "buffered"])
def test_a_kept_connection_the_server_closed_while_idle_is_replaced(
    serve, output, fetchers, data, spliced
):
    """Servers close connections idle for long (ours after 600 s): the next fetch
    connects again instead of failing the source."""

    def answer_then_close(conn: socket.socket, req_id: int, req: FileRead, _c: int, _n: int):
        reply(conn, req_id, data[req.offset : req.offset + req.length])
        conn.shutdown(socket.SHUT_RDWR)

    srv = serve(answer_then_close)
    f = fetchers(srv.port, output)
    for start in (0, 100_000, 200_000):
        got = f.fetch(start, 50_000, output.fd if spliced else None)
        if spliced:
            assert got is None and contents(output)[start : start + 50_000] == data[start:][:50_000]
        else:
            assert got is not None
            assert bytes(got) == data[start : start + 50_000]
    assert srv.accepted == 3


def test_a_reply_cut_short_on_a_kept_connection_is_not_asked_again(serve, output, fetchers, data):
    def half_then_close(conn: socket.socket, req_id: int, req: FileRead, _c: int, n: int):
        head, payload = encoded(req_id, data[req.offset : req.offset + req.length])
        conn.sendall(head + payload if n == 1 else head[:5])
        if n > 1:
            conn.shutdown(socket.SHUT_RDWR)

    srv = serve(half_then_close)
    f = fetchers(srv.port, output)
    assert f.fetch(0, 1000, None) is not None
    with pytest.raises(FetchFailed, match="closed the connection"):
        f.fetch(1000, 1000, None)  # an answer began: the server's failure, not a stale one
    assert srv.accepted == 1
