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
    "data": {"selection"},
    "benchmark": {"data"},
    "eval": {"data", "models"},
    "train": {"selection", "data", "models", "eval"},
    "report": {"selection", "data", "models", "eval", "train"},
    "demo": {"benchmark", "data", "models", "train", "report"},
    "commands": {"selection", "data", "benchmark", "models", "eval", "train", "report", "demo"},
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
