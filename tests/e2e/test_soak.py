"""Long soak tests (tests/run.sh --slow): rounds of failures under a live mount."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from helpers import cli, wait_for

MiB = 1 << 20


def write(path: Path, rng: random.Random) -> str:
    data = rng.randbytes(rng.randrange(1, 6 * MiB))
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_rounds_of_kill_write_and_heal_lose_nothing(cluster4, make_mount, tmp_path):
    """Each round: files written, a random server killed half way, the rest written on its
    mirror, the server back (its old directory or an empty one), healed by the mount;
    every file checked."""
    m = make_mount(cluster4)
    rng = random.Random(20261122)
    want: dict[str, str] = {}
    for round_ in range(8):
        victim = rng.randrange(4)
        names = [f"r{round_}-f{i}" for i in range(12)] + rng.sample(sorted(want), min(4, len(want)))
        for k, name in enumerate(names):
            if k == len(names) // 2:
                cluster4.kill(victim)
            want[name] = write(m.path / name, rng)
        os.sync()
        states = cluster4.states()
        assert states[victim] == "failed" and states.count("alive") == 3, states
        empty = rng.random() < 0.5
        cluster4.start(victim, tmp_path / f"empty-{round_}" if empty else None)
        assert wait_for(lambda: cluster4.states() == ["alive"] * 4, 120), cluster4.status()
        for name, digest in want.items():
            got = hashlib.sha256((m.path / name).read_bytes()).hexdigest()
            assert got == digest, f"round {round_}: {name} differs"
    m.close()
    res = cli("fsck", *cluster4.args, "--deep")
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout
