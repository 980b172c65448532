"""contrib/: the systemd units parse and start the installed commands with options they take,
and mount(8) mounts a volume through the helper (mount -t fuse.mirrorfs, and an fstab line)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import Cluster, free_ports, run, sha, wait_for

from mirrorfuse.tools import fstab
from mirrorfuse.tools import index as index_tool
from mirrorfuse.tools import peer as peer_tool
from mirrorfuse.tools import server as server_tool
from mirrorfuse.tools.registry import pid_alive
from mirrorfuse.wire.auth import KEY_NAME

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib"
BIN = Path(sys.executable).parent
UNITS = ["mirrorfs-server@.service", "mirrorfs-index.service", "mirrorfs-peer.service"]
INSTALLED_BIN = "/usr/local/bin/"  # where the units expect the commands (README)
HELPER = Path("/sbin/mount.fuse.mirrorfs")
UTAB = Path("/run/mount/utab")
MiB = 1 << 20


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as systemd reads it: sections of keys, a key may repeat."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line and not line.endswith("\\"), raw
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def defaults(service: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        for word in shlex.split(line):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def expand(command: str, env: dict[str, str], instance: str) -> list[str]:
    """ExecStart's words as systemd passes them: %i, %H; ${VAR} in a word, $VAR split."""
    command = command.replace("%i", instance).replace("%H", "host1")
    words: list[str] = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$[A-Za-z_]+", word):
            words += env[word[1:]].split()  # KeyError: a variable without a default
        else:
            words.append(re.sub(r"\$\{([A-Za-z_]+)\}", lambda m: env[m.group(1)], word))
    return words


def example_settings(name: str) -> dict[str, str]:
    """The commented settings of an example environment file (``#VAR=value``)."""
    out = {}
    for line in (CONTRIB / name).read_text().splitlines():
        m = re.fullmatch(r"#([A-Z_]+)=(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def scripts() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_starts_an_installed_command_with_options_it_takes(unit, tmp_path):
    u = read_unit(CONTRIB / unit)
    service = u["Service"]
    assert u["Unit"]["Description"] and u["Install"]["WantedBy"] == ["multi-user.target"]
    assert service["User"] == ["mirrorfs"] and service["Restart"] == ["on-failure"]
    assert all(f.startswith("-/etc/mirrorfs/") for f in service["EnvironmentFile"])
    env = defaults(service)
    if unit == "mirrorfs-peer.service":
        env["MIRRORFS_PEER_SHARE"] = str(tmp_path)  # the default is made by whoever installs
    [command] = service["ExecStart"]
    argv = expand(command, env, "3")
    assert argv[0].startswith(INSTALLED_BIN)
    name = argv[0].removeprefix(INSTALLED_BIN)
    assert name in scripts(), f"{name} is not a command pyproject.toml installs"
    # every option it passes is in the command's --help
    helptext = run([str(BIN / name), "--help"]).stdout
    for word in argv[1:]:
        if word.startswith("--"):
            assert re.search(rf"(^|\s){re.escape(word)}\b", helptext), f"{name} has no {word}"
    # and the command line parses, to the values meant
    if name == "mirrorfs-server":
        args = server_tool.parse_args(argv[1:])
        assert (args.id, args.port, args.host) == (3, 7000, "127.0.0.1")
        data = args.data
    elif name == "mirrorfs-index":
        opts, key_file = index_tool.parse_args(argv[1:])
        assert (opts.group, opts.port, opts.id, opts.host) == ("235.1.1.1", 55555, 1, "127.0.0.1")
        assert key_file is None and env["MIRRORFS_KEYS"] == "/var/lib/mirrorfs/keys"
        data = opts.data
    else:
        args = peer_tool.parse_args(argv[1:])
        assert (args.group, args.group_port, args.port, args.id) == ("235.1.1.1", 55555, 0, "host1")
        assert env["MIRRORFS_STATE_DIR"] == "/run/" + service["RuntimeDirectory"][0]
        data = Path(env["MIRRORFS_KEYS"])
    # what it writes is a state directory of its own (the rest of the system is read-only)
    states = [f"/var/lib/{d}" for d in service["StateDirectory"][0].replace("%i", "3").split()]
    assert str(data) in states and service["ProtectSystem"] == ["strict"]


@pytest.mark.parametrize(
    ("example", "units"),
    [
        ("server.env", ["mirrorfs-server@.service"]),
        ("index.env", ["mirrorfs-index.service", "mirrorfs-peer.service"]),
        ("peer.env", ["mirrorfs-peer.service"]),
    ],
)
def test_example_settings_are_the_units_defaults(example, units):
    shown = example_settings(example)
    assert shown
    used = set()
    for unit in units:
        service = read_unit(CONTRIB / unit)["Service"]
        assert f"-/etc/mirrorfs/{example}" in service["EnvironmentFile"]
        env = defaults(service)
        for name, value in shown.items():
            if name in service["ExecStart"][0]:
                assert env.get(name) == value, f"{unit}: {name}"
                used.add(name)
    assert used == set(shown), "settings no unit reads"


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the units are checked as INI above)")
    for unit in UNITS:  # the commands where this checkout's virtualenv has them
        text = (CONTRIB / unit).read_text().replace(INSTALLED_BIN, f"{BIN}/")
        (tmp_path / unit).write_text(text)
    names = [str(tmp_path / u.replace("@.", "@3.")) for u in UNITS]
    res = run([analyze, "verify", "--man=no", *names])
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "mirrorfs" in ln]
    assert lines == [], res.stderr


def test_sysusers_file_makes_the_user(tmp_path):
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    res = run([sysusers, f"--root={tmp_path}", str(CONTRIB / "mirrorfs.sysusers")])
    assert res.returncode == 0, res.stderr
    [line] = [ln for ln in (tmp_path / "etc/passwd").read_text().splitlines() if "mirrorfs" in ln]
    assert line.startswith("mirrorfs:") and line.endswith(":/var/lib/mirrorfs:/usr/sbin/nologin")


def unit_command(unit: str, tmp: Path, settings: dict[str, str]) -> tuple[list[str], dict]:
    """A unit's ExecStart and environment as systemd would run it, its directories (and the
    commands) moved to where this test may write."""
    service = read_unit(CONTRIB / unit)["Service"]
    env = {**defaults(service), **settings}
    moved = {"/var/lib/mirrorfs": str(tmp / "var"), "/run/": f"{tmp}/run/"}
    for old, new in moved.items():
        env = {k: v.replace(old, new) for k, v in env.items()}
    command = service["ExecStart"][0].replace(INSTALLED_BIN, f"{BIN}/")
    for old, new in moved.items():
        command = command.replace(old, new)
    for d in service.get("StateDirectory", [""])[0].split():
        (tmp / "var" / d.removeprefix("mirrorfs/").replace("%i", "3")).mkdir(
            parents=True, exist_ok=True
        )
    for d in service.get("RuntimeDirectory", [""])[0].split():
        (tmp / "run" / d).mkdir(parents=True, exist_ok=True)
    return expand(command, env, "3"), {**os.environ, **env}


def test_units_run_and_stop_cleanly(tmp_path):
    """The daemons start from the units' command lines and end with status 0 on SIGTERM
    (systemd's stop), so Restart=on-failure restarts only a failure."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "a.txt").write_text("shared\n")
    server_port, group_port = free_ports(2)
    group = f"239.{os.getpid() % 250}.{server_port % 250}.7"
    index_env = {"MIRRORFS_INDEX_GROUP": group, "MIRRORFS_INDEX_PORT": str(group_port)}
    runs = [
        ("mirrorfs-server@.service", {"MIRRORFS_PORT": str(server_port)}, "3 listening on"),
        ("mirrorfs-index.service", index_env, "replica 1 on"),
        ("mirrorfs-peer.service", {**index_env, "MIRRORFS_PEER_SHARE": str(share)}, "serving"),
    ]
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for unit, settings, ready in runs:
            argv, env = unit_command(unit, tmp_path, settings)
            log = tmp_path / f"{unit}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out)
            procs.append((proc, log))
            assert wait_for(lambda log=log, ready=ready: ready in log.read_text(), 20), (
                log.read_text()
            )
        assert (tmp_path / "var/keys/index.key").exists()  # made by the index, read by the peer
        assert list((tmp_path / "run/mirrorfs-peer/peers").glob("*.sock"))
    finally:
        for proc, _ in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        codes = []
        for proc, _ in procs:
            try:
                codes.append(proc.wait(timeout=20))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
    assert codes == [0, 0, 0], [log.read_text() for _, log in procs]
    assert not any("Traceback" in log.read_text() for _, log in procs)


def test_readme_fstab_line_makes_a_network_mount_unit(tmp_path):
    """The README's fstab line, as systemd reads it at boot: a mount unit of type
    fuse.mirrorfs, started with the network file systems, with options the helper takes."""
    generator = Path("/usr/lib/systemd/system-generators/systemd-fstab-generator")
    if not generator.exists():
        pytest.skip("systemd-fstab-generator is not installed")
    readme = (REPO / "README.md").read_text().splitlines()
    [line] = [ln.strip() for ln in readme if re.search(r"\sfuse\.mirrorfs\s+\S+\s+0\s+0$", ln)]
    (tmp_path / "fstab").write_text(line + "\n")
    out = [tmp_path / d for d in ("normal", "early", "late")]
    for d in out:
        d.mkdir()
    env = {**os.environ, "SYSTEMD_FSTAB": str(tmp_path / "fstab")}
    res = run([str(generator), *map(str, out)], env=env)
    assert res.returncode == 0, res.stderr
    source, where, _, options, *_ = line.split()
    name = where.strip("/").replace("/", "-") + ".mount"
    assert (out[0] / "remote-fs.target.wants" / name).exists()  # _netdev: after the network
    mount = read_unit(out[0] / name)["Mount"]
    assert mount["Type"] == ["fuse.mirrorfs"] and mount["What"] == [source]
    command, ignored = fstab.mount_argv(source, where, mount["Options"])
    assert command[:2] == ["--servers", source] and "--key-file" in command and not ignored


# ---- the mount helper, through mount(8) -------------------------------------------------


@pytest.fixture
def helper():
    """contrib/mount.fuse.mirrorfs where mount(8) looks for it; removed afterwards."""
    if os.path.lexists(HELPER):
        pytest.skip(f"{HELPER} is installed already: the test does not replace it")
    if os.geteuid() != 0:
        pytest.skip("mount(8) with a helper needs root")
    made_utab = not UTAB.parent.exists()  # mount(8) keeps _netdev and the like there
    HELPER.symlink_to(CONTRIB / "mount.fuse.mirrorfs")
    try:
        yield
    finally:
        if HELPER.is_symlink() and HELPER.readlink() == CONTRIB / "mount.fuse.mirrorfs":
            HELPER.unlink()
        if made_utab:  # nothing left in it once everything is unmounted: it goes too
            for name in ("utab", "utab.lock"):
                path = UTAB.parent / name
                if path.exists() and path.stat().st_size == 0:
                    path.unlink()
            with contextlib.suppress(OSError):
                UTAB.parent.rmdir()


class Mounts:
    """mount(8) runs, their mount processes ended by pid and mountpoints unmounted."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.env = {**os.environ, "MIRRORFS_BIN": str(BIN)}

    def mount(self, *args: str) -> subprocess.CompletedProcess[str]:
        res = run(["mount", *args], timeout=60, env=self.env)
        m = re.search(r"\(pid (\d+),", res.stdout)
        if m:
            self.pids.append(int(m.group(1)))
        return res

    def umount(self, path: Path) -> None:
        res = run(["umount", str(path)])
        assert res.returncode == 0, res.stderr
        assert f" TARGET={path} " not in (UTAB.read_text() if UTAB.exists() else "")
        pid = self.pids[-1]
        assert wait_for(lambda: not pid_alive(pid), 30), "the mount process did not end"

    def close(self, path: Path) -> None:
        if mounted(path):
            run(["umount", "-l", str(path)])
        for pid in self.pids:
            if not wait_for(lambda p=pid: not pid_alive(p), 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def mount_entry(path: Path) -> list[str] | None:
    """mountinfo's fields after the separator (type, source, options) for ``path``."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):  # tmp_path is a real path already
                return fields[fields.index("-") + 1 :]
    return None


def mounted(path: Path) -> bool:
    return mount_entry(path) is not None


@pytest.fixture
def mounts(tmp_path, helper):
    m = Mounts()
    yield m
    m.close(tmp_path / "mnt")


def servers(c: Cluster) -> str:
    return ",".join(f"127.0.0.1:{c.base + i}" for i in range(c.count))


def test_mount_t_fuse_mirrorfs_and_an_fstab_line(cluster4, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    key = cluster4.data_dir(0) / KEY_NAME
    log = tmp_path / "mount.log"
    res = mounts.mount(
        "-t",
        "fuse.mirrorfs",
        servers(cluster4),
        str(mnt),
        "-o",
        f"rw,nosuid,nodev,_netdev,nofail,noauto,x-systemd.automount,key_file={key},"
        f"timeout=2,log={log}",
    )
    assert res.returncode == 0, res.stderr
    fstype, *_ = mount_entry(mnt) or ["not mounted"]
    assert fstype == "fuse.mirrorfs"
    big = os.urandom(3 * MiB + 123)
    (mnt / "big").write_bytes(big)
    (mnt / "dir").mkdir()
    (mnt / "dir" / "small").write_text("through mount(8)\n")
    mounts.umount(mnt)
    assert not mounted(mnt) and log.exists()

    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# a temporary fstab\n"
        f"{servers(cluster4)}  {mnt}  fuse.mirrorfs  "
        f"noauto,_netdev,nofail,x-systemd.requires=mirrorfs-server@0.service,"
        f"key_file={key},timeout=2,log={log}  0  0\n"
    )
    res = mounts.mount("-T", str(fstab), str(mnt))
    assert res.returncode == 0, res.stderr
    assert sha(mnt / "big") == sha_bytes(big)
    assert (mnt / "dir" / "small").read_text() == "through mount(8)\n"
    (mnt / "dir" / "more").write_bytes(big[:MiB])
    mounts.umount(mnt)
    res = mounts.mount("-T", str(fstab), str(mnt))
    assert res.returncode == 0, res.stderr
    assert sha(mnt / "dir" / "more") == sha_bytes(big[:MiB])
    mounts.umount(mnt)
    assert not mounted(mnt)


def sha_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("colour=blue", "mount.fuse.mirrorfs: error: unknown option 'colour=blue'"),
        ("ro", "mount.fuse.mirrorfs: error: read-only mounts are not supported"),
        ("timeout=soon", "mount.fuse.mirrorfs: error: option timeout: 'soon' is not a number"),
    ],
)
def test_bad_options_through_mount(mounts, tmp_path, options, message):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cluster = ",".join(f"127.0.0.1:{7000 + i}" for i in range(4))  # refused before it is asked
    res = mounts.mount("-t", "fuse.mirrorfs", cluster, str(mnt), "-o", f"tls,{options}")
    assert res.returncode != 0 and not mounted(mnt)
    assert message in res.stderr and "Traceback" not in res.stderr


def test_helper_without_the_commands_says_where_it_looked(tmp_path):
    env = {**os.environ, "MIRRORFS_BIN": str(tmp_path)}
    res = run([str(CONTRIB / "mount.fuse.mirrorfs"), "a:1,b:2", str(tmp_path)], env=env)
    assert res.returncode == 1
    assert res.stderr == (
        f"mount.fuse.mirrorfs: error: {tmp_path}/mirrorfs-mount not found (install "
        "mirrorfs's commands there, or set MIRRORFS_BIN)\n"
    )
