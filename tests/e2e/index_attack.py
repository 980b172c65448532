"""Attacks on the index group, run as user nobody (who cannot read the group's key) inside
the scenario's network namespace; prints one JSON line of what it did.

  forge GROUP PORT SEQ IDS    forged orders, heartbeats and snapshots, unsealed or sealed
                              with a key of its own, to the group (and to 127.0.0.1:PORT)
  replay GROUP PORT SECONDS   listen to the group that long (saying "listening" first), then
                              send every datagram heard again, byte for byte
  blob HOST PORT TOKEN        read a snapshot offered by token over TCP, without the key
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import struct
import sys
import time

import msgspec

from mirrorfuse.core.indexstate import IndexState
from mirrorfuse.wire import datagrams as dg
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.datagrams import FileEntry, PeerEntry, Sealer, pack


def evil_snapshot(seq: int) -> bytes:
    s = IndexState(seq=seq)
    s.peers["evil"] = PeerEntry("6.6.6.6:1", time.time(), 3600.0)
    s.files["passwords.txt"] = FileEntry("evil", 1, 1, ["evil"])
    return s.snapshot()


def malformed_snapshot(seq: int) -> bytes:
    s = IndexState(seq=seq)
    s.files["x"] = FileEntry("ghost", -1, 1, [])  # no holders, an owner nobody knows
    return s.snapshot()


def sender(iface: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
    return s


def forge(group: str, port: int, seq: int, ids: list[int]) -> dict:
    args = {"peer": "evil", "addr": "6.6.6.6:1", "interval": 3600.0}
    msgs: list[dg.Datagram] = [
        dg.Order(
            seq=seq + 1, master=0, time=time.time(), client="x", req=1, op="register", args=args
        ),
        dg.Req(client="evil-client", req=1, op="register", args=args),
        dg.Hb(replica=0, seq=seq + 50, ready=True, master=0),  # a master that is not there
    ]
    for rid in ids:
        msgs.append(dg.Snap(to=rid, seq=seq + 1000, blob=evil_snapshot(seq + 1000)))
        msgs.append(dg.Snap(to=rid, seq=seq + 2000, blob=malformed_snapshot(seq + 2000)))
        msgs.append(dg.Snap(to=rid, seq=seq + 3000, blob=b"\xc1 not a snapshot"))
    own = Sealer(secrets.token_bytes(32), secrets.token_bytes(8))  # a key of its own
    datagrams = [pack(m) for m in msgs] + [own.seal(pack(m), time.time()) for m in msgs]
    datagrams.append(b"\xc1 garbage")
    s = sender()
    for data in datagrams:
        s.sendto(data, (group, port))
        s.sendto(data, ("127.0.0.1", port))  # the replicas listen on the group only
        time.sleep(0.01)
    return {"sent": len(datagrams)}


def replay(group: str, port: int, seconds: float) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((group, port))
    mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("127.0.0.1"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    s.settimeout(0.2)
    print("listening", flush=True)
    heard: list[bytes] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            heard.append(s.recv(65536))
        except TimeoutError:
            continue
    kinds: dict[str, int] = {}
    for data in heard:  # sealed, not secret: the message sits between header and seal
        try:
            kind = type(dg.unpack(data[28:-32])).__name__
        except dg.BadDatagram:
            kind = "?"
        kinds[kind] = kinds.get(kind, 0) + 1
    out = sender()
    for data in heard:
        out.sendto(data, (group, port))
        time.sleep(0.002)
    return {"replayed": len(heard), "kinds": kinds}


def blob(host: str, port: int, token: str) -> dict:
    """With a key of its own, and without the handshake at all."""
    from mirrorfuse.client.connection import request_once
    from mirrorfuse.index.blobs import fetch_blob
    from mirrorfuse.wire.messages import BlobRead

    where = Address(host, port)
    out: dict = {"read": None}
    try:
        out["read"] = len(asyncio.run(fetch_blob(where, token, secrets.token_bytes(32))))
    except Exception as exc:  # noqa: BLE001 (what it was refused with is the result)
        out["error"] = f"{type(exc).__name__}: {exc}"
    try:
        reply = asyncio.run(request_once(where, BlobRead(token=token, offset=0), 5.0))
        out["read"] = len(reply.payload)
    except Exception as exc:  # noqa: BLE001
        out["plain_error"] = f"{type(exc).__name__}: {exc}"
    return out


def main() -> None:
    what, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if what == "forge":
        ids = [int(i) for i in sys.argv[5].split(",")]
        out = forge(host, port, int(sys.argv[4]), ids)
    elif what == "replay":
        out = replay(host, port, float(sys.argv[4]))
    else:
        out = blob(host, port, sys.argv[4])
    print(json.dumps(msgspec.to_builtins(out)), flush=True)


if __name__ == "__main__":
    main()
