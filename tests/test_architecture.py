"""The import rules of docs/architecture.md: each part imports only the parts below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "jestclip"

# part -> the other jestclip parts it may import (docs/architecture.md, "What each part may import")
ALLOWED: dict[str, set[str]] = {
    "selection": set(),
    "models": set(),
    "signals": set(),
    "data": {"selection"},
    "benchmark": {"data"},
    "eval": {"data", "models"},
    "train": {"selection", "data", "models", "eval", "signals"},
    "report": {"selection", "data", "models", "eval", "train"},
    "demo": {"benchmark", "data", "models", "train", "report"},
    "commands": {"selection", "data", "benchmark", "models", "eval", "train", "report", "demo", "signals"},
    "cli": {"commands"},
}


def imported_parts(path: Path) -> set[str]:
    """The jestclip parts a module imports, at top level or inside functions."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        parts |= {n.split(".")[1] for n in names if n.startswith("jestclip.") and n.count(".") >= 1}
    return parts


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if part_of(p) not in ("__init__", "__main__"))


def test_every_part_is_listed():
    assert {part_of(p) for p in MODULES} == set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layering(path):
    part = part_of(path)
    extra = imported_parts(path) - ALLOWED[part] - {part}
    assert not extra, f"{path.relative_to(PACKAGE)} ({part}) imports {sorted(extra)}"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``jestclip.train.steps`` for ``src/jestclip/train/steps.py``; an ``__init__.py`` is its package."""
    rel = path.relative_to(package.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports: at module level, under ``TYPE_CHECKING`` and inside
    functions alike. ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``."""
    root = package.name
    paths = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in paths else node.module)
            elif isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
        graph[name] = {e for e in edges if e in paths and e != name and e.split(".")[0] == root}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "modules that import each other (directly or around a loop): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


@pytest.mark.parametrize(
    "back_edge",
    [
        "from pkg.a import f\n",  # module level
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n",
        "def g():\n    from pkg.a import f\n",  # inside a function
        "from pkg import a\n",  # a submodule named through its package
    ],
    ids=["module-level", "type-checking", "function-level", "from-package"],
)
def test_the_cycle_check_sees_every_kind_of_import(tmp_path, back_edge):
    """The layout before this check (train/config -> methods -> steps -> distributed -> steps, steps ->
    methods and config under TYPE_CHECKING, steps -> distributed inside functions) fails it; so does each
    kind of import closing a loop here, while the same package without the back edge passes."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    pass\n")
    (pkg / "b.py").write_text("def g():\n    pass\n")
    assert import_cycles(import_graph(pkg)) == []
    (pkg / "b.py").write_text(back_edge + "\ndef g():\n    pass\n")
    assert import_cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]
