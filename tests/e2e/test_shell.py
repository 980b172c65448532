"""mirrorfs-cli shell driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pexpect
import pytest
from helpers import Cluster, cli, free_base_port, run

CLI = str(Path(sys.executable).parent / "mirrorfs-cli")
T = 30


@pytest.fixture
def seed_cluster(tmp_path):
    """Four servers on 4-digit ports, as seed 000 numbers them; not formatted."""
    c = Cluster(tmp_path / "c", 4, base=free_base_port(4, 2000, 9990))
    yield c
    c.close()


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(CLI, ["shell", *args], encoding="utf-8", timeout=T)
    child.logfile_read = sys.stdout  # shown by pytest when a test fails
    return child


def cmd(child: pexpect.spawn, line: str, *expect: str) -> str:
    child.expect_exact("$ ")
    child.sendline(line)
    for e in expect:
        child.expect_exact(e)
    return child.before


def test_the_session_of_seed_000(seed_cluster):
    c = seed_cluster
    c.kill(3)  # not started yet: the shell must say it waits for it
    child = spawn("--read-delay", "0.2")
    child.expect_exact("4 servers")
    child.expect_exact("waiting time t in seconds")
    child.sendline("soon")
    child.expect_exact("is not a number")
    child.sendline("0.1")
    for bad, why in (
        ("99", "not a 4-digit"),
        ("12345", "not a 4-digit"),
        ("0999", "reserved"),
        ("abcd", "not a 4-digit"),
    ):
        child.expect_exact("starting port")
        child.sendline(bad)
        child.expect_exact(why)
    child.expect_exact("starting port")
    child.sendline(str(c.base))
    child.expect_exact(f"ports {c.base}, {c.base + 1}, {c.base + 2}, {c.base + 3}")
    child.expect_exact("press Enter")
    child.sendline("")
    child.expect_exact(f"waiting for server 3 (port {c.base + 3})")
    c.start(3)
    for i in range(4):
        child.expect_exact(f"connection established from server {i} at 127.0.0.1:{c.base + i}")
    child.expect_exact("formatted a new volume")

    cmd(child, "help", "write /a.txt TEXT")
    cmd(child, "mkdir /A/B", "made directory /A", "made directory /A/B")
    cmd(child, "create /a.txt", "created /a.txt")
    a0, a1 = f"server 0 (127.0.0.1:{c.base})", f"server 1 (127.0.0.1:{c.base + 1})"
    cmd(
        child,
        "write /a.txt hello mirrored world",
        f"block 0 (mirror pair 0) will be written to {a0} and {a1}",
        "waiting 0.1 s before writing",
        f"written to {a0}",
        f"next replica: {a1}",
        f"waiting to write in another replica: {a1} (0.1 s)",
        f"written to {a1}",
        "wrote 20 bytes to /a.txt",
    )
    served = []
    for _ in range(4):
        cmd(
            child,
            "read /a.txt",
            f"block 0 of /a.txt is on {a0} and {a1}",
            "waiting 0.2 s before reading",
            "block 0 read from ",
        )
        child.expect(r"server (\d)")
        served.append(int(child.match.group(1)))
        child.expect_exact("hello mirrored world")
    assert served in ([0, 1, 0, 1], [1, 0, 1, 0]), served  # odd reads from one, even from the other
    cmd(child, "mv /a.txt /A/B/a.txt", "moved /a.txt to /A/B/a.txt")
    cmd(child, "status", "ID  ADDRESS")
    child.expect_exact("alive")
    cmd(child, "rm /A/B/a.txt", "removed /A/B/a.txt")
    cmd(child, "exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_bad_input_never_kills_the_shell(seed_cluster):
    child = spawn(
        "--delay", "0", "--read-delay", "0", "--base-port", str(seed_cluster.base), "--yes"
    )
    cases = [
        ("frobnicate", "unknown command 'frobnicate'"),
        ("mkdir", "expected 1 argument(s)"),
        ("mv /x", "expected 2 argument(s)"),
        ("mkdir relative/path", "paths are absolute"),
        ("read /missing", "No such file or directory"),
        ("rm /missing", "No such file or directory"),
        ("write nopath", "usage: write /path TEXT"),
        ("mkdir /d", "made directory /d"),
        ("mkdir /d", "File exists"),
        ("create /d", "File exists"),
        ("create /d/f/g", "No such file or directory"),
        ("mv /d /d/inside", "Invalid argument"),
        ("read /d", "Is a directory"),
        ('mkdir "/unterminated', "No closing quotation"),
        ("create /" + "n" * 256, "File name too long"),
        ("mkdir /", "error: mkdir /: File exists"),
        ("create /", "error: create /: File exists"),
        ("mv /d /", "error: mv /d: File exists"),
    ]
    for line, answer in cases:
        cmd(child, line, answer)
    cmd(child, "status", "alive")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
    res = cli("fsck", *seed_cluster.args)  # nothing was made under an empty name
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout


def test_exit_with_a_whole_pair_dead_says_so(seed_cluster):
    c = seed_cluster
    child = spawn(
        "--delay", "0", "--read-delay", "0", "--base-port", str(c.base), "--yes", "--timeout", "1"
    )
    cmd(child, "write /one first", "wrote 5 bytes to /one")
    c.kill(2)
    c.kill(3)
    cmd(child, "mkdir /later", "made directory /later")  # the journal is on every server
    for i in range(4):  # blocks on both pairs: pair 1's fail, one by one
        cmd(child, f"write /x{i} text{i}")
        child.expect(f"(wrote 5 bytes to /x{i}|error: write /x{i}: .*pair 1)")
    cmd(child, "exit")
    child.expect(pexpect.EOF)
    child.wait()
    out = child.before
    assert "Traceback" not in out and "JournalBroken" not in out, out
    assert child.exitstatus == 0, out
    m = [r["state"] for r in c.status()["rows"]]
    assert m[:2] == ["alive", "alive"], m


def test_a_replica_lost_after_its_mirror_took_the_block_is_noted_for_its_heal(seed_cluster):
    c = seed_cluster
    child = spawn(
        "--delay", "1", "--read-delay", "0", "--base-port", str(c.base), "--yes", "--timeout", "1"
    )
    s0, s1 = f"server 0 (127.0.0.1:{c.base})", f"server 1 (127.0.0.1:{c.base + 1})"
    cmd(child, "write /a hello", f"written to {s0}", f"waiting to write in another replica: {s1}")
    c.kill(1)  # while the shell waits to write the second replica
    child.expect_exact(f"{s1} is down")
    child.expect_exact(f"written again to {s0}: it notes the block for its mirror")
    child.expect_exact("wrote 5 bytes to /a")
    cmd(child, "status", "server 0: 1 blocks changed while server 1 was out")
    cmd(child, "exit")
    child.expect(pexpect.EOF)


def test_server_killed_between_two_writes(seed_cluster):
    c = seed_cluster
    child = spawn(
        "--delay", "0", "--read-delay", "0", "--base-port", str(c.base), "--yes", "--timeout", "1"
    )
    cmd(child, "write /one first", "wrote 5 bytes to /one")  # block 0: pair 0
    c.kill(3)
    s2, s3 = f"server 2 (127.0.0.1:{c.base + 2})", f"server 3 (127.0.0.1:{c.base + 3})"
    out = cmd(child, "write /two second", "wrote 6 bytes to /two")  # block 1: pair 1
    assert f"block 1 (mirror pair 1) will be written to {s2}" in out
    # found dead either by this write or, a moment earlier, by the journal commit
    assert re.search(re.escape(s3) + "( is failed, so not written| is down)", out), out
    assert f"written to {s2}" in out and f"written to {s3}" not in out
    cmd(child, "status")
    child.expect(r"3\s+127\.0\.0\.1:\d+\s+-\s+1\s+failed")
    for _ in range(3):  # only the survivor holds it now, and serves every read
        cmd(
            child,
            "read /two",
            f"block 0 of /two is on {s2}\r\n",  # the failed mirror is not listed
            f"block 0 read from {s2}",
            "second",
        )
    # later writes to that pair go to its survivor only
    pair0 = f"server 0 (127.0.0.1:{c.base}) and server 1 (127.0.0.1:{c.base + 1})"
    seen_pairs = set()
    for i in range(4):
        cmd(child, f"write /more{i} text{i}")
        child.expect(r"\(mirror pair (\d)\) will be written to ([^\r]*)\r\n")
        pair, holders = int(child.match.group(1)), child.match.group(2)
        seen_pairs.add(pair)
        assert holders == (f"{s2}; {s3} is failed, so not written" if pair == 1 else pair0)
        child.expect_exact(f"wrote 5 bytes to /more{i}")
    assert seen_pairs == {0, 1}
    cmd(child, "exit")
    child.expect(pexpect.EOF)
    assert [r["state"] for r in c.status()["rows"]] == ["alive", "alive", "alive", "failed"]


def test_shell_and_mount_see_each_others_files(seed_cluster, make_mount):
    c = seed_cluster
    script = "mkdir /s\nwrite /s/from-shell written in the shell\nexit\n"
    args = ["shell", "--delay", "0", "--read-delay", "0", "--base-port", str(c.base), "--yes"]
    res = run([CLI, *args], input=script)
    assert res.returncode == 0 and "wrote 20 bytes" in res.stdout, res.stdout + res.stderr
    m = make_mount(c)
    assert (m.path / "s" / "from-shell").read_text() == "written in the shell"
    (m.path / "s" / "from-mount").write_text("written through the mount")
    while_mounted = run([CLI, *args], input="read /s/from-mount\n")
    assert "already mounted read-write" in while_mounted.stderr  # one writer at a time
    m.close()
    res = run([CLI, *args], input="read /s/from-mount\n")
    assert res.returncode == 0 and "written through the mount" in res.stdout, res.stdout
    assert cli("fsck", *c.args).returncode == 0
