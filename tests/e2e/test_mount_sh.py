"""./mount.sh as a user runs it (with its own data directory and ports, not the defaults)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from helpers import ServerProc, cli, free_base_port, mount_sh, wait_for

from mirrorfuse.client.keys import Keyring


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def test_mount_status_twice_and_unmount(local):
    mnt, args, base = local
    res = mount_sh(*args, str(mnt))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"created mountpoint {mnt}" in res.stdout and "formatted new volume" in res.stdout
    assert f"./mount.sh -u {mnt}" in res.stdout
    (mnt / "hello").write_text("hi")
    st = cli("status", "--json")  # no cluster named: the one behind the only mount
    assert st.returncode == 0, st.stderr
    rows = json.loads(st.stdout)["rows"]
    assert [r["address"] for r in rows] == [f"127.0.0.1:{base + i}" for i in range(4)]
    assert cli("status", str(mnt)).returncode == 0
    pids = [r["pid"] for r in rows]
    again = mount_sh(*args, str(mnt))
    assert again.returncode != 0 and "already mounted" in again.stderr
    assert "Traceback" not in again.stderr
    down = mount_sh("-u", str(mnt))
    assert down.returncode == 0 and "stopped 4 servers" in down.stdout, down.stderr
    assert wait_for(lambda: not any(alive(p) for p in pids), 20)
    logs = [(Path(args[1]) / f"server{i}.log").read_text() for i in range(4)]
    for text in logs:  # each says it started and stopped, and nothing went wrong on the way
        assert "listening on" in text and "stopped" in text and "Traceback" not in text, text
    up = mount_sh(*args, str(mnt))  # the same data comes back
    assert up.returncode == 0, up.stderr
    assert (mnt / "hello").read_text() == "hi"
    assert mount_sh("-u", str(mnt)).returncode == 0
    res = mount_sh("-u", str(mnt))
    assert res.returncode != 0 and "is not mounted" in res.stderr


def test_non_empty_mountpoint_and_missing_servers_are_clear_errors(local, tmp_path):
    mnt, args, _ = local
    mnt.mkdir()
    (mnt / "something").write_text("x")
    res = mount_sh(*args, str(mnt))
    assert res.returncode != 0 and "is not an empty directory" in res.stderr
    assert "Traceback" not in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    dead = free_base_port(4)
    servers = ",".join(f"127.0.0.1:{dead + i}" for i in range(4))
    res = mount_sh("--servers", servers, str(empty))
    assert res.returncode != 0 and "no server answers" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    res = mount_sh("--count", "5", *args, str(empty))
    assert res.returncode != 0 and "odd number" in res.stderr and "Traceback" not in res.stderr


def test_an_old_directory_brought_back_is_stale_never_alive(local, tmp_path):
    """The report: server 2 failed, came back on an empty directory and was healed;
    later ./mount.sh started it from its old directory, which lacked what was written
    meanwhile. It must not count alive: stale, healed in full, then its mirror may go."""
    mnt, args, base = local
    assert mount_sh(*args, str(mnt)).returncode == 0
    data = tmp_path / "data"
    (mnt / "before").write_bytes(os.urandom(3 << 20))
    rows = json.loads(cli("status", "--json").stdout)["rows"]
    os.kill(rows[2]["pid"], signal.SIGKILL)
    after = os.urandom(5 << 20)
    (mnt / "after").write_bytes(after)  # server 2 misses this
    assert json.loads(cli("status", "--json").stdout)["rows"][2]["state"] == "failed"
    spare = ServerProc(2, base + 2, tmp_path / "spare" / "2")  # an empty directory
    try:  # the mount heals it by itself, in full
        assert wait_for(lambda: cli("status", "--json").stdout.count('"alive"') == 4, 60)
        assert mount_sh("-u", str(mnt)).returncode == 0
    finally:
        spare.terminate()
    # a plain ./mount.sh: server 2 starts again from its old directory
    old = ident_of(data / "2")
    up = mount_sh(*args, str(mnt))
    assert up.returncode == 0, up.stderr
    first = json.loads(cli("status", "--json").stdout)["rows"]
    assert first[2]["state"] != "alive" or ident_of(data / "2") != old  # never alive as it was
    assert wait_for(lambda: cli("status", "--json").stdout.count('"alive"') == 4, 60)
    assert ident_of(data / "2") != old  # healed in full: formatted anew, not caught up
    os.kill(first[3]["pid"], signal.SIGKILL)  # which the README says is survivable
    assert (mnt / "after").read_bytes() == after
    assert mount_sh("-u", str(mnt)).returncode == 0


def ident_of(directory: Path) -> str:
    return json.loads((directory / "superblock.json").read_text())["ident"]


def test_mount_sh_with_tls_and_status_through_the_mount(local):
    mnt, args, base = local
    res = mount_sh(*args, "--tls", str(mnt))
    assert res.returncode == 0, res.stdout + res.stderr
    data = os.urandom(3 << 20)
    (mnt / "secret").write_bytes(data)
    st = cli("status", "--json")  # the mount's record says TLS
    assert st.returncode == 0, st.stderr
    assert [r["state"] for r in json.loads(st.stdout)["rows"]] == ["alive"] * 4
    plain = cli("status", "--base-port", str(base), "--count", "4")
    assert plain.returncode == 1 and "does it use --tls?" in plain.stdout + plain.stderr
    assert mount_sh("-u", str(mnt)).returncode == 0
    up = mount_sh("--data", args[1], str(mnt))  # the data directory remembers TLS
    assert up.returncode == 0, up.stderr
    assert (mnt / "secret").read_bytes() == data
    data_dir = Path(args[1])
    assert oct((data_dir / "0" / "tls.key").stat().st_mode & 0o777) == "0o600"
    assert oct((data_dir / "0" / "volume.key").stat().st_mode & 0o777) == "0o600"
    assert mount_sh("-u", str(mnt)).returncode == 0


def test_a_volume_from_before_keys_gets_one_from_mount_sh(local):
    mnt, args, base = local
    assert mount_sh(*args, str(mnt)).returncode == 0
    (mnt / "kept").write_text("from before keys")
    assert mount_sh("-u", str(mnt)).returncode == 0
    data_dir = Path(args[1])
    volume = json.loads((data_dir / "0" / "superblock.json").read_text())["volume"]
    for i in range(4):  # as the previous version left them
        (data_dir / str(i) / "volume.key").unlink()
    Keyring().path_for(volume).unlink()
    up = mount_sh(*args, str(mnt))
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"made a key for volume {volume}" in up.stdout
    assert (mnt / "kept").read_text() == "from before keys"
    assert mount_sh("-u", str(mnt)).returncode == 0
