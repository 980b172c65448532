"""Run as an unprivileged user against a peer run by root (see test_peer_security.py):
asks it, every way there is, to share /etc/shadow and to serve files it does not share,
without the group's key or (given a copy of it, as another member of the group would
have) with it. Prints one JSON result: what each attempt got."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from mirrorfuse.client.connection import Connection, ServerDown
from mirrorfuse.index.keys import group_key
from mirrorfuse.tools.peerctl import ask_control
from mirrorfuse.wire.addresses import parse_address
from mirrorfuse.wire.auth import KeyLookup
from mirrorfuse.wire.errors import MirrorfsError, ServerError, UsageError
from mirrorfuse.wire.messages import FileInfo, FileRead, PeerShare, PeerUnshare, Request

SHADOW = PeerShare(path="/etc/shadow", name="shadow")


async def over_tcp(addr: str, req: Request[Any], keys: KeyLookup | None) -> str:
    try:
        conn = await Connection.open(0, parse_address(addr), 3.0, keys=keys)
    except ServerDown as exc:
        return f"down: {exc.reason}"
    try:
        reply = await asyncio.wait_for(conn.call(req), 5.0)
        return f"answered: {reply.body} {bytes(reply.payload)[:40]!r}"
    except ServerError as exc:
        return exc.code
    except (ServerDown, TimeoutError) as exc:
        return f"down: {exc}"
    finally:
        conn.close()


async def over_unix(path: str, req: PeerShare | PeerUnshare) -> str:
    try:
        outcome = await ask_control(Path(path), req, 5.0)
    except UsageError as exc:
        return f"refused: {exc}"
    except MirrorfsError as exc:
        return f"error: {exc}"
    return "ok" if outcome.ok else f"denied: {outcome.error}"


async def main(control: str, addr: str, shared: str, key_file: str = "") -> dict[str, Any]:
    key = group_key(key_file) if key_file else None
    keys: KeyLookup | None = (lambda _: key) if key else None
    out: dict[str, Any] = {
        "unix_share": await over_unix(control, SHADOW),
        "unix_unshare": await over_unix(control, PeerUnshare(name=shared)),
        "tcp_share": await over_tcp(addr, SHADOW, keys),
        "tcp_unshare": await over_tcp(addr, PeerUnshare(name=shared), keys),
    }
    for name in ("shadow", "/etc/shadow", "../../../../etc/shadow", shared):
        req = FileRead(name=name, offset=0, length=9)
        out[f"read {name}"] = await over_tcp(addr, req, keys)
    out["info /etc/shadow"] = await over_tcp(addr, FileInfo(name="/etc/shadow"), keys)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:5]))))
