"""The library's floors (``distill/__init__.py``): no module imports from a higher floor, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import distill

PACKAGE = Path(distill.__file__).parent

# Bottom first, as distill/__init__.py states them.
FLOORS = {
    "config": 0,
    "runtime": 1,
    "cost": 1,
    "fingerprint": 1,
    "loaders": 1,
    "objective": 2,
    "compress": 2,
    "data": 3,
    "models": 4,
    "export": 5,
    "module": 6,
    "eval": 7,
    "recipe": 8,
}


def _unit(dotted: str) -> str | None:
    """The first component below ``distill`` (a subpackage or a top-level module); None outside the package."""
    parts = dotted.split(".")
    return parts[1] if parts[0] == "distill" and len(parts) > 1 else None


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "distill" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, node.lineno) for n in names]
    return found


def test_every_unit_of_the_package_has_a_floor():
    units = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    units |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert units == set(FLOORS)


def _upward(source: str, tree: ast.AST) -> list[tuple[str, int]]:
    """The imports in ``tree`` (a module of unit ``source``) of another unit on the same or a higher floor."""
    return [
        (name, line)
        for name, line in _imports(tree)
        if (target := _unit(name)) is not None and target != source and FLOORS[target] >= FLOORS[source]
    ]


def test_no_module_imports_from_a_higher_floor():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        source = _unit(".".join(rel.parts))
        if source is None:  # distill/__init__.py itself
            continue
        upward += [f"{rel}.py:{line} imports {name}" for name, line in _upward(source, ast.parse(path.read_text()))]
    assert upward == []


def test_the_check_sees_an_upward_import_inside_a_function_and_allows_downward_ones():
    tree = ast.parse("import distill.cost\ndef f():\n    from distill.eval.report import write\n")
    assert _upward("compress", tree) == [("distill.eval.report", 3)]
    assert _upward("recipe", tree) == []
