"""mount(8)'s calling convention, for fstab lines and ``mount -t fuse.mirrorfs``.

mount(8) runs ``/sbin/mount.fuse.mirrorfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]``
(contrib/mount.fuse.mirrorfs, which runs ``mirrorfs-mount --fstab ...``). SOURCE
is the server list, ``host:port,...`` in id order. OPTIONS mixes this file
system's own (``key_file=``, ``tls``, ``timeout=``, ``log=``, ``force``) with what
fstab, mount(8) and systemd use for themselves (``_netdev``, ``noauto``,
``nofail``, ``x-systemd.*``, ``rw``, ...): those are dropped where dropping them
changes nothing, and refused where the mount would not do what they ask (``ro``,
``noexec``, ``sync``), so an fstab line never promises more than it gets.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mirrorfuse.wire.addresses import parse_servers
from mirrorfuse.wire.errors import UsageError

from .args import run, seconds_arg

PROG = "mount.fuse.mirrorfs"

# ours: fstab option -> mirrorfs-mount option
WITH_VALUE = {"key_file": "--key-file", "timeout": "--timeout", "log": "--log"}
FLAGS = {"tls": "--tls", "force": "--force"}
# for mount(8), systemd or the kernel, and true of every mirrorfs mount anyway (FUSE
# mounts are nosuid and nodev; a suid or dev asked for is not granted, which is safe)
# fmt: off
IGNORED = frozenset([
    "defaults", "rw", "auto", "noauto", "user", "nouser", "users", "owner", "group",
    "_netdev", "nofail", "dev", "nodev", "suid", "nosuid", "exec", "async",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime",
    "lazytime", "nolazytime", "diratime", "nodiratime", "nomand", "silent", "loud",
    "iversion", "noiversion",
])
# fmt: on
IGNORED_PREFIXES = ("x-", "comment=")
REFUSED = {
    "ro": "read-only mounts are not supported (a mount takes the volume's write lease)",
    "noexec": "noexec is not supported (programs on the mount could still be run)",
    "sync": "sync is not supported (writes are buffered; fsync makes them durable)",
    "dirsync": "dirsync is not supported (fsync on the directory makes changes durable)",
    "mand": "mandatory locks are not supported",
}
OURS = "key_file=FILE, tls, timeout=SECONDS, log=FILE, force"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="mount(8)'s helper for type fuse.mirrorfs: mounts SERVERS on MOUNTPOINT "
        f"with mirrorfs-mount. Options of mirrorfs: {OURS}; fstab's, mount's and "
        "systemd's own (_netdev, noauto, nofail, x-systemd.*, rw, ...) are ignored.",
    )
    p.add_argument("source", metavar="SERVERS", help="host:port,... of every server, in id order")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "-o", dest="options", metavar="OPTION,...", action="append", default=[], help="options"
    )
    p.add_argument("-s", dest="sloppy", action="store_true", help="ignore unknown options")
    p.add_argument("-f", dest="fake", action="store_true", help="check only, mount nothing")
    p.add_argument("-n", action="store_true", help="(ignored: the kernel keeps the mount table)")
    p.add_argument("-v", action="store_true", help="(ignored)")
    p.add_argument("-t", dest="type", help="(ignored: fuse.mirrorfs)")
    p.add_argument("-N", dest="namespace", help="(not supported)")
    return p.parse_args(argv)


def mount_argv(
    source: str, mountpoint: str, options: list[str], sloppy: bool = False
) -> tuple[list[str], list[str]]:
    """The mirrorfs-mount command line for an fstab entry, and the options ignored as unknown
    (only with ``sloppy``). UsageError names the first option that cannot be honoured."""
    try:
        parse_servers(source)
    except UsageError as exc:
        raise UsageError(f"{exc} (the source is the servers, host:port,... in id order)") from None
    argv = ["--servers", source]
    unknown: list[str] = []
    for opt in (o for group in options for o in group.split(",")):
        name, eq, value = opt.partition("=")
        name = "key_file" if name == "key-file" else name
        if not opt or opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
            continue
        if opt in REFUSED:
            raise UsageError(REFUSED[opt])
        if name in WITH_VALUE:
            if not value:
                raise UsageError(f"option {name} needs a value ({name}=...)")
            if name == "timeout":
                try:
                    seconds_arg(value)
                except argparse.ArgumentTypeError as exc:
                    raise UsageError(f"option timeout: {exc}") from None
            argv += [WITH_VALUE[name], value]
        elif name in FLAGS:
            if eq:
                raise UsageError(f"option {name} takes no value")
            argv.append(FLAGS[name])
        elif sloppy:
            unknown.append(opt)
        else:
            raise UsageError(f"unknown option {opt!r} (mirrorfs takes {OURS})")
    return [*argv, mountpoint], unknown


def main(argv: list[str], mount: Callable[[list[str]], int]) -> int:
    """mount(8)'s helper: check the entry, then ``mount`` (mirrorfs-mount) it."""
    args = parse_args(argv)

    def go() -> int:
        if args.namespace is not None:
            raise UsageError("mounting in another namespace (-N) is not supported")
        command, unknown = mount_argv(args.source, args.mountpoint, args.options, args.sloppy)
        for opt in unknown:
            print(f"{PROG}: ignoring unknown option {opt!r} (-s)", file=sys.stderr)
        return 0 if args.fake else mount(command)

    return run(PROG, go, usage_exit=1)
