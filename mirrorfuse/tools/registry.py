"""Where this machine's mounts are recorded, so commands find a cluster without arguments.

``mirrorfs-mount`` writes one small JSON record per mountpoint (servers, pid,
volume; ``mount.sh`` adds the servers it started). ``mirrorfs-cli status``
with no cluster named uses the only live record, or the one of the
mountpoint it is given.
"""

from __future__ import annotations

import dataclasses
import errno
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


def mount_type(mountpoint: str) -> str | None:
    """The file system type mounted at ``mountpoint`` (``fuse.mirrorfs``), None if none is."""
    real = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            found = None
            for line in f:
                fields = line.split()
                if fields[4] == real:  # the last mount on a path is the one seen
                    found = fields[fields.index("-") + 1]
            return found
    except OSError:
        return None


def is_mounted(mountpoint: str) -> bool:
    return mount_type(mountpoint) is not None


def is_disconnected(mountpoint: str) -> bool:
    """A mirrorfs mount whose process has gone: every call on it fails with ENOTCONN
    (but stat, from the kernel's cache). A live mount process is not asked at all."""
    if mount_type(mountpoint) != "fuse.mirrorfs":
        return False
    rec = read(mountpoint)
    if rec is not None and pid_alive(rec.get("mount_pid")):
        return False
    try:
        os.listdir(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def mount_log(mountpoint: str) -> Path:
    """One log per mount, named after its mountpoint: /mnt/mfs logs to logs/mnt-mfs.log."""
    name = mountpoint.strip("/").replace("/", "-") or "root"
    if len(name) > 200:  # a file name has 255 bytes at most
        name = name[-180:] + "-" + hashlib.sha1(mountpoint.encode()).hexdigest()[:8]
    return state_dir() / "logs" / f"{name}.log"


def pid_alive(pid: int | None) -> bool:
    """A process that runs (a zombie has ended: only its exit status waits)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(") ")[2][:1] != "Z"
    except OSError:
        return False


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


def find(mountpoint: str | None = None) -> dict[str, Any]:
    """The record of ``mountpoint``, or of the only mirrorfs mount of this machine."""
    if mountpoint is not None:
        rec = read(os.path.realpath(mountpoint))
        if rec is None:
            raise UsageError(f"{mountpoint} is not a mirrorfs mount started on this machine")
        return rec
    records = live_records()
    if len(records) == 1:
        return records[0]
    if not records:
        raise UsageError(
            "no cluster named and no mirrorfs mount found on this machine: give "
            "--servers HOST:PORT,... or --base-port B --count N (or a mountpoint)"
        )
    where = ", ".join(r["mountpoint"] for r in records)
    raise UsageError(f"several mirrorfs mounts ({where}): name one of them (a MOUNTPOINT)")


def default_cluster(mountpoint: str | None = None) -> ClusterSpec:
    """The cluster behind ``mountpoint``, or behind the only mirrorfs mount of this machine."""
    return spec_of(find(mountpoint))


def mount_of(spec: ClusterSpec) -> dict[str, Any] | None:
    """The live mount of this machine that uses the servers of ``spec``, if any."""
    servers = [str(a) for a in spec.addresses]
    return next((r for r in live_records() if r.get("servers") == servers), None)


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
