"""Logging, configured once by each command: ``PROG: level: message`` on standard error.

A daemon's own account of what it does (listening, sharing a file) is its
standard output; warnings and errors go through logging.
"""

from __future__ import annotations

import logging
import os
import sys


class _Formatter(logging.Formatter):
    def __init__(self, prog: str, timestamps: bool) -> None:
        super().__init__()
        self.prog = prog
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.prog}: {record.levelname.lower()}: {record.getMessage()}"
        if self.timestamps:
            text = f"{self.formatTime(record)} {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(prog: str, level: int = logging.INFO, timestamps: bool = False) -> None:
    """Route every logger of the process to standard error, once, at the start of a command.

    Daemons, whose standard error is a log read later, stamp each line with the time.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prog, timestamps))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def say(text: str) -> None:
    """One line of a command's account on standard output.

    A reader that has gone (``./mount.sh ... | head -1``) silences the rest rather
    than failing the command halfway, with its servers started and its mount up.
    """
    try:
        print(text, flush=True)
    except BrokenPipeError:
        try:  # later lines, and the flush at exit, go nowhere
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        except (OSError, ValueError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
