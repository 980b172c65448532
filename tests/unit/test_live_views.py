"""The live views (status --watch, a download's progress) drawn by rich, without a terminal."""

from __future__ import annotations

import io
import re

from rich.console import Console

from mirrorfuse.core.scheduler import Scheduler, Segment
from mirrorfuse.tools.watch import render, watch
from mirrorfuse.transfer.progress import Progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def status(state: str = "alive", healing: dict | None = None) -> dict:
    rows = []
    for i in range(4):
        row = {"id": i, "address": f"127.0.0.1:{7000 + i}", "pair": i // 2, "pid": 100 + i}
        row.update(state="alive", blocks=10, bytes=10 << 20, reads=1, writes=2, repairs=0)
        rows.append(row)
    rows[1]["state"] = state
    if healing:
        rows[1]["healing"] = healing
    if state == "failed":
        rows[1] = {**rows[1], "error": "is not reachable: connection refused", "pid": None}
    return {
        "volume": "v1", "block_size": 1 << 20, "servers": 4, "pairs": 2, "table_gen": 7,
        "rows": rows,
    }  # fmt: skip


def text(renderable, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, record=True)
    console.print(renderable)
    return console.export_text()


def row_of(screen: str, server: int) -> str:
    return next(line for line in screen.splitlines() if f"127.0.0.1:{7000 + server}" in line)


def test_a_healing_server_shows_how_far_its_heal_is():
    heal = {"done": 450, "total": 1000, "percent": 45, "seconds_left": 3}
    screen = text(render(status("healing 45%", heal), 0.0))
    row = row_of(screen, 1)
    assert "healing 45%" in row
    assert "450/1000 blocks" in row
    assert "blocks" not in row_of(screen, 0).split("│")[-2]  # no heal, no bar
    assert "volume v1: 4 servers in 2 mirror pairs" in screen
    assert "server 1: healing, 450 of 1000 blocks, about 3 s left" in screen
    narrow = text(render(status("healing 45%", heal), 0.0), width=60)
    assert "127.0.0.1:7001" in row_of(narrow, 1)  # who and what state: never cut
    assert "healing 45%" in row_of(narrow, 1)
    assert "server 1: healing, 450 of 1000 blocks" in narrow.replace("\n", " ")


def test_a_failed_server_shows_its_state_and_why():
    screen = text(render(status("failed"), 0.0))
    assert "failed" in row_of(screen, 1)
    assert "server 1: is not reachable: connection refused" in screen


def test_watch_piped_prints_a_table_per_interval_and_ends_on_ctrl_c():
    out = io.StringIO()
    asked = []

    def ask() -> dict:
        asked.append(1)
        if len(asked) == 3:
            raise KeyboardInterrupt  # Ctrl-C while it asks
        return status()

    assert watch(ask, 0.01, out) == 0
    tables = out.getvalue().split("\n\n")
    assert len([t for t in tables if t.startswith("-- ")]) == 2
    assert all("ID  ADDRESS" in t for t in tables if t.startswith("-- "))


def test_watch_on_a_terminal_redraws_in_place():
    out = io.StringIO()
    states = iter(["alive", "failed"])

    def ask() -> dict:
        st = next(states, None)
        if st is None:
            raise KeyboardInterrupt
        return status(st)

    assert watch(ask, 0.01, out, live=True) == 0
    raw = out.getvalue()
    assert "\x1b[" in raw  # cursor moves: the table is drawn over itself
    plain = ANSI.sub("", raw)
    assert plain.index("alive") < plain.index("failed")
    assert "-- " not in plain  # not the piped form


def sched() -> Scheduler:
    s = Scheduler([Segment(0, 0, 100), Segment(1, 100, 200)], ["server-a", "server-b"])
    s.sources["server-a"].bytes = 3 << 20
    return s


def test_download_progress_piped_is_lines():
    out = io.StringIO()
    p = Progress(sched(), 8 << 20, out)
    p.show()
    p.show(final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6
    assert lines[0].split()[:2] == ["server-a", "alive"]
    assert lines[2].strip().startswith("total ")


def test_download_progress_on_a_terminal_is_one_table_redrawn():
    out = io.StringIO()
    p = Progress(sched(), 8 << 20, out, live=True)
    p.show()
    p.show(final=True)
    plain = ANSI.sub("", out.getvalue())
    assert "SOURCE" in plain and "server-b" in plain and "total " in plain
    assert "\x1b[" in out.getvalue()
