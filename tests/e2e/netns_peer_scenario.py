"""Run inside a private network namespace (see test_peer.py): prints one JSON result."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from netns import setup_lo, start, stop, wait

from mirrorfuse.client.connection import Connection
from mirrorfuse.index.client import BlockingIndexClient as IndexClient
from mirrorfuse.index.keys import group_key
from mirrorfuse.wire.addresses import Address
from mirrorfuse.wire.errors import ServerError
from mirrorfuse.wire.messages import FileRead

GROUP, PORT = "235.1.1.2", 55556
BIN = Path(sys.executable).parent


def peer(name: str, share: Path, interval: str = "0.5") -> tuple[subprocess.Popen, str]:
    cmd = [str(BIN / "mirrorfs-peer"), "--index", f"{GROUP}:{PORT}", "--share", str(share)]
    p, line = start([*cmd, "--id", name, "--interval", interval], "serving")
    return p, line.split(" on ")[1].split()[0]  # and its address


async def escape(addr: str) -> str:
    host, _, port = addr.rpartition(":")
    key = group_key()  # made by the first replica; a peer takes nothing without it
    conn = await Connection.open(0, Address(host, int(port)), 2.0, keys=lambda _: key)
    try:
        await conn.call(FileRead(name="../../etc/passwd", offset=0, length=10))
        return "served"
    except ServerError as exc:
        return exc.code
    finally:
        conn.close()


def main() -> None:
    setup_lo()
    tmp = Path(tempfile.mkdtemp())
    a, b = tmp / "a", tmp / "b"
    a.mkdir()
    b.mkdir()
    shared = os.urandom(3 << 20)
    (a / "shared.bin").write_bytes(shared)
    (b / "shared.bin").write_bytes(shared)
    (a / "only-a.txt").write_text("a")
    (b / "only-b.txt").write_text("b")
    procs = [
        start(
            [str(BIN / "mirrorfs-index"), GROUP, str(PORT), "--id", str(i)],
            "mirrorfs-index replica",
        )[0]
        for i in (1, 2)
    ]
    out: dict = {}
    try:
        for name, d in (("pa", a), ("pb", b)):
            procs.append(
                start(
                    [
                        str(BIN / "mirrorfs-peer"),
                        "--index",
                        f"{GROUP}:{PORT}",
                        "--share",
                        str(d),
                        "--id",
                        name,
                        "--interval",
                        "0.5",
                    ],
                    "serving",
                )[0]
            )
        c = IndexClient(GROUP, PORT)
        assert wait(lambda: len(c.query("files").files) == 3, 20), c.query("files")
        files = c.query("files").files
        out["holders"] = files["shared.bin"].holders
        peers = c.query("peers").peers
        res = subprocess.run(
            [
                str(BIN / "mirrorfs-cli"),
                "index",
                GROUP,
                str(PORT),
                "fetch",
                "shared.bin",
                "-o",
                str(tmp / "got.bin"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        out["fetch_rc"] = res.returncode
        out["fetch_out"] = res.stdout + res.stderr
        out["same"] = (tmp / "got.bin").exists() and hashlib.sha256(
            (tmp / "got.bin").read_bytes()
        ).digest() == hashlib.sha256(shared).digest()
        out["escape"] = asyncio.run(escape(peers["pa"]))
        (a / "only-a.txt").unlink()
        out["revoked"] = wait(lambda: "only-a.txt" not in c.query("files").files, 20)

        # pa killed and started again under its id: it registers again, at its new address
        (a / "after-restart.txt").write_text("a again")
        procs[2].kill()
        procs[2].wait()
        procs[2], addr = peer("pa", a)

        def back() -> bool:
            files = c.query("files").files
            return c.query("peers").peers.get("pa") == addr and "after-restart.txt" in files

        out["pa_back"] = wait(back, 20)
        out["pa_holds"] = sorted(c.query("files").files["shared.bin"].holders)

        # a peer with a long heartbeat interval, stopped: it leaves with its files at once
        c_dir = tmp / "c"
        c_dir.mkdir()
        (c_dir / "only-c.txt").write_text("c")
        pc, _ = peer("pc", c_dir, interval="60")  # silent for 3 minutes before it expires
        procs.append(pc)
        out["pc_listed"] = wait(lambda: "only-c.txt" in c.query("files").files, 20)
        pc.terminate()
        said, _ = pc.communicate(timeout=30)
        out["pc_exit"] = [pc.returncode, said.splitlines()[-1] if said else ""]
        out["pc_gone"] = wait(
            lambda: (
                "pc" not in c.query("peers").peers and "only-c.txt" not in c.query("files").files
            ),
            10,
        )
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
