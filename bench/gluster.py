#!/usr/bin/env python3
"""A GlusterFS volume on this machine, the file system mirrorfs is measured against.

    bench/gluster.py start [--root DIR]    # prints the mount point
    bench/gluster.py stop [--root DIR]     # unmounts, deletes, stops; leaves nothing

The volume is distributed-replicated 2 x 2 (replica 2, four bricks on loopback,
like four mirrorfs servers in two pairs), mounted with GlusterFS's own FUSE
client. The packages come from Debian's archive (installed when missing, as
root). glusterd runs without systemd, in the foreground of its own session,
with its state, run files, logs and CLI socket under ROOT: only the bricks'
sockets go to /run/gluster (a fixed path), and stop removes those too.
Bricks name 127.0.0.2: the gluster CLI refuses 127.0.0.1 and localhost for a
brick, while glusterd takes any 127.x address as this host.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

VOLUME = "mfsbench"
BRICK_HOST = "127.0.0.2"
GLUSTERD_PORT = 24007  # fixed: the bricks and the mount fetch their volfile there
DEFAULT_ROOT = Path("/tmp/mirrorfs-gluster")
PACKAGES = {"glusterd": "glusterfs-server", "glusterfs": "glusterfs-client", "fio": "fio"}

GLUSTERD_VOL = """volume management
    type mgmt/glusterd
    option working-directory {root}/state
    option run-directory {root}/run
    option logging-directory {root}/log
    option glusterd-sockfile {root}/glusterd.socket
    option transport-type socket
    option transport.socket.listen-port {port}
    option ping-timeout 0
    option event-threads 1
    option max-port 60999
end-volume
"""


class GlusterError(RuntimeError):
    """GlusterFS could not be set up; the message says which step and why."""


def ensure_packages(names: dict[str, str] = PACKAGES) -> None:
    """Install from Debian's archive whatever of ``names`` (program: package) is missing."""
    missing = sorted({pkg for prog, pkg in names.items() if shutil.which(prog) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise GlusterError(f"missing {', '.join(missing)}: run apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)  # stale lists
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise GlusterError(f"apt-get install {' '.join(missing)}: {done.stderr.strip()[-500:]}")


def _port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat.rsplit(") ", 1)[-1].startswith("Z")  # a zombie has ended


def _processes_under(root: Path) -> dict[int, list[str]]:
    """Gluster processes whose command line names a path under root: ours, and only ours."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "gluster" in Path(argv[0]).name and any(f"{root}/" in a for a in argv):
            found[int(entry.name)] = argv
    return found


def _end(pids: list[int], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL what is still there after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if _pid_alive(p)]
        if not pids:
            return


class GlusterVolume:
    """The volume under ``root``: bricks root/b0..b3, mounted at root/mnt."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root.resolve()
        self.mnt = self.root / "mnt"
        self.pidfile = self.root / "glusterd.pid"
        self.glusterd: subprocess.Popen[bytes] | None = None

    # -- commands --------------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [
            "gluster",
            "--mode=script",
            f"--glusterd-sock={self.root}/glusterd.socket",
            f"--log-file={self.root}/log/cli.log",
            *args,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise GlusterError(f"gluster {' '.join(args)}: {(done.stderr + done.stdout).strip()}")
        return done

    def mount(self) -> None:
        self.mnt.mkdir(exist_ok=True)
        opts = f"log-file={self.root}/log/mount.log"
        cmd = ["mount", "-t", "glusterfs", "-o", opts, f"127.0.0.1:/{VOLUME}", str(self.mnt)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        for _ in range(50):
            if os.path.ismount(self.mnt):
                return
            time.sleep(0.1)
        raise GlusterError(f"mount: {done.stderr.strip()} {self._tail('mount.log')}")

    def unmount(self) -> None:
        for lazy in ([], [], ["-l"]):
            if not os.path.ismount(self.mnt):
                return
            subprocess.run(["umount", *lazy, str(self.mnt)], capture_output=True)
            time.sleep(0.5)

    def kill_client(self) -> None:
        """End the FUSE client: whatever hangs on the mount gets ENOTCONN and returns."""
        for pid, argv in _processes_under(self.root).items():
            if str(self.mnt) in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def remount(self) -> None:
        """A new client: nothing of the old one's caches (kernel or its own) is kept."""
        self.unmount()
        self.mount()

    # -- the whole life --------------------------------------------------------------------------

    def start(self) -> Path:
        """glusterd, the volume and the mount; on failure, everything stopped again."""
        ensure_packages()
        if self._glusterd_pid() is not None:
            raise GlusterError(f"already running under {self.root} (bench/gluster.py stop)")
        if (self.root / "glusterd.vol").exists():
            self.stop()  # what a run that was cut short left
        elif self.root.exists() and any(self.root.iterdir()):
            raise GlusterError(f"{self.root} is not empty")
        if _port_answers(GLUSTERD_PORT):
            raise GlusterError(f"port {GLUSTERD_PORT} is taken: another glusterd runs here")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self.mnt

    def _start(self) -> None:
        for d in ("state", "run", "log", "mnt"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        vol = self.root / "glusterd.vol"
        vol.write_text(GLUSTERD_VOL.format(root=self.root, port=GLUSTERD_PORT))
        with open(self.root / "log" / "glusterd.out", "ab") as out:
            self.glusterd = subprocess.Popen(
                [
                    "glusterd",
                    "-N",
                    "-f",
                    str(vol),
                    "-p",
                    str(self.pidfile),
                    "-l",
                    f"{self.root}/log/glusterd.log",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.pidfile.write_text(str(self.glusterd.pid))
        deadline = time.monotonic() + 30
        while self.cli("volume", "list", check=False).returncode != 0:
            if self.glusterd.poll() is not None or time.monotonic() > deadline:
                raise GlusterError(f"glusterd did not start: {self._tail('glusterd.log')}")
            time.sleep(0.2)
        bricks = [f"{BRICK_HOST}:{self.root}/b{i}" for i in range(4)]
        self.cli("volume", "create", VOLUME, "replica", "2", *bricks, "force")
        self.cli("volume", "start", VOLUME)
        self.mount()

    def stop(self) -> None:
        """Unmount, stop and delete the volume, end glusterd; remove every file it made."""
        self.unmount()
        procs = _processes_under(self.root)
        sockets = [b for argv in procs.values() for a, b in pairwise(argv) if a == "-S"]
        glusterd = self._glusterd_pid()
        if glusterd is not None:
            self.cli("volume", "stop", VOLUME, "force", check=False)
            self.cli("volume", "delete", VOLUME, check=False)
            _end([glusterd])
            if self.glusterd is not None:
                self.glusterd.wait(timeout=10)
        _end(list(_processes_under(self.root)))  # bricks or clients glusterd left behind
        for path in sockets:
            if path.startswith(("/run/gluster/", "/var/run/gluster/")):
                Path(path).unlink(missing_ok=True)
        if os.path.ismount(self.mnt):
            raise GlusterError(f"{self.mnt} is still mounted: {self.root} kept")
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            raise GlusterError(f"{self.root} could not be removed")

    def _glusterd_pid(self) -> int | None:
        if self.glusterd is not None and self.glusterd.poll() is None:
            return self.glusterd.pid
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text())
            if _pid_alive(pid) and "glusterd" in Path(f"/proc/{pid}/cmdline").read_text():
                return pid
        return None

    def _tail(self, log: str, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join((self.root / "log" / log).read_text().splitlines()[-lines:])
        return ""

    def __enter__(self) -> Path:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"default {DEFAULT_ROOT}")
    args = p.parse_args()
    vol = GlusterVolume(args.root)
    try:
        if args.action == "start":
            print(vol.start())
        else:
            vol.stop()
    except GlusterError as e:
        print(f"gluster.py {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
