"""Fixtures: clusters of real server processes, always ended by pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import Cluster, Mount, free_base_port

from mirrorfuse.tools import registry
from mirrorfuse.tools.spawn import running_server

# The tests' own registry of mounts, so they neither see nor disturb the user's.
_STATE = tempfile.mkdtemp(prefix="mirrorfs-test-state-")
os.environ["MIRRORFS_STATE_DIR"] = _STATE
# and their own key directory: the volumes they format never touch the user's keys
os.environ["MIRRORFS_KEYS"] = os.path.join(_STATE, "keys")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_STATE, ignore_errors=True)


BIG = 4 << 20  # bytes on disk: data, copies, slot files; logs and metadata stay


def remove_big_files(root: Path) -> int:
    """Delete every file under ``root`` taking more than BIG on disk (never inside a mount)."""
    freed = 0
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(top, d))]
        for name in files:
            path = os.path.join(top, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if st.st_blocks * 512 > BIG:
                    os.unlink(path)
                    freed += st.st_blocks * 512
    return freed


@pytest.fixture(autouse=True)
def _leave_no_big_files(request):
    """Whatever a test's outcome, its large files go once everything it started is ended
    (this fixture is set up first, so it is torn down last)."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp is not None:
        remove_big_files(tmp)


@pytest.fixture
def make_cluster(tmp_path):
    made: list[Cluster] = []

    def make(
        count: int = 4, format_args: tuple[str, ...] | None = (), server_args: tuple[str, ...] = ()
    ) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", count, server_args=server_args)
        made.append(c)
        if format_args is not None:
            c.format(*format_args)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def cluster4(make_cluster) -> Cluster:
    return make_cluster(4)


@pytest.fixture
def make_mount(tmp_path):
    made: list[Mount] = []

    def make(
        cluster: Cluster,
        *extra: str,
        name: str = "mnt",
        check: bool = True,
        path: Path | None = None,
    ) -> Mount:
        m = Mount(cluster, path or tmp_path / name, *extra)
        made.append(m)
        if check:
            assert m.ok, m.result.stderr
        return m

    yield make
    for m in reversed(made):
        m.close()


@pytest.fixture
def mfs(cluster4, make_mount) -> Mount:
    """A freshly formatted 4-server volume, mounted."""
    return make_mount(cluster4)


@pytest.fixture
def local(tmp_path):
    """./mount.sh's own cluster in tmp_path (mountpoint, its arguments, base port);
    unmounted and stopped afterwards whatever happens."""
    base = free_base_port(4)
    mnt = tmp_path / "mnt"
    data = tmp_path / "data"
    args = ["--data", str(data), "--base-port", str(base)]
    yield mnt, args, base
    # whatever a failed test left: the mount's pid as recorded, ended by pid
    record = registry.read(os.path.realpath(mnt)) or {}
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    pid = record.get("mount_pid")
    with contextlib.suppress(ProcessLookupError, TypeError):
        os.kill(pid, signal.SIGKILL)
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    # and every server of this data directory, however it was started
    for entry in os.listdir("/proc"):
        server = running_server(int(entry)) if entry.isdigit() else None
        if server is not None and server.data.is_relative_to(data.resolve()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
