"""The README's "Several machines" recipe, run as written in a LAN of network namespaces:
its command blocks are read from README.md and run on the hosts they name (four server
hosts, a client, another client), with the README's example addresses, paths and the
`scp` from one client to the other replaced by this LAN's (listed in ``_local``). Each
host has its own data directory and its own home (so its own key directory); the
servers' firewalls drop everything but the port the recipe opens."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import sha, wait_for
from lan import SUBNET, Host, Lan, LanError

README = Path(__file__).resolve().parents[2] / "README.md"


def recipe() -> list[tuple[str, list[str]]]:
    """The section's command blocks: (where, lines), ``where`` from each block's first
    line (``# on ...``)."""
    text = README.read_text()
    section = text.split("## Several machines", 1)[1].split("\n## ", 1)[0]
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in section.splitlines():
        if line.startswith("    "):
            if current is None:
                current = []
                blocks.append(("", current))
            current.append(line[4:])
        elif line.strip():
            current = None
    out = []
    for _, lines in blocks:
        where = lines[0].removeprefix("# on ").split(" (")[0].split(",")[0].strip()
        out.append((where, [ln for ln in lines[1:] if ln.strip() and not ln.startswith("#")]))
    return out


class Site:
    """The hosts, each with its own home; what runs on them, ended by pid."""

    def __init__(self, tmp: Path, prefix: str) -> None:
        self.tmp = tmp
        self.prefix = prefix  # the virtualenv standing for /opt/mirrorfs
        self.lan = Lan(["c", "c2", "s0", "s1", "s2", "s3"])
        self.servers: list[subprocess.Popen] = []
        self.mount_pids: list[int] = []
        self.mounts: list[Path] = []

    def home(self, host: str) -> Path:
        return self.tmp / host / "home"

    def env(self, host: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MIRRORFS_KEYS"}  # the default
        env.update(HOME=str(self.home(host)), **extra)
        env.pop("XDG_CONFIG_HOME", None)
        self.home(host).mkdir(parents=True, exist_ok=True)
        return env

    def local(self, host: str, line: str) -> str:
        """The README's example names replaced by this LAN's."""
        for i in range(4):
            line = line.replace(f"192.0.2.1{i}", self.lan[f"s{i}"].addr)
        line = line.replace("192.0.2.0/24", f"{SUBNET}.0/24")
        line = line.replace("/opt/mirrorfs", self.prefix)
        line = line.replace("/srv/mirrorfs", str(self.tmp / host / "srv"))
        line = line.replace("/mnt/mfs", str(self.tmp / host / "mnt"))
        # the one step that needs ssh: the same copy, from the first client's home
        return line.replace("scp -p client1:", f"cp -p {self.home('c')}/")

    def script(self, host: str, lines: list[str]) -> subprocess.CompletedProcess[str]:
        body = "set -euo pipefail\n" + "\n".join(self.local(host, ln) for ln in lines)
        res = self.lan[host].run("bash", "-c", body, check=False, env=self.env(host))
        assert res.returncode == 0, f"on {host}:\n{body}\n{res.stdout}\n{res.stderr}"
        self.mount_pids += [int(p) for p in re.findall(r"\(pid (\d+), log", res.stdout)]
        self.mounts += [self.tmp / host / "mnt"] if "mounted volume" in res.stdout else []
        return res

    def start_server(self, i: int, line: str) -> None:
        host = f"s{i}"
        env = self.env(host, ID=str(i), ADDR=self.lan[host].addr)
        p = subprocess.Popen(
            [*self.lan[host].enter, "bash", "-c", "exec " + self.local(host, line)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=open(self.tmp / f"{host}.log", "ab"),  # noqa: SIM115
            text=True,
        )
        self.servers.append(p)
        assert p.stdout is not None
        first = p.stdout.readline()
        assert "listening on" in first, (self.tmp / f"{host}.log").read_text()

    def firewall(self, i: int, lines: list[str]) -> None:
        """A server host whose firewall drops whatever it does not allow, then the
        recipe's rule."""
        host = self.lan[f"s{i}"]
        host.run("nft", "add", "table", "inet", "filter")
        host.run(
            "nft", "add", "chain", "inet", "filter", "input",
            "{ type filter hook input priority 0; policy drop; }",
        )  # fmt: skip
        for line in lines:
            host.run("bash", "-c", self.local(f"s{i}", line))

    def close(self) -> None:
        for mnt in self.mounts:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        for pid in self.mount_pids:
            wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 30)
        for p in self.servers:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.lan.close()


def _refused_or_dropped(host: Host, addr: str, port: int) -> str:
    code = (
        "import socket, sys\n"
        "s = socket.socket(); s.settimeout(1.5)\n"
        f"try: s.connect(({addr!r}, {port})); print('open')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except (TimeoutError, socket.timeout): print('dropped')\n"
    )
    return host.run(sys.executable, "-c", code).stdout.strip()


def follow(tmp: Path, prefix: str, install: bool) -> None:
    steps = recipe()
    wheres = [w for w, _ in steps]
    assert wheres == [
        "every machine",
        "server host i",
        "every server host",
        "the client",
        "the client",
        "the other client",
    ], wheres
    site = Site(tmp, prefix)
    try:
        if install:  # on the test's own network: it reaches the package index
            env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
            for line in steps[0][1]:
                res = subprocess.run(
                    ["bash", "-c", site.local("c", line)], cwd=tmp, env=env,
                    capture_output=True, text=True, timeout=900,
                )  # fmt: skip
                assert res.returncode == 0, f"{line}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        (server_line,) = steps[1][1]
        for i in range(4):
            site.start_server(i, server_line)
        for i in range(4):
            site.firewall(i, steps[2][1])
        # only the recipe's port is open: any other is dropped, not even refused
        assert _refused_or_dropped(site.lan["c"], site.lan["s0"].addr, 7001) == "dropped"
        out = site.script("c", steps[3][1] + steps[4][1]).stdout
        volume = re.search(r"formatted volume (\S+):", out)
        assert volume, out
        vol = volume.group(1)
        rows = [ln.split() for ln in out.splitlines() if re.match(r"\d+ +\d+\.", ln)]
        assert [r[1] for r in rows] == [f"{site.lan[f's{i}'].addr}:7000" for i in range(4)], out
        assert [r[4] for r in rows] == ["alive"] * 4, out
        key = site.home("c") / ".config/mirrorfs/keys" / f"{vol}.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        for i in range(4):  # every server keeps the same key in its data directory
            assert (tmp / f"s{i}" / "srv" / "volume.key").read_bytes() == key.read_bytes()
        mnt = tmp / "c" / "mnt"
        data = os.urandom(3 << 20)
        (mnt / "hello").write_bytes(data)
        res = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert wait_for(lambda: not Path(f"/proc/{site.mount_pids[0]}").exists(), 30)
        site.script("c2", steps[5][1])
        assert sha(tmp / "c2" / "mnt" / "hello") == hashlib.sha256(data).hexdigest()
    finally:
        site.close()


def test_lan_readme_recipe_for_several_machines(tmp_path):
    """Steps 2-5 and the other client, with this test run's virtualenv as /opt/mirrorfs
    (step 1, the install, is what tests/run.sh did; the long test runs it too)."""
    follow(tmp_path, sys.prefix, install=False)


@pytest.mark.slow
def test_lan_readme_recipe_from_a_fresh_install(tmp_path):
    """The whole recipe, from `python3 -m venv` and `pip install` of a copy of this
    checkout (the package index must be reachable)."""
    if shutil.which("python3") is None:
        raise LanError("python3 is needed")
    root = Path(__file__).resolve().parents[2]
    shutil.copytree(
        root,
        tmp_path / "mirrorfs",
        ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build"),
    )
    follow(tmp_path, str(tmp_path / "opt" / "mirrorfs"), install=True)
