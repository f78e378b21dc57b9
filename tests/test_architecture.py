"""Imports flow one way: towers <- training, indexing <- serving; nothing imports serving."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> packages of ours it may import
ALLOWED = {
    "towers": {"towers"},
    "training": {"towers", "training"},
    "indexing": {"towers", "indexing"},
    "serving": {"towers", "indexing", "serving", "protos"},
}
OURS = {"towers", "training", "indexing", "serving", "ecomrec", "protos"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    bad = []
    for f in sorted((ROOT / package).rglob("*.py")):
        if "_generated" in f.parts:
            continue
        wrong = _imports(f) - ALLOWED[package]
        if wrong:
            bad.append(f"{f.relative_to(ROOT)} imports {sorted(wrong)}")
    assert not bad, "\n".join(bad)


def test_serving_is_a_leaf() -> None:
    importers = [
        str(f.relative_to(ROOT))
        for pkg in ("towers", "training", "indexing")
        for f in (ROOT / pkg).rglob("*.py")
        if "serving" in _imports(f)
    ]
    assert importers == [], importers
