"""Attacks on a block server, run as a separate process (as user nobody in the tests).

    block_attack.py PORT requests         read, write, trim, table, format without the key
    block_attack.py PORT flood N SEND [KEYFILE]   N connections announce a big payload,
                                                  send SEND bytes of it
    block_attack.py PORT farslot KEYFILE  one WRITE to slot 2^24-1 (with the key and epoch)

Prints one JSON line: what each attempt got back.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from pathlib import Path

import xxhash

from mirrorfuse.wire.auth import REPLY_SIZE, ClientHandshake, parse_key
from mirrorfuse.wire.checksums import CHUNK, block_checksum
from mirrorfuse.wire.frames import (
    HEADER,
    MAGIC,
    MAX_REQUEST_PAYLOAD,
    VERSION,
    FrameDecoder,
    Msg,
    encode,
)
from mirrorfuse.wire.messages import decode_error


def replies(s: socket.socket, wait: float = 2.0) -> list[tuple[int, str]]:
    s.settimeout(wait)
    dec = FrameDecoder()
    try:
        while chunk := s.recv(65536):
            dec.feed(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    out = []
    for f in dec.frames():
        out.append((f.type, decode_error(f.body).code if f.is_error else "OK"))
    return out


def connect(port: int, key: bytes | None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if key is not None:
        hs = ClientHandshake(lambda _v: key)
        s.sendall(hs.hello())
        s.sendall(hs.receive(s.recv(REPLY_SIZE, socket.MSG_WAITALL)))
    return s


def try_requests(port: int) -> dict[str, object]:
    data = b"evil" * 1024
    attempts = {
        "read": encode(Msg.READ, 1, {"slot": 0}),
        "write": encode(
            Msg.WRITE,
            2,
            {"slot": 0, "checksum": xxhash.xxh3_64_intdigest(data), "gen": 99, "epoch": 99},
            data,
        ),
        "trim": encode(Msg.TRIM, 3, {"slot": 0, "gen": 99, "epoch": 99}),
        "table": encode(
            Msg.SET_TABLE, 4, {"table": {"gen": 99, "states": ["failed"] * 4}, "epoch": 99}
        ),
        "format": encode(
            Msg.FORMAT,
            5,
            {"volume": "evil", "server": 0, "count": 4, "block_size": 4096, "force": True},
        ),
    }
    out: dict[str, object] = {}
    for name, frame in attempts.items():
        # as an old client would: frames straight away
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            with contextlib.suppress(OSError):
                s.sendall(b"".join(frame))
            out[name] = replies(s)
        # and with a handshake, but a guessed proof
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            hs = ClientHandshake(lambda _v: None)
            s.sendall(hs.hello())
            s.recv(REPLY_SIZE, socket.MSG_WAITALL)
            with contextlib.suppress(OSError):
                s.sendall(bytes(32) + b"".join(frame))
            out[name + "_guessed"] = replies(s)
    return out


def flood(port: int, n: int, key: bytes | None, send: int) -> dict[str, object]:
    """Each connection announces the largest payload and sends ``send`` bytes of it."""
    announce = MAX_REQUEST_PAYLOAD if key is not None else 16 << 20
    head = HEADER.pack(MAGIC, VERSION, Msg.WRITE, 1, 0, 1, announce) + b"\x80"
    socks = []
    for _ in range(n):
        s = connect(port, key)
        s.setblocking(False)
        data = memoryview(head + bytes(send))
        try:
            while data:  # as much as the server takes; it may stop reading
                data = data[s.send(data) :]
        except OSError:
            pass
        socks.append(s)
    time.sleep(2.0)  # the server holds whatever it holds now; the test measures it
    print(json.dumps({"connected": len(socks)}), flush=True)
    sys.stdin.readline()  # until the test has measured
    for s in socks:
        s.close()
    return {"closed": len(socks)}


def far_slot(port: int, key: bytes, epoch: int, gen: int) -> dict[str, object]:
    data = b"far"
    req = {
        "slot": (1 << 24) - 1,
        "checksum": block_checksum(data, CHUNK),  # the scheme of a new volume of 1 MiB blocks
        "gen": gen,
        "epoch": epoch,
    }
    with connect(port, key) as s:
        s.sendall(b"".join(encode(Msg.WRITE, 1, req, data)))
        return {"write": replies(s)}


def main() -> None:
    port, what = int(sys.argv[1]), sys.argv[2]
    if what == "requests":
        result = try_requests(port)
    elif what == "flood":
        key = parse_key(Path(sys.argv[5]).read_bytes(), "key") if len(sys.argv) > 5 else None
        result = flood(port, int(sys.argv[3]), key, int(sys.argv[4]))
    else:
        key = parse_key(Path(sys.argv[3]).read_bytes(), "key")
        result = far_slot(port, key, int(sys.argv[4]), int(sys.argv[5]))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
