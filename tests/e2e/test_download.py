"""serve-file, download and get with real processes: pauses, deaths, resume, HTTP mirrors."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import cli, free_base_port, free_ports, sha, wait_for

CLI = str(Path(sys.executable).parent / "mirrorfs-cli")
MiB = 1 << 20


def make_file(path: Path, mib: int) -> Path:
    chunk = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        for i in range(mib // 16):
            f.write(bytes([i % 256]) + chunk[1:])
    return path


class FileServers:
    """mirrorfs-cli serve-file as a process, with its console on a pipe."""

    def __init__(self, path: Path, ports: list[int], rate: float | None = None) -> None:
        cmd = [
            CLI,
            "serve-file",
            "-i",
            "0.5",
            "-f",
            str(path),
            "-n",
            str(len(ports)),
            "-a",
            "127.0.0.1",
            "-p",
            *map(str, ports),
        ]
        if rate:
            cmd += ["--rate", str(rate)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert wait_for(lambda: any("serving" in line for line in self.lines), 60), self.lines

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def console(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def servers_factory():
    made: list[FileServers] = []

    def make(*args, **kw) -> FileServers:
        s = FileServers(*args, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()


def download(out: Path, ports: list[int], *extra: str) -> subprocess.Popen:
    cmd = [CLI, "download", "-i", "0.3", "-o", str(out), "-a", "127.0.0.1"]
    if ports:
        cmd += ["-p", *map(str, ports)]
    return subprocess.Popen(
        [*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def resume(out: Path, ports: list[int]) -> subprocess.CompletedProcess[str]:
    """download -r of ``out`` from the servers on ``ports``, to its end."""
    cmd = [CLI, "download", "-o", str(out), "-a", "127.0.0.1", "-p", *map(str, ports), "-r"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def killed_download(out: Path, ports: list[int], after: int) -> None:
    """A download SIGKILLed once its saved state holds ``after`` bytes."""
    dl = download(out, ports)
    assert wait_for(lambda: partial_size(out) >= after, 60)
    dl.send_signal(signal.SIGKILL)
    dl.wait(10)


def saved_segments(out: Path) -> list[tuple[int, int]]:
    """(start, length) of the segments the saved state says are done."""
    state = out.with_name(out.name + ".mfs-state")
    if not state.exists():
        return []
    st = json.loads(state.read_text())
    bits = base64.b64decode(st["done"])
    each = st["segment_size"]
    done = [i for i in range(st["segments"]) if bits[i // 8] >> (i % 8) & 1]
    return [(i * each, min(each, st["size"] - i * each)) for i in done]


def partial_size(out: Path) -> int:
    """Bytes the saved state says are done."""
    return sum(length for _, length in saved_segments(out))


def sent_per_server(srv: FileServers, after: int) -> list[int]:
    """Bytes each server has sent, from serve-file's first status line after line ``after``
    (to 0.1 KiB or MiB: as it prints them)."""
    units = {"B": 1, "KiB": 1 << 10, "MiB": MiB}

    def status() -> str | None:
        return next((x for x in srv.lines[after:] if x.startswith("server 1 (")), None)

    assert wait_for(lambda: status() is not None, 10), srv.lines
    sent = re.findall(r"([\d.]+) (B|KiB|MiB) sent", status() or "")
    return [round(float(n) * units[u]) for n, u in sent]


def test_kill_one_pause_another_and_still_get_every_byte(tmp_path, servers_factory):
    src = make_file(tmp_path / "src.bin", 256)
    ports = free_ports(4)
    srv = servers_factory(src, ports, rate=30)
    out = tmp_path / "out.bin"
    dl = download(out, ports)
    assert wait_for(lambda: partial_size(out) >= 32 * MiB, 60)
    srv.console("2")  # pause server 2
    srv.console("3")
    srv.console("e3")  # end server 3 (paused first, as seed 003 wants)
    time.sleep(1.0)
    srv.console("r2")
    text, _ = dl.communicate(timeout=120)
    assert dl.returncode == 0, text
    assert sha(out) == sha(src)
    assert "saved" in text and "(verified)" in text
    assert f"127.0.0.1:{ports[1]} is paused" in text
    assert f"127.0.0.1:{ports[1]} resumed" in text
    assert f"127.0.0.1:{ports[2]} failed" in text and "divided among" in text
    assert any("server 2 paused" in line for line in srv.lines)
    assert any("server 3 ended" in line for line in srv.lines)
    assert not out.with_name("out.bin.mfs-state").exists()


def test_all_servers_die_then_resume_fetches_only_the_rest(tmp_path, servers_factory):
    src = make_file(tmp_path / "src.bin", 256)
    ports = free_ports(3)
    srv = servers_factory(src, ports, rate=25)
    out = tmp_path / "out.bin"
    dl = download(out, ports)
    assert wait_for(lambda: partial_size(out) >= 48 * MiB, 60)
    srv.kill()
    text, _ = dl.communicate(timeout=120)
    assert dl.returncode == 1, text
    assert "Run again with -r" in text and not out.exists()
    have = partial_size(out)
    assert 0 < have < 256 * MiB
    count = len(saved_segments(out))
    servers_factory(src, ports)
    res = resume(out, ports)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{count} already here" in res.stdout
    assert sha(out) == sha(src)
    assert not out.with_name("out.bin.mfs-state").exists()  # a finished resume leaves none
    assert not out.with_name("out.bin.mfs-partial").exists()


def test_a_small_file_from_four_servers_is_sent_once_and_shared(tmp_path, servers_factory):
    """Issue 13: 2 MiB from 4 servers were 2 segments of 1 MiB, raced by every idle
    worker: 8 MiB sent, and no faster than from one server."""
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(2 * MiB))
    ports = free_ports(4)
    srv = servers_factory(src, ports, rate=1)  # 1 MiB/s each: 2 s from one, 0.5 s from 4
    out = tmp_path / "out.bin"
    dl = download(out, ports)
    text, _ = dl.communicate(timeout=60)
    assert dl.returncode == 0, text
    assert sha(out) == sha(src)
    assert "in 32 segments of 64.0 KiB from 4 source(s)" in text
    sent = sent_per_server(srv, len(srv.lines))
    assert len(sent) == 4, srv.lines[-1]
    assert 2 * MiB <= sum(sent) <= 2 * MiB + 256 * 1024, sent  # each byte once, or nearly
    assert all(n >= 256 * 1024 for n in sent), sent  # every server did its share


def test_resume_from_fewer_servers_keeps_the_segments_it_started_with(tmp_path, servers_factory):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(8 * MiB))
    ports = free_ports(4)
    srv = servers_factory(src, ports, rate=1)
    out = tmp_path / "out.bin"
    killed_download(out, ports, 1 * MiB)
    count = len(saved_segments(out))
    srv.kill()
    servers_factory(src, ports[:1])  # from one server, 8 MiB would be cut in 1 MiB segments
    res = resume(out, ports[:1])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"in 32 segments of 256.0 KiB from 1 source(s), {count} already here" in res.stdout
    assert sha(out) == sha(src)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A plain static file server that also answers Range requests (as nginx does)."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().do_GET()
        start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        size = path.stat().st_size
        end = min(end, size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def http_server(root: Path, handler=RangeHandler):
    class Handler(handler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_mixed_http_mirrors_and_mirrorfs_servers(tmp_path, servers_factory):
    src = make_file(tmp_path / "src.bin", 64)
    ports = free_ports(2)
    servers_factory(src, ports)
    good = http_server(tmp_path)
    plain = http_server(tmp_path, http.server.SimpleHTTPRequestHandler)  # no Range support
    try:
        out = tmp_path / "out.bin"
        url = f"http://127.0.0.1:{good.server_address[1]}/src.bin"
        bad = f"http://127.0.0.1:{plain.server_address[1]}/src.bin"
        res = subprocess.run(
            [
                CLI,
                "download",
                "-i",
                "5",
                "-o",
                str(out),
                "-a",
                "127.0.0.1",
                "-p",
                *map(str, ports),
                url,
                bad,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert sha(out) == sha(src) and "(verified)" in res.stdout
        assert "does not serve byte ranges" in res.stdout
        only_http = tmp_path / "http.bin"
        res = subprocess.run(
            [CLI, "download", "-o", str(only_http), url, url + "?mirror=2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0 and sha(only_http) == sha(src), res.stdout + res.stderr
        assert "no checksum to verify against" in res.stdout
    finally:
        good.shutdown()
        plain.shutdown()


def test_get_reads_a_volume_file_through_every_server_even_when_one_dies(
    cluster4, make_mount, tmp_path
):
    m = make_mount(cluster4)
    src = make_file(tmp_path / "src.bin", 512)
    subprocess.run(["cp", str(src), str(m.path / "big")], check=True)
    with open(m.path / "sparse", "wb") as f:
        f.seek(5 * MiB)
        f.write(b"end")
    out = tmp_path / "got.bin"
    proc = subprocess.Popen(
        [CLI, "get", *cluster4.args, "/big", "-o", str(out), "-i", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    part = out.with_name("got.bin.mfs-partial")
    wait_for(lambda: part.exists(), 30, 0.005)
    cluster4.kill(1)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert sha(out) == sha(src)
    assert "from 4 source(s)" in text  # both mirrors of both pairs share the work
    # killed while the transfer ran: its blocks were taken over by its mirror
    assert f"server 1 (127.0.0.1:{cluster4.base + 1}) failed" in text, text
    res = cli("get", *cluster4.args, "/sparse", "-o", str(tmp_path / "sparse"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "sparse").read_bytes() == bytes(5 * MiB) + b"end"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["serve-file", "-i", "1", "-f", "/nonexistent", "-p", "7001"], "does not exist"),
        (["serve-file", "-i", "1", "-f", "/etc/hostname", "-p", "80"], "outside 1024-65535"),
        (
            ["serve-file", "-i", "1", "-f", "/etc/hostname", "-n", "3", "-p", "7001", "7002"],
            "-n 3 but 2 ports",
        ),
        (["download", "-o", "/tmp/x"], "give the servers"),
        (["download", "-o", "/tmp/x", "-p", "99999"], "outside 1024-65535"),
        (["download", "-o", "/tmp/x", "ftp://mirror/file"], "is not an http:// URL"),
        (["download", "-o", "/nonexistent/dir/x", "-p", "7001"], "does not exist"),
        (["download", "-o", "/tmp/x", "-n", "2", "-p", "7001"], "-n 2 does not match the 1"),
        (
            ["download", "-o", "/tmp/x", "-n", "2", "-p", "7001", "7001"],
            "port 7001 is listed twice",
        ),
    ],
)
def test_bad_input_is_one_clear_line(args, fragment):
    res = cli(*args)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert fragment in res.stderr, res.stderr


def test_download_into_a_directory_saves_under_the_served_name(tmp_path, servers_factory):
    src = make_file(tmp_path / "served.bin", 16)
    ports = free_ports(2)
    servers_factory(src, ports)
    into = tmp_path / "into"
    into.mkdir()
    dl = download(into, ports)
    out, _ = dl.communicate(timeout=120)
    assert dl.returncode == 0, out
    assert sha(into / "served.bin") == sha(src)
    assert sorted(p.name for p in into.iterdir()) == ["served.bin"]  # no partial left
    assert "Traceback" not in out


def test_download_from_servers_that_are_not_there(tmp_path):
    port = free_base_port(1)
    res = cli("download", "-o", str(tmp_path / "x"), "-p", str(port))
    assert res.returncode == 1 and "no source answers" in res.stderr, res.stderr
    res = cli("download", "-o", str(tmp_path / "x"), "-p", str(port), "-r")
    assert res.returncode == 1 and "Traceback" not in res.stderr


def test_get_of_a_missing_path_or_directory(cluster4, make_mount):
    m = make_mount(cluster4)
    (m.path / "d").mkdir()
    os.sync()
    time.sleep(0.5)  # let the journal commit the mkdir
    res = cli("get", *cluster4.args, "/nope", "-o", "/tmp/x")
    assert res.returncode != 0 and "no such file in the volume" in res.stderr
    res = cli("get", *cluster4.args, "/d", "-o", "/tmp/x")
    assert res.returncode != 0 and "is a directory" in res.stderr


def test_resume_state_survives_a_sigkill_of_the_client(tmp_path, servers_factory):
    src = make_file(tmp_path / "src.bin", 256)
    ports = free_ports(4)
    servers_factory(src, ports, rate=25)
    out = tmp_path / "out.bin"
    killed_download(out, ports, 64 * MiB)
    have = partial_size(out)
    assert 0 < have < 256 * MiB and not out.exists()
    res = resume(out, ports)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already here" in res.stdout and sha(out) == sha(src)


def test_a_damaged_download_fails_its_checksum_and_is_not_renamed(tmp_path, servers_factory):
    src = make_file(tmp_path / "src.bin", 128)
    ports = free_ports(2)
    servers_factory(src, ports, rate=20)
    out = tmp_path / "out.bin"
    killed_download(out, ports, 32 * MiB)
    part = out.with_name("out.bin.mfs-partial")
    with open(part, "r+b") as f:  # a segment already marked done goes bad on disk
        f.seek(1000)
        f.write(b"\xff" * 64)
    res = resume(out, ports)
    assert res.returncode == 1 and "does not match its checksum" in res.stderr, res.stderr
    assert not out.exists() and part.exists()
