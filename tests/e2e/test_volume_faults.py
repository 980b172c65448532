"""The mirrored volume against real servers that are killed, stopped and corrupted."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import threading
import time

import pytest
from helpers import cli, wait_for

from mirrorfuse.client.blocking import BlockingVolume
from mirrorfuse.client.heal import heal
from mirrorfuse.wire.errors import VolumeIOError

MiB = 1 << 20


def block_data(seed: int, block: int, size: int) -> bytes:
    return random.Random(seed * 1_000_003 + block).randbytes(size)


class Writer(threading.Thread):
    """Writes blocks 0..n-1 in batches, recording progress and a digest of what it wrote."""

    def __init__(self, vol: BlockingVolume, n: int, size: int, seed: int = 1, batch: int = 8):
        super().__init__(daemon=True)
        self.vol, self.n, self.size, self.seed, self.batch = vol, n, size, seed, batch
        self.done = 0
        self.sums: dict[int, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for start in range(0, self.n, self.batch):
                blocks = range(start, min(start + self.batch, self.n))
                items = [(b, block_data(self.seed, b, self.size)) for b in blocks]
                for b, s in zip(blocks, self.vol.write_many(items), strict=True):
                    self.sums[b] = s
                self.done = blocks[-1] + 1
        except BaseException as exc:  # reported by the test
            self.error = exc


def digest(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


@pytest.mark.parametrize("count", [4, 8])
def test_kill_one_server_of_each_pair_mid_write_loses_nothing(make_cluster, count):
    size = 256 << 10
    n = 200 * MiB // size
    c = make_cluster(count, format_args=("--block-size", "256K"))
    rng = random.Random(count)
    victims = [2 * p + rng.randrange(2) for p in range(count // 2)]
    with BlockingVolume(c.spec, timeout=2.0, writer="test") as vol:
        w = Writer(vol, n, size)
        w.start()
        assert wait_for(lambda: w.done >= n // 2 or w.error is not None, 120)
        for v in victims:
            c.kill(v)
        w.join(300)
        assert w.error is None and w.done == n
        back = vol.read_many(range(n), [w.sums[b] for b in range(n)])
        assert digest(back) == digest(block_data(1, b, size) for b in range(n))
        assert [i for i, s in enumerate(vol.volume.states) if s == "failed"] == victims
    # every later client knows: the failure table was persisted on the survivors
    st = c.status()
    assert [r["id"] for r in st["rows"] if r["state"] == "failed"] == victims
    assert all(r["state"] == "alive" for r in st["rows"] if r["id"] not in victims)
    with BlockingVolume(c.spec, timeout=2.0, writer="test") as fresh:
        assert list(fresh.volume.states) == [
            "failed" if i in victims else "alive" for i in range(count)
        ]
        assert digest(fresh.read_many(range(0, n, 7))) == digest(
            block_data(1, b, size) for b in range(0, n, 7)
        )


def test_a_stopped_server_is_marked_failed_within_the_timeout(cluster4):
    timeout = 1.0
    failed: list[tuple[int, float]] = []
    with BlockingVolume(cluster4.spec, timeout=timeout, writer="test") as vol:
        vol.volume.on_failure = lambda s, why: failed.append((s, time.monotonic()))
        vol.write_many((b, block_data(2, b, 4096)) for b in range(16))
        cluster4.stop(2)
        stopped_at = time.monotonic()
        sums = vol.write_many((b, block_data(3, b, 4096)) for b in range(16, 64))
        assert [s for s, _ in failed] == [2]
        # detection is bounded by the timeout (plus the watchdog's tick), not GlusterFS's 42 s
        assert failed[0][1] - stopped_at < 2 * timeout + 1.0
        back = vol.read_many(range(16, 64), sums)
        assert back == [block_data(3, b, 4096) for b in range(16, 64)]
        assert list(vol.volume.states) == ["alive", "alive", "failed", "alive"]
    states = cluster4.states()
    assert states == ["alive", "alive", "failed", "alive"]


def server_reads(cluster) -> list[int]:
    return [r["reads"] for r in cluster.status()["rows"]]


def test_reads_alternate_between_mirrors(cluster4):
    with BlockingVolume(cluster4.spec, writer="test") as vol:
        pair0 = [b for b in range(64) if b % 2 == 0]
        sums = vol.write_many((b, block_data(4, b, 4096)) for b in pair0)
        before = server_reads(cluster4)
        for i in range(1000):
            b = pair0[i % len(pair0)]
            assert vol.read(b, sums[pair0.index(b)]) == block_data(4, b, 4096)
        after = server_reads(cluster4)
    r0, r1 = after[0] - before[0], after[1] - before[1]
    assert r0 + r1 == 1000 and after[2:] == before[2:]
    assert abs(r0 - r1) <= 100, (r0, r1)


def corrupt(cluster, server: int, slot: int, block_size: int) -> None:
    path = cluster.data_dir(server) / "slots.dat"
    with open(path, "r+b") as f:
        f.seek(slot * block_size + 100)
        old = f.read(16)
        f.seek(slot * block_size + 100)
        f.write(bytes(b ^ 0xFF for b in old))


@pytest.mark.parametrize("use_block_map", [True, False])
def test_a_corrupted_copy_is_detected_and_repaired(make_cluster, use_block_map):
    c = make_cluster(4, format_args=("--block-size", "64K"))
    size = 64 << 10
    with BlockingVolume(c.spec, writer="test") as vol:
        data = block_data(5, 6, size)
        csum = vol.write(6, data)
        pair, slot, (a, b) = vol.volume.layout.place(6)
        corrupt(c, a, slot, size)
        expected = csum if use_block_map else None
        for _ in range(4):
            assert vol.run(vol.volume.read_from(6, expected))[0] == data
        assert vol.volume.stats.bad[a] == 1 and vol.volume.stats.repaired[a] == 1
        # after the repair both copies are good again and reads alternate once more
        served = {vol.run(vol.volume.read_from(6, expected))[1] for _ in range(4)}
        assert served == {a, b}
    raw = (c.data_dir(a) / "slots.dat").read_bytes()[slot * size : (slot + 1) * size]
    assert raw == data
    rows = c.status()["rows"]
    assert rows[a]["repairs"] == 1 and rows[b]["repairs"] == 0


def test_both_copies_damaged_is_eio_not_wrong_data(make_cluster):
    c = make_cluster(4, format_args=("--block-size", "64K"))
    with BlockingVolume(c.spec, writer="test") as vol:
        csum = vol.write(3, block_data(6, 3, 65536))
        _, slot, (a, b) = vol.volume.layout.place(3)
        corrupt(c, a, slot, 65536)
        corrupt(c, b, slot, 65536)
        with pytest.raises(VolumeIOError, match="every copy is damaged"):
            vol.read(3, csum)


def test_losing_both_mirrors_is_eio_without_hanging(cluster4):
    with BlockingVolume(cluster4.spec, timeout=1.0, writer="test") as vol:
        vol.write_many((b, block_data(7, b, 4096)) for b in range(8))
        cluster4.kill(0)
        cluster4.stop(1)
        t0 = time.monotonic()
        with pytest.raises(VolumeIOError, match="mirror pair 0"):
            vol.read(0)
        with pytest.raises(VolumeIOError, match="mirror pair 0"):
            vol.write(2, b"x")
        assert time.monotonic() - t0 < 15
        assert vol.read(1) == block_data(7, 1, 4096)  # pair 1 is untouched
        assert vol.volume.states[0] == "failed" and vol.volume.states[1] == "alive"


@pytest.mark.parametrize("replacement", ["empty", "old"])
def test_a_full_heal_under_load_then_lose_the_other_mirror(make_cluster, replacement):
    size = 64 << 10
    c = make_cluster(4, format_args=("--block-size", "64K"))
    latest: dict[int, bytes] = {}
    with BlockingVolume(c.spec, timeout=2.0, writer="test") as vol:

        def put(items):
            for (b, d), _ in zip(items, vol.write_many(items), strict=True):
                latest[b] = d

        put([(b, block_data(8, b, size)) for b in range(400)])
        c.kill(1)
        put([(b, block_data(9, b, size)) for b in range(200, 600)])
        assert vol.volume.states[1] == "failed"
        if replacement == "empty":
            c.start(1, c.root / "replacement1")
        else:
            c.start(1)

        stop = threading.Event()
        errors: list[BaseException] = []
        rounds = [0]

        def churn() -> None:
            rng = random.Random(10)
            seed = 100
            try:
                while not stop.is_set():
                    seed += 1
                    blocks = rng.sample(range(800), 16)
                    put([(b, block_data(seed, b, size)) for b in blocks])
                    for b in rng.sample(sorted(latest), 4):
                        assert vol.read(b) == latest[b]
                    rounds[0] += 1
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=churn, daemon=True)
        t.start()
        assert wait_for(lambda: rounds[0] >= 3, 30)
        before = rounds[0]
        # the heal runs beside the writer that holds the lease, as a mount's does
        copied = vol.run(heal(vol.volume, 1, full=True))
        during = rounds[0] - before
        stop.set()
        t.join(60)
        assert copied >= 300  # every block of pair 0 (and what the churn added)
        assert not errors, errors
        assert during > 0, "the load must run while the rebuild copies"
        assert vol.volume.states[1] == "alive" or wait_for(
            lambda: vol.volume.states[1] == "alive", 5
        )
        c.kill(0)
        blocks = sorted(latest)
        back = vol.read_many(blocks)
        assert [b for b, d in zip(blocks, back, strict=True) if d != latest[b]] == []
    states = c.states()
    assert states == ["failed", "alive", "alive", "alive"]


def test_status_json_lists_every_server(cluster4):
    res = cli("status", *cluster4.args, "--json")
    st = json.loads(res.stdout)
    assert [r["pid"] for r in st["rows"]] == [s.pid for s in cluster4.servers]
    assert [r["pair"] for r in st["rows"]] == [0, 0, 1, 1]
    assert st["pairs"] == 2 and st["servers"] == 4
    text = cli("status", *cluster4.args).stdout
    assert "ID  ADDRESS" in text and text.count("alive") == 4
    cluster4.servers[3].signal(signal.SIGKILL)
    cluster4.servers[3].proc.wait()
    st = cluster4.status()
    assert [r["state"] for r in st["rows"]] == ["alive", "alive", "alive", "unreachable"]


def test_a_hung_server_is_waited_for_once(cluster4):
    """SIGSTOP: its port still takes connections. Reads of every kind and writes after the
    first timeout go to the mirror at once; the server is failed, never reconnected to."""
    size = 64 << 10
    with BlockingVolume(cluster4.spec, timeout=1.0, writer="test") as vol:
        sums = vol.write_many((b, block_data(11, b, size)) for b in range(64))
        cluster4.stop(3)  # pair 1: blocks 1, 3, 5...
        back = vol.read_many(range(64), sums)  # both mirrors at once, as read-ahead does
        assert back == [block_data(11, b, size) for b in range(64)]
        for b in range(1, 64, 2):  # the path read-ahead takes: a chosen server first
            assert vol.run(vol.volume.read_via(b, sums[b], 3)) == block_data(11, b, size)
        vol.write_many((b, block_data(12, b, size)) for b in range(64, 128))
        assert vol.volume.cluster.hangs == [0, 0, 0, 1]
        assert vol.volume.states[3] == "failed"


def test_both_hung_servers_of_a_pair_are_eio_after_one_wait_each(cluster4):
    size = 64 << 10
    with BlockingVolume(cluster4.spec, timeout=1.0, writer="test") as vol:
        sums = vol.write_many((b, block_data(13, b, size)) for b in range(16))
        cluster4.stop(0)
        cluster4.stop(1)
        with pytest.raises(VolumeIOError, match="mirror pair 0"):
            vol.read_many(range(0, 16, 2), sums[0:16:2])
        with pytest.raises(VolumeIOError, match="mirror pair 0"):
            vol.write(2, b"x")
        assert vol.read_many(range(1, 16, 2), sums[1:16:2]) == [
            block_data(13, b, size) for b in range(1, 16, 2)
        ]
        assert vol.volume.cluster.hangs[:2] == [1, 1]
