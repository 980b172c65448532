"""A real mount and an in-memory model side by side, driven by a seeded random sequence of
write, read, truncate up and down, mmap store, fsync, close and reopen on files of up to
8 MiB over several blocks. Every read is compared with the model, and after a remount every
file is compared whole. A short run by default; 100,000 operations with --slow."""

from __future__ import annotations

import mmap
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

MiB = 1 << 20
MAX = 8 * MiB
BLOCK = 256 << 10  # several blocks per file, and writes across their edges


class Model:
    """What POSIX says the files hold: one byte string per file, shared by its handles."""

    def __init__(self) -> None:
        self.data: dict[str, bytearray] = {}

    def write(self, name: str, off: int, buf: bytes) -> None:
        d = self.data[name]
        if off > len(d):
            d.extend(bytes(off - len(d)))
        d[off : off + len(buf)] = buf

    def truncate(self, name: str, size: int) -> None:
        d = self.data[name]
        if size < len(d):
            del d[size:]
        else:
            d.extend(bytes(size - len(d)))


class Driver:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.model = Model()
        self.fds: dict[str, list[int]] = {}
        self.log: list[str] = []  # the last operations, shown when a check fails

    def say(self, what: str) -> None:
        self.log = [*self.log[-30:], what]

    def check(self, ok: bool, what: Callable[[], str]) -> None:
        assert ok, f"{what()}; last operations:\n  " + "\n  ".join(self.log)

    def offset(self, name: str) -> int:
        size = len(self.model.data[name])
        r = self.rng.random()
        if r < 0.3:  # at or around a block edge
            edge = self.rng.randrange(0, MAX // BLOCK + 1) * BLOCK
            return max(0, min(MAX - 1, edge + self.rng.randint(-3, 3)))
        if r < 0.5 and size:
            return self.rng.randrange(size)
        return self.rng.randrange(MAX)

    def fd(self, name: str) -> int:
        if not self.fds.get(name):
            self.fds.setdefault(name, []).append(os.open(self.root / name, os.O_RDWR))
        return self.rng.choice(self.fds[name])

    def step(self) -> None:
        rng = self.rng
        if not self.model.data or rng.random() < 0.03:
            name = f"f{rng.randrange(4)}"
            if name not in self.model.data:
                fd = os.open(self.root / name, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
                self.fds.setdefault(name, []).append(fd)
                self.model.data[name] = bytearray()
                self.say(f"create {name}")
            return
        name = rng.choice(sorted(self.model.data))
        op = rng.choices(
            ["write", "read", "shrink", "grow", "mmap", "fsync", "close", "open"],
            [30, 30, 8, 8, 6, 5, 6, 7],
        )[0]
        size = len(self.model.data[name])
        if op == "write":
            off = self.offset(name)
            n = min(rng.choice([1, 100, 4096, BLOCK, 3 * BLOCK // 2, 2 * MiB]), MAX - off)
            buf = rng.randbytes(n)
            self.say(f"pwrite {name} {off}+{n}")
            self.check(os.pwrite(self.fd(name), buf, off) == n, lambda: "short write")
            self.model.write(name, off, buf)
        elif op == "read":
            off = self.offset(name)
            n = rng.choice([1, 4096, BLOCK, 3 * MiB])
            self.say(f"pread {name} {off}+{n}")
            got = os.pread(self.fd(name), n, off)
            want = bytes(self.model.data[name][off : off + n])
            self.check(got == want, lambda: f"pread {name} {off}+{n}: {diff(got, want)}")
        elif op in ("shrink", "grow"):
            new = rng.randrange(0, size + 1) if op == "shrink" else rng.randrange(size, MAX + 1)
            self.say(f"ftruncate {name} {new} (was {size})")
            os.ftruncate(self.fd(name), new)
            self.model.truncate(name, new)
        elif op == "mmap" and size:
            off = rng.randrange(size)
            n = min(rng.choice([1, 10, 5000]), size - off)
            buf = rng.randbytes(n)
            self.say(f"mmap store {name} {off}+{n}")
            with mmap.mmap(self.fd(name), size) as m:
                m[off : off + n] = buf
                m.flush()
            self.model.write(name, off, buf)
        elif op == "fsync":
            self.say(f"fsync {name}")
            os.fsync(self.fd(name))
        elif op == "close" and self.fds.get(name):
            self.say(f"close {name}")
            os.close(self.fds[name].pop(rng.randrange(len(self.fds[name]))))
        elif op == "open":
            self.say(f"open {name}")
            self.fds.setdefault(name, []).append(os.open(self.root / name, os.O_RDWR))

    def close_all(self) -> None:
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)
        self.fds.clear()

    def compare_all(self, root: Path) -> None:
        for name, want in self.model.data.items():
            got = (root / name).read_bytes()
            self.check(got == want, lambda n=name, g=got, w=want: f"{n}: {diff(g, bytes(w))}")


def diff(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"{len(got)} bytes, the model has {len(want)}"
    first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    return f"first difference at byte {first} (block {first // BLOCK})"


def run_model(cluster, make_mount, seed: int, steps: int) -> None:
    m = make_mount(cluster)
    drv = Driver(m.path, seed)
    try:
        for _ in range(steps):
            drv.step()
    finally:
        drv.close_all()
    m.close()
    again = make_mount(cluster, name="again")  # what reached the servers, nothing cached
    drv.compare_all(again.path)


@pytest.fixture
def cluster256k(make_cluster):
    return make_cluster(4, format_args=("--block-size", "256K"))


@pytest.mark.parametrize("seed", [1, 2])
def test_a_mount_agrees_with_the_model(cluster256k, make_mount, seed):
    run_model(cluster256k, make_mount, seed, 600)


def test_shrinking_an_open_file_then_growing_it_reads_zeros(cluster256k, make_mount):
    """The case of the report: whole blocks past the cut come back as zeros."""
    m = make_mount(cluster256k)
    p = m.path / "f"
    fd = os.open(p, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"A" * 3 * MiB, 0)
        os.fsync(fd)
        os.ftruncate(fd, 100)
        os.ftruncate(fd, 3 * MiB)
        assert os.pread(fd, 4096, 2 * MiB) == bytes(4096)
        with mmap.mmap(fd, 3 * MiB) as mm:  # one byte stored in that window
            mm[2 * MiB] = 0x42
        os.fsync(fd)
    finally:
        os.close(fd)
    want = b"A" * 100 + bytes(2 * MiB - 100) + b"\x42" + bytes(MiB - 1)
    assert p.read_bytes() == want
    m.close()
    assert (make_mount(cluster256k, name="again").path / "f").read_bytes() == want


@pytest.mark.slow
def test_a_mount_agrees_with_the_model_for_100000_operations(cluster256k, make_mount):
    run_model(cluster256k, make_mount, 2026, 100_000)
