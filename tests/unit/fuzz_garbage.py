"""The garbage of tests/unit/test_daemon_fuzz.py: streams of frames, openings that prove
no key, and what each daemon may answer to them."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import xxhash
from fuzz_daemons import (
    PLAIN,
    SECRETS,
    WAIT,
    Daemons,
)
from helpers import prove
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mirrorfuse.wire.auth import MAGIC as AUTH_MAGIC
from mirrorfuse.wire.auth import (
    PROOF_SIZE,
    REPLY_SIZE,
)
from mirrorfuse.wire.frames import HEADER, MAGIC, VERSION, Flag, Frame, FrameDecoder, Msg

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
    root = f"{tmp}/absent/" if keyed else "/"
    shares = [
        st.fixed_dictionaries({"path": refused, "name": names}),
        st.fixed_dictionaries({"path": unopenable, "name": st.one_of(st.just("x"), names)}),
        st.fixed_dictionaries({"path": texts, "name": names}),
        # short absolute paths; with the key only under a directory that does not exist:
        # "/" + 8 characters found /bin/ls once, which root may share over loopback
        st.fixed_dictionaries({"path": st.text(max_size=8).map(root.__add__), "name": names}),
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
