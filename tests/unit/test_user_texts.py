"""What a new user reads: each tool described by what it does, the Python it needs."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import tomllib
from pathlib import Path

import pytest

from mirrorfuse.tools import cli, index, mount, peer, server, up

REPO = Path(__file__).resolve().parents[2]


def help_texts() -> dict[str, str]:
    """Every --help a user can ask for: each command, each mirrorfs-cli subcommand."""
    parser = cli.build_parser()
    texts = {"mirrorfs-cli": parser.format_help()}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        texts[f"mirrorfs-cli {name}"] = sp.format_help()
    for module in (server, mount, up, index, peer):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.parse_args(["--help"])
        texts[module.PROG] = out.getvalue()
    return texts


def test_no_text_speaks_of_seeds():
    texts = help_texts()
    assert "mirrorfs-cli start" in texts and "mount.sh" in texts
    for name, text in texts.items():
        assert "usage:" in text, name
        assert not re.search(r"\bseeds?\b", text, re.I), f"{name} --help: {text}"
    for doc in ("README.md", "docs/ARCHITECTURE.md"):
        text = (REPO / doc).read_text()
        assert not re.search(r"\bseeds?\b", text, re.I), doc


def test_the_readme_states_the_python_the_project_requires():
    needed = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    version = needed.removeprefix(">=")
    assert re.fullmatch(r"3\.\d+", version), needed
    assert f"Python {version} or newer" in (REPO / "README.md").read_text()


def test_status_help_names_an_option_that_exists():
    """`status --help` said `MOUNTPOINT same as --mount` while --mount was refused."""
    parser = cli.build_parser()
    for argv in (["status", "--mount", "/m"], ["fsck", "--mount", "/m"], ["rebuild", "1", "/m"]):
        args = parser.parse_args(argv)
        assert "/m" in (args.mount, args.where), argv
