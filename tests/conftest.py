"""Fixtures: clusters of real server processes, always ended by pid."""

from __future__ import annotations

import pytest
from helpers import Cluster


@pytest.fixture
def make_cluster(tmp_path):
    made: list[Cluster] = []

    def make(count: int = 4, format_args: tuple[str, ...] | None = ()) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", count)
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
