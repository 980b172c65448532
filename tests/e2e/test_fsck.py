"""fsck --deep reads every copy of every block and names the server of each bad one;
fsck --repair rewrites them from the copy whose checksum is right."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from helpers import cli, sha

from servers.block.store import ENTRY, USED

MiB = 1 << 20


def used_slots(data_dir: Path) -> list[int]:
    index = (data_dir / "slots.idx").read_bytes()
    return [
        off // ENTRY.size
        for off in range(0, len(index) - ENTRY.size + 1, ENTRY.size)
        if ENTRY.unpack_from(index, off)[2] & USED
    ]


def forget(data_dir: Path, slots: list[int]) -> None:
    """The server loses these copies (as if its directory were older)."""
    with open(data_dir / "slots.idx", "r+b") as f:
        for slot in slots:
            f.seek(slot * ENTRY.size)
            f.write(bytes(ENTRY.size))


def scribble(data_dir: Path, slots: list[int], block_size: int) -> None:
    """The disk returns other bytes for these copies (bit rot)."""
    with open(data_dir / "slots.dat", "r+b") as f:
        for slot in slots:
            f.seek(slot * block_size + 100)
            f.write(struct.pack("<Q", 0xDEADBEEF) * 8)


def damaged_volume(c, make_mount) -> dict[str, str]:
    """Files written through a mount, then 3 copies lost and 2 scribbled on server 1 (which
    the table still counts alive: no client saw it go)."""
    m = make_mount(c)
    want = {}
    for name in ("a", "b", "c"):
        (m.path / name).write_bytes(os.urandom(2 * MiB + 123))
        want[name] = sha(m.path / name)
    m.close()
    c.kill(1)
    slots = used_slots(c.data_dir(1))
    data_slots = slots[-5:]
    forget(c.data_dir(1), data_slots[:3])
    scribble(c.data_dir(1), data_slots[3:], 64 << 10)
    c.start(1)
    return want


def test_deep_names_the_server_of_every_missing_and_differing_copy(make_cluster, make_mount):
    c = make_cluster(4, format_args=("--block-size", "64K"))
    damaged_volume(c, make_mount)
    res = cli("fsck", *c.args, "--deep")
    assert res.returncode == 1, res.stdout
    out = res.stdout
    assert out.count("missing on server 1") == 3 and out.count("differs on server 1") == 2, out
    assert "server 1: 3 missing, 2 differing copies" in out
    for other in (0, 2, 3):
        assert f"on server {other}" not in out and f"server {other}:" not in out
    assert "fsck (namespace and every copy of every block): 5 problem(s)" in out


def test_repair_rewrites_bad_copies_from_their_mirror(make_cluster, make_mount):
    c = make_cluster(4, format_args=("--block-size", "64K"))
    want = damaged_volume(c, make_mount)
    res = cli("fsck", *c.args, "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("; rewritten from its mirror") == 5
    assert "clean; 5 copies repaired" in res.stdout
    res = cli("fsck", *c.args, "--deep")
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout
    c.kill(0)  # every block of pair 0 from the repaired server
    m = make_mount(c, name="again")
    assert {n: sha(m.path / n) for n in want} == want


def test_repair_refuses_while_the_volume_is_mounted(cluster4, make_mount):
    m = make_mount(cluster4)
    (m.path / "f").write_bytes(b"x" * 1000)
    res = cli("fsck", *cluster4.args, "--repair")
    assert res.returncode != 0 and "already mounted read-write" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_deep_says_which_servers_it_could_not_check(cluster4, make_mount):
    m = make_mount(cluster4)
    (m.path / "f").write_bytes(os.urandom(3 * MiB))
    cluster4.kill(3)
    (m.path / "g").write_bytes(os.urandom(3 * MiB))  # server 3 is marked failed
    m.close()
    res = cli("fsck", *cluster4.args, "--deep")
    assert res.returncode == 0, res.stdout
    assert "server 3 is failed: its copies were not checked (heal it first)" in res.stdout


def test_deep_finds_a_damaged_chunk_sum_and_repair_rewrites_it(make_cluster, make_mount):
    """A copy whose data is right but whose chunk sums (kept beside it, read by small
    reads) are not is a bad copy too."""
    c = make_cluster(4)  # a new volume: 1 MiB blocks, their sums per 64 KiB chunk
    m = make_mount(c)
    (m.path / "f").write_bytes(os.urandom(3 * MiB))
    want = sha(m.path / "f")
    m.close()
    c.kill(1)
    slot = used_slots(c.data_dir(1))[-1]
    with open(c.data_dir(1) / "slots.sum", "r+b") as f:  # 16 sums of 8 bytes per slot
        f.seek(slot * 128 + 40)
        f.write(b"\xff" * 8)
    c.start(1)
    res = cli("fsck", *c.args, "--deep")
    assert res.returncode == 1 and res.stdout.count("differs on server 1") == 1, res.stdout
    res = cli("fsck", *c.args, "--repair")
    assert res.returncode == 0 and "clean; 1 copies repaired" in res.stdout, res.stdout
    res = cli("fsck", *c.args, "--deep")
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout
    c.kill(0)  # pair 0 from the repaired server
    m = make_mount(c, name="again")
    assert sha(m.path / "f") == want
