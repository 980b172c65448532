"""./mount.sh as a user runs it (with its own data directory and ports, not the defaults)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import cli, free_base_port, wait_for

from mirrorfuse.tools import registry

REPO = Path(__file__).resolve().parents[2]


def mount_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "mount.sh"), *args], capture_output=True, text=True, timeout=180
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


@pytest.fixture
def local(tmp_path):
    """mount.sh's own cluster in tmp_path; unmounted and stopped afterwards whatever happens."""
    base = free_base_port(4)
    mnt = tmp_path / "mnt"
    args = ["--data", str(tmp_path / "data"), "--base-port", str(base)]
    yield mnt, args, base
    # whatever a failed test left: the pids mount.sh recorded, ended by pid
    record = registry.read(os.path.realpath(mnt)) or {}
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    for pid in [record.get("mount_pid"), *(record.get("started_pids") or [])]:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_mount_status_twice_and_unmount(local):
    mnt, args, base = local
    res = mount_sh(*args, str(mnt))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"created mountpoint {mnt}" in res.stdout and "formatted new volume" in res.stdout
    assert f"./mount.sh -u {mnt}" in res.stdout
    (mnt / "hello").write_text("hi")
    st = cli("status", "--json")  # no cluster named: the one behind the only mount
    assert st.returncode == 0, st.stderr
    rows = json.loads(st.stdout)["rows"]
    assert [r["address"] for r in rows] == [f"127.0.0.1:{base + i}" for i in range(4)]
    assert cli("status", str(mnt)).returncode == 0
    pids = [r["pid"] for r in rows]
    again = mount_sh(*args, str(mnt))
    assert again.returncode != 0 and "already mounted" in again.stderr
    assert "Traceback" not in again.stderr
    down = mount_sh("-u", str(mnt))
    assert down.returncode == 0 and "stopped 4 servers" in down.stdout, down.stderr
    assert wait_for(lambda: not any(alive(p) for p in pids), 20)
    up = mount_sh(*args, str(mnt))  # the same data comes back
    assert up.returncode == 0, up.stderr
    assert (mnt / "hello").read_text() == "hi"
    assert mount_sh("-u", str(mnt)).returncode == 0
    res = mount_sh("-u", str(mnt))
    assert res.returncode != 0 and "is not mounted" in res.stderr


def test_non_empty_mountpoint_and_missing_servers_are_clear_errors(local, tmp_path):
    mnt, args, _ = local
    mnt.mkdir()
    (mnt / "something").write_text("x")
    res = mount_sh(*args, str(mnt))
    assert res.returncode != 0 and "is not an empty directory" in res.stderr
    assert "Traceback" not in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    dead = free_base_port(4)
    servers = ",".join(f"127.0.0.1:{dead + i}" for i in range(4))
    res = mount_sh("--servers", servers, str(empty))
    assert res.returncode != 0 and "no server answers" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    res = mount_sh("--count", "5", *args, str(empty))
    assert res.returncode != 0 and "odd number" in res.stderr and "Traceback" not in res.stderr
