"""What ./mount.sh runs: local servers (started or reused), format if new, mount; -u undoes it.

mount.sh [--count N] [--base-port B] [--data DIR] [--block-size S] MOUNTPOINT
mount.sh --servers HOST:PORT,... MOUNTPOINT        (an existing cluster: start nothing)
mount.sh -u MOUNTPOINT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mirrorfuse.client.connection import Connection, ServerDown
from mirrorfuse.tools import registry
from mirrorfuse.tools.admin import format_volume
from mirrorfuse.tools.mount import main as mount_main
from mirrorfuse.tools.spawn import SERVER
from mirrorfuse.wire.addresses import ClusterSpec, from_base_port, parse_servers
from mirrorfuse.wire.errors import MirrorfsError, UsageError
from mirrorfuse.wire.frames import Msg
from mirrorfuse.wire.sizes import check_block_size, parse_size

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
    return p.parse_args(argv)


async def _probe(spec: ClusterSpec) -> list[dict | str]:
    async def one(i: int) -> dict | str:
        try:
            conn = await Connection.open(i, spec.addresses[i], 2.0)
        except ServerDown as exc:
            return exc.reason
        try:
            return (await conn.request(Msg.HELLO)).body
        except MirrorfsError as exc:
            return str(exc)
        finally:
            conn.close()

    return list(await asyncio.gather(*(one(i) for i in range(spec.count))))


def start_local(data: Path, count: int, base: int) -> tuple[ClusterSpec, list[int]]:
    """Start the servers that are not already running; returns the pids it started."""
    spec = from_base_port(base, count)
    probes = asyncio.run(_probe(spec))
    started = []
    for i, probe in enumerate(probes):
        if isinstance(probe, dict):
            if probe.get("server") != i:
                raise MirrorfsError(
                    f"port {base + i} is taken by a mirrorfs server that is not "
                    f"server {i}: choose another --base-port"
                )
            continue
        d = data / str(i)
        d.mkdir(parents=True, exist_ok=True)
        with open(data / f"server{i}.log", "ab") as log:
            proc = subprocess.Popen(
                [SERVER, "--id", str(i), "--port", str(base + i), "--data", str(d)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                text=True,
            )
        line = proc.stdout.readline()
        if "listening" not in line:
            proc.wait(timeout=10)
            last = (data / f"server{i}.log").read_text().strip().splitlines()
            for pid in started:
                os.kill(pid, signal.SIGTERM)
            raise MirrorfsError(f"server {i} did not start: {last[-1] if last else 'no output'}")
        proc.stdout.close()
        started.append(proc.pid)
    return spec, started


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
        spec = parse_servers(args.servers)
    else:
        data = (args.data or default_data_dir()).resolve()
        conf_path = data / "cluster.json"
        conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}
        count = args.count or conf.get("count", 4)
        base = args.base_port or conf.get("base_port", DEFAULT_BASE_PORT)
        if conf and (count, base) != (conf["count"], conf["base_port"]):
            raise UsageError(
                f"{data} holds a cluster of {conf['count']} servers on base port "
                f"{conf['base_port']}; use another --data for a different one"
            )
        spec = from_base_port(base, count)  # validates before anything starts
        data.mkdir(parents=True, exist_ok=True)
        spec, started = start_local(data, count, base)
        conf_path.write_text(json.dumps({"count": count, "base_port": base}))
        print(
            f"{count} servers on 127.0.0.1:{base}-{base + count - 1}"
            f"{f' (started {len(started)})' if started else ' (already running)'}, data in {data}"
        )
    try:
        probes = asyncio.run(_probe(spec))
        missing = [
            f"server {i} ({spec.addresses[i]}) {p}"
            for i, p in enumerate(probes)
            if isinstance(p, str)
        ]
        if all(isinstance(p, dict) and not p.get("formatted") for p in probes):
            size = check_block_size(parse_size(args.block_size))
            volume = asyncio.run(format_volume(spec, size))
            print(f"formatted new volume {volume}")
        elif len(missing) == spec.count:
            raise MirrorfsError("no server answers: " + "; ".join(missing))
        servers = ",".join(str(a) for a in spec.addresses)
        argv = ["--servers", servers, mnt] + (["--force"] if args.force else [])
        if mount_main(argv) != 0:
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
    try:
        return down(args) if args.unmount else up(args)
    except MirrorfsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
