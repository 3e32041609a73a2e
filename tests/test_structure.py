"""The package's structure: every module imports on its own in a fresh interpreter, the import
graph has no cycle (function-level imports count: hiding a cycle inside a function is still a
cycle), and no module reaches into another package's private modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llmbatch

SRC = Path(llmbatch.__file__).parent
#: Modules not imported by the first test: an optional library not installed everywhere (the GPU engine).
OPTIONAL = {"llmbatch.engines._vllm", "llmbatch.__main__"}  # (__main__ runs the CLI)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(name: str) -> set[str]:
    """The llmbatch modules `name` imports, at any level (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(MODULES[name].read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target not in MODULES:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    found.discard(name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    names = [n for n in MODULES if n not in OPTIONAL]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_import_graph_has_no_cycle() -> None:
    # A module importing a package depends on the package's __init__, which may import its
    # submodules; an edge from a submodule to its own package's __init__ is what makes Python's
    # partially initialised packages work, so only edges between distinct modules count.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if m.startswith(n + ".") or n.startswith(m + ".") and _is_package(m):
                continue  # a package and its own submodules
            if state.get(m) == 1:
                cycles.append([*stack[stack.index(m) :], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_packages_private_modules() -> None:
    bad = []
    for name, targets in GRAPH.items():
        for target in targets:
            owner, _, leaf = target.rpartition(".")
            if leaf.startswith("_") and not _is_package(target) and not (name + ".").startswith(owner + "."):
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(sorted(bad))
