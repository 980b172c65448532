"""``mirrorfs-cli status --watch``: the status table, asked again every interval.

On a terminal the table is redrawn in place (rich's Live), with a bar for each
server being healed; piped or redirected, a plain table is printed per interval
with the time it was taken, so a log of it reads like a series of ``status``
runs. Ctrl-C (or SIGTERM) ends it, exit status 0.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mirrorfuse.wire.sizes import human

from .admin import format_status

Status = dict[str, Any]
COLOURS = {"alive": "green", "failed": "bold red", "stale": "red", "unreachable": "bold red"}


def render(st: Status, when: float) -> RenderableType:
    """The status as a rich table, its notes below it."""
    stamp = time.strftime("%H:%M:%S", time.localtime(when))
    if st["volume"] is None:
        title = f"no formatted volume found on {st['servers']} servers"
    else:
        title = (
            f"volume {st['volume']}: {st['servers']} servers in {st['pairs']} mirror pairs, "
            f"block size {human(st['block_size'])}, failure table generation {st['table_gen']}"
        )
    table = Table(title=title, caption=f"at {stamp}; Ctrl-C ends", title_justify="left")
    # on a narrow terminal the numbers give way, never who a server is or its state
    wide = {
        "ID": 2,
        "ADDRESS": max((len(r["address"]) for r in st["rows"]), default=7),
        "STATE": max((len(str(r["state"])) for r in st["rows"]), default=5),
    }
    for col in ("ID", "ADDRESS", "PID", "PAIR", "STATE", "BLOCKS", "STORED", "READS", "WRITES"):
        right = col in ("BLOCKS", "READS", "WRITES")
        table.add_column(
            col, justify="right" if right else "left", no_wrap=True, min_width=wide.get(col)
        )
    table.add_column("HEALING")
    for r in st["rows"]:
        has = "blocks" in r
        state = str(r["state"])
        heal: RenderableType = ""
        if r.get("healing"):
            h = r["healing"]
            bar = ProgressBar(total=max(h["total"], 1), completed=h["done"], width=20)
            heal = Table.grid(padding=(0, 1))
            heal.add_row(bar, f"{h['done']}/{h['total']} blocks")
        table.add_row(
            str(r["id"]),
            r["address"],
            str(r["pid"] or "-"),
            str(r["pair"]),
            Text(state, style=COLOURS.get(state.split()[0], "yellow")),
            str(r["blocks"]) if has else "-",
            human(r["bytes"]) if has else "-",
            str(r["reads"]) if has else "-",
            str(r["writes"]) if has else "-",
            heal,
        )
    notes = []
    for r in st["rows"]:
        if r.get("error"):
            notes.append(Text(f"server {r['id']}: {r['error']}", style="red"))
        if r.get("healing"):  # also here: a narrow terminal may not show the bar
            h = r["healing"]
            eta = f", about {h['seconds_left']} s left" if h["seconds_left"] is not None else ""
            notes.append(
                Text(f"server {r['id']}: healing, {h['done']} of {h['total']} blocks{eta}")
            )
    return Group(table, *notes)


def watch(ask: Callable[[], Status], interval: float, out: TextIO, live: bool | None = None) -> int:
    """Show ``ask()`` every ``interval`` seconds until Ctrl-C or SIGTERM."""
    console = Console(file=out, highlight=False, force_terminal=live)
    live = console.is_terminal
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if live:
            with Live(console=console, auto_refresh=False, transient=False) as view:
                while True:
                    view.update(render(ask(), time.time()), refresh=True)
                    time.sleep(interval)
        while True:
            st = ask()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"-- {stamp}\n{format_status(st)}\n\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `status --watch | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # nothing left to flush
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt
