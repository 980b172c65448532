"""What ./mount.sh runs: local servers (started or reused), format if new, mount; -u undoes it.

mount.sh [--count N] [--base-port B] [--data DIR] [--block-size S] MOUNTPOINT
mount.sh --servers HOST:PORT,... MOUNTPOINT        (an existing cluster: start nothing)
mount.sh -u MOUNTPOINT
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
from .spawn import ServerProc, SpawnError, running_server

PROG = "mount.sh"
DEFAULT_BASE_PORT = 7000


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/mirrorfs")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mirrorfs"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Mount a mirrorfs volume: start its local block servers (those not "
        "running yet), format the volume if it is new, and mount it in the background. "
        "-u unmounts it and stops the servers it started.",
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
            logs.say(f"made a key for volume {volume} (from before keys): {keys.path_for(volume)}")
        write_key(folder / KEY_NAME, key)


def start_local(
    data: Path, count: int, base: int, tls: bool, key_file: str | None
) -> tuple[ClusterSpec, list[int]]:
    """Start the servers that are not already running; returns the pids it started."""
    spec = dataclasses.replace(from_base_port(base, count), tls=tls, key_file=key_file)
    give_keys(data, count, key_file)
    found = run_async(probe(spec))
    for i, reply in enumerate(found):
        if isinstance(reply, StatReply):
            check_reused(reply, i, base + i, data)
    try:  # only now: a run refused above leaves no directory behind
        data.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {data}: {exc.strerror}") from None
    started: list[ServerProc] = []
    try:
        for i, reply in enumerate(found):
            if isinstance(reply, StatReply):
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


def check_reused(reply: StatReply, server: int, port: int, data: Path) -> None:
    """A server already running on a port is reused only if it is the one of ``data``."""
    if reply.server != server:
        raise MirrorfsError(
            f"port {port} is taken by a mirrorfs server that is not "
            f"server {server}: choose another --base-port"
        )
    mine = Path(os.path.realpath(data / str(server)))
    running = running_server(reply.pid)
    theirs: Path | None = None
    if running is not None:
        theirs = running.data
    elif reply.ident != _ident(mine):  # not readable here: compare the directories' identities
        theirs = Path("?")
    if theirs is not None and theirs != mine:
        where = f" ({theirs})" if running is not None else ""
        hint = f", or --data {theirs.parent}" if running is not None else ""
        raise MirrorfsError(
            f"port {port} is taken by server {server} of another data directory{where}: "
            f"choose another --base-port{hint}"
        )


def _ident(folder: Path) -> str:
    try:
        return str(json.loads((folder / "superblock.json").read_text())["ident"])
    except (OSError, ValueError, KeyError):
        return ""


def local_cluster(args: argparse.Namespace) -> tuple[Path, int, int, bool]:
    """--data, --count and --base-port checked, against the data directory's cluster too,
    before anything is created or started."""
    data = Path(os.path.realpath(args.data or default_data_dir()))
    given = "--data " + str(args.data) if args.data else "the data directory " + str(data)
    if data.exists() and not data.is_dir():
        raise UsageError(f"{given} is not a directory")
    conf_path = data / "cluster.json"
    try:
        conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}
        conf_key = (int(conf["count"]), int(conf["base_port"])) if conf else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MirrorfsError(f"{conf_path} cannot be read ({exc})") from None
    count, base = conf_key or (4, DEFAULT_BASE_PORT)
    count = args.count if args.count is not None else count
    base = args.base_port if args.base_port is not None else base
    from_base_port(base, count)  # a bad --count or --base-port is named as such
    if conf_key is not None and (count, base) != conf_key:
        raise UsageError(
            f"{data} holds a cluster of {conf_key[0]} servers on base port "
            f"{conf_key[1]}; use another --data for a different one"
        )
    return data, count, base, args.tls or bool(conf.get("tls"))


def prepare_mountpoint(mnt: str) -> tuple[bool, list[int]]:
    """Create the mountpoint if needed (True when it was created here); a mount whose
    process has gone is cleared first, and the servers it had started are handed on."""
    kept: list[int] = []
    if registry.is_disconnected(mnt):
        old = registry.read(mnt) or {}
        res = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True)
        if res.returncode != 0:
            raise MirrorfsError(f"cannot clear the dead mount at {mnt}: {res.stderr.strip()}")
        registry.remove(mnt)
        kept = [p for p in old.get("started_pids") or [] if running_server(p) is not None]
        logs.say(f"cleared the mount at {mnt}: its mount process had ended")
    if registry.is_mounted(mnt):
        raise UsageError(f"{mnt} is already mounted; unmount it with: ./mount.sh -u {mnt}")
    created = False
    if not os.path.lexists(mnt):
        try:
            os.makedirs(mnt)
        except OSError as exc:
            raise UsageError(f"cannot create mountpoint {mnt}: {exc.strerror}") from None
        created = True
        logs.say(f"created mountpoint {mnt}")
    if not os.path.isdir(mnt) or os.listdir(mnt):
        raise UsageError(f"mountpoint {mnt} is not an empty directory")
    return created, kept


def up(args: argparse.Namespace) -> int:
    mnt = os.path.realpath(args.mountpoint)
    size = check_block_size(parse_size(args.block_size))
    if args.servers:
        if args.count is not None or args.base_port is not None or args.data:
            raise UsageError(
                "--servers names an existing cluster: --count, --base-port and "
                "--data are for the local one"
            )
        spec = checked_cluster(parse_servers(args.servers), "--servers")
        spec = dataclasses.replace(spec, tls=args.tls, key_file=args.key_file)
        local = None
    else:
        local = local_cluster(args)
    created, started = prepare_mountpoint(mnt)
    mounted = False
    try:
        data = None
        if local is not None:
            data, count, base, tls = local
            spec, new = start_local(data, count, base, tls, args.key_file)
            started += new
            conf = {"count": count, "base_port": base, "tls": tls}
            atomic_write(data / "cluster.json", json.dumps(conf).encode())
            logs.say(
                f"{count} servers on 127.0.0.1:{base}-{base + count - 1}"
                f"{f' (started {len(new)})' if new else ' (already running)'}, data in {data}"
            )
        probes = run_async(probe(spec))
        missing = [
            f"server {i} ({spec.addresses[i]}) {p}"
            for i, p in enumerate(probes)
            if isinstance(p, str)
        ]
        if all(isinstance(p, StatReply) and not p.formatted for p in probes):
            volume = run_async(format_volume(spec, size))
            logs.say(f"formatted new volume {volume}")
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
        mounted = True  # from here on the servers are the mount's: nothing stops them
        registry.write(mnt, {"started_pids": started, "data": str(data) if data else None})
    except BaseException:
        if not mounted:
            for pid in started:
                if running_server(pid) is not None:
                    os.kill(pid, signal.SIGTERM)
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(mnt)
        raise
    logs.say(f"status:   .venv/bin/mirrorfs-cli status\nunmount:  ./mount.sh -u {mnt}")
    return 0


def start_server(record: dict[str, Any], server: int) -> str:
    """Start server ``server`` of a mount.sh cluster again, as mount.sh does, and record
    it with the mount so that ``./mount.sh -u`` stops it too; says what it did."""
    mnt = record["mountpoint"]
    if not record.get("data"):
        raise UsageError(
            f"{mnt} was not mounted by ./mount.sh with servers of its own: start server "
            f"{server} where it runs (mirrorfs-server --id {server} --port P --data DIR)"
        )
    data = Path(record["data"])
    try:
        conf = json.loads((data / "cluster.json").read_text())
        count, base, tls = int(conf["count"]), int(conf["base_port"]), bool(conf.get("tls"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MirrorfsError(f"{data / 'cluster.json'} cannot be read ({exc})") from None
    if not 0 <= server < count:
        raise UsageError(f"there is no server {server} (servers are 0-{count - 1})")
    spec = dataclasses.replace(from_base_port(base, count), tls=tls)
    spec = dataclasses.replace(spec, key_file=record.get("key_file") or None)
    reply = run_async(probe(spec))[server]
    if isinstance(reply, StatReply):
        raise MirrorfsError(f"server {server} is already running (pid {reply.pid})")
    try:
        proc = ServerProc(server, base + server, data / str(server), extra=("--tls",) * tls)
    except SpawnError as exc:
        raise MirrorfsError(f"server {server} did not start: {exc}") from None
    proc.detach()
    pids = [p for p in record.get("started_pids") or [] if running_server(p) is not None]
    registry.write(mnt, {"started_pids": [*pids, proc.pid]})
    return (
        f"started server {server} on 127.0.0.1:{base + server} (pid {proc.pid}, log "
        f"{proc.log}); the mount heals it by itself; ./mount.sh -u {mnt} stops it"
    )


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
        if running_server(spid) is not None:  # not a pid reused by something else since
            os.kill(spid, signal.SIGTERM)
            stopped += 1
    registry.remove(mnt)
    logs.say(f"unmounted {mnt}" + (f"; stopped {stopped} servers" if stopped else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logs.setup(PROG, logging.WARNING)
    return run(PROG, lambda: down(args) if args.unmount else up(args))


if __name__ == "__main__":
    sys.exit(main())
