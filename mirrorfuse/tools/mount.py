"""mirrorfs-mount: open the volume, take the lease, replay the journal, serve FUSE.

Without -f the command starts itself in the background and returns once the
mount is up, or prints why it could not be, so every failure is one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mirrorfuse.client.blocking import run_async
from mirrorfuse.client.volume import Volume
from mirrorfuse.fs.filesystem import FileSystem
from mirrorfuse.fs.opening import open_filesystem
from mirrorfuse.wire.addresses import ClusterSpec
from mirrorfuse.wire.errors import MirrorfsError, UsageError

from . import fstab, logs, registry
from .args import (
    METRICS_HELP,
    add_cluster_args,
    cluster_from_args,
    metrics_arg,
    run,
    seconds_arg,
)

PROG = "mirrorfs-mount"
log = logging.getLogger(PROG)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Mount a mirrorfs volume.",
        epilog="As mount(8)'s helper (fstab, mount -t fuse.mirrorfs): mirrorfs-mount --fstab "
        "SERVERS MOUNTPOINT -o OPTIONS (contrib/mount.fuse.mirrorfs runs it).",
    )
    add_cluster_args(p)
    p.add_argument("mountpoint", help="an empty directory")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "--force",
        action="store_true",
        help="take the volume over from another mount (which is then fenced)",
    )
    p.add_argument(
        "--timeout",
        type=seconds_arg,
        default=3.0,
        help="seconds before a silent server is marked failed (3)",
    )
    p.add_argument(
        "--log",
        help="log file of the background mount (default: one per mountpoint, in "
        f"{registry.state_dir() / 'logs'})",
    )
    p.add_argument("--metrics", type=metrics_arg, metavar="HOST:PORT", help=METRICS_HELP)
    return p.parse_args(argv)


def check_mountpoint(path: str) -> None:
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {path} is not a directory")
    if registry.is_mounted(path):
        raise UsageError(f"{path} is already a mount point (unmount it first)")
    if os.listdir(path):
        raise UsageError(f"mountpoint {path} is not empty")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: this machine cannot mount FUSE file systems")


def serve(args: argparse.Namespace, spec: ClusterSpec) -> int:
    """Foreground: mount and serve until unmounted (one event loop, no threads)."""
    ready_fd = args.ready_fd

    def report(msg: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, msg.encode())
            os.close(ready_fd)
            ready_fd = None

    try:
        return run_async(_serve(args, spec, report))
    except MirrorfsError as exc:
        report(f"error: {exc}")
        log.error("%s", exc)
        return 1
    except RuntimeError as exc:
        report(f"error: FUSE could not mount {args.mountpoint}: {exc}")
        log.error("FUSE could not mount %s: %s", args.mountpoint, exc)
        return 1
    finally:
        rec = registry.read(args.mountpoint)
        if rec is not None and rec.get("mount_pid") == os.getpid():
            registry.remove(args.mountpoint)


async def _serve(args: argparse.Namespace, spec: ClusterSpec, report: Callable[[str], None]) -> int:
    from mirrorfuse.fs.fuse_driver import serve as serve_fuse

    volume = Volume(spec, args.timeout)
    opened: list[FileSystem] = []
    exporter = None
    if args.metrics is not None:  # first: a port in use is said before anything is mounted
        from servers.metrics import serve as serve_metrics

        from .metrics import mount_metrics

        collect = mount_metrics(volume, lambda: opened[0] if opened else None)
        exporter = serve_metrics(args.metrics, collect)
    try:
        await volume.open()
        fs = await open_filesystem(volume, args.mountpoint, args.force, heal=True)
        opened.append(fs)

        def ready() -> None:
            registry.write(
                args.mountpoint,
                {
                    "servers": [str(a) for a in spec.addresses],
                    "mount_pid": os.getpid(),
                    "volume": volume.volume_id,
                    "key_file": spec.key_file,
                    "tls": spec.tls,
                    "log": getattr(args, "log_path", None),
                },
            )
            report(f"ok {volume.volume_id}")

        await serve_fuse(fs, args.mountpoint, f"mirrorfs:{volume.volume_id}", ready)
        return 0
    finally:
        if exporter is not None:
            exporter.stop()
        await volume.close()


def background(args: argparse.Namespace, spec: ClusterSpec) -> int:
    """Serve the mount from a detached child; wait until it is up or has failed.

    The child is forked, not started anew: it has everything imported already.
    """
    log_path = args.log_path = os.path.abspath(args.log or registry.mount_log(args.mountpoint))
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the mount: a session of its own, its output in the log
        code = 1
        try:
            os.close(r)
            os.setsid()
            out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            logs.setup(PROG, logging.INFO, timestamps=True)  # its output is now the log
            args.ready_fd = w
            code = serve(args, spec)
        except BaseException:
            log.exception("the mount failed")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as pipe:
        answer = pipe.read()
    if answer.startswith("ok"):
        logs.say(
            f"mounted volume {answer.split()[1]} at {args.mountpoint} (pid {pid}, log {log_path})"
        )
        return 0
    os.waitpid(pid, 0)
    raise MirrorfsError(
        answer.removeprefix("error: ") or f"the mount process exited; see {log_path}"
    )


def start(args: argparse.Namespace) -> int:
    spec = cluster_from_args(args)
    check_mountpoint(args.mountpoint)
    args.mountpoint = os.path.realpath(args.mountpoint)
    if args.foreground:
        return serve(args, spec)
    return background(args, spec)


def mount(argv: list[str]) -> int:
    """The command, for a caller that set up logging already (mount.sh)."""
    args = parse_args(argv)
    args.ready_fd = None  # the background child tells its parent through a pipe
    args.log_path = None  # the foreground mount logs to its standard error
    return run(PROG, lambda: start(args))


def main(argv: list[str] | None = None) -> int:
    logs.setup(PROG, logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--fstab"]:  # mount(8)'s calling convention: SOURCE MOUNTPOINT -o OPTIONS
        return fstab.main(argv[1:], mount)
    return mount(argv)


if __name__ == "__main__":
    sys.exit(main())
