"""A small LAN of network namespaces, for running real servers and a real mount across it
(``Site``: four server hosts and a client, its mounts, and the check that nothing
acknowledged was lost).

One namespace holds the switch (a bridge); every host (each server machine and the
client) is a namespace of its own joined to the bridge by a veth pair. Nothing is
added to the host's network: the namespaces are held by ``unshare -n sleep`` processes
that the harness ends by pid, and the veth pairs and the bridge go with them. Commands
enter a host with ``nsenter --net``, which execs them, so a server's pid is its own and
a FUSE mount made from the client's namespace is seen by the test like any other.

Links get ``tc netem`` delay and loss where the kernel has netem; where it does not
(``CONFIG_NET_SCH_NETEM`` unset) loss is made by the switch itself (an nftables rule
with a random number per frame) and there is no added delay: ``Lan.shaping`` says
which. A host is cut off by taking its switch port down (its packets are dropped, the
process runs on); a client is cut off from some hosts by a drop rule in the switch.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from helpers import sha, wait_for

from mirrorfuse.tools.registry import pid_alive
from mirrorfuse.tools.spawn import ServerProc
from mirrorfuse.wire.addresses import Address, ClusterSpec

SUBNET = "10.213.7"  # exists only inside these namespaces
PORT = 7000  # every server host listens on the same port, as on real machines
BIN = Path(sys.executable).parent
CLI = str(BIN / "mirrorfs-cli")
MOUNT = str(BIN / "mirrorfs-mount")
NEEDED = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "nft": "nftables"}


class LanError(AssertionError):
    """The machine cannot build the LAN (a tool missing): says what to install."""


def faketime_lib() -> str:
    """libfaketime, which gives a process a wall clock of its own (Debian: faketime)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        raise LanError("libfaketime is missing: apt-get install faketime (tests/run.sh does)")
    return found[0]


def _own_netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


class Host:
    """One machine of the LAN: a network namespace, held by a sleeping process."""

    def __init__(self, name: str, addr: str, port_name: str) -> None:
        self.name = name
        self.addr = addr
        self.port_name = port_name  # its port on the switch
        self.holder = subprocess.Popen(
            ["unshare", "-n", "--", "sleep", "infinity"], stdin=subprocess.DEVNULL
        )
        mine = _own_netns(os.getpid())
        if not wait_for(lambda: _own_netns(self.holder.pid) != mine, 10):
            self.close()
            raise LanError(f"unshare -n did not make a namespace for {name}")

    @property
    def enter(self) -> tuple[str, ...]:
        """What goes before a command to run it on this host (it execs the command)."""
        return ("nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--")

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120, env: dict | None = None
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [*self.enter, *cmd], capture_output=True, text=True, timeout=timeout, env=env
        )
        if check and res.returncode != 0:
            raise LanError(f"{self.name}: {' '.join(cmd)}: {res.stderr.strip() or res.stdout}")
        return res

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()


class Lan:
    """A switch and ``names`` hosts at SUBNET.1, .2, ...; ``loss`` is per frame (0.01: 1%)."""

    def __init__(self, names: Sequence[str], delay_ms: float = 1.0, loss: float = 0.01) -> None:
        for tool, package in NEEDED.items():
            if shutil.which(tool) is None:
                raise LanError(f"{tool} is missing: apt-get install {package} (tests/run.sh does)")
        self.hosts: dict[str, Host] = {}
        self.switch = Host("switch", "", "")
        try:
            self.switch.run("ip", "link", "set", "lo", "up")
            self.switch.run("ip", "link", "add", "br0", "type", "bridge")
            self.switch.run("ip", "link", "set", "br0", "up")
            for n, name in enumerate(names):
                self._add(name, n)
            self.shaping = self._shape(delay_ms, loss)
        except BaseException:
            self.close()
            raise

    def _add(self, name: str, n: int) -> None:
        host = Host(name, f"{SUBNET}.{n + 1}", f"p{n}")
        self.hosts[name] = host
        sw = self.switch
        sw.run(
            "ip", "link", "add", host.port_name, "type", "veth",
            "peer", "name", "eth0", "netns", str(host.holder.pid),
        )  # fmt: skip
        sw.run("ip", "link", "set", host.port_name, "master", "br0", "up")
        host.run("ip", "link", "set", "lo", "up")
        host.run("ip", "addr", "add", f"{host.addr}/24", "dev", "eth0")
        host.run("ip", "link", "set", "eth0", "up")

    def _shape(self, delay_ms: float, loss: float) -> str:
        """netem delay and loss on every host's link, or loss at the switch without it."""
        if delay_ms or loss:
            netem = ["delay", f"{delay_ms}ms", "loss", f"{loss * 100:g}%"]
            tried = [
                h.run("tc", "qdisc", "add", "dev", "eth0", "root", "netem", *netem, check=False)
                for h in self.hosts.values()
            ]
            if all(r.returncode == 0 for r in tried):
                return f"netem: {delay_ms:g} ms delay, {loss:.1%} loss on every link"
        if loss:
            per_mille = round(loss * 1000)
            self._nft(
                "table bridge shaping {\n chain lossy {\n"
                "  type filter hook forward priority 0\n"
                f"  numgen random mod 1000 < {per_mille} drop\n }}\n}}\n"
            )
            return f"no netem in this kernel: no added delay; {loss:.1%} loss at the switch"
        return "no shaping"

    def _nft(self, ruleset: str) -> None:
        res = subprocess.run(
            [*self.switch.enter, "nft", "-f", "-"],
            input=ruleset,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if res.returncode != 0:
            raise LanError(f"nft: {res.stderr.strip()}")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # -- partitions -------------------------------------------------------------------

    def cut(self, name: str) -> None:
        """Pull the host's cable: its switch port goes down, every packet is dropped."""
        self.switch.run("ip", "link", "set", self.hosts[name].port_name, "down")

    def reconnect(self, name: str) -> None:
        self.switch.run("ip", "link", "set", self.hosts[name].port_name, "up")

    def separate(self, name: str, others: Sequence[str]) -> None:
        """The switch drops every IP packet between ``name`` and ``others`` (both ways);
        each of them still reaches everyone else."""
        a = self.hosts[name].addr
        bs = ", ".join(self.hosts[o].addr for o in others)
        self._nft(
            "table bridge cut {\n chain drops {\n  type filter hook forward priority -10\n"
            f"  ip saddr {a} ip daddr {{ {bs} }} drop\n"
            f"  ip saddr {{ {bs} }} ip daddr {a} drop\n }}\n}}\n"
        )

    def join(self) -> None:
        """Undo ``separate``."""
        self.switch.run("nft", "delete", "table", "bridge", "cut")

    def close(self) -> None:
        for host in [*self.hosts.values(), self.switch]:
            host.close()


class LanCluster:
    """One block server per host (``s0``, ``s1``, ...) on PORT, listening on the host's
    address, and commands run from the client host ``c``."""

    def __init__(
        self,
        lan: Lan,
        root: Path,
        count: int = 4,
        server_args: tuple[str, ...] = (),
        clocks: dict[int, str] | None = None,
    ) -> None:
        self.lan = lan
        self.root = root
        self.count = count
        self.server_args = server_args
        self.clocks = clocks or {}  # server -> libfaketime offset, e.g. "+400d"
        self.tls = "--tls" in server_args
        self.client = lan["c"]
        self.servers: list[ServerProc] = []
        try:
            for i in range(count):
                self.servers.append(self._spawn(i, wait=False))
            for s in self.servers:
                s.wait_ready()
        except BaseException:
            self.close()
            raise

    def host(self, i: int) -> Host:
        return self.lan[f"s{i}"]

    def data_dir(self, i: int) -> Path:
        return self.root / f"s{i}" / "data"

    def _spawn(self, i: int, wait: bool = True) -> ServerProc:
        wrap = self.host(i).enter
        if i in self.clocks:  # env execs the server: the pid stays the server's
            clock = (f"LD_PRELOAD={faketime_lib()}", f"FAKETIME={self.clocks[i]}")
            wrap = (*wrap, "env", *clock)
        host = self.host(i).addr
        return ServerProc(i, PORT, self.data_dir(i), host, self.server_args, wait, wrap)

    @property
    def spec(self) -> ClusterSpec:
        addrs = tuple(Address(self.host(i).addr, PORT) for i in range(self.count))
        return ClusterSpec(addrs, tls=self.tls)

    @property
    def args(self) -> list[str]:
        servers = ",".join(f"{self.host(i).addr}:{PORT}" for i in range(self.count))
        return ["--servers", servers, *(["--tls"] if self.tls else [])]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """mirrorfs-cli on the client host, on this cluster."""
        return self.client.run(CLI, *args, *self.args, check=False, timeout=timeout)

    def format(self, *extra: str) -> str:
        res = self.cli("format", *extra)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()[2].rstrip(":")

    def status(self) -> dict:
        res = self.cli("status", "--json")
        st = json.loads(res.stdout)
        assert res.returncode == (0 if st["volume"] else 1), res.stderr
        return st

    def states(self) -> list[str]:
        return [r["state"] for r in self.status()["rows"]]

    def start(self, i: int) -> ServerProc:
        if self.servers[i].running:
            self.servers[i].kill()
        self.servers[i] = self._spawn(i)
        return self.servers[i]

    def kill(self, i: int) -> None:
        self.servers[i].kill()

    def close(self) -> None:
        for s in self.servers:
            if s.running:
                s.kill()


class LanMount:
    """mirrorfs-mount run on the client host; the mountpoint is seen from the test too."""

    def __init__(self, cluster: LanCluster, path: Path, *extra: str) -> None:
        self.cluster = cluster
        self.path = path
        self.log = path.parent / f"{path.name}.log"
        path.mkdir(parents=True, exist_ok=True)
        res = cluster.client.run(
            MOUNT, *cluster.args, str(path), "--log", str(self.log), *extra, check=False
        )
        self.result = res
        self.pid: int | None = None
        if res.returncode == 0:
            self.pid = int(res.stdout.split("(pid ")[1].split(",")[0])

    def mounted(self) -> bool:
        real = os.path.realpath(self.path)
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == real for line in f)

    def close(self) -> None:
        """Unmount (lazily if it is busy), then wait for the mount process by its pid."""
        if self.mounted():
            res = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
            if res.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)
        pid = self.pid
        if pid is not None and not wait_for(lambda: not pid_alive(pid), 30):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pid = None


WRITER = r"""
import hashlib, os, random, sys, time
mnt, log, stop, seed, most, secs = sys.argv[1:7]
rng = random.Random(int(seed))
end = time.monotonic() + float(secs)
with open(log, "a") as out:
    for i in range(int(most)):
        if os.path.exists(stop) or time.monotonic() > end:
            break
        size = rng.choice((rng.randrange(1, 4000), rng.randrange(50_000, 1_500_000)))
        data = rng.randbytes(size)
        name = f"w{i:05d}"
        try:
            fd = os.open(os.path.join(mnt, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            out.write(f"{name} error {exc.errno}\n")
        else:
            out.write(f"{name} {hashlib.sha256(data).hexdigest()}\n")
        out.flush()
"""


class Writer:
    """Files written and fsynced one after another into a mount, each logged with its
    sha256 once fsync returned (or with the errno it failed with)."""

    def __init__(self, mnt: Path, work: Path, seed: int, most: int = 5000, secs: float = 240):
        self.log = work / f"writer{seed}.log"
        self.stop_file = work / f"writer{seed}.stop"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(mnt), str(self.log), str(self.stop_file),
             str(seed), str(most), str(secs)],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def lines(self) -> list[tuple[str, str]]:
        if not self.log.exists():
            return []
        return [tuple(line.split(" ", 1)) for line in self.log.read_text().splitlines()]  # type: ignore[misc]

    def synced(self) -> dict[str, str]:
        return {name: h for name, h in self.lines() if not h.startswith("error")}

    def errors(self) -> list[str]:
        return [name for name, h in self.lines() if h.startswith("error")]

    def wait_more(self, count: int, timeout: float = 60) -> bool:
        """Until ``count`` more files were fsynced than now."""
        goal = len(self.synced()) + count
        wait_for(lambda: len(self.synced()) >= goal or self.proc.poll() is not None, timeout)
        return len(self.synced()) >= goal

    def finish(self, timeout: float = 120) -> None:
        self.stop_file.touch()
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, self.proc.stderr.read() if self.proc.stderr else ""


HOSTS = ("c", "s0", "s1", "s2", "s3")


class Site:
    def __init__(self, work: Path, **cluster_args) -> None:
        self.work = work
        self.lan = Lan(HOSTS)
        self.mounts: list[LanMount] = []
        try:
            self.cluster = LanCluster(self.lan, work, **cluster_args)
        except BaseException:
            self.lan.close()
            raise

    def mount(self, name: str = "mnt", *extra: str) -> LanMount:
        m = LanMount(self.cluster, self.work / name, "--timeout", "2", *extra)
        self.mounts.append(m)
        assert m.pid is not None, m.result.stderr
        return m

    def rows(self) -> list[dict]:
        return self.cluster.status()["rows"]

    def states(self) -> list[str]:
        return [r["state"] for r in self.rows()]

    def all_alive(self, timeout: float = 60) -> bool:
        return wait_for(lambda: self.states() == ["alive"] * self.cluster.count, timeout, 0.5)

    def verify(self, m: LanMount, synced: dict[str, str]) -> None:
        """Unmount, fsck --deep is clean, and a new mount reads every fsynced file back
        with the checksum it was written with (from the servers, not a cache)."""
        assert synced, "nothing was written"
        m.close()
        res = self.cluster.cli("fsck", "--deep")
        assert res.returncode == 0 and "clean" in res.stdout, res.stdout + res.stderr
        again = self.mount(f"{m.path.name}-again")
        lost = [name for name, h in synced.items() if sha(again.path / name) != h]
        assert not lost, f"{len(lost)} fsynced files differ: {lost[:5]}"

    def close(self) -> None:
        for m in reversed(self.mounts):
            with contextlib.suppress(Exception):
                m.close()
        self.cluster.close()
        self.lan.close()
