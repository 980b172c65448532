"""A peer run by root, attacked by user nobody, without the group's key and with a copy of
it: it never shares /etc/shadow, never publishes it to the index, never serves a file it
does not share; root itself shares what it can read (through the control socket, and over
TCP with the key), and a shared file later swapped for a link to /etc/shadow stops being
served."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import sha
from netns import stop, wait

from mirrorfuse.client.connection import Connection
from mirrorfuse.index.client import BlockingIndexClient
from mirrorfuse.index.keys import group_key
from mirrorfuse.wire.addresses import Address, parse_address
from mirrorfuse.wire.errors import ServerError
from mirrorfuse.wire.messages import FileRead

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
ATTACK = Path(__file__).with_name("peer_attack.py")
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
NOBODY = pwd.getpwnam("nobody").pw_uid

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (a root peer, attacked as nobody) and setpriv",
)


class Setup:
    """One index replica and one peer, both root's, on loopback, with a state directory
    of their own (where the peer's control socket is)."""

    def __init__(self, tmp_path: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.state = Path(tempfile.mkdtemp(prefix="mfs-peer-"))  # short: a socket path
        self.env = {**os.environ, "MIRRORFS_STATE_DIR": str(self.state)}
        self.index: BlockingIndexClient | None = None
        try:
            self.begin(tmp_path)
        except BaseException:
            self.close()
            raise

    def begin(self, tmp_path: Path) -> None:
        self.share = tmp_path / "share"
        self.share.mkdir()
        (self.share / "plain.txt").write_text("shared on purpose\n")
        port = _free_udp_port()
        self.group = ["127.0.0.1", str(port), "--replicas", f"127.0.0.1:{port}"]
        index = [str(BIN / "mirrorfs-index"), *self.group[:2], "--id", "1"]
        self.start([*index, *self.group[2:]], "replica")
        line = self.start(
            [
                str(BIN / "mirrorfs-peer"),
                "--index",
                f"127.0.0.1:{port}",
                "--replicas",
                f"127.0.0.1:{port}",
                "--share",
                str(self.share),
                "--id",
                "sec",
                "--interval",
                "0.5",
            ],
            "serving",
        )
        self.addr = line.split(" on ")[1].split()[0]
        self.control = self.state / "peers" / "sec.sock"
        self.index = BlockingIndexClient("127.0.0.1", port, [Address("127.0.0.1", port)])
        self.key = group_key()  # made by the replica where the tests keep keys
        assert wait(lambda: "plain.txt" in self.files(), 20)

    def start(self, cmd: list[str], marker: str) -> str:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=self.env)
        self.procs.append(p)
        line = p.stdout.readline() if p.stdout else ""
        assert marker in line, f"{cmd[0]} did not start: {line!r}"
        return line

    def files(self) -> dict:
        assert self.index is not None
        return self.index.query("files").files

    def cli(self, *args: str, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [*(user or []), str(BIN / "mirrorfs-cli"), "index", *self.group, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=self.env)

    def read(self, name: str) -> str:
        """FILE_READ as root, with everything root has: its first 9 bytes or the error code."""

        async def go() -> str:
            keys = lambda _: self.key  # noqa: E731
            conn = await Connection.open(0, parse_address(self.addr), 3.0, keys=keys)
            try:
                reply = await conn.call(FileRead(name=name, offset=0, length=9))
                return bytes(reply.payload).decode(errors="replace")
            except ServerError as exc:
                return exc.code
            finally:
                conn.close()

        return asyncio.run(go())

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
        for p in reversed(self.procs):  # peers first: they leave while the group is there
            stop(p)
        shutil.rmtree(self.state, ignore_errors=True)


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def setup(tmp_path):
    s = Setup(tmp_path)
    yield s
    s.close()


def attack(s: Setup, key_file: str = "") -> dict[str, str]:
    cmd = [*AS_NOBODY, sys.executable, str(ATTACK), str(s.control), s.addr, "plain.txt", key_file]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_nobody_cannot_make_a_root_peer_share_or_serve_shadow(setup: Setup):
    got = attack(setup)
    assert got["unix_share"].startswith("refused:"), got  # cannot even reach the socket
    assert got["unix_unshare"].startswith("refused:"), got
    tcp = [v for k, v in got.items() if not k.startswith("unix")]
    assert all(v.startswith("down:") for v in tcp), got  # no key: not one frame is read

    # nobody with a copy of the key, as another member of the group holds it
    copy = setup.state / "member.key"
    copy.write_text(setup.key.hex() + "\n")
    os.chmod(copy, 0o600)
    os.chown(copy, NOBODY, -1)
    os.chmod(setup.state, 0o711)
    got = attack(setup, str(copy))
    assert got["tcp_share"] == "DENIED" and got["tcp_unshare"] == "DENIED", got
    for name in ("shadow", "/etc/shadow", "../../../../etc/shadow"):
        assert got[f"read {name}"] == "NOT_FOUND", got
    assert got["info /etc/shadow"] == "NOT_FOUND", got
    assert got["read plain.txt"].endswith("b'shared on'"), got  # what the peer advertises

    # the socket's directory opened up by mistake: the peer still asks the kernel who calls
    for p, mode in ((setup.control.parent, 0o711), (setup.control, 0o666)):
        os.chmod(p, mode)
    got = attack(setup)
    assert got["unix_share"].startswith("denied:") and "only from uid 0" in got["unix_share"]
    assert got["unix_unshare"].startswith("denied:"), got

    # the command line, as nobody, naming the peer
    res = setup.cli("share", "/etc/shadow", "--name", "shadow", "--peer", setup.addr,
                    user=AS_NOBODY)  # fmt: skip
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr

    # nothing changed: not shared, not published, not readable; the shared file still is
    assert "shadow" not in setup.files() and sorted(setup.files()) == ["plain.txt"]
    assert setup.read("shadow") == "NOT_FOUND"
    assert setup.read("plain.txt") == "shared on"


def test_root_shares_what_it_can_read_until_it_is_swapped_for_a_link(setup: Setup, tmp_path):
    secret = tmp_path / "root-only.bin"
    secret.write_bytes(os.urandom(300_000))
    secret.chmod(0o600)
    res = setup.cli("share", str(secret), "--name", "root-only.bin")
    assert res.returncode == 0, res.stderr  # through the control socket, found by its record
    assert "root-only.bin" in setup.files()
    res = setup.cli("fetch", "root-only.bin", "-o", str(tmp_path / "got.bin"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert sha(tmp_path / "got.bin") == sha(secret)
    other = tmp_path / "other.bin"
    other.write_bytes(b"asked over TCP")
    port = setup.addr.rpartition(":")[2]  # not the address in its record: over TCP, with the key
    res = setup.cli("share", str(other), "--name", "other.bin", "--peer", f"localhost:{port}")
    assert res.returncode == 0 and "other.bin" in setup.files(), res.stderr
    res = setup.cli("unshare", "other.bin", "--peer", f"localhost:{port}")
    assert res.returncode == 0 and "other.bin" not in setup.files(), res.stderr

    secret.unlink()
    secret.symlink_to("/etc/shadow")  # the shared path now leads somewhere else
    assert wait(lambda: "root-only.bin" not in setup.files(), 20)
    assert setup.read("root-only.bin") == "NOT_FOUND"
    res = setup.cli("unshare", "no-such.bin")
    assert res.returncode == 1 and "does not share 'no-such.bin'" in res.stderr
