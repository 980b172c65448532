"""mirrorfs-cli status --watch as a person runs it: on a terminal, and piped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pexpect
from helpers import CLI, cli

MiB = 1 << 20
T = 60


def row(cluster, server: int, state: str) -> str:
    """A pattern for server's row showing ``state`` (on one line of the table)."""
    return rf"127\.0\.0\.1:{cluster.base + server}[^\n]*{state}"


def test_watch_on_a_terminal_follows_a_kill_and_the_heal(cluster4, mfs):
    child = pexpect.spawn(
        CLI,
        ["status", "--watch", "-n", "0.3", *cluster4.args],
        encoding="utf-8",
        timeout=T,
        dimensions=(60, 200),
        env={**os.environ, "COLUMNS": "200", "LINES": "60"},  # else 80 under pytest
    )
    child.logfile_read = sys.stdout  # shown by pytest when the test fails
    try:
        child.expect(row(cluster4, 2, "alive"))
        cluster4.kill(2)
        with open(mfs.path / "f", "wb") as f:  # reaches both pairs: the mount finds 2 gone
            f.write(os.urandom(8 * MiB))
            os.fsync(f.fileno())
        child.expect(row(cluster4, 2, "failed"))
        cluster4.start(2)  # the mount heals it: healing, then alive
        child.expect(row(cluster4, 2, "(healing|alive)"))
        child.expect(row(cluster4, 2, "alive"))
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Traceback" not in child.before


def test_watch_piped_prints_a_table_per_interval_until_ctrl_c(cluster4):
    proc = subprocess.Popen(
        [CLI, "status", "--watch", "-n", "0.2", *cluster4.args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    guard = threading.Timer(T, proc.kill)  # a hang fails the test instead of the run
    guard.start()
    try:
        stamps, alive = 0, 0
        assert proc.stdout is not None
        while stamps < 3:
            line = proc.stdout.readline()
            assert line, "status --watch stopped printing"
            stamps += line.startswith("-- ")
            alive += f"127.0.0.1:{cluster4.base}" in line and " alive " in line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=T)
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert alive >= 2  # server 0's row in each table so far
    assert proc.returncode == 0
    assert "Traceback" not in err


def test_watch_and_json_do_not_go_together(cluster4):
    res = cli("status", "--watch", "--json", *cluster4.args)
    assert res.returncode == 1
    assert res.stderr.startswith("usage: mirrorfs-cli status ")  # the command's own usage
    assert res.stderr.strip().splitlines()[-1] == (
        "mirrorfs-cli status: error: --watch shows a table: it does not go with --json"
    )
