"""Logging, configured once by each command: ``PROG: level: message`` on standard error."""

from __future__ import annotations

import logging
import sys


class _Formatter(logging.Formatter):
    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.prog}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(prog: str, level: int = logging.INFO) -> None:
    """Route every logger of the process to standard error, once, at the start of a command."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prog))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
