"""Pending writes (fs/pending.py) against a bytearray model of the file.

Random writes and truncations go both into a model (the file's bytes) and into
layers over a committed file; reading every block through the layers, the way
the file system does, must give the model's bytes at every step, and so must
the block contents a write-out sends.
"""

from __future__ import annotations

import random

import pytest

from mirrorfuse.fs.pending import DirtyBlock, Layer

BS = 64


def read_through(layers: list[Layer], committed: dict[int, bytes], idx: int, lo: int, hi: int):
    """Bytes [lo, hi) of block ``idx``: newest layer first, then what is committed."""
    for k in range(len(layers) - 1, -1, -1):
        blk = layers[k].dirty.get(idx)
        if blk is not None:
            if blk.covers(lo, hi):
                return bytes(blk.data[lo:hi])
            if layers[k].hides(idx):  # written after a truncation: zeros around it
                return bytes(blk.over(b"", lo, hi))
            below = read_through(layers[:k], committed, idx, lo, hi)
            return bytes(blk.over(below, lo, hi))
        if layers[k].hides(idx):
            return bytes(hi - lo)
    data = committed.get(idx, b"")[lo:hi]
    return data + bytes(hi - lo - len(data))


def content(layers: list[Layer], committed: dict[int, bytes], size: int) -> bytes:
    out = b""
    for idx in range(-(-size // BS)):
        hi = min(BS, size - idx * BS)
        out += read_through(layers, committed, idx, 0, hi)
    return out


def write_out(layer: Layer, committed: dict[int, bytes], size: int) -> dict[int, bytes]:
    """The committed blocks once ``layer`` went out (as files._send builds them)."""
    new = {i: b for i, b in committed.items() if not layer.hides(i)}
    for idx in layer.dirty:
        valid = min(BS, size - idx * BS)
        if valid > 0:
            new[idx] = read_through([layer], committed, idx, 0, valid)
    return {i: b for i, b in new.items() if i * BS < size}


@pytest.mark.parametrize("seed", range(100))
def test_layers_read_back_as_the_model_after_every_step(seed):
    rng = random.Random(seed)
    model = bytearray(rng.randbytes(rng.randrange(0, 5 * BS)))
    committed = {i // BS: bytes(model[i : i + BS]) for i in range(0, len(model), BS)}
    layers = [Layer()]
    for _ in range(60):
        op = rng.random()
        size = len(model)
        if op < 0.6:
            off = rng.randrange(0, 6 * BS)
            data = rng.randbytes(rng.randrange(1, 2 * BS))
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
            layers[-1].write(BS, off, data)
            layers[-1].size = len(model)
        elif op < 0.8:
            length = rng.randrange(0, 6 * BS)
            layers[-1].truncate(BS, size, length)
            layers[-1].size = length
            if length < len(model):
                del model[length:]
            else:
                model.extend(bytes(length - len(model)))
        elif op < 0.9:
            layers.append(Layer())  # a write-out starts: later writes go to a new layer
        elif len(layers) > 1:
            bottom = layers.pop(0)  # the oldest layer went out and is committed now
            size_then = bottom.size if bottom.size is not None else size
            committed = write_out(bottom, committed, size_then)
        assert content(layers, committed, len(model)) == bytes(model)


def test_spans_merge_and_cover():
    b = DirtyBlock()
    b.write(10, b"a" * 10)
    b.write(30, b"b" * 10)
    assert b.spans == [(10, 20), (30, 40)]
    assert b.covers(12, 18) and not b.covers(15, 35)
    b.write(20, b"c" * 10)
    assert b.spans == [(10, 40)] and b.covers(10, 40)
    b.cut(25)
    assert b.spans == [(10, 25)] and len(b.data) == 25
    assert bytes(b.over(b"z" * 40, 0, 30)) == b"z" * 10 + b"a" * 10 + b"c" * 5 + b"z" * 5


def test_memory_held_is_counted_as_it_grows_and_shrinks():
    layer = Layer()
    assert layer.write(BS, 0, b"x" * (3 * BS)) == 3 * BS
    assert layer.nbytes == 3 * BS
    layer.truncate(BS, 3 * BS, BS + 1)
    assert layer.nbytes == sum(b.nbytes for b in layer.dirty.values())
