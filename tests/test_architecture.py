"""Imports flow one way: ecomrec.errors/config <- intake <- towers <- training <- segments,
towers <- indexing, and serving on top; nothing imports serving; no import circle between
modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> packages of ours it may import
# ``BASE`` (ecomrec.errors, ecomrec.config) is reachable from every package and imports
# nothing of ours; the rest of ``ecomrec`` is the console script on top of everything.
BASE = "ecomrec.base"
BASE_MODULES = ("ecomrec.errors", "ecomrec.config")
ALLOWED = {
    "intake": {BASE, "intake"},
    "towers": {BASE, "intake", "towers"},
    "training": {BASE, "intake", "towers", "training"},
    "segments": {BASE, "intake", "towers", "training", "segments"},
    "indexing": {BASE, "intake", "towers", "indexing"},
    "lifecycle": {
        BASE,
        "intake",
        "towers",
        "training",
        "segments",
        "indexing",
        "lifecycle",
        "outcomes",
    },
    "serving": {
        BASE,
        "intake",
        "towers",
        "training",
        "segments",
        "indexing",
        "lifecycle",
        "serving",
        "protos",
        "outcomes",
    },
    # online outcomes of recommendations (attribution, metrics, A/B): serving and lifecycle
    # import it, it imports neither
    "outcomes": {BASE, "intake", "towers", "training", "segments", "outcomes"},
}
OURS = {
    "intake",
    "towers",
    "training",
    "segments",
    "indexing",
    "lifecycle",
    "serving",
    "ecomrec",
    "protos",
    "outcomes",
}
PACKAGES = (
    "intake",
    "towers",
    "training",
    "segments",
    "indexing",
    "lifecycle",
    "serving",
    "ecomrec",
    "outcomes",
)


def _modules(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports (at top level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pkg import mod` imports the module pkg.mod when it is one
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return {m for m in found if m.split(".")[0] in OURS}


def _package(module: str) -> str:
    if module.startswith(BASE_MODULES):
        return BASE
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    return {_package(m) for m in _modules(path)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


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


def test_base_imports_nothing_of_ours() -> None:
    """ecomrec.errors and ecomrec.config sit under every package: they import none of ours
    but each other (the console script ``ecomrec.cli`` is the only other module there)."""
    found = {m: _modules(ROOT / (m.replace(".", "/") + ".py")) for m in BASE_MODULES}
    bad = {m: sorted(d for d in deps if _package(d) != BASE) for m, deps in found.items()}
    bad = {m: d for m, d in bad.items() if d}
    assert bad == {}, bad


def test_serving_is_a_leaf() -> None:
    importers = [
        str(f.relative_to(ROOT))
        for pkg in ("intake", "towers", "training", "segments", "indexing", "lifecycle", "outcomes")
        for f in (ROOT / pkg).rglob("*.py")
        if "serving" in _imports(f)
    ]
    assert importers == [], importers


def test_every_package_is_covered() -> None:
    """A new top-level package of ours must be added to the rule above."""
    ours = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert ours <= set(ALLOWED) | {"ecomrec", "protos"}, ours - set(ALLOWED)


def test_no_import_cycle_between_modules() -> None:
    """No module imports (even lazily, inside a function) a module that imports it back,
    directly or through others."""
    files = {
        _module_name(f): f
        for pkg in PACKAGES
        for f in (ROOT / pkg).rglob("*.py")
        if "_generated" not in f.parts
    }
    graph = {m: {d for d in _modules(f) if d in files and d != m} for m, f in files.items()}
    # Tarjan's strongly connected components: any component of size > 1 is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], cycles


def test_benchmarks_use_public_api_only() -> None:
    """Benchmarks import no private name (``_x``) from our packages."""
    bad = []
    for f in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in OURS
            ):
                bad += [
                    f"{f.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert bad == [], bad
