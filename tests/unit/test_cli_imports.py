"""mirrorfs-cli imports the code of the command it runs, not of every command.

Each start of a command pays for what it imports: the volume client, the file
system, the index client and rich are a tenth of a second that a download,
or any --help, does not need. A fresh interpreter runs the command and lists
what it loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# what only other commands need (get, status, fsck, shell, index, status --watch)
HEAVY = (
    "mirrorfuse.client.volume",
    "mirrorfuse.client.metastore",
    "mirrorfuse.fs",
    "mirrorfuse.index.client",
    "mirrorfuse.transfer.get",
    "rich",
)
# the code of the commands themselves
COMMANDS = (
    "mirrorfuse.client",
    "mirrorfuse.transfer",
    "mirrorfuse.tools.admin",
    "mirrorfuse.tools.download",
    "mirrorfuse.tools.fsck",
    "mirrorfuse.tools.indexcmd",
    "mirrorfuse.tools.servefile",
    "mirrorfuse.tools.shell",
)


def run_cli(argv: list[str]) -> tuple[int, list[str]]:
    """mirrorfs-cli ARGV in a fresh interpreter: its exit code, and every module it loaded."""
    code = (
        "import sys\n"
        "from mirrorfuse.tools.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print(code)\n"
        "print(*sorted(sys.modules))\n"
    )
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": path},
    ).stdout.splitlines()
    return int(out[-2]), out[-1].split()


def test_a_download_imports_neither_the_volume_client_nor_rich(tmp_path):
    # it stops at its first check, after its code is imported
    code, modules = run_cli(["download", "-o", str(tmp_path / "no" / "f"), "http://127.0.0.1/f"])
    assert code == 1
    assert "mirrorfuse.tools.download" in modules and "mirrorfuse.transfer.download" in modules
    assert [m for m in modules if m.startswith(HEAVY)] == []


def test_help_imports_the_code_of_no_command():
    for argv in (["--help"], ["status", "--help"], ["download", "--help"], ["get", "--help"]):
        code, modules = run_cli(argv)
        assert code == 0, argv
        assert [m for m in modules if m.startswith(COMMANDS)] == [], argv
