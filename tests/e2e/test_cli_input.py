"""Bad input to mirrorfs-server and mirrorfs-cli: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import CLI, MOUNT, SERVER, ServerProc, cli, free_base_port, run, sha, wait_for

from mirrorfuse.tools.cli import build_parser

INDEX = str(Path(SERVER).with_name("mirrorfs-index"))
PEER = str(Path(SERVER).with_name("mirrorfs-peer"))
NOHOST = "nosuchhost.invalid"  # .invalid never resolves (RFC 6761)


def assert_clean_failure(res, *fragments: str) -> None:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    for frag in fragments:
        assert frag in res.stderr, res.stderr


@pytest.mark.parametrize("port", ["80", "70000", "0", "abc"])
def test_server_refuses_ports_outside_range(tmp_path, port):
    res = run([SERVER, "--id", "0", "--port", port, "--data", str(tmp_path / "d")])
    assert_clean_failure(res, "--port")


def test_server_refuses_a_port_in_use(tmp_path):
    port = free_base_port(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        res = run([SERVER, "--id", "0", "--port", str(port), "--data", str(tmp_path / "d")])
    assert_clean_failure(res, f"port {port} on 127.0.0.1 is already in use")


def test_server_prints_ready_and_exits_0_on_sigterm(tmp_path):
    port = free_base_port(1)
    srv = ServerProc(0, port, tmp_path / "d")
    assert f"listening on 127.0.0.1:{port}" in srv.ready_line
    assert f"pid {srv.pid}" in srv.ready_line
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=10) == 0


def test_server_refuses_data_dir_of_another_server_or_volume(make_cluster):
    c = make_cluster(4)
    vol = c.status()["volume"]
    c.kill(1)
    port = free_base_port(1)
    res = run([SERVER, "--id", "2", "--port", str(port), "--data", str(c.data_dir(1))])
    assert_clean_failure(res, "belongs to server 1", vol)
    res = run(
        [
            SERVER,
            "--id",
            "1",
            "--port",
            str(port),
            "--data",
            str(c.data_dir(1)),
            "--volume",
            "not-this-one",
        ]
    )
    assert_clean_failure(res, f"belongs to volume {vol}, not not-this-one")


def test_server_refuses_a_data_dir_in_use(cluster4):
    port = free_base_port(1)
    res = run([SERVER, "--id", "0", "--port", str(port), "--data", str(cluster4.data_dir(0))])
    assert_clean_failure(res, "in use by another mirrorfs-server", str(cluster4.servers[0].pid))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--base-port", "7000", "--count", "3"], "odd number"),
        (["--base-port", "7000", "--count", "2"], "between 4 and 16"),
        (["--base-port", "7000", "--count", "18"], "between 4 and 16"),
        (["--base-port", "80", "--count", "4"], "outside 1024-65535"),
        (["--base-port", "7000"], "--base-port needs --count"),
        ([], "no cluster named"),
        (["--servers", "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"], "odd number"),
        (["--servers", "localhost"], "not host:port"),
    ],
)
@pytest.mark.parametrize("command", ["status", "format", "rebuild"])
def test_cli_refuses_bad_cluster_names(command, args, fragment):
    extra = ["0"] if command == "rebuild" else []
    assert_clean_failure(cli(command, *args, *extra), fragment)


def test_cli_reports_servers_that_are_not_there():
    base = free_base_port(4)
    res = cli("format", "--base-port", str(base), "--count", "4")
    assert_clean_failure(res, "cannot format", f"server 0 (127.0.0.1:{base}) is not reachable")
    res = cli("status", "--base-port", str(base), "--count", "4")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stdout.count("unreachable") == 4
    res = cli("rebuild", "--base-port", str(base), "--count", "4", "1")
    assert_clean_failure(res, "no server of the cluster is reachable")


@pytest.mark.parametrize(
    "size, fragment",
    [
        ("3K", "power of two from 4K to 4M"),
        ("8M", "power of two from 4K to 4M"),
        ("100000", "power of two"),
        ("lots", "'lots' is not a size"),
    ],
)
def test_format_refuses_bad_block_sizes(make_cluster, size, fragment):
    c = make_cluster(4, format_args=None)
    assert_clean_failure(cli("format", *c.args, "--block-size", size), fragment)
    assert c.status()["volume"] is None


def test_format_twice_needs_force(make_cluster):
    c = make_cluster(4, format_args=("--block-size", "64K"))
    first = c.status()["volume"]
    res = cli("format", *c.args)
    assert_clean_failure(res, "already hold volume", first, "--force")
    assert c.status()["volume"] == first
    res = cli("format", *c.args, "--force")
    assert res.returncode == 0, res.stderr
    assert c.status()["volume"] != first


def test_servers_named_out_of_order_are_refused(make_cluster):
    c = make_cluster(4, format_args=None)
    addrs = [f"127.0.0.1:{c.base + i}" for i in (1, 0, 2, 3)]
    res = cli("format", "--servers", ",".join(addrs))
    assert_clean_failure(res, "is server 1, expected server 0")


def test_rebuild_of_a_live_server_is_refused(cluster4):
    res = cli("rebuild", *cluster4.args, "1")
    assert_clean_failure(res, "server 1 is alive")
    res = cli("rebuild", *cluster4.args, "9")
    assert_clean_failure(res, "there is no server 9")


def test_help_is_not_an_error():
    assert run([CLI, "--help"]).returncode == 0
    assert run([SERVER, "--help"]).returncode == 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["10.0.0.1", "55555"], "is not a multicast address"),
        (["235.1.1.1", "80"], "outside 1024-65535"),
        (["nonsense", "55555"], "is not an IPv4 address"),
        (["235.1.1.1", "55555", "--log-keep", "0"], "--log-keep must be at least 1"),
        (["127.0.0.1", "55555", "--replicas", "foo:bar"], "port 'bar' is not a number"),
    ],
)
def test_index_replica_refuses_bad_arguments(args, fragment):
    assert_clean_failure(run([str(Path(SERVER).with_name("mirrorfs-index")), *args]), fragment)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--index", "nonsense"], "is not GROUP:PORT"),
        (["--index", "235.1.1.1:5555", "--interval", "0"], "outside 0.2-3600"),
        (["--index", "235.1.1.1:5555", "--peers", "127.0.0.1:x"], "is not HOST:PORT"),
        (["--index", "235.1.1.1:5555", "--port", "80"], "outside 1024-65535"),
        (["--index", "235.1.1.1:5555", "--replicas", "x"], "--replicas 'x' is not host:port"),
    ],
)
def test_peer_refuses_bad_arguments(tmp_path, args, fragment):
    peer = str(Path(SERVER).with_name("mirrorfs-peer"))
    assert_clean_failure(run([peer, "--share", str(tmp_path), *args]), fragment)
    res = run([peer, "--share", str(tmp_path / "missing"), "--index", "235.1.1.1:5555"])
    assert_clean_failure(res, "is not a directory")


def test_index_cli_refuses_misplaced_flags():
    res = cli("index", "235.1.1.1", "55555", "files", "--name", "x")
    assert_clean_failure(res, "--name goes with share")
    res = cli("index", "235.1.1.1", "55555", "peers", "-o", "x")
    assert_clean_failure(res, "-o goes with fetch")


def four_servers(first: str) -> str:
    return ",".join([first, "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (
            [INDEX, "127.0.0.1", "55555", "--replicas", f"{NOHOST}:9000,127.0.0.1:9001"],
            "--replicas",
        ),
        ([INDEX, "235.1.1.1", "55555", "--host", NOHOST], "--host"),
        ([PEER, "--index", f"{NOHOST}:5555"], "--index"),
        ([PEER, "--index", "235.1.1.1:5555", "--replicas", f"{NOHOST}:9000"], "--replicas"),
        ([PEER, "--index", "235.1.1.1:5555", "--peers", f"{NOHOST}:9000"], "--peers"),
        ([CLI, "status", "--servers", four_servers(f"{NOHOST}:7000")], "--servers"),
        ([CLI, "format", "--base-port", "7000", "--count", "4", "--host", NOHOST], "--host"),
        ([MOUNT, "--servers", four_servers(f"{NOHOST}:7000"), "/nonexistent"], "--servers"),
        ([CLI, "index", "notanip", "55555", "status"], "index group"),
        ([CLI, "index-shell", "notanip", "55555"], "index group"),
        (
            [CLI, "index", "235.1.1.1", "55555", "--replicas", f"{NOHOST}:1234", "peers"],
            "--replicas",
        ),
        ([CLI, "index", "235.1.1.1", "55555", "--peer", f"{NOHOST}:1234", "files"], "--peer"),
        ([CLI, "download", "-o", "/tmp/x", "-a", NOHOST, "-p", "7001"], "-a"),
        ([CLI, "serve-file", "-i", "1", "-f", "/etc/hostname", "-a", NOHOST, "-p", "7001"], "-a"),
    ],
    ids=lambda v: f"{Path(v[0]).name} {v[1]}" if isinstance(v, list) else v,
)
def test_a_host_that_does_not_resolve_is_named(tmp_path, argv, fragment):
    if argv[0] == PEER:
        argv = [*argv, "--share", str(tmp_path)]
    res = run(argv, timeout=60, stdin=subprocess.DEVNULL)
    host = "notanip" if "notanip" in argv else NOHOST
    assert_clean_failure(res, f"error: {fragment}: cannot resolve host {host!r}")
    assert len(res.stderr.splitlines()[-1]) < 200, res.stderr  # one line, not a dump


def test_peer_refuses_an_index_port_out_of_range(tmp_path):
    res = run([PEER, "--share", str(tmp_path), "--index", "235.1.1.1:99999"])
    assert_clean_failure(res, "--index port 99999 is outside 1024-65535")


def cli_commands_with(option: str) -> list[str]:
    """Every mirrorfs-cli command that takes ``option``."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(name for name, p in sub.choices.items() if option in p._option_string_actions)


@pytest.mark.parametrize(
    "command",
    [[CLI, c] for c in cli_commands_with("--timeout")] + [[MOUNT, "/nonexistent"]],
    ids=lambda command: f"{Path(command[0]).name} {command[1]}",
)
def test_timeouts_are_positive_finite_seconds(command):
    values = ["nan", "-1", "inf", "0"]
    with ThreadPoolExecutor(len(values)) as pool:  # four processes at once: each is a start-up
        results = pool.map(
            lambda v: run([*command, "--timeout", v], stdin=subprocess.DEVNULL), values
        )
    for value, res in zip(values, results, strict=True):
        assert res.returncode == 2, res.stdout
        assert "Traceback" not in res.stderr, res.stderr
        assert f"error: argument --timeout: {value!r} is not a " in res.stderr, res.stderr
        assert "number of seconds" in res.stderr.splitlines()[-1]


def test_every_timeout_was_checked():
    assert {"status", "format", "fsck", "heal", "rebuild", "get", "shell"} <= set(
        cli_commands_with("--timeout")
    )


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0"])
@pytest.mark.parametrize("command", cli_commands_with("--rate"))
def test_rates_are_positive_finite(command, value):
    assert command == "serve-file"
    res = cli(command, "-i", "1", "-f", "/etc/hostname", "-p", "7001", "--rate", value)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"error: argument --rate: {value!r} is not a positive number of MiB/s" in res.stderr


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("console", ["/dev/null", "a file", "closed"])
def test_serve_file_whose_console_ends_keeps_serving(tmp_path, console):
    """Standard input at its end (< /dev/null, a file of commands, or closed): the
    servers go on until a signal, idle, and say that the console is closed."""
    served = tmp_path / "served.bin"
    served.write_bytes(os.urandom(300_000))
    commands = tmp_path / "commands"
    commands.write_text("1\nr1\nbogus\n")
    port = free_base_port(1)
    stdin = open(commands if console == "a file" else os.devnull, "rb")  # noqa: SIM115
    cmd = [CLI, "serve-file", "-i", "0.2", "-f", str(served), "-p", str(port)]
    proc = subprocess.Popen(
        cmd,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: os.close(0)) if console == "closed" else None,
    )
    stdin.close()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        closed = "console closed (end of input): serving until interrupted or terminated\n"
        assert wait_for(lambda: closed in lines or proc.poll() is not None, 60), lines
        assert proc.poll() is None, (proc.returncode, lines, proc.stderr.read())
        if console == "a file":  # its commands were carried out first
            assert "server 1 paused\n" in lines and "server 1 resumed\n" in lines, lines
            assert lines.index("server 1 resumed\n") < lines.index(closed)
        cpu, start = cpu_seconds(proc.pid), time.monotonic()
        res = cli("download", "-o", str(tmp_path / "copy"), "-p", str(port))
        assert res.returncode == 0, res.stdout + res.stderr
        assert sha(tmp_path / "copy") == sha(served)
        reports = len(lines)
        assert wait_for(lambda: len(lines) >= reports + 3, 30), lines  # still reporting
        assert cpu_seconds(proc.pid) - cpu < (time.monotonic() - start) / 2  # idle, no spin
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
