"""A partition campaign across the LAN (long): rounds of random cuts and heals while a
writer fsyncs file after file, from a seeded generator (the seed is printed, and
MIRRORFS_LAN_SEED repeats a run). Each round takes out at most one server of each pair,
in one of three ways (its cable pulled, the client alone cut off from it, killed), holds
a few seconds, then brings it back; nothing fsynced is lost, every cut-off server is
shown failed while out and alive once healed, and fsck is clean at the end."""

from __future__ import annotations

import os
import random
import time

import pytest
from helpers import wait_for
from lan import Site, Writer

ROUNDS = 12


def _failed(site: Site, servers: list[int]) -> bool:
    states = site.states()
    return all(states[s] == "failed" for s in servers)


@pytest.mark.slow
def test_lan_partition_campaign(tmp_path):
    seed = int(os.environ.get("MIRRORFS_LAN_SEED") or random.randrange(1 << 30))
    print(f"MIRRORFS_LAN_SEED={seed}")
    rng = random.Random(seed)
    site = Site(tmp_path)
    try:
        site.cluster.format()
        m = site.mount()
        w = Writer(m.path, site.work, seed=seed % 1000, most=20000, secs=900)
        try:
            assert w.wait_more(5)
            for rnd in range(ROUNDS):
                one_each = [rng.choice((2 * p, 2 * p + 1)) for p in range(2)]
                out = sorted(rng.sample(one_each, rng.choice((1, 2))))
                how = {s: rng.choice(("cut", "separate", "kill")) for s in out}
                separated = [f"s{s}" for s in out if how[s] == "separate"]
                for s in out:
                    if how[s] == "cut":
                        site.lan.cut(f"s{s}")
                    elif how[s] == "kill":
                        site.cluster.kill(s)
                if separated:
                    site.lan.separate("c", separated)
                time.sleep(rng.uniform(1, 6))
                assert w.wait_more(3), f"round {rnd}: writes stopped with {how} out"
                assert wait_for(lambda out=out: _failed(site, out), 30), (
                    f"round {rnd} {how}: {site.states()}"
                )
                for s in out:
                    if how[s] == "cut":
                        site.lan.reconnect(f"s{s}")
                    elif how[s] == "kill":
                        site.cluster.start(s)
                if separated:
                    site.lan.join()
                assert site.all_alive(90), f"round {rnd} {how}: {site.states()}"
        finally:
            w.finish()
        assert not w.errors(), w.errors()[:5]
        print(f"{len(w.synced())} files fsynced over {ROUNDS} rounds; {site.lan.shaping}")
        site.verify(m, w.synced())
    finally:
        site.close()
