"""The mount's faults across a LAN of network namespaces (tests/lan.py): four server
hosts and a client on a switch, real daemons, a real mount, lossy links. A server is
killed, cut off while it runs, the client is cut off from a whole pair, and servers run
with clocks years off; what was fsynced is read back by checksum after a remount, the
server cut off is shown failed while it is out and alive again once it is back."""

from __future__ import annotations

import datetime
import errno
import hashlib
import os
import signal
import threading

import pytest
from cryptography import x509
from helpers import cli, drop_caches, sha, wait_for
from lan import Site, Writer


@pytest.fixture
def make_site(tmp_path):
    made: list[Site] = []

    def make(**cluster_args) -> Site:
        site = Site(tmp_path, **cluster_args)
        made.append(site)
        site.cluster.format()
        return site

    yield make
    for site in made:
        site.close()


def test_lan_server_killed_during_writes(make_site):
    site = make_site()
    print(site.lan.shaping)  # what this kernel allowed (netem, or loss at the switch)
    assert "loss" in site.lan.shaping
    rows = site.rows()  # each server on its own host, listening on that host's address
    assert [r["address"] for r in rows] == [f"{site.cluster.host(i).addr}:7000" for i in range(4)]
    assert [r["pid"] for r in rows] == [s.pid for s in site.cluster.servers]
    m = site.mount()
    w = Writer(m.path, site.work, seed=1)
    try:
        assert w.wait_more(8)
        site.cluster.kill(1)
        assert w.wait_more(8)  # on its mirror alone
        assert wait_for(lambda: site.states()[1] == "failed", 20), site.states()
        assert site.states() == ["alive", "failed", "alive", "alive"]
        site.cluster.start(1)
        assert site.all_alive(), site.states()  # healed by the mount
        assert w.wait_more(4)
    finally:
        w.finish()
    assert not w.errors()
    site.verify(m, w.synced())


@pytest.mark.slow  # 15-25 s each: with the partition campaign, in tests/run.sh --slow
def test_lan_server_cut_off_during_writes_is_failed_then_heals(make_site):
    """Its cable pulled, not killed: the mount marks it failed within its timeout and
    writes on; status says failed (not alive, not stale) while it is out; once it is
    back the mount catches it up with what changed, and it is alive again."""
    site = make_site()
    m = site.mount()
    w = Writer(m.path, site.work, seed=2)
    try:
        assert w.wait_more(8)
        site.lan.cut("s2")
        assert w.wait_more(8)
        assert wait_for(lambda: site.states()[2] == "failed", 20), site.states()
        row = site.rows()[2]
        assert row["state"] == "failed" and row["pid"] is None, row  # seen failed, unreached
        assert site.cluster.servers[2].running  # it was only cut off
        text = site.cluster.cli("status").stdout
        assert f"server 2: {row['error']}" in text
        assert w.wait_more(8)
        site.lan.reconnect("s2")
        assert site.all_alive(), site.states()
        assert w.wait_more(4)
    finally:
        w.finish()
    assert not w.errors()
    log = m.log.read_text()
    assert "healing server 2 from server 3: what changed" in log, log[-2000:]
    site.verify(m, w.synced())


@pytest.mark.slow  # 15-25 s each: with the partition campaign, in tests/run.sh --slow
def test_lan_server_cut_off_while_the_mount_is_idle(make_site):
    """Nothing asked it yet: status, which asks every server itself, already says it
    cannot reach it (never alive); the first write that needs it marks it failed."""
    site = make_site()
    m = site.mount()
    (m.path / "first").write_bytes(os.urandom(3 << 20))
    site.lan.cut("s1")
    row = site.rows()[1]
    assert row["state"] == "unreachable" and "within" in row["error"], row
    data = os.urandom(3 << 20)  # three blocks: one on pair 0 at least
    with open(m.path / "second", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    assert site.states() == ["alive", "failed", "alive", "alive"]
    site.lan.reconnect("s1")
    assert site.all_alive(), site.states()
    site.verify(m, {"second": hashlib.sha256(data).hexdigest()})


@pytest.mark.slow  # 15-25 s each: with the partition campaign, in tests/run.sh --slow
def test_lan_client_cut_off_from_a_whole_pair(make_site):
    """The client loses both servers of pair 0 (they run on and see each other): their
    blocks fail with EIO at once, never a hang; metadata and new files go on, on pair 1;
    status says the pair's data is unavailable. Joined again, everything reads back with
    no remount, and the server the mount marked failed is healed."""
    site = make_site()
    m = site.mount()
    before = {f"b{i}": os.urandom(200_000 + i) for i in range(8)}  # one block each
    for name, data in before.items():
        with open(m.path / name, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    site.lan.separate("c", ["s0", "s1"])
    drop_caches()  # reads must reach the servers
    readable, eio = 0, 0
    for name, data in before.items():
        try:
            assert (m.path / name).read_bytes() == data
            readable += 1
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            eio += 1
    assert readable and eio, (readable, eio)  # files on pair 1 read, pair 0's fail
    after = {f"a{i}": os.urandom(150_000 + i) for i in range(6)}
    for name, data in after.items():  # placed on the pair that takes them
        with open(m.path / name, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    (m.path / "d").mkdir()
    text = site.cluster.cli("status").stdout
    assert "DATA UNAVAILABLE: mirror pair(s) [0] have no live server" in text, text
    states = site.states()
    assert states[2:] == ["alive", "alive"] and "alive" not in states[:2], states
    site.lan.join()
    assert site.all_alive(), site.states()
    drop_caches()
    for name, data in {**before, **after}.items():
        assert (m.path / name).read_bytes() == data, name
    synced = {name: sha(m.path / name) for name in {**before, **after}}
    site.verify(m, synced)


def test_lan_servers_with_clocks_years_off(make_site):
    """Server 1's clock three years ahead, server 2's three years behind, with TLS (their
    certificates dated by those clocks): the volume works on them alone, the servers
    killed heal from mirrors whose clocks are off, and status and fsck agree."""
    site = make_site(server_args=("--tls",), clocks={1: "+1100d", 2: "-1100d"})
    now = datetime.datetime.now(datetime.UTC)
    for i, sign in ((1, 1), (2, -1)):
        cert = x509.load_pem_x509_certificate((site.cluster.data_dir(i) / "tls.crt").read_bytes())
        skew = cert.not_valid_before_utc + datetime.timedelta(days=1) - now
        assert abs(skew.days - sign * 1100) <= 1, (i, skew)  # the server ran on its own clock
    m = site.mount()
    w = Writer(m.path, site.work, seed=4)
    try:
        assert w.wait_more(6)
        site.cluster.kill(0)  # pair 0 on the server from the future alone
        site.cluster.kill(3)  # pair 1 on the server from the past alone
        assert w.wait_more(6)
        assert wait_for(lambda: site.states() == ["failed", "alive", "alive", "failed"], 20)
        site.cluster.start(0)
        site.cluster.start(3)
        assert site.all_alive(), site.states()
        assert w.wait_more(4)
    finally:
        w.finish()
    assert not w.errors()
    site.verify(m, w.synced())


def test_format_waits_as_long_as_its_timeout_for_a_slow_server(make_cluster):
    """A server slower to answer than the default wait (stopped for 6 s here: a far or
    busy host) is formatted when --timeout allows it, as every other command does."""
    c = make_cluster(4, format_args=None)
    c.servers[0].signal(signal.SIGSTOP)
    cont = threading.Timer(6, c.servers[0].signal, (signal.SIGCONT,))
    cont.start()
    try:
        res = cli("format", *c.args, "--timeout", "15")
    finally:
        cont.cancel()
        c.servers[0].signal(signal.SIGCONT)
    assert res.returncode == 0, res.stderr
    assert [r["state"] for r in c.status()["rows"]] == ["alive"] * 4
