"""The layout's rules, read from the source so they cannot silently rot (docs/ARCHITECTURE.md).

* servers/ imports only mirrorfuse.wire and mirrorfuse.core (and itself);
* wire and core do no I/O and import nothing above them;
* in mirrorfuse, arrows point down: tools -> fs, transfer, index -> client -> core -> wire;
* no import cycles; no module over 500 lines.

Each check is a function of ``{module name: source}``, run on the tree and on
a small made-up tree that breaks it, so a check that stopped working fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 500
LAYERS = {"wire": 0, "core": 1, "client": 2, "fs": 3, "transfer": 3, "index": 3, "tools": 4}
IO_MODULES = {
    "asyncio",
    "socket",
    "selectors",
    "ssl",
    "subprocess",
    "threading",
    "multiprocessing",
    "concurrent",
    "os",
    "shutil",
    "tempfile",
    "signal",
    "fcntl",
    "ctypes",
    "io",
    "pathlib",
    "aiohttp",
    "uvloop",
    "pyfuse3",
}
IO_CALLS = {"open", "print", "input"}
# the durable-write helper is the one module of servers/ the client side uses
SHARED_FROM_SERVERS = {"servers.files"}

Tree = dict[str, str]


def load_tree() -> Tree:
    tree = {}
    for top in ("mirrorfuse", "servers"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            tree[".".join(parts)] = path.read_text()
    return tree


def is_package(tree: Tree, module: str) -> bool:
    return any(m.startswith(module + ".") for m in tree)


def imports(tree: Tree, module: str) -> set[str]:
    """Every project module ``module`` imports, at any depth of its code."""
    out = set()
    package = module if is_package(tree, module) else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(tree[module])):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from package import module" names the module, else the module imported from
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in tree else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in tree:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def external_imports(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "mirrorfuse" and len(parts) > 1 else None


def servers_violations(tree: Tree) -> list[str]:
    return [
        f"{m} imports {i}"
        for m in tree
        if m.split(".")[0] == "servers"
        for i in imports(tree, m)
        if not i.startswith(("mirrorfuse.wire", "mirrorfuse.core", "servers"))
    ]


def kernel_violations(tree: Tree) -> list[str]:
    """wire imports only wire; core only core and wire; neither does I/O."""
    out = []
    for m in tree:
        layer = layer_of(m)
        if layer not in ("wire", "core"):
            continue
        allowed = (
            ("mirrorfuse.wire",) if layer == "wire" else ("mirrorfuse.wire", "mirrorfuse.core")
        )
        out += [f"{m} imports {i}" for i in imports(tree, m) if not i.startswith(allowed)]
        out += [f"{m} imports {x} (I/O)" for x in sorted(external_imports(tree[m]) & IO_MODULES)]
        for node in ast.walk(ast.parse(tree[m])):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in IO_CALLS:
                out.append(f"{m} calls {node.func.id}() (I/O)")  # type: ignore[attr-defined]
    return out


def arrow_violations(tree: Tree) -> list[str]:
    """In mirrorfuse an import goes to a lower layer or within its own package."""
    out = []
    for m in tree:
        mine = layer_of(m)
        if mine is None:
            continue
        for i in imports(tree, m):
            theirs = layer_of(i)
            if theirs is None:
                if (
                    i.split(".")[0] == "servers"
                    and mine != "tools"
                    and i not in SHARED_FROM_SERVERS
                ):
                    out.append(f"{m} imports {i} (only tools start daemons)")
                continue
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                out.append(f"{m} ({mine}) imports {i} ({theirs}): arrows point down")
    return out


def cycles(tree: Tree) -> list[list[str]]:
    graph = {m: sorted(imports(tree, m)) for m in tree}
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                found.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def long_modules(paths: list[Path], root: Path = REPO) -> list[str]:
    return [
        f"{p.relative_to(root)}: {n} lines"
        for p in paths
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]


# -- the tree as it is ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree() -> Tree:
    return load_tree()


def test_servers_import_only_wire_and_core(tree):
    assert servers_violations(tree) == []


def test_wire_and_core_do_no_io_and_import_nothing_above(tree):
    assert kernel_violations(tree) == []


def test_arrows_point_down(tree):
    assert arrow_violations(tree) == []


def test_no_import_cycles(tree):
    assert cycles(tree) == []


def test_no_module_over_500_lines():
    paths = [
        p for top in ("mirrorfuse", "servers", "tests", "bench") for p in (REPO / top).rglob("*.py")
    ]
    assert len(paths) > 50
    assert long_modules(paths) == []


# -- each check catches what it is for -----------------------------------------------------------


BROKEN: Tree = {
    "mirrorfuse": "",
    "mirrorfuse.wire": "",
    "mirrorfuse.wire.frames": "import socket\nfrom mirrorfuse.core import layout\n",
    "mirrorfuse.core": "",
    "mirrorfuse.core.layout": "from ..client import volume\nprint('hi')\n",
    "mirrorfuse.client": "",
    "mirrorfuse.client.volume": "from mirrorfuse.tools.cli import main\n",
    "mirrorfuse.fs": "",
    "mirrorfuse.fs.files": "from mirrorfuse.transfer import get\nfrom servers.block import store\n",
    "mirrorfuse.transfer": "",
    "mirrorfuse.transfer.get": "from servers.files import atomic_write\n",
    "mirrorfuse.tools": "",
    "mirrorfuse.tools.cli": "from mirrorfuse.client import volume\nimport servers.peer\n",
    "servers": "",
    "servers.files": "",
    "servers.block": "",
    "servers.block.store": "from mirrorfuse.client.volume import Volume\nfrom ..files import x\n",
    "servers.peer": "from mirrorfuse.core.layout import Layout\n",
}


def test_the_checks_catch_a_tree_that_breaks_them():
    assert servers_violations(BROKEN) == [
        "servers.block.store imports mirrorfuse.client.volume",
    ]
    assert sorted(kernel_violations(BROKEN)) == [
        "mirrorfuse.core.layout calls print() (I/O)",
        "mirrorfuse.core.layout imports mirrorfuse.client.volume",
        "mirrorfuse.wire.frames imports mirrorfuse.core.layout",
        "mirrorfuse.wire.frames imports socket (I/O)",
    ]
    down = "arrows point down"
    assert sorted(arrow_violations(BROKEN)) == [
        f"mirrorfuse.client.volume (client) imports mirrorfuse.tools.cli (tools): {down}",
        f"mirrorfuse.core.layout (core) imports mirrorfuse.client.volume (client): {down}",
        f"mirrorfuse.fs.files (fs) imports mirrorfuse.transfer.get (transfer): {down}",
        "mirrorfuse.fs.files imports servers.block.store (only tools start daemons)",
        f"mirrorfuse.wire.frames (wire) imports mirrorfuse.core.layout (core): {down}",
    ]
    loops = cycles(BROKEN)
    assert ["mirrorfuse.client.volume", "mirrorfuse.tools.cli", "mirrorfuse.client.volume"] in loops


def test_a_long_module_is_found(tmp_path):
    fat, thin = tmp_path / "fat.py", tmp_path / "thin.py"
    fat.write_text("x = 1\n" * (MAX_LINES + 1))
    thin.write_text("x = 1\n" * MAX_LINES)
    assert long_modules([fat, thin], tmp_path) == [f"fat.py: {MAX_LINES + 1} lines"]
