"""Garbage thrown at the peer, the index replica's snapshot server and the file server of
serve-file, each listening in this process as its daemon builds it.

Without the key a keyed daemon answers at most one refusal (request id 0, AUTH) and does
nothing; with the key it answers with replies only and goes on serving; no exception
escapes, no connection is left open, no byte of the budget stays held; a peer never
shares, unshares or serves a file it does not advertise. (The block server has the same
treatment, live, in tests/e2e/test_wire_fuzz.py; here only the one bug found through the
peer that it shares.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import msgpack
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_peer_daemon import Group, nobody

from mirrorfuse.client.blocking import new_event_loop
from mirrorfuse.wire.auth import MAGIC as AUTH_MAGIC
from mirrorfuse.wire.auth import (
    PROOF_SIZE,
    REPLY_SIZE,
    ClientHandshake,
    ServerHandshake,
    new_key,
)
from mirrorfuse.wire.frames import HEADER, MAGIC, VERSION, Flag, Frame, FrameDecoder, Msg, encode
from servers import net
from servers.blobs import BlobServer, BlobStore
from servers.block.server import listen as listen_blocks
from servers.block.store import Store
from servers.fileserver import VirtualServer, file_checksum, listen
from servers.net import Limits
from servers.peer import Peer, PeerOptions, PeerServer

T = TypeVar("T")
KEY = new_key()  # the group's: the peer's and the index replica's connections prove it
WAIT = 3.0  # seconds one exchange may take before the connection counts as wedged
PLAIN = b"plain text, advertised. " * 120  # the one file the peer shares
SERVED = b"served by serve-file. " * 130
BLOB = b"a snapshot of the index. " * 150
SECRETS = (b"SECRET", b"HIDDEN", b"INNER")  # in files no daemon may serve


# -- the daemons, on a loop of their own ---------------------------------------------------------


class LoopThread:
    """The event loop every mirrorfs process runs on, in a thread; what escapes is kept:
    to its exception handler (a protocol callback that raised) or out of a task."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self.escaped: list[str] = []
        self.loop.set_exception_handler(self._escaped)
        self.loop.set_task_factory(self._task)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fuzzed")
        self.thread.start()

    def _escaped(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.escaped.append(f"{context.get('message')}: {context.get('exception')!r}")

    def _task(
        self, loop: asyncio.AbstractEventLoop, coro: Any, context: Any = None
    ) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, context=context)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.escaped.append(f"task {task.get_coro()!r} raised {task.exception()!r}")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def on_loop() -> T:
            return fn()

        return self.run(on_loop())

    def close(self) -> None:
        """Cancel what still runs (a block server's queue runs for ever), then stop."""

        async def cancel_all() -> None:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Daemons:
    tmp: Path
    runner: LoopThread
    peer: Peer
    group: Group
    peer_limits: Limits
    peer_port: int
    store: BlobStore
    token: str
    blob_limits: Limits
    blob_port: int
    file: VirtualServer
    file_port: int
    closers: list[Callable[[], None]] = field(default_factory=list)


def port_of(server: asyncio.AbstractServer) -> int:
    return int(cast(asyncio.Server, server).sockets[0].getsockname()[1])


def close_all(closers: list[Callable[[], None]]) -> None:
    for close in closers:
        close()


def shared_tree(tmp: Path) -> Path:
    """A shared directory with one plain file, and around it what must never be served."""
    share = tmp / "share"
    share.mkdir()
    (share / "plain.txt").write_bytes(PLAIN)
    (share / ".hidden").write_bytes(b"HIDDEN" * 50)
    (tmp / "secret").write_bytes(b"SECRET" * 50)
    (share / "escape.txt").symlink_to(tmp / "secret")
    (share / "sub").mkdir()
    (share / "sub" / "inner").write_bytes(b"INNER" * 50)
    (tmp / "secret-link").symlink_to(tmp / "secret")
    os.mkfifo(tmp / "fifo")
    return share


async def start_peer(share: Path) -> tuple[Peer, Group, Limits, asyncio.Server]:
    """As mirrorfuse.tools.peer.serve builds its listener, with a stand-in for the group."""
    group = Group(up=True)
    peer = Peer(PeerOptions("pa", share, 0.5, []), group, nobody)
    await peer.round()  # registered, plain.txt advertised
    auth = lambda: ServerHandshake(KEY, None)  # noqa: E731
    limits = Limits(max_payload=0)
    server = await asyncio.get_running_loop().create_server(
        lambda: PeerServer(peer, auth, limits), "127.0.0.1", 0
    )
    return peer, group, limits, server


async def start(tmp: Path, runner: LoopThread) -> Daemons:
    loop = asyncio.get_running_loop()
    share = shared_tree(tmp)
    peer, group, peer_limits, peer_server = await start_peer(share)
    assert sorted(peer.files) == ["plain.txt"]
    # as servers.index.serve builds the snapshot server
    store = BlobStore()
    token = store.put(BLOB)
    blob_limits = Limits(max_connections=64)
    blob_server = await loop.create_server(
        lambda: BlobServer(store, KEY, blob_limits), "127.0.0.1", 0
    )
    # as serve-file: one virtual server, on a port of its own
    served = tmp / "served.bin"
    served.write_bytes(SERVED)
    file = VirtualServer(1, 0, served, len(SERVED), file_checksum(served))
    await listen([file], "127.0.0.1")
    assert file.listener is not None
    d = Daemons(
        tmp,
        runner=runner,
        peer=peer,
        group=group,
        peer_limits=peer_limits,
        peer_port=port_of(peer_server),
        store=store,
        token=token,
        blob_limits=blob_limits,
        blob_port=port_of(blob_server),
        file=file,
        file_port=port_of(file.listener),
    )
    d.closers = [peer_server.close, blob_server.close, file.end, file.close]
    d.closers += [srv.close for srv in peer.files.values()]
    return d


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    runner = LoopThread()
    try:
        d = runner.run(start(tmp_path_factory.mktemp("fuzzed"), runner))
        yield d
        runner.call(lambda: close_all(d.closers))
    finally:
        runner.close()


def settle(d: Daemons, limits: Limits) -> None:
    """Wait until the daemon closed every connection and finished what it ran in the
    background; then nothing may have escaped, and no byte of its budget is still held."""

    async def quiet() -> None:
        deadline = time.monotonic() + WAIT
        loop = asyncio.get_running_loop()
        while (busy := [t for t in net._running if t.get_loop() is loop]) or limits.connections:
            assert time.monotonic() < deadline, (
                f"{len(busy)} background tasks, {limits.connections} connections left"
            )
            await asyncio.sleep(0.002)

    d.runner.run(quiet())
    escaped, d.runner.escaped = d.runner.escaped, []
    assert not escaped, escaped
    assert d.runner.call(lambda: limits.in_flight) == 0


# -- the garbage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadText:
    """A msgpack string whose bytes are not UTF-8."""

    raw: bytes


def pack(value: Any) -> bytes:
    """msgpack, with BadText as a str of its raw bytes (no encoder writes those)."""
    if isinstance(value, BadText):
        return bytes([0xA0 | len(value.raw)]) + value.raw
    if isinstance(value, dict):
        return pack_map(list(value.items()))
    if isinstance(value, list):
        return bytes([0x90 | len(value)]) + b"".join(pack(v) for v in value)
    return msgpack.packb(value)


def pack_map(pairs: list[tuple[Any, Any]]) -> bytes:
    """A map of these pairs, in order, duplicates kept."""
    return bytes([0x80 | len(pairs)]) + b"".join(pack(k) + pack(v) for k, v in pairs)


def not_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return True
    return False


NAMES = [
    "plain.txt",
    ".hidden",
    "escape.txt",
    "sub",
    "sub/inner",
    "../secret",
    "secret",
    "secret-link",
    "fifo",
    "",
    ".",
    "..",
    "/etc/passwd",
    "plain.txt\x00",
    "plain.txt/",
    "PLAIN.TXT",
    "served.bin",
]
# paths a share must refuse (links, not regular files, relative, missing, a NUL byte)
REFUSED_PATHS = [
    "{tmp}/secret-link",
    "{tmp}/share/escape.txt",
    "{tmp}/share",
    "{tmp}/fifo",
    "{tmp}/missing",
    "share/plain.txt",
    "/dev/null",
    "/",
    "",
]
# paths the kernel does not take at all
UNOPENABLE = ["{tmp}/secret\x00", "{tmp}/\x00/secret", "/\x00", "\x00", "/" + "a" * 5000]
bad_text = st.builds(
    BadText,
    st.one_of(
        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"plain.txt\x80"]),
        st.binary(min_size=1, max_size=12).filter(not_utf8),
    ),
)
ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
texts = st.one_of(st.text(max_size=12), st.sampled_from(NAMES), bad_text)
scalars = st.one_of(
    ints, texts, st.binary(max_size=10), st.none(), st.booleans(), st.floats(allow_nan=False)
)
shared_files = st.fixed_dictionaries({"size": ints, "checksum": st.one_of(ints, texts)})
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(
        st.one_of(st.text(max_size=6), bad_text), st.one_of(texts, shared_files), max_size=3
    ),
)
KEYS = ["name", "offset", "length", "peer", "addr", "peers", "mine", "path", "token", "x"]
keys = st.one_of(st.sampled_from(KEYS), bad_text, st.builds(BadText, st.just(b"name\xff")))
random_maps = st.lists(st.tuples(keys, values), max_size=6).map(pack_map)
offsets = st.one_of(st.integers(0, 4000), ints)


def aimed(tmp: Path, token: str, keyed: bool) -> dict[Msg, st.SearchStrategy[bytes]]:
    """Per request type, bodies that nearly fit it. ``keyed``: sent with the key, so no
    share request here may be one the peer should carry out."""
    names = st.one_of(st.sampled_from(NAMES), texts)
    refused = st.sampled_from([p.format(tmp=tmp) for p in REFUSED_PATHS])
    unopenable = st.sampled_from([p.format(tmp=tmp) for p in UNOPENABLE])
    real = st.just(str(tmp / "secret"))  # a regular file: shared only under a bad name
    shares = [
        st.fixed_dictionaries({"path": refused, "name": names}),
        st.fixed_dictionaries({"path": unopenable, "name": st.one_of(st.just("x"), names)}),
        st.fixed_dictionaries({"path": texts, "name": names}),
        st.fixed_dictionaries({"path": st.text(max_size=8).map("/".__add__), "name": names}),
        st.fixed_dictionaries(
            {"path": real, "name": st.sampled_from(["", ".x", "a/b", "plain.txt", "..", "/"])}
        ),
    ]
    if not keyed:  # well-formed and allowed, but without the key
        shares.append(st.fixed_dictionaries({"path": real, "name": st.just("fresh.txt")}))
    bodies = {
        Msg.FILE_INFO: st.fixed_dictionaries({}, optional={"name": names}),
        Msg.FILE_READ: st.fixed_dictionaries(
            {"offset": offsets, "length": offsets}, optional={"name": names}
        ),
        Msg.BLOB_READ: st.fixed_dictionaries(
            {"token": st.one_of(st.just(token), texts), "offset": offsets}
        ),
        Msg.PEER_INDEX: st.fixed_dictionaries(
            {},
            optional={
                "peer": texts,
                "addr": texts,
                "peers": st.dictionaries(texts, texts, max_size=3),
                "mine": st.dictionaries(texts, shared_files, max_size=3),
            },
        ),
        Msg.PEER_SHARE: st.one_of(*shares),
        Msg.PEER_UNSHARE: st.fixed_dictionaries({"name": names}),
    }
    return {t: b.map(pack) for t, b in bodies.items()}


FLAGS = [0, Flag.REPLY, Flag.ERROR, Flag.REPLY | Flag.ERROR, Flag.COPY, Flag.REPAIR]


def frame_bytes(t: int, req_id: int, flags: int, body: bytes, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, t, req_id, flags, len(body), len(payload)) + body + payload


def streams(tmp: Path, token: str, keyed: bool, types: list[Msg]) -> st.SearchStrategy[bytes]:
    """What follows the handshake: frames of every kind, most of them requests of
    ``types`` (what the daemon serves) with nearly right bodies, then perhaps what breaks
    the stream (a bad header, noise, a frame cut short: nothing after it is read)."""
    bodies = aimed(tmp, token, keyed)
    req_ids = st.one_of(st.integers(0, 20), st.integers(0, 2**64 - 1))
    requests = st.sampled_from(types).flatmap(
        lambda t: st.builds(
            frame_bytes, st.just(int(t)), req_ids, st.just(0), bodies[t], st.just(b"")
        )
    )
    frames = st.builds(
        frame_bytes,
        st.one_of(st.sampled_from([int(t) for t in Msg]), st.integers(0, 255)),
        req_ids,
        st.one_of(st.sampled_from([int(f) for f in FLAGS]), st.integers(0, 2**16 - 1)),
        st.one_of(
            st.one_of(*bodies.values()),
            random_maps,
            st.binary(max_size=24),  # not msgpack, or not a map
        ),
        st.one_of(st.just(b""), st.just(b""), st.binary(min_size=1, max_size=64)),
    )
    bad_headers = st.builds(
        lambda m, v, t, blen, plen, tail: HEADER.pack(m, v, t, 1, 0, blen, plen) + tail,
        st.sampled_from([MAGIC, b"XX", b"\0\0"]),
        st.sampled_from([VERSION, 0, VERSION - 1, VERSION + 1]),
        st.integers(0, 255),
        st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)),
        st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)),
        st.binary(max_size=64),
    )
    cut = st.builds(lambda f, n: f[: max(1, len(f) - n)], requests, st.integers(1, 40))
    ends = st.one_of(st.just(b""), bad_headers, st.binary(min_size=1, max_size=200), cut)
    return st.builds(
        lambda parts, end: b"".join(parts) + end,
        st.lists(st.one_of(requests, requests, requests, frames), max_size=6),
        ends,
    )


PEER_TYPES = [Msg.FILE_INFO, Msg.FILE_READ, Msg.PEER_INDEX, Msg.PEER_SHARE, Msg.PEER_UNSHARE]


hellos = st.binary(min_size=32, max_size=32).map(lambda nonce: AUTH_MAGIC + nonce)
# the opening of a connection that does not hold the key
no_key_openings = st.one_of(
    st.just(b""),  # frames at once, as a client of an older version
    hellos,  # a hello, then frames as the proof
    st.builds(lambda h, proof: h + proof, hellos, st.binary(min_size=PROOF_SIZE, max_size=40)),
    st.sampled_from([b"M", b"MF", b"MFA", AUTH_MAGIC, b"MFA2", b"GET / HTTP/1.1\r\n\r\n"]),
    st.binary(max_size=80),
)


# -- one connection ------------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms for a delayed ack
    return s


def prove(s: socket.socket, key: bytes) -> None:
    """The client's side of the key handshake, by hand on a plain socket."""
    hs = ClientHandshake(lambda _v: key)
    s.sendall(hs.hello())
    reply = b""
    while len(reply) < REPLY_SIZE:
        chunk = s.recv(REPLY_SIZE - len(reply))
        assert chunk, "the daemon hung up during the handshake"
        reply += chunk
    s.sendall(hs.receive(reply))


def exchange(port: int, blob: bytes, key: bytes | None = None) -> tuple[bytes, list[Frame]]:
    """Send ``blob`` (after proving ``key``) and the end of input; read until the daemon
    hangs up. The handshake reply a hello got (without ``key``), and the frames."""
    with connect(port) as s:
        if key is not None:
            prove(s, key)
        with contextlib.suppress(OSError):  # it may have hung up already
            s.sendall(blob)
            s.shutdown(socket.SHUT_WR)
        raw = b""
        try:
            while chunk := s.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"no hang-up within {WAIT}s: the connection is wedged") from None
    hs_reply = b""
    if key is None and raw.startswith(AUTH_MAGIC):
        hs_reply, raw = raw[:REPLY_SIZE], raw[REPLY_SIZE:]
        assert len(hs_reply) == REPLY_SIZE and blob.startswith(AUTH_MAGIC)
    dec = FrameDecoder()
    dec.feed(raw)
    return hs_reply, dec.frames()  # bytes that are not frames: ProtocolError


def request(port: int, frame: list[Any], key: bytes | None, want: int = 1) -> list[Frame]:
    """Send one request and read ``want`` frames back, the connection left open meanwhile."""
    with connect(port) as s:
        if key is not None:
            prove(s, key)
        s.sendall(b"".join(frame))
        dec = FrameDecoder()
        got: list[Frame] = []
        while len(got) < want:
            chunk = s.recv(65536)
            assert chunk, f"hung up after {len(got)} of {want} replies"
            dec.feed(chunk)
            got += dec.frames()
        return got


def body(frame: Frame) -> Any:
    return msgpack.unpackb(frame.body, raw=False)


def check_refusal_only(hs_reply: bytes, frames: list[Frame]) -> None:
    """Without the key: at most one refusal, and nothing answered."""
    assert len(frames) <= 1, frames
    for f in frames:
        assert f.is_reply and f.is_error and f.req_id == 0 and f.type == Msg.ERROR, f
        assert body(f)["code"] == "AUTH", body(f)
    if hs_reply:  # the daemon's half of a handshake it was asked for: its own proof
        assert hs_reply[len(AUTH_MAGIC)] == 1  # keyed


EXPECTED_ERRORS = {"BAD_REQUEST", "UNKNOWN_TYPE", "NOT_FOUND", "DENIED"}


def check_replies(frames: list[Frame], check_ok: Callable[[Frame], None]) -> None:
    """Replies only: a refusal (request id 0) can only be the last frame; every other
    error names a known code, and whatever succeeded passes ``check_ok``."""
    for i, f in enumerate(frames):
        assert f.is_reply, f
        if not f.is_error:
            check_ok(f)
        elif body(f)["code"] == "PROTOCOL":
            assert f.type == Msg.ERROR and f.req_id == 0 and i == len(frames) - 1, f
        else:
            assert body(f)["code"] in EXPECTED_ERRORS, body(f)


def check_file_reply(f: Frame, name: str, content: bytes) -> None:
    """A FILE_INFO or FILE_READ that succeeded: of the file this daemon serves, nothing else."""
    assert f.type in (Msg.FILE_INFO, Msg.FILE_READ), f
    reply = body(f)
    if f.type == Msg.FILE_INFO:
        assert reply["name"] == name and reply["size"] == len(content)
        assert reply["checksum"] == xxhash.xxh3_64_intdigest(content)
    else:
        assert bytes(f.payload) in content
        assert reply["checksum"] == xxhash.xxh3_64_intdigest(bytes(f.payload))
    assert not any(s in bytes(f.payload) for s in SECRETS)


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the peer ------------------------------------------------------------------------------------


def peer_state(d: Daemons) -> tuple[Any, ...]:
    """What garbage must never change; ``peers`` too when it does not hold the key."""
    p = d.peer
    return (
        sorted(p.files),
        dict(p.extra),
        list(d.group.requests),
        dict(p.peers),
        dict(p.cache.files),
        p.cache.seq,
    )


def check_peer_reply(f: Frame) -> None:
    if f.type in (Msg.FILE_INFO, Msg.FILE_READ):
        check_file_reply(f, "plain.txt", PLAIN)
    elif f.type in (Msg.PEER_SHARE, Msg.PEER_UNSHARE):  # never carried out for garbage
        assert body(f)["ok"] is False, body(f)
    else:
        assert f.type == Msg.PEER_INDEX and body(f)["peer"] == "pa", f


KEYED = pytest.mark.parametrize("keyed", [False, True], ids=["without_key", "with_key"])


def garbage(d: Daemons, keyed: bool, types: list[Msg]) -> st.SearchStrategy[bytes]:
    """With the key: what follows the handshake. Without: an opening that proves nothing
    (none, a hello, a wrong proof, noise) and the same garbage after it."""
    if keyed:
        return streams(d.tmp, d.token, True, types)
    return st.builds(bytes.__add__, no_key_openings, streams(d.tmp, d.token, False, types))


@KEYED
def test_peer_fuzzed(daemons: Daemons, keyed: bool):
    d = daemons
    before = d.runner.call(lambda: peer_state(d))

    @FUZZ
    @given(garbage(d, keyed, PEER_TYPES))
    def throw(blob: bytes) -> None:
        hs_reply, frames = exchange(d.peer_port, blob, KEY if keyed else None)
        settle(d, d.peer_limits)
        now = d.runner.call(lambda: peer_state(d))
        if keyed:
            check_replies(frames, check_peer_reply)
            # it may learn of peers; it shares, unshares and advertises nothing
            assert now[:3] == before[:3] and now[4:] == before[4:]
        else:
            check_refusal_only(hs_reply, frames)
            assert now == before
        # and it serves on, the file it advertises only
        (ok,) = request(
            d.peer_port,
            encode(Msg.FILE_READ, 7, {"name": "plain.txt", "offset": 0, "length": 9}),
            KEY,
        )
        assert not ok.is_error and bytes(ok.payload) == PLAIN[:9]

    throw()
    settle(d, d.peer_limits)


def test_peer_serves_by_name_only_what_it_advertises(daemons: Daemons):
    d = daemons
    for name in NAMES[1:] + [str(d.tmp / "secret"), str(d.peer.share / "plain.txt")]:
        asked = encode(Msg.FILE_INFO, 1, {"name": name})
        asked += encode(Msg.FILE_READ, 2, {"name": name, "offset": 0, "length": 5})
        replies = request(d.peer_port, asked, KEY, want=2)
        assert [body(f)["code"] for f in replies] == ["NOT_FOUND"] * 2, name
    settle(d, d.peer_limits)


def test_share_of_a_path_with_a_nul_byte_is_refused_with_a_reply(tmp_path: Path):
    """With the key, from this machine: a path the kernel cannot take is refused like any
    other, and the peer answers (it raised ValueError in a background task, leaving the
    request unanswered); a real file is shared over the same connection."""
    runner = LoopThread()
    try:
        share = shared_tree(tmp_path)
        peer, group, limits, server = runner.run(start_peer(share))
        port = port_of(server)
        secret = str(tmp_path / "secret")
        for path in (secret + "\x00", "/\x00", f"{tmp_path}/\x00/secret"):
            (reply,) = request(port, encode(Msg.PEER_SHARE, 3, {"path": path, "name": "x"}), KEY)
            assert not reply.is_error and body(reply)["ok"] is False, body(reply)
            assert "null" in body(reply)["error"]
        assert runner.call(lambda: sorted(peer.files)) == ["plain.txt"]
        assert not runner.escaped, runner.escaped
        (reply,) = request(port, encode(Msg.PEER_SHARE, 4, {"path": secret, "name": "x"}), KEY)
        assert body(reply) == {"ok": True}
        assert runner.call(lambda: sorted(peer.files)) == ["plain.txt", "x"]
        (reply,) = request(port, encode(Msg.PEER_UNSHARE, 5, {"name": "x"}), KEY)
        assert body(reply) == {"ok": True}
        runner.call(lambda: close_all([server.close] + [s.close for s in peer.files.values()]))
        assert not runner.escaped, runner.escaped
        assert [op for op, _ in group.requests][-2:] == ["advertise", "revoke"]
    finally:
        runner.close()


def test_a_reply_ready_after_the_refusal_is_dropped_not_raised(daemons: Daemons):
    """A share request answered in the background, then a broken header: the refusal
    ends the stream first, and the late reply must not be written after it (it raised
    RuntimeError in the task that made it)."""
    d = daemons
    blob = b"".join(encode(Msg.PEER_SHARE, 1)) + b"XX" * 12
    _, frames = exchange(d.peer_port, blob, KEY)
    assert [(f.req_id, body(f)["code"]) for f in frames] == [(0, "PROTOCOL")]
    settle(d, d.peer_limits)


def test_a_refused_connection_does_not_end_a_block_server_s_in_order_queue(tmp_path: Path):
    """The same on a block server: the reply to a metadata request of a connection refused
    meanwhile raised in the one task that serves every connection's metadata requests,
    and no later one was ever answered."""
    store = Store(tmp_path / "d", 0)
    store.format("v", 4, 4096, KEY)
    runner = LoopThread()
    try:
        server = runner.run(listen_blocks(store, "127.0.0.1", 0))
        port = port_of(server)
        blob = b"".join(encode(Msg.META_INFO, 1)) + b"XX" * 12
        _, frames = exchange(port, blob, KEY)
        assert [(f.req_id, body(f)["code"]) for f in frames] == [(0, "PROTOCOL")]
        (reply,) = request(port, encode(Msg.META_INFO, 2), KEY)
        assert not reply.is_error and "epoch" in body(reply)
        runner.call(server.close)
        escaped, runner.escaped = runner.escaped, []
        assert not escaped, escaped
    finally:
        runner.close()


# -- the index replica's snapshot server ----------------------------------------------------------


@KEYED
def test_blob_server_fuzzed(daemons: Daemons, keyed: bool):
    d = daemons
    before = d.runner.call(lambda: dict(d.store.blobs))

    def check_ok(f: Frame) -> None:
        assert f.type == Msg.BLOB_READ and body(f)["total"] == len(BLOB), f
        assert bytes(f.payload) in BLOB

    @FUZZ
    @given(garbage(d, keyed, [Msg.BLOB_READ]))
    def throw(blob: bytes) -> None:
        hs_reply, frames = exchange(d.blob_port, blob, KEY if keyed else None)
        settle(d, d.blob_limits)
        if keyed:
            check_replies(frames, check_ok)
        else:
            check_refusal_only(hs_reply, frames)
        assert d.runner.call(lambda: dict(d.store.blobs)) == before
        (ok,) = request(d.blob_port, encode(Msg.BLOB_READ, 7, {"token": d.token, "offset": 0}), KEY)
        assert not ok.is_error and bytes(ok.payload) == BLOB

    throw()
    settle(d, d.blob_limits)


# -- the file server of serve-file (no key, by design) -------------------------------------------


def test_file_server_fuzzed(daemons: Daemons):
    d = daemons

    @FUZZ
    @given(streams(d.tmp, "token", True, [Msg.FILE_INFO, Msg.FILE_READ]))
    def throw(blob: bytes) -> None:
        _, frames = exchange(d.file_port, blob)
        settle(d, d.file.limits)
        check_replies(frames, lambda f: check_file_reply(f, "served.bin", SERVED))
        assert d.runner.call(lambda: d.file.state) == "alive"
        (ok,) = request(d.file_port, encode(Msg.FILE_INFO, 7), None)
        assert not ok.is_error and body(ok)["size"] == len(SERVED)

    throw()
    settle(d, d.file.limits)
