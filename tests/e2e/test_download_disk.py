"""A download whose disk fills: one clear line, exit 1, no source blamed, what arrived kept."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import free_ports, sha
from test_download import CLI, FileServers, http_server, make_file


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (root mounts it; unmounted after)."""
    where = tmp_path / "small"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(where)])
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture
def file_servers(tmp_path):
    """serve-file of a 64 MiB file on two ports, ended after the test."""
    src = make_file(tmp_path / "src.bin", 64)
    ports = free_ports(2)
    srv = FileServers(src, ports)
    yield src, ports
    srv.kill()


def download(out: Path, sources: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "download", "-i", "3600", "-o", str(out), *sources],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("via", ["protocol", "http"])
def test_a_full_disk_stops_the_download_with_one_clear_line(
    tmp_path, file_servers, small_disk, via, request
):
    src, ports = file_servers
    out = small_disk / "big.bin"
    if via == "protocol":
        sources = ["-p", *map(str, ports)]
    else:
        srv = http_server(tmp_path)
        request.addfinalizer(srv.shutdown)
        sources = [f"http://127.0.0.1:{srv.server_address[1]}/src.bin"]
    res = download(out, sources)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert "No space left on device" in res.stderr, res.stderr
    assert "failed (" not in res.stdout  # the disk's fault: no source is blamed
    assert not out.exists()
    assert Path(str(out) + ".mfs-partial").exists()  # what arrived is kept
    # the disk is full to the last page: not even the small state could be saved
    assert not Path(str(out) + ".mfs-state").exists()
    assert "Start again without -r" in res.stderr, res.stderr
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    again = download(out, sources)
    assert again.returncode == 0, again.stdout + again.stderr
    assert sha(out) == sha(src)
    assert not Path(str(out) + ".mfs-partial").exists()
