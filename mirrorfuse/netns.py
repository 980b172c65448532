"""Multicast for tests and benchmarks, kept off the host network: a private namespace."""

from __future__ import annotations

import subprocess


def setup_lo() -> None:
    """Inside ``unshare -n``: loopback up, with multicast and a route for 224.0.0.0/4."""
    for cmd in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "set", "lo", "multicast", "on"],
        ["ip", "route", "add", "224.0.0.0/4", "dev", "lo"],
    ):
        subprocess.run(cmd, check=True)
