"""Progress of a download: bytes and speed per source, total and average.

Live on a terminal (a table redrawn in place by rich's Live, as ``status
--watch`` is), one block of lines per interval otherwise (a log, a pipe).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from mirrorfuse.core.scheduler import Scheduler
from mirrorfuse.wire.sizes import human

if TYPE_CHECKING:  # rich is imported for a live view only: a tenth of a second to import
    from rich.live import Live


class Progress:
    """Per source: bytes and speed; total and average. Live on a terminal, lines otherwise."""

    def __init__(
        self, sched: Scheduler, total: int, out: TextIO = sys.stdout, live: bool | None = None
    ) -> None:
        """``live``: redraw in place (None: when ``out`` is a terminal)."""
        self.sched = sched
        self.total = total
        self.out = out
        if live is None:
            isatty = getattr(out, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live
        self.start = time.monotonic()
        self.last = dict.fromkeys(sched.sources, 0)
        self.last_t = self.start
        self._view: Live | None = None

    def _rows(self) -> tuple[list[tuple[str, str, str, str]], str]:
        now = time.monotonic()
        dt = max(now - self.last_t, 1e-6)
        rows = []
        for name, st in self.sched.sources.items():
            speed = (st.bytes - self.last[name]) / dt
            self.last[name] = st.bytes
            rows.append((name, str(st.state), human(st.bytes), f"{human(speed)}/s"))
        done = self.total - self.sched.remaining()
        elapsed = max(now - self.start, 1e-6)
        self.last_t = now
        total = (
            f"total {human(done)} of {human(self.total)} "
            f"({100 * done / max(self.total, 1):.0f}%), average {human(done / elapsed)}/s"
        )
        return rows, total

    def show(self, final: bool = False) -> None:
        rows, total = self._rows()
        if not self.live:
            lines = [f"  {n:28} {s:7} {b:>10} {v:>12}" for n, s, b, v in rows]
            self.out.write("\n".join([*lines, f"  {total}"]) + "\n")
            self.out.flush()
            return
        from rich.console import Console
        from rich.live import Live
        from rich.table import Table

        table = Table(caption=total, caption_justify="left")
        for col in ("SOURCE", "STATE", "BYTES", "SPEED"):
            table.add_column(col, justify="right" if col in ("BYTES", "SPEED") else "left")
        for row in rows:
            table.add_row(*row)
        if self._view is None:
            console = Console(file=self.out, highlight=False, force_terminal=True)
            self._view = Live(console=console, auto_refresh=False)
            self._view.start()
        self._view.update(table, refresh=True)
        if final:
            self._view.stop()
            self._view = None
