"""Healing: a failed server coming back gets only what changed while it was out (noted by
its mirror, across the mirror's restarts); any other directory gets everything; a mount
heals by itself; status shows how far a heal is."""

from __future__ import annotations

import os
import random
import time

import pytest
from helpers import cli, wait_for

from mirrorfuse.client.blocking import BlockingVolume, run_async
from mirrorfuse.client.connection import request_once
from mirrorfuse.client.heal import heal
from mirrorfuse.client.keys import Keyring
from mirrorfuse.tools import admin
from mirrorfuse.wire.errors import MirrorfsError, ServerError
from mirrorfuse.wire.messages import HealBegin, MetaInfo, Stat

SIZE = 64 << 10


def data(seed: int, block: int) -> bytes:
    return random.Random(seed * 7919 + block).randbytes(SIZE)


@pytest.fixture
def c64k(make_cluster):
    return make_cluster(4, format_args=("--block-size", "64K"))


def written_while_out(c64k, restart_mirror: bool = False) -> tuple[BlockingVolume, dict]:
    """200 blocks, server 1 killed, blocks 0..49 written again (25 on pair 0), server 1
    back on its own directory; returns the volume and what each block should hold."""
    vol = BlockingVolume(c64k.spec, timeout=2.0, writer="test")
    want = {b: data(1, b) for b in range(200)}
    vol.write_many(want.items())
    c64k.kill(1)
    again = {b: data(2, b) for b in range(50)}
    vol.write_many(again.items())
    want.update(again)
    assert vol.volume.states[1] == "failed"
    if restart_mirror:  # what it noted survives its own restart
        c64k.kill(0)
        c64k.start(0)
    c64k.start(1)
    return vol, want


def test_a_server_back_with_its_own_directory_gets_only_what_changed(c64k):
    vol, want = written_while_out(c64k)
    with vol:
        rows = admin_rows(c64k)
        assert rows[0]["dirty"] == 25 and "25 blocks changed while server 1 was out" in (
            admin.format_status(run_async(admin.status(c64k.spec)))
        )
        assert vol.run(heal(vol.volume, 1)) == 25
        assert list(vol.volume.states) == ["alive"] * 4
        c64k.kill(0)  # all of pair 0 from server 1 now
        assert vol.read_many(sorted(want)) == [want[b] for b in sorted(want)]
    assert admin_rows(c64k)[1]["dirty"] == 0


def test_the_noted_changes_survive_a_restart_of_the_mirror(c64k):
    vol, want = written_while_out(c64k, restart_mirror=True)
    with vol:
        assert vol.run(heal(vol.volume, 1)) == 25
        c64k.kill(0)
        assert vol.read_many(sorted(want)) == [want[b] for b in sorted(want)]


def test_an_empty_directory_gets_everything(c64k, tmp_path):
    vol = BlockingVolume(c64k.spec, timeout=2.0, writer="test")
    with vol:
        want = {b: data(3, b) for b in range(100)}
        vol.write_many(want.items())
        c64k.kill(1)
        c64k.start(1, tmp_path / "empty")
        assert vol.run(heal(vol.volume, 1)) == 50  # every block of pair 0
        c64k.kill(0)
        assert vol.read_many(sorted(want)) == [want[b] for b in sorted(want)]


def test_a_second_healer_is_refused_while_the_first_is_at_work(c64k):
    addr = c64k.spec.addresses[1]
    run_async(request_once(addr, HealBegin(healer="first", total=10), 5.0, keys=Keyring()))
    with pytest.raises(ServerError) as err:
        run_async(request_once(addr, HealBegin(healer="second", total=10), 5.0, keys=Keyring()))
    assert err.value.code == "HEALING" and "being healed by another client" in str(err.value)


def test_status_shows_a_heal_in_progress(c64k):
    vol = BlockingVolume(c64k.spec, timeout=2.0, writer="test")
    with vol:
        vol.write_many((b, data(4, b)) for b in range(200))
        c64k.kill(1)
        vol.write_many((b, data(5, b)) for b in range(3000))  # 1500 to copy on pair 0
        c64k.start(1)
        job = vol.submit(heal(vol.volume, 1, concurrency=1))
        seen = []
        while not job.done():
            text = admin.format_status(run_async(admin.status(c64k.spec)))
            if "healing " in text:
                seen.append(text)
            time.sleep(0.05)
        assert job.result() == 1500
    assert seen, "the heal was never seen in progress"
    assert "% " in seen[-1] and "server 1: healing, " in seen[-1] and " of 1500 blocks" in seen[-1]


def test_heal_from_the_command_line_when_nothing_is_mounted(c64k):
    vol, _ = written_while_out(c64k)
    vol.close()
    res = cli("heal", *c64k.args)
    assert res.returncode == 0, res.stderr
    assert "healing server 1 from server 0: what changed, 25 blocks" in res.stdout
    assert "server 1 healed: 25 blocks copied" in res.stdout
    res = cli("heal", *c64k.args)
    assert res.returncode == 0 and "every server is alive" in res.stdout


def test_a_mount_heals_a_returning_server_by_itself(c64k, make_mount):
    m = make_mount(c64k)
    (m.path / "a").write_bytes(os.urandom(3 << 20))
    c64k.kill(3)
    later = os.urandom(5 << 20)
    (m.path / "b").write_bytes(later)  # server 3 misses this
    assert wait_for(lambda: admin_rows(c64k)[3]["state"] == "failed", 10)
    res = cli("heal", *c64k.args)  # one healer at a time: the mount's
    assert res.returncode == 1 and "the mount heals servers that come back by itself" in (
        res.stderr
    )
    c64k.start(3)
    n = 0

    def healed_while_writing() -> bool:  # changes go on during the heal, as they would
        nonlocal n
        n += 1
        (m.path / f"during{n}").write_bytes(b"x" * 5000)
        return [r["state"] for r in admin_rows(c64k)] == ["alive"] * 4

    assert wait_for(healed_while_writing, 30)
    # its metadata too, although nothing changed since: it could carry the volume alone
    assert wait_for(lambda: journal_end(c64k, 3) == journal_end(c64k, 2), 5)
    c64k.kill(2)
    assert (m.path / "b").read_bytes() == later


def test_a_heal_from_the_command_line_brings_the_metadata_too(c64k, make_mount):
    m = make_mount(c64k)
    (m.path / "a").write_bytes(b"a" * 1000)
    c64k.kill(1)
    for i in range(20):
        (m.path / f"n{i}").write_bytes(b"x")  # journal batches server 1 misses
    m.close()
    c64k.start(1)
    res = cli("heal", *c64k.args)
    assert res.returncode == 0, res.stderr
    assert journal_end(c64k, 1) == journal_end(c64k, 0)


def test_a_full_heal_cut_short_is_finished_in_full(c64k, tmp_path):
    vol = BlockingVolume(c64k.spec, timeout=1.0, writer="test")
    with vol:
        want = {b: data(9, b) for b in range(3000)}
        vol.write_many(want.items())
        c64k.kill(1)
        empty = tmp_path / "empty"
        c64k.start(1, empty)
        job = vol.submit(heal(vol.volume, 1, concurrency=1))
        assert wait_for(lambda: heal_done(c64k, 1) > 0, 30)
        c64k.kill(1)
        with pytest.raises(MirrorfsError):
            job.result()
        c64k.start(1, empty)  # its half-filled directory: it must not pass as caught up
        assert vol.run(heal(vol.volume, 1)) == 1500
        c64k.kill(0)
        assert vol.read_many(sorted(want)) == [want[b] for b in sorted(want)]


def test_a_target_restarted_during_its_heal_is_healed_again_whole(c64k):
    vol = BlockingVolume(c64k.spec, timeout=1.0, writer="test")
    with vol:
        want = {b: data(10, b) for b in range(200)}
        vol.write_many(want.items())
        c64k.kill(1)
        again = {b: data(11, b) for b in range(3000)}
        vol.write_many(again.items())
        want.update(again)
        c64k.start(1)
        job = vol.submit(heal(vol.volume, 1, concurrency=1))
        assert wait_for(lambda: heal_done(c64k, 1) > 0, 30)
        c64k.kill(1)
        c64k.start(1)
        vol.write_many((b, want[b]) for b in range(0, 40, 2))  # written during it all
        with pytest.raises(MirrorfsError):
            job.result()
        assert vol.run(heal(vol.volume, 1)) == 1500  # what its mirror noted is all still there
        c64k.kill(0)
        assert vol.read_many(sorted(want)) == [want[b] for b in sorted(want)]


def heal_done(cluster, server: int) -> int:
    try:
        return run_async(
            request_once(cluster.spec.addresses[server], Stat(), 2.0, keys=Keyring())
        ).body.heal_done
    except MirrorfsError:
        return 0


def journal_end(cluster, server: int) -> tuple[int, int]:
    info = run_async(
        request_once(cluster.spec.addresses[server], MetaInfo(), 2.0, keys=Keyring())
    ).body
    return info.checkpoint_seq, info.last_seq


def test_a_server_that_is_not_back_cannot_be_healed(c64k):
    with BlockingVolume(c64k.spec, timeout=1.0, writer="test") as vol:
        vol.write_many((b, data(6, b)) for b in range(10))
        c64k.kill(1)
        vol.write_many((b, data(7, b)) for b in range(10))
        with pytest.raises(MirrorfsError, match=r"cannot heal: server 1 .* \(start it first\)"):
            vol.run(heal(vol.volume, 1))


def admin_rows(cluster) -> list[dict]:
    return run_async(admin.status(cluster.spec))["rows"]


def test_an_empty_directory_no_client_noticed_is_shown_stale_and_healed_in_full(c64k, tmp_path):
    with BlockingVolume(c64k.spec, timeout=2.0, writer="test") as vol:
        want = {b: data(8, b) for b in range(40)}
        vol.write_many(want.items())
    c64k.kill(1)
    c64k.start(1, tmp_path / "empty")
    res = cli("status", *c64k.args)
    assert "server 1: holds an empty data directory; it will be healed in full" in res.stdout
    assert [r["state"] for r in admin_rows(c64k)] == ["alive", "stale", "alive", "alive"]
    res = cli("heal", *c64k.args)
    assert res.returncode == 0, res.stderr
    assert "healing server 1 from server 0: everything, 20 blocks" in res.stdout
    c64k.kill(0)
    with BlockingVolume(c64k.spec, timeout=2.0, writer="test") as vol:
        assert vol.read_many(sorted(want)) == [want[b] for b in sorted(want)]


def test_a_server_that_hung_is_healed_as_soon_as_it_is_back(c64k):
    with BlockingVolume(c64k.spec, timeout=3.0, writer="test") as vol:
        want = {b: data(12, b) for b in range(20)}
        vol.write_many(want.items())
        c64k.stop(1)  # SIGSTOP: silent until the timeout
        again = {b: data(13, b) for b in range(20)}
        vol.write_many(again.items())
        want.update(again)
        assert vol.volume.cluster.hung.keys() == {1}
        c64k.start(1)  # restarted at once: healed before a probe found it back
        assert vol.run(heal(vol.volume, 1)) == 10
        c64k.kill(0)
        assert vol.read_many(sorted(want)) == [want[b] for b in sorted(want)]
