"""What ./mount.sh runs: local servers (started or reused), format if new, mount; -u undoes it.

mount.sh [--count N] [--base-port B] [--data DIR] [--block-size S] MOUNTPOINT
mount.sh --servers HOST:PORT,... MOUNTPOINT        (an existing cluster: start nothing)
mount.sh -u MOUNTPOINT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mirrorfuse.client.blocking import run_async
from mirrorfuse.client.keys import Keyring
from mirrorfuse.wire.addresses import ClusterSpec, from_base_port, parse_servers
from mirrorfuse.wire.auth import KEY_NAME, KeyFileError
from mirrorfuse.wire.errors import MirrorfsError, UsageError
from mirrorfuse.wire.messages import StatReply
from mirrorfuse.wire.sizes import check_block_size, parse_size
from servers.files import atomic_write, write_key

from . import logs, registry
from .admin import format_volume, probe
from .args import metrics_arg, run
from .hosts import checked_cluster
from .mount import mount
from .spawn import ServerProc, SpawnError

PROG = "mount.sh"
DEFAULT_BASE_PORT = 7000


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/mirrorfs")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mirrorfs"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description="Start a local mirrorfs cluster and mount it."
    )
    p.add_argument("mountpoint")
    p.add_argument("-u", "--unmount", action="store_true", help="unmount and stop what was started")
    p.add_argument("--count", type=int, help="servers to start (4; even, 4-16)")
    p.add_argument("--base-port", type=int, help=f"server i listens on B+i ({DEFAULT_BASE_PORT})")
    p.add_argument("--data", type=Path, help=f"data directory ({default_data_dir()})")
    p.add_argument("--block-size", default="1M", help="block size of a new volume (1M)")
    p.add_argument("--servers", help="an existing cluster, HOST:PORT,... in id order")
    p.add_argument("--force", action="store_true", help="take the volume over from another mount")
    p.add_argument(
        "--tls", action="store_true", help="encrypt traffic (local servers start with --tls)"
    )
    p.add_argument("--key-file", help="the volume's key (default: the key directory's)")
    p.add_argument(
        "--metrics",
        type=metrics_arg,
        metavar="HOST:PORT",
        help="serve the mount's Prometheus metrics there (off by default)",
    )
    return p.parse_args(argv)


def give_keys(data: Path, count: int, key_file: str | None) -> None:
    """Directories formatted before volumes had keys get their volume's key (made here,
    once, where clients look for it), so that their servers start."""
    for i in range(count):
        folder = data / str(i)
        sb = folder / "superblock.json"
        if not sb.exists() or (folder / KEY_NAME).exists():
            continue
        try:
            volume = str(json.loads(sb.read_text())["volume"])
        except (OSError, ValueError, KeyError):
            continue  # the server says what is wrong with it
        keys = Keyring(key_file)
        try:
            key = keys(volume)
        except KeyFileError:
            key = keys.create(volume)
            print(f"made a key for volume {volume} (from before keys): {keys.path_for(volume)}")
        write_key(folder / KEY_NAME, key)


def start_local(
    data: Path, count: int, base: int, tls: bool, key_file: str | None
) -> tuple[ClusterSpec, list[int]]:
    """Start the servers that are not already running; returns the pids it started."""
    spec = dataclasses.replace(from_base_port(base, count), tls=tls, key_file=key_file)
    give_keys(data, count, key_file)
    found = run_async(probe(spec))
    started: list[ServerProc] = []
    try:
        for i, reply in enumerate(found):
            if isinstance(reply, StatReply):
                if reply.server != i:
                    raise MirrorfsError(
                        f"port {base + i} is taken by a mirrorfs server that is not "
                        f"server {i}: choose another --base-port"
                    )
                continue
            extra = ("--tls",) if tls else ()
            started.append(ServerProc(i, base + i, data / str(i), extra=extra, wait=False))
        for proc in started:  # started all at once, then each waited for
            try:
                proc.wait_ready()
            except SpawnError as exc:
                raise MirrorfsError(f"server {proc.id} did not start: {exc}") from None
            proc.detach()
    except BaseException:
        for proc in started:
            proc.terminate()
        raise
    return spec, [proc.pid for proc in started]


def up(args: argparse.Namespace) -> int:
    mnt = os.path.realpath(args.mountpoint)
    if not os.path.exists(mnt):
        os.makedirs(mnt)
        print(f"created mountpoint {mnt}")
    if registry.is_mounted(mnt):
        raise UsageError(f"{mnt} is already mounted; unmount it with: ./mount.sh -u {mnt}")
    if not os.path.isdir(mnt) or os.listdir(mnt):
        raise UsageError(f"mountpoint {mnt} is not an empty directory")
    started: list[int] = []
    data = None
    if args.servers:
        if args.count or args.base_port or args.data:
            raise UsageError(
                "--servers names an existing cluster: --count, --base-port and "
                "--data are for the local one"
            )
        spec = checked_cluster(parse_servers(args.servers), "--servers")
        spec = dataclasses.replace(spec, tls=args.tls, key_file=args.key_file)
    else:
        data = (args.data or default_data_dir()).resolve()
        conf_path = data / "cluster.json"
        conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}
        count = args.count or conf.get("count", 4)
        base = args.base_port or conf.get("base_port", DEFAULT_BASE_PORT)
        tls = args.tls or bool(conf.get("tls"))
        if conf and (count, base) != (conf["count"], conf["base_port"]):
            raise UsageError(
                f"{data} holds a cluster of {conf['count']} servers on base port "
                f"{conf['base_port']}; use another --data for a different one"
            )
        spec = from_base_port(base, count)  # validates before anything starts
        data.mkdir(parents=True, exist_ok=True)
        spec, started = start_local(data, count, base, tls, args.key_file)
        conf = {"count": count, "base_port": base, "tls": tls}
        atomic_write(conf_path, json.dumps(conf).encode())
        print(
            f"{count} servers on 127.0.0.1:{base}-{base + count - 1}"
            f"{f' (started {len(started)})' if started else ' (already running)'}, data in {data}"
        )
    try:
        probes = run_async(probe(spec))
        missing = [
            f"server {i} ({spec.addresses[i]}) {p}"
            for i, p in enumerate(probes)
            if isinstance(p, str)
        ]
        if all(isinstance(p, StatReply) and not p.formatted for p in probes):
            size = check_block_size(parse_size(args.block_size))
            volume = run_async(format_volume(spec, size))
            print(f"formatted new volume {volume}")
        elif len(missing) == spec.count:
            raise MirrorfsError("no server answers: " + "; ".join(missing))
        servers = ",".join(str(a) for a in spec.addresses)
        argv = ["--servers", servers, mnt] + (["--force"] if args.force else [])
        argv += ["--metrics", str(args.metrics)] if args.metrics else []
        argv += (["--tls"] if spec.tls else []) + (
            ["--key-file", spec.key_file] if spec.key_file else []
        )
        if mount(argv) != 0:
            raise MirrorfsError("mount failed (see above)")
    except BaseException:
        for pid in started:
            os.kill(pid, signal.SIGTERM)
        raise
    registry.write(mnt, {"started_pids": started, "data": str(data) if data else None})
    print(f"status:   .venv/bin/mirrorfs-cli status\nunmount:  ./mount.sh -u {mnt}")
    return 0


def down(args: argparse.Namespace) -> int:
    mnt = os.path.realpath(args.mountpoint)
    rec = registry.read(mnt)
    if rec is None and not registry.is_mounted(mnt):
        raise UsageError(f"{mnt} is not mounted")
    if registry.is_mounted(mnt):
        res = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
        if res.returncode != 0:
            raise MirrorfsError(f"cannot unmount {mnt}: {res.stderr.strip()} (is it busy?)")
    pid = (rec or {}).get("mount_pid")
    deadline = time.monotonic() + 30
    while registry.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = 0
    for spid in (rec or {}).get("started_pids") or []:
        if registry.pid_alive(spid):
            os.kill(spid, signal.SIGTERM)
            stopped += 1
    registry.remove(mnt)
    print(f"unmounted {mnt}" + (f"; stopped {stopped} servers" if stopped else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logs.setup(PROG, logging.WARNING)
    return run(PROG, lambda: down(args) if args.unmount else up(args))


if __name__ == "__main__":
    sys.exit(main())
