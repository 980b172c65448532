"""Block servers attacked by user nobody, who cannot read the volume's key: every request is
refused before it is read and nothing changes; connections that announce big payloads and
send nothing cost a server almost nothing; a far slot allocates nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli

from mirrorfuse.client.blocking import BlockingVolume
from mirrorfuse.wire.auth import KEY_NAME
from mirrorfuse.wire.frames import Msg

ATTACK = Path(__file__).with_name("block_attack.py")
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
MiB = 1 << 20

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (servers attacked as nobody) and setpriv",
)


def attack(*args: str, nobody: bool = True) -> dict:
    cmd = [*(AS_NOBODY if nobody else []), sys.executable, str(ATTACK), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@needs_root
def test_without_the_key_nobody_reads_writes_trims_or_formats(cluster4):
    assert oct(os.stat(cluster4.data_dir(0) / KEY_NAME).st_mode & 0o777) == "0o600"
    with BlockingVolume(cluster4.spec, writer="test") as vol:
        csum = vol.write(0, b"precious")
    before = cluster4.status()
    got = attack(str(cluster4.base), "requests")
    for name, replies in got.items():
        # one refusal, before any request was read; nothing answered
        assert replies == [[Msg.ERROR, "AUTH"]], (name, replies)
    with BlockingVolume(cluster4.spec) as vol:
        assert vol.read(0, csum) == b"precious"
        assert list(vol.volume.states) == ["alive"] * 4
    after = cluster4.status()
    assert after["volume"] == before["volume"]
    assert [r["blocks"] for r in after["rows"]] == [r["blocks"] for r in before["rows"]]


def test_a_client_without_the_key_says_where_it_looked(cluster4, tmp_path):
    other = tmp_path / "other.key"
    other.write_text("ab" * 32 + "\n")
    res = cli("status", *cluster4.args, "--key-file", str(other))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "did not prove the key of volume" in res.stdout + res.stderr
    empty = {**os.environ, "MIRRORFS_KEYS": str(tmp_path / "none")}
    res = subprocess.run(
        [str(Path(sys.executable).parent / "mirrorfs-cli"), "fsck", *cluster4.args],
        capture_output=True,
        text=True,
        env=empty,
        timeout=60,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "there is no key for it here" in res.stderr and str(tmp_path / "none") in res.stderr


def test_formatting_a_formatted_volume_needs_the_key_and_force(cluster4, tmp_path):
    other = tmp_path / "other.key"
    other.write_text("cd" * 32 + "\n")
    res = cli("format", *cluster4.args, "--force", "--key-file", str(other))
    assert res.returncode == 1 and "did not prove the key of volume" in res.stderr
    res = cli("format", *cluster4.args)
    assert res.returncode == 1 and "add --force" in res.stderr
    res = cli("format", *cluster4.args, "--force")
    assert res.returncode == 0, res.stderr


@needs_root
@pytest.mark.parametrize("with_key", [False, True])
def test_connections_announcing_big_payloads_cost_little(cluster4, with_key):
    pid = cluster4.servers[0].pid
    before = rss(pid)
    cmd = [sys.executable, str(ATTACK), str(cluster4.base), "flood", "40", str(4 * MiB)]
    if with_key:  # a client that holds the key: still bounded by the server's budget
        cmd += [str(cluster4.data_dir(0) / KEY_NAME)]
    else:
        cmd = AS_NOBODY + cmd
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert json.loads(line)["connected"] == 40
        during = rss(pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    grown = during - before
    # 40 x 8 MiB announced, 4 MiB sent: without the key none of it is read; with it,
    # what the server's budget (64 MiB) lets in, the rest waits in the senders' sockets
    assert grown < (8 * MiB if not with_key else 80 * MiB), grown
    with BlockingVolume(cluster4.spec, writer="test") as vol:  # and it still serves
        csum = vol.write(1, b"after")
        assert vol.read(1, csum) == b"after"


def test_a_write_to_a_far_slot_allocates_nothing(cluster4):
    pid = cluster4.servers[0].pid
    with BlockingVolume(cluster4.spec, writer="test") as vol:
        gen, epoch = vol.volume.gen, vol.volume.table.epoch
    before = rss(pid)
    got = attack(
        str(cluster4.base),
        "farslot",
        str(cluster4.data_dir(0) / KEY_NAME),
        str(epoch),
        str(gen),
        nobody=False,
    )
    assert got["write"] == [[Msg.WRITE, "ENOSPC"]]
    assert rss(pid) - before < 8 * MiB
    cluster4.start(0)  # and nothing of it survives a restart
    assert (cluster4.data_dir(0) / "slots.idx").stat().st_size < MiB
    assert rss(cluster4.servers[0].pid) < 200 * MiB
