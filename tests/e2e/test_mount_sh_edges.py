"""The rough edges a new user hit with ./mount.sh and mirrorfs-cli, each as the user hit it:
the exact message and exit status, and nothing left behind (mountpoints, servers, mounts)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import REPO, cli, free_base_port, mount_sh, run, sha, wait_for

from mirrorfuse.tools import registry
from mirrorfuse.tools.spawn import running_server


def clean_failure(res: subprocess.CompletedProcess[str], message: str) -> None:
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert f"error: {message}" in res.stderr, res.stderr


def servers_of(data: Path) -> dict[int, int]:
    """Server id -> pid of every mirrorfs-server running on a directory under ``data``."""
    found = {}
    for entry in os.listdir("/proc"):
        server = running_server(int(entry)) if entry.isdigit() else None
        if server is not None and server.data.is_relative_to(data.resolve()):
            found[server.id] = int(entry)
    return found


def states() -> list[str]:
    res = cli("status", "--json")
    assert res.returncode == 0, res.stderr
    return [r["state"] for r in json.loads(res.stdout)["rows"]]


def check_data(mnt: Path, name: str = "f") -> None:
    """A file written through the mount now reads back the same."""
    data = os.urandom(3 << 20)
    with open(mnt / name, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    assert sha(mnt / name) == hashlib.sha256(data).hexdigest()


def test_bad_arguments_are_named_and_leave_nothing_behind(local, tmp_path):
    mnt, args, base = local
    data = Path(args[1]).resolve()
    cases = [
        (["--data", "/etc/passwd"], "--data /etc/passwd is not a directory"),
        (["--data", str(data), "--base-port", "0"], "base port 0 is outside 1024-65535"),
        (["--data", str(data), "--base-port", "99999"], "base port 99999 is outside 1024-65535"),
        ([*args, "--count", "5"], "5 servers is an odd number"),
        ([*args, "--block-size", "3K"], "block size 3072 must be a power of two"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:  # each is a start-up; none creates anything
        results = list(pool.map(lambda c: mount_sh(*c[0], str(mnt)), cases))
    for (_, message), res in zip(cases, results, strict=True):
        assert res.returncode == 2, res.stderr
        assert f"mount.sh: error: {message}" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert not mnt.exists() and not data.exists()
    # a data directory that holds a cluster: a bad value is named as such, not as a mismatch
    data.mkdir()
    (data / "cluster.json").write_text(json.dumps({"count": 4, "base_port": base, "tls": False}))
    cases = [
        (["--count", "5"], "odd number"),
        (["--base-port", "99999"], "base port 99999 is outside 1024-65535"),
        (["--count", "6"], f"{data} holds a cluster of 4 servers on base port {base}"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:  # each is a start-up; none creates anything
        results = list(pool.map(lambda c: mount_sh("--data", str(data), *c[0], str(mnt)), cases))
    for (_, message), res in zip(cases, results, strict=True):
        assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not mnt.exists()
    # a run that fails later still removes the mountpoint it created (and only that)
    dead = free_base_port(4)
    servers = ",".join(f"127.0.0.1:{dead + i}" for i in range(4))
    res = mount_sh("--servers", servers, str(mnt))
    clean_failure(res, "no server answers")
    assert f"created mountpoint {mnt}" in res.stdout and not mnt.exists()
    mnt.mkdir()
    res = mount_sh("--servers", servers, str(mnt))
    clean_failure(res, "no server answers")
    assert mnt.is_dir()  # the user's own directory stays
    assert servers_of(data) == {}


def test_a_closed_output_stops_nothing_and_a_killed_mount_is_mounted_again(local):
    """`./mount.sh ... | head -1` stopped all four servers while the mount went on (EIO);
    ./mount.sh after the mount process was killed ended in FileExistsError."""
    mnt, args, _ = local
    data = Path(args[1]).resolve()
    line = f"set -o pipefail; {REPO}/mount.sh {' '.join(args)} {mnt} | head -1"
    res = run(["bash", "-c", line], timeout=180)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"created mountpoint {mnt}\n"
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert registry.is_mounted(str(mnt))
    assert sorted(servers_of(data)) == [0, 1, 2, 3]
    check_data(mnt, "kept")
    kept = sha(mnt / "kept")
    assert states() == ["alive"] * 4
    os.kill(registry.read(str(mnt))["mount_pid"], signal.SIGKILL)
    assert wait_for(lambda: registry.is_disconnected(str(mnt)), 30)
    again = mount_sh(*args, str(mnt))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"cleared the mount at {mnt}: its mount process had ended" in again.stdout
    assert "4 servers on" in again.stdout and "(already running)" in again.stdout
    assert sha(mnt / "kept") == kept
    down = mount_sh("-u", str(mnt))  # the servers of the first run are stopped too
    assert down.returncode == 0 and "stopped 4 servers" in down.stdout, down.stdout + down.stderr
    assert wait_for(lambda: servers_of(data) == {}, 20)
    for i in range(4):  # every server stopped cleanly: nothing printed into a closed pipe
        log = (data / f"server{i}.log").read_text()
        assert "stopped" in log and "Traceback" not in log, log


def test_start_brings_a_server_back_that_unmount_stops(local, tmp_path):
    """The tour killed server 1 and started it by hand; -u then stopped 3 of 4."""
    mnt, args, base = local
    data = Path(args[1]).resolve()
    assert mount_sh(*args, str(mnt)).returncode == 0
    check_data(mnt)
    os.kill(servers_of(data)[1], signal.SIGKILL)
    check_data(mnt, "while-out")  # server 1 misses this
    assert wait_for(lambda: servers_of(data).keys() == {0, 2, 3}, 10)
    res = cli("start", "1")
    assert res.returncode == 0, res.stderr
    pid = servers_of(data)[1]
    assert res.stdout == (
        f"started server 1 on 127.0.0.1:{base + 1} (pid {pid}, log {data}/server1.log); "
        f"the mount heals it by itself; ./mount.sh -u {mnt} stops it\n"
    )
    assert wait_for(lambda: states() == ["alive"] * 4, 60)
    res = cli("start", "1")
    clean_failure(res, f"server 1 is already running (pid {pid})")
    res = cli("start", "7", str(mnt))
    assert res.returncode == 1 and "error: there is no server 7 (servers are 0-3)" in res.stderr
    assert res.stderr.startswith("usage: mirrorfs-cli start")
    # a port of the cluster in use with another --data: refused, not reused
    other = tmp_path / "other"
    res = mount_sh("--data", str(other), "--base-port", str(base), str(tmp_path / "m2"))
    assert res.returncode == 1, res.stdout
    assert (
        f"error: port {base} is taken by server 0 of another data directory ({data}/0): "
        f"choose another --base-port, or --data {data}"
    ) in res.stderr
    assert not (tmp_path / "m2").exists() and not other.exists()
    # the status names this mount's own log, which tells of the heal
    status = cli("status", str(mnt))
    log = registry.mount_log(str(mnt))
    mount_pid = registry.read(str(mnt))["mount_pid"]
    assert f"mounted at {mnt} (pid {mount_pid}), log {log}\n" in status.stdout
    text = log.read_text()
    assert "server 1 healed" in text, text
    assert "Ignoring invalid max threads" not in text, text
    assert not (registry.state_dir() / "mount.log").exists()
    down = mount_sh("-u", str(mnt))
    assert down.returncode == 0 and "stopped 4 servers" in down.stdout, down.stdout
    assert wait_for(lambda: servers_of(data) == {}, 20)
    res = cli("start", "1")
    assert res.returncode == 1 and "error: no mirrorfs mount on this machine" in res.stderr


def test_every_cluster_command_takes_the_mountpoint(local, cluster4, make_mount):
    """With two mounts, `rebuild 1` and `fsck --deep` failed although `status` took one."""
    mnt, args, base = local
    assert mount_sh(*args, str(mnt)).returncode == 0
    other = make_mount(cluster4, name="other")
    mnt = Path(os.path.realpath(mnt))
    commands = (["fsck", "--deep"], ["rebuild", "1"], ["status"], ["heal"], ["start", "1"])
    with ThreadPoolExecutor(len(commands)) as pool:
        results = list(pool.map(lambda argv: cli(*argv), commands))
    for argv, res in zip(commands, results, strict=True):
        assert res.returncode == 1, res.stdout
        assert res.stderr.startswith(f"usage: mirrorfs-cli {argv[0]} "), res.stderr
        assert (
            f"mirrorfs-cli {argv[0]}: error: several mirrorfs mounts ("
            in res.stderr.splitlines()[-1]
        )
        assert str(mnt) in res.stderr and str(other.path) in res.stderr
    for how in ([str(mnt)], ["--mount", str(mnt)]):
        res = cli("fsck", "--deep", *how)
        assert res.returncode == 0 and "fsck (namespace and every copy" in res.stdout, res.stderr
        st = json.loads(cli("status", "--json", *how).stdout)
        assert st["rows"][0]["address"] == f"127.0.0.1:{base}"
        assert st["mount"]["mountpoint"] == str(mnt)
        res = cli("rebuild", "1", *how)  # it reaches the volume, which the mount heals itself
        clean_failure(res, "the volume is mounted")
    res = cli("heal", str(other.path))
    clean_failure(res, "the volume is mounted")
    st = json.loads(cli("status", "--json", "--mount", str(other.path)).stdout)
    assert st["rows"][0]["address"] == f"127.0.0.1:{cluster4.base}"
    assert st["mount"]["log"] == str(registry.mount_log(str(other.path)))
    assert st["mount"]["log"] != str(registry.mount_log(str(mnt)))
    res = cli("start", "1", str(other.path))
    clean_failure(res, f"{other.path} was not mounted by ./mount.sh with servers of its own")
    res = cli("status", str(mnt), "--mount", str(other.path))
    assert res.returncode == 1 and "two mountpoints given" in res.stderr
    assert mount_sh("-u", str(mnt)).returncode == 0


def test_an_older_python_is_named_before_anything_is_installed(tmp_path):
    """mount.sh on a machine whose python3 is too old: one line, no virtualenv made."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(
        '#!/bin/sh\n[ "$1" = -V ] && { echo "Python 3.10.12"; exit 0; }\nexit 1\n'
    )
    (fake / "python3").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "MIRRORFS_VENV": str(tmp_path / "v"),
    }
    script = f"cd {REPO} && source mirrorfuse/tools/bootstrap.sh && bootstrap_venv ''"
    res = run(["bash", "-c", script], env=env)
    assert res.returncode == 1
    assert res.stderr == "mirrorfs needs Python 3.11 or newer; python3 is Python 3.10.12\n"
    assert not (tmp_path / "v").exists()
