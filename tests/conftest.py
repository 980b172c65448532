"""Fixtures: clusters of real server processes, always ended by pid."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import Cluster, Mount

# The tests' own registry of mounts, so they neither see nor disturb the user's.
_STATE = tempfile.mkdtemp(prefix="mirrorfs-test-state-")
os.environ["MIRRORFS_STATE_DIR"] = _STATE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_STATE, ignore_errors=True)


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
