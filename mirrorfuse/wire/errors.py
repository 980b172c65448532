"""Errors a user sees: each carries a one-line message and, where it maps to one, an errno."""

from __future__ import annotations

import errno


class MirrorfsError(Exception):
    """A failure to report to the user as one line, without a traceback."""

    errno: int = errno.EIO


class UsageError(MirrorfsError):
    """Bad input on the command line or in a configuration."""

    errno = errno.EINVAL


class VolumeIOError(MirrorfsError):
    """Data cannot be read or written: every replica of a pair is gone."""

    errno = errno.EIO


class ServerError(MirrorfsError):
    """A server answered with an error reply: its code and message (and, for GAP, ``last``)."""

    def __init__(
        self, code: str, message: str, server: int | None = None, last: int | None = None
    ) -> None:
        where = f"server {server}: " if server is not None else ""
        super().__init__(f"{where}{message}")
        self.code = code
        self.detail = message
        self.server = server
        self.last = last
