"""Progress of a download: bytes and speed per source, total and average.

Live on a terminal (the table redrawn in place), one block of lines per
interval otherwise (a log, a pipe).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from mirrorfuse.core.scheduler import Scheduler
from mirrorfuse.wire.sizes import human


class Progress:
    """Per source: bytes and speed; total and average. Live on a terminal, lines otherwise."""

    def __init__(self, sched: Scheduler, total: int, out: TextIO = sys.stdout) -> None:
        self.sched = sched
        self.total = total
        self.out = out
        self.live = out.isatty()
        self.start = time.monotonic()
        self.last = dict.fromkeys(sched.sources, 0)
        self.last_t = self.start
        self.lines = 0

    def show(self, final: bool = False) -> None:
        now = time.monotonic()
        dt = max(now - self.last_t, 1e-6)
        rows = []
        for name, st in self.sched.sources.items():
            speed = (st.bytes - self.last[name]) / dt
            self.last[name] = st.bytes
            rows.append(f"  {name:28} {st.state:7} {human(st.bytes):>10} {human(speed):>10}/s")
        done = self.total - self.sched.remaining()
        elapsed = max(now - self.start, 1e-6)
        rows.append(
            f"  total {human(done)} of {human(self.total)} "
            f"({100 * done / max(self.total, 1):.0f}%), average {human(done / elapsed)}/s"
        )
        self.last_t = now
        if self.live and self.lines and not final:
            self.out.write(f"\x1b[{self.lines}F")
        self.out.write("\n".join(rows) + "\n")
        self.out.flush()
        self.lines = len(rows)
