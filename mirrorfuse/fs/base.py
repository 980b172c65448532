"""What every part of the file system shares: its errno exception, the caller, the clock."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from mirrorfuse.wire.records import Inode


class FsError(OSError):
    def __init__(self, err: int, detail: str | None = None) -> None:
        super().__init__(err, detail or os.strerror(err))


def now_ns() -> int:
    return time.time_ns()


@dataclass
class Context:
    """Who asks: uid and gid of the calling process."""

    uid: int = 0
    gid: int = 0


def names(node: Inode) -> dict[str, int]:
    """A directory's entries (the caller looked it up as a directory)."""
    assert node.entries is not None
    return node.entries
