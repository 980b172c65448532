"""The fault campaign (tests/run.sh --slow): 20 rounds of kill -9 or SIGSTOP of a random
server (one per pair at most) under a live mount doing mixed writes; each comes back on
its own or an empty directory and the mount heals it by itself. After every round each
acknowledged file reads back exactly, fsck --deep (every copy of every block) is clean,
and no server is alive that should not be."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import cli, wait_for

MiB = 1 << 20
ROUNDS = 20


class Writer(threading.Thread):
    """Mixed changes on the mount; each one acknowledged (fsync returned) goes into the
    model. Any error of the file system is kept: with one server per pair out, none may
    come."""

    def __init__(self, root: Path, seed: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.rng = random.Random(seed)
        self.model: dict[str, bytes] = {}
        self.errors: list[str] = []
        self.go = threading.Event()
        self.idle = threading.Event()
        self.stop = False
        self.ops = 0

    def run(self) -> None:
        while not self.stop:
            if not self.go.is_set():
                self.idle.set()
                self.go.wait(0.1)
                continue
            self.idle.clear()
            try:
                self.step()
                self.ops += 1
            except OSError as exc:
                self.errors.append(f"op {self.ops}: {exc!r}")
                self.go.clear()

    def pause(self) -> None:
        self.go.clear()
        assert self.idle.wait(60), "the writer did not come to rest"

    def step(self) -> None:
        rng, model = self.rng, self.model
        names = sorted(model)
        kind = rng.choice(["new", "new", "patch", "patch", "cut", "rm", "mv"]) if names else "new"
        if kind == "new" or len(names) < 5:
            name = f"f{self.ops}"
            data = rng.randbytes(rng.randrange(0, 2 * MiB))
            with open(self.root / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            model[name] = data
        elif kind == "patch":
            name = rng.choice(names)
            old = model[name]
            at = rng.randrange(0, len(old) + 100_000)
            piece = rng.randbytes(rng.randrange(1, 600_000))
            fd = os.open(self.root / name, os.O_WRONLY)
            try:
                os.pwrite(fd, piece, at)
                os.fsync(fd)
            finally:
                os.close(fd)
            grown = old.ljust(at, b"\0")
            model[name] = grown[:at] + piece + grown[at + len(piece) :]
        elif kind == "cut":
            name = rng.choice(names)
            size = rng.randrange(0, len(model[name]) + 300_000)
            fd = os.open(self.root / name, os.O_WRONLY)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            model[name] = model[name][:size].ljust(size, b"\0")
        elif kind == "rm" and len(names) > 30:
            name = rng.choice(names)
            os.unlink(self.root / name)
            del model[name]
        elif kind == "mv":
            a, b = rng.choice(names), rng.choice(names + [f"m{self.ops}"])
            os.rename(self.root / a, self.root / b)
            model[b] = model.pop(a)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_twenty_rounds_of_kills_and_hangs_under_mixed_writes(cluster4, make_mount, tmp_path):
    c = cluster4
    m = make_mount(c)
    rng = random.Random(11_2026)
    writer = Writer(m.path, 7)
    writer.start()
    dirs = {i: c.data_dir(i) for i in range(4)}
    try:
        for round_ in range(ROUNDS):
            writer.go.set()
            victims = [p * 2 + rng.randrange(2) for p in range(2) if rng.random() < 0.7]
            victims = victims or [rng.randrange(4)]
            how = {v: rng.choice(["kill", "stop"]) for v in victims}
            time.sleep(rng.uniform(0.5, 1.5))
            for v in victims:
                if how[v] == "kill":
                    c.kill(v)
                else:
                    c.stop(v)
            time.sleep(rng.uniform(2.5, 4.0))  # writes go on without them
            states = c.states()
            for v in victims:
                assert states[v] != "alive" or how[v] == "stop", (round_, v, states)
                if rng.random() < 0.5:  # back on its own directory, as it left it
                    if how[v] == "stop":
                        c.servers[v].signal(signal.SIGCONT)
                    else:
                        c.start(v, dirs[v])
                else:  # back on an empty one: healed in full
                    old, dirs[v] = dirs[v], tmp_path / f"r{round_}-s{v}"
                    c.start(v, dirs[v])
                    shutil.rmtree(old, ignore_errors=True)
            assert wait_for(lambda: c.states() == ["alive"] * 4, 120), (round_, c.status())
            writer.pause()
            assert not writer.errors, (round_, writer.errors)
            found = sorted(p.name for p in m.path.iterdir())
            assert found == sorted(writer.model), round_
            for name, data in writer.model.items():
                got = (m.path / name).read_bytes()
                assert digest(got) == digest(data), f"round {round_}: {name} differs"
            res = cli("fsck", *c.args, "--deep")
            assert res.returncode == 0 and "clean" in res.stdout, (round_, res.stdout)
    finally:
        writer.stop = True
        writer.go.set()
        writer.join(30)
    assert writer.ops > 100  # the campaign did write under every fault
