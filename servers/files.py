"""Durable files: what a daemon (or a tool) writes must be all there after a crash, or not at all.

Written to a temporary file, fsynced, renamed over the old one, and the
directory fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path

from mirrorfuse.wire.auth import KeyFileError, parse_key


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename a fully written and fsynced ``tmp`` over ``path``, and make the rename stick."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # a leftover temporary file keeps its old mode otherwise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    replace_durably(tmp, path)


def read_key(path: Path) -> bytes:
    """A key file (one line of hex); a missing or malformed one is a KeyFileError."""
    try:
        with open(path, "rb") as f:
            text = f.read(4096)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    return parse_key(text, f"key file {path}")


def write_key(path: Path, key: bytes) -> None:
    """A key, durably and readable by its owner only (never visible with wider modes)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, key.hex().encode() + b"\n", mode=0o600)
