"""Bad input to mirrorfs-server and mirrorfs-cli: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
from helpers import CLI, SERVER, ServerProc, cli, free_base_port, run


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
