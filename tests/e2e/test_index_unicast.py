"""The index group by unicast (--replicas, where multicast is not available), with a peer
sharing files that live on a mounted mirrorfs volume."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from helpers import cli, sha, wait_for
from netns import start, stop

from mirrorfuse.index.client import BlockingIndexClient
from mirrorfuse.wire.addresses import Address

BIN = Path(sys.executable).parent


def free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []

    def run(cmd: list[str], marker: str) -> subprocess.Popen:
        p = start(cmd, marker)[0]
        started.append(p)
        return p

    yield run
    for p in reversed(started):  # peers first: they leave while the group is there
        stop(p)


def test_unicast_group_and_a_peer_sharing_from_a_mount(mfs, procs, tmp_path):
    ports = free_udp_ports(2)
    replicas = ",".join(f"127.0.0.1:{p}" for p in ports)
    index = str(BIN / "mirrorfs-index")
    r1 = procs([index, "127.0.0.1", str(ports[0]), "--id", "1", "--replicas", replicas], "replica")
    procs([index, "127.0.0.1", str(ports[1]), "--id", "2", "--replicas", replicas], "replica")
    share = mfs.path / "share"
    share.mkdir()
    (share / "movie.bin").write_bytes(os.urandom(5 << 20))
    (mfs.path / "talk.pdf").write_bytes(os.urandom(700_000))
    peer = procs(
        [
            str(BIN / "mirrorfs-peer"),
            "--index",
            f"127.0.0.1:{ports[0]}",
            "--replicas",
            replicas,
            "--share",
            str(share),
            "--id",
            "node1",
            "--interval",
            "0.5",
        ],
        "serving",
    )
    group = ["index", "127.0.0.1", str(ports[0]), "--replicas", replicas]
    assert wait_for(lambda: "movie.bin" in cli(*group, "files").stdout, 20)

    res = cli(*group, "share", str(mfs.path / "talk.pdf"), "--name", "talk.pdf")
    assert res.returncode == 0, res.stderr  # the one peer running here, found by its record
    res = cli(*group, "fetch", "movie.bin", "-o", str(tmp_path / "movie.got"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert sha(tmp_path / "movie.got") == sha(share / "movie.bin")

    r1.send_signal(signal.SIGKILL)  # the master: replica 2 takes over, by unicast too
    r1.wait()
    res = cli(*group, "fetch", "talk.pdf", "-o", str(tmp_path / "talk.got"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert sha(tmp_path / "talk.got") == sha(mfs.path / "talk.pdf")
    (share / "movie.bin").unlink()
    ok = wait_for(lambda: "movie.bin" not in cli(*group, "files").stdout, 20)
    if not ok:
        peer.send_signal(signal.SIGTERM)
        out, err = peer.communicate(timeout=10)
        raise AssertionError(out + err + cli(*group, "files").stdout + cli(*group, "status").stdout)
    status = cli(*group, "status").stdout
    assert "replica 2:" in status and "master 2" in status and "replica 1:" not in status
    assert peer.poll() is None

    # bad input: a clear message and a non-zero exit, and the replica carries on
    c = BlockingIndexClient("127.0.0.1", ports[1], [Address("127.0.0.1", ports[1])])
    c.send_raw(msgpack.packb({"t": "teleport"}))
    c.send_raw(b"\xc1\xc1")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    ghost = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: refuses
    reg = {"peer": "ghost", "addr": ghost, "interval": 600}
    assert c.request("register", reg).ok
    adv = {"peer": "ghost", "name": "ghost.bin", "size": 10, "checksum": 1}
    assert c.request("advertise", adv).ok
    c.close()
    res = cli(*group, "fetch", "ghost.bin", "-o", str(tmp_path / "ghost.got"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"source {ghost} is not available" in res.stdout  # says which peer did not answer
    assert "no source answers" in res.stderr
    closed.close()
    assert not (tmp_path / "ghost.got").exists()
    res = cli(*group, "fetch", "no-such-file", "-o", str(tmp_path / "x"))
    assert res.returncode == 1 and "no peer shares 'no-such-file'" in res.stderr
    res = cli(*group, "share", str(tmp_path / "missing"))
    assert res.returncode == 1 and "is not a regular file" in res.stderr
    res = cli("index", "127.0.0.1", "80", "status")
    assert res.returncode != 0 and "outside 1024-65535" in res.stderr
    status = cli(*group, "status").stdout
    assert "dropped datagrams 2" in status, status
