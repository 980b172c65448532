"""Faults under a live mount: servers killed, the mount killed, two mounts at once."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli, drop_caches, sha, wait_for

from mirrorfuse.client.blocking import run_async
from mirrorfuse.tools import admin

MiB = 1 << 20


def failed_servers(cluster) -> list[int]:
    return [r["id"] for r in cluster.status()["rows"] if r["state"] == "failed"]


def test_kill_one_server_of_each_pair_during_cp(cluster4, make_mount, tmp_path: Path):
    m = make_mount(cluster4)
    src = tmp_path / "src"
    with open(src, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    victims = [random.choice((0, 1)), random.choice((2, 3))]
    cp = subprocess.Popen(["cp", str(src), str(m.path / "copy")])
    try:
        assert wait_for(
            lambda: (m.path / "copy").exists() and os.stat(m.path / "copy").st_size > 64 * MiB, 60
        )
        for v in victims:
            cluster4.kill(v)
        assert cp.wait(timeout=300) == 0
    finally:
        if cp.poll() is None:
            cp.kill()
    assert sha(m.path / "copy") == sha(src)
    assert failed_servers(cluster4) == sorted(victims)
    # the mount keeps working on the survivors
    (m.path / "after").write_bytes(b"still here")
    assert (m.path / "after").read_bytes() == b"still here"


WRITER = r"""
import os, sys, random
mnt, log = sys.argv[1], sys.argv[2]
rng = random.Random(7)
def body(name, v):
    size = rng.randrange(1, 3 << 20)
    head = f"{name}:{v}:{size}\n".encode()
    return head + bytes((v * 7 + i) % 251 for i in range(256)) * (size // 256)
version = {}
with open(log, "a") as out:
    for i in range(100000):
        name = f"f{i % 12}"
        v = version.get(name, 0) + 1
        version[name] = v
        path = os.path.join(mnt, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, body(name, v))
        if i % 4 == 0:
            os.fsync(fd)
            os.close(fd)
            out.write(f"{name} {v}\n")
            out.flush()
        else:
            os.close(fd)
"""


def parse_version(name: str, data: bytes) -> int:
    """The version a file holds; fails unless it is one complete version."""
    head, _, rest = data.partition(b"\n")
    fname, v, size = head.decode().split(":")
    v, size = int(v), int(size)
    assert fname == name
    assert rest == bytes((v * 7 + i) % 251 for i in range(256)) * (size // 256), (
        f"{name} holds a mix of versions"
    )
    return v


def test_sigkill_of_the_mount_during_writes(cluster4, make_mount, tmp_path: Path):
    m = make_mount(cluster4)
    log = tmp_path / "synced.log"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(m.path), str(log)], stderr=subprocess.DEVNULL
    )
    try:
        assert wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 8, 120)
        time.sleep(0.5)
        m.kill()
    finally:
        writer.kill()
        writer.wait()
    synced: dict[str, int] = {}
    for line in log.read_text().splitlines():
        name, v = line.split()
        synced[name] = max(synced.get(name, 0), int(v))
    res = cli("fsck", *cluster4.args, "--deep")
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout
    again = make_mount(cluster4, name="again")
    for name, v in synced.items():
        got = parse_version(name, (again.path / name).read_bytes())
        assert got >= v, f"{name}: fsync'ed version {v} lost (found {got})"
    for path in again.path.iterdir():
        parse_version(path.name, path.read_bytes())  # every file: one whole version


def test_remount_with_one_server_of_a_pair_missing(cluster4, make_mount):
    m = make_mount(cluster4)
    data = os.urandom(5 * MiB)
    (m.path / "f").write_bytes(data)
    m.close()
    cluster4.kill(1)
    again = make_mount(cluster4, name="degraded")
    assert (again.path / "f").read_bytes() == data
    (again.path / "g").write_bytes(data[::-1])
    assert (again.path / "g").read_bytes() == data[::-1]
    assert failed_servers(cluster4) == [1]


def test_second_mount_is_refused_and_force_fences_the_first(cluster4, make_mount):
    first = make_mount(cluster4, name="first")
    (first.path / "before").write_text("from the first mount")
    second = make_mount(cluster4, name="second", check=False)
    assert not second.ok
    msg = second.result.stderr
    assert f"already mounted read-write by pid {first.pid}" in msg and str(first.path) in msg
    assert "Traceback" not in msg
    taker = make_mount(cluster4, "--force", name="taker")
    assert (taker.path / "before").read_text() == "from the first mount"
    # the fenced client's write fails when it is written out: at the latest its fsync
    # (a close that hands the record to the journal may return before the servers refuse
    # it, as a local file system's close returns before the disk has the data)
    with pytest.raises(OSError), open(first.path / "late", "w") as f:  # noqa: PT012
        f.write("must not land")
        f.flush()
        os.fsync(f.fileno())
    assert not (taker.path / "late").exists()
    (taker.path / "new").write_text("from the taker")
    taker.close()
    res = cli("fsck", *cluster4.args)
    assert res.returncode == 0, res.stdout


def test_killed_server_is_named_in_status_while_mounted(cluster4, make_mount):
    m = make_mount(cluster4)
    cluster4.servers[2].signal(signal.SIGKILL)
    cluster4.servers[2].proc.wait()
    (m.path / "f").write_bytes(os.urandom(4 * MiB))  # touches both pairs
    assert failed_servers(cluster4) == [2]
    res = cli("status", *cluster4.args)
    assert "failed" in res.stdout.splitlines()[4]


def test_losing_a_whole_pair_fails_only_its_blocks_and_writes_resume_when_it_is_back(
    make_cluster, make_mount
):
    """Both servers of pair 0 killed: its blocks are EIO at once; the files on pair 1,
    new files (placed on pair 1) and the metadata (on every server) keep working and
    fsync; with the pair back, its files read and writes use it again, no remount."""
    c = make_cluster(4, format_args=("--block-size", "64K"))
    m = make_mount(c)
    # one block each (too big to live inline in the metadata)
    small = {f"s{i}": os.urandom(9000 + i) for i in range(8)}
    for name, data in small.items():
        (m.path / name).write_bytes(data)
    c.kill(0)
    c.kill(1)
    drop_caches()  # the kernel's copies of what was written are not the servers' blocks
    readable = {}
    for name, data in small.items():  # about half live on each pair
        try:
            readable[name] = (m.path / name).read_bytes() == data
        except OSError as exc:
            assert exc.errno == errno.EIO
    assert readable and all(readable.values()) and len(readable) < len(small)
    (m.path / "dir").mkdir()  # metadata only
    os.rename(m.path / next(iter(readable)), m.path / "dir" / "moved")
    new = {f"new{i}": os.urandom(9000) for i in range(8)}
    for name, data in new.items():  # new data goes to the pair that takes it, and fsyncs
        with open(m.path / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    c.start(0)
    c.start(1)
    assert wait_for(lambda: _writes(m.path / "after", 8), 30)  # no remount
    for name, data in small.items():
        if name in readable:
            continue
        assert (m.path / name).read_bytes() == data  # pair 0's files are back
    for name, data in new.items():
        assert (m.path / name).read_bytes() == data
    # the mount heals the server it marked failed (a first try may find its mirror not
    # started yet, and tries again): then every server holds the volume as it is
    assert wait_for(lambda: _states(c) == ["alive"] * 4, 30), _states(c)
    m.close()
    res = cli("fsck", *c.args, "--deep")
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout


def _states(c) -> list[str]:
    return [r["state"] for r in run_async(admin.status(c.spec))["rows"]]


def _writes(path: Path, count: int) -> bool:
    """``count`` one-block files written and synced (so both pairs took some; too big
    to live inline in the metadata)."""
    try:
        for i in range(count):
            with open(f"{path}{i}", "wb") as f:
                f.write(os.urandom(9000))
                f.flush()
                os.fsync(f.fileno())
    except OSError:
        return False
    return True


def test_a_checkpoint_damaged_on_one_server_is_read_from_another(cluster4, make_mount):
    m = make_mount(cluster4)
    data = os.urandom(3 * MiB)
    (m.path / "f").write_bytes(data)
    m.close()  # a checkpoint on every server
    path = cluster4.data_dir(0) / "checkpoint.bin"  # the first one a mount would read
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(raw)
    again = make_mount(cluster4, name="again")
    assert (again.path / "f").read_bytes() == data
