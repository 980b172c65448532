"""Prometheus metrics of real servers and a real mount, scraped while work runs."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path

import pytest
from helpers import MOUNT, SERVER, Cluster, ServerProc, drop_caches, free_ports, run, sha, wait_for
from scrape import scrape, value

MiB = 1 << 20


class MetricsCluster(Cluster):
    """Servers that each serve /metrics on a port of their own (``mports[i]``)."""

    def __init__(self, root: Path, count: int) -> None:
        self.mports = free_ports(count)
        super().__init__(root, count)

    def _spawn(self, i: int, data: Path, wait: bool = True) -> ServerProc:
        extra = ("--metrics", f"127.0.0.1:{self.mports[i]}")
        return ServerProc(i, self.base + i, data, extra=extra, wait=wait)


@pytest.fixture
def mcluster(tmp_path):
    c = MetricsCluster(tmp_path / "cluster", 4)
    try:
        c.format()
        yield c
    finally:
        c.close()


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_counters_move_under_a_workload_and_a_heal(mcluster, make_mount, tmp_path):
    (mport,) = free_ports(1)
    m = make_mount(mcluster, "--metrics", f"127.0.0.1:{mport}")
    before = scrape(mport)
    data = os.urandom(8 * MiB)
    write_file(m.path / "a", data)

    got = scrape(mport)
    fuse_written = value(got, "mirrorfs_mount_fuse_request_bytes_total", op="write")
    assert fuse_written - value(
        before, "mirrorfs_mount_fuse_request_bytes_total", op="write"
    ) >= len(data)
    assert value(got, "mirrorfs_mount_fuse_requests_total", op="create") >= 1
    assert value(got, "mirrorfs_mount_fuse_requests_total", op="fsync") >= 1
    assert value(got, "mirrorfs_mount_fsync_seconds_count") >= 1
    # every block went to both servers of its pair
    sent = value(got, "mirrorfs_mount_server_request_bytes_total", op="write")
    assert sent >= 2 * len(data)
    assert value(got, "mirrorfs_mount_server_requests_total", op="write") >= 2 * 8
    assert value(got, "mirrorfs_mount_server_requests_total", op="sync") >= 4
    assert value(got, "mirrorfs_mount_journal_appends_total") >= 1
    assert value(got, "mirrorfs_mount_journal_records_total") >= 1

    servers = [scrape(p) for p in mcluster.mports]
    assert sum(value(s, "mirrorfs_server_written_bytes_total") for s in servers) >= 2 * len(data)
    for s in servers:  # 8 blocks striped over both pairs: every server took some
        assert value(s, "mirrorfs_server_requests_total", op="write") >= 1
        assert value(s, "mirrorfs_server_journal_appends_total") >= 1
        assert value(s, "mirrorfs_server_fsync_seconds_count") >= 1
        assert value(s, "mirrorfs_server_request_seconds_count", op="write") >= 1

    # a re-read the kernel cannot serve from its pages: the chunk cache serves it
    drop_caches()
    assert sha(m.path / "a") == sha_bytes(data)
    misses = value(scrape(mport), "mirrorfs_mount_cache_misses_total")
    hits = value(scrape(mport), "mirrorfs_mount_cache_hits_total")
    drop_caches()
    assert sha(m.path / "a") == sha_bytes(data)
    after = scrape(mport)
    assert value(after, "mirrorfs_mount_cache_hits_total") > hits
    assert value(after, "mirrorfs_mount_cache_misses_total") == misses
    assert value(after, "mirrorfs_mount_fuse_reply_bytes_total", op="read") >= 2 * len(data)

    # server 1 dies; what is written meanwhile is copied to it when it is back
    mcluster.kill(1)
    more = os.urandom(4 * MiB)
    write_file(m.path / "b", more)
    down = scrape(mport)
    assert value(down, "mirrorfs_mount_server_failures_total", server="1") == 1
    assert value(down, "mirrorfs_mount_server_state", server="1", state="failed") == 1
    assert value(scrape(mcluster.mports[0]), "mirrorfs_server_dirty_blocks") >= 1
    mcluster.start(1)
    assert wait_for(lambda: value(scrape(mport), "mirrorfs_mount_heals_total") >= 1, 60)
    healed = scrape(mport)
    assert value(healed, "mirrorfs_mount_server_state", server="1", state="alive") == 1
    assert value(healed, "mirrorfs_mount_heal_blocks_total") >= 1
    back = scrape(mcluster.mports[1])
    assert value(back, "mirrorfs_server_heal_copies_total") >= 1
    assert value(back, "mirrorfs_server_heals_begun_total") >= 1
    assert sha(m.path / "b") == sha_bytes(more)


def sha_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_bad_or_busy_metrics_address_is_one_line(cluster4, make_mount, tmp_path):
    (port,) = free_ports(1)
    res = run([SERVER, "--id", "0", "--port", str(port), "--data", str(tmp_path / "x"),
               "--metrics", "nonsense"])  # fmt: skip
    assert res.returncode == 2
    assert "metrics address 'nonsense' is not host:port" in res.stderr
    mnt = tmp_path / "mnt"
    res = run([sys.executable, "-m", "mirrorfuse.tools.up", "--metrics", "9100", str(mnt)])
    assert res.returncode == 2  # mount.sh: refused before anything starts
    assert "metrics address '9100' is not host:port" in res.stderr
    assert not mnt.exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        res = run([SERVER, "--id", "0", "--port", str(port), "--data", str(tmp_path / "x"),
                   "--metrics", f"127.0.0.1:{taken}"])  # fmt: skip
        assert res.returncode == 1
        assert res.stderr.strip().splitlines()[-1] == (
            f"mirrorfs-server: error: metrics port {taken} on 127.0.0.1 is in use"
        )
        assert "Traceback" not in res.stderr
        mnt.mkdir()
        res = run([MOUNT, *cluster4.args, str(mnt), "--metrics", f"127.0.0.1:{taken}"])
        assert res.returncode == 1
        assert res.stderr.strip() == (
            f"mirrorfs-mount: error: metrics port {taken} on 127.0.0.1 is in use"
        )
    assert not os.path.ismount(mnt)
    # nothing was left holding the volume: a mount now works
    m = make_mount(cluster4, path=mnt)
    (m.path / "x").write_bytes(b"ok")
    assert (m.path / "x").read_bytes() == b"ok"
