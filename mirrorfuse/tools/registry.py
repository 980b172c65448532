"""Where this machine's mounts are recorded, so commands find a cluster without arguments.

``mirrorfs-mount`` writes one small JSON record per mountpoint (servers, pid,
volume; ``mount.sh`` adds the servers it started). ``mirrorfs-cli status``
with no cluster named uses the only live record, or the one of the
mountpoint it is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mirrorfuse.wire.addresses import ClusterSpec, parse_servers
from mirrorfuse.wire.errors import UsageError
from servers.files import atomic_write


def state_dir() -> Path:
    env = os.environ.get("MIRRORFS_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/mirrorfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "mirrorfs" if runtime else Path.home() / ".cache" / "mirrorfs"


def _record_path(mountpoint: str) -> Path:
    """Keyed by the path as given: callers resolve it first (never from inside the daemon,
    where resolving the mountpoint would wait on the mount itself)."""
    key = hashlib.sha1(mountpoint.encode()).hexdigest()[:16]
    return state_dir() / "mounts" / f"{key}.json"


def is_mounted(mountpoint: str) -> bool:
    real = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == real for line in f)
    except OSError:
        return False


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write(mountpoint: str, record: dict[str, Any]) -> None:
    path = _record_path(mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = read(mountpoint) or {}
    old.update(record, mountpoint=mountpoint)
    atomic_write(path, json.dumps(old, indent=2).encode())


def read(mountpoint: str) -> dict[str, Any] | None:
    try:
        return json.loads(_record_path(mountpoint).read_text())
    except (OSError, ValueError):
        return None


def remove(mountpoint: str) -> None:
    _record_path(mountpoint).unlink(missing_ok=True)


def live_records() -> list[dict[str, Any]]:
    folder = state_dir() / "mounts"
    out = []
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(rec.get("mount_pid")) and is_mounted(rec["mountpoint"]):
            out.append(rec)
    return out


def spec_of(record: dict[str, Any]) -> ClusterSpec:
    spec = parse_servers(",".join(record["servers"]))
    return dataclasses.replace(
        spec, key_file=record.get("key_file") or None, tls=bool(record.get("tls"))
    )


def default_cluster(mountpoint: str | None = None) -> ClusterSpec:
    """The cluster behind ``mountpoint``, or behind the only mirrorfs mount of this machine."""
    if mountpoint is not None:
        rec = read(os.path.realpath(mountpoint))
        if rec is None:
            raise UsageError(f"{mountpoint} is not a mirrorfs mount started on this machine")
        return spec_of(rec)
    records = live_records()
    if len(records) == 1:
        return spec_of(records[0])
    if not records:
        raise UsageError(
            "no cluster named and no mirrorfs mount found on this machine: give "
            "--servers HOST:PORT,... or --base-port B --count N (or a mountpoint)"
        )
    where = ", ".join(r["mountpoint"] for r in records)
    raise UsageError(f"several mirrorfs mounts ({where}): name one of them")


def peer_dir() -> Path:
    """Running mirrorfs-peer processes leave a record here (id, address, pid, index, control
    socket) and their control socket; the directory is its user's only (mode 0700)."""
    return state_dir() / "peers"


def control_socket(peer_id: str) -> Path:
    """Where the peer ``peer_id`` takes share and unshare from its own user (or root)."""
    return peer_dir() / f"{peer_id}.sock"


def live_peers() -> list[dict[str, Any]]:
    out = []
    for path in sorted(peer_dir().glob("*.json")) if peer_dir().exists() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(rec.get("pid")):
            out.append(rec)
    return out
