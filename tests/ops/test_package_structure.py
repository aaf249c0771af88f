"""The ops package's structure, checked on its source (no triton needed): no import
cycle between the op families, shared constants defined once, and Triton kernel source
patterns that the interpreter accepts but a GPU compiler rejects or lacks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "westar_ops"
TRITON_SOURCES = sorted((PACKAGE / "triton").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from a import b`` gives both
    ``a`` and ``a.b``: b may be a submodule), wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_registry_imports_neither_ops_nor_triton():
    names = imported_modules(PACKAGE / "_registry.py")
    assert not any(n.startswith(("westar_ops.ops", "westar_ops.triton")) for n in names), names


@pytest.mark.parametrize("path", TRITON_SOURCES, ids=lambda p: p.name)
def test_triton_package_does_not_import_ops(path):
    assert not any(n.startswith("westar_ops.ops") for n in imported_modules(path))


def test_shared_constants_defined_once():
    """NUM_STATS and acc_dtype live in westar_ops/_registry.py only."""
    defined = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in ("acc_dtype", "_stats_dtype"):
                defined.append((path.name, node.name))
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id == "NUM_STATS":
                        defined.append((path.name, "NUM_STATS"))
    assert sorted(defined) == [("_registry.py", "NUM_STATS"), ("_registry.py", "acc_dtype")]


# ------------------------------------------------------------- Triton source patterns


def constexpr_assignments_in_loops(source: str) -> list[int]:
    """Lines of ``x: tl.constexpr = ...`` inside a for/while loop. Triton >= 3.6 rejects
    re-annotating a name as constexpr in a loop body (also in tl.static_range), while the
    interpreter runs it: the tests under TRITON_INTERPRET=1 cannot catch it."""
    lines = []
    for loop in ast.walk(ast.parse(source)):
        if not isinstance(loop, (ast.For, ast.While)):
            continue
        for node in ast.walk(loop):
            if isinstance(node, ast.AnnAssign) and ast.unparse(node.annotation).endswith(
                "constexpr"
            ):
                lines.append(node.lineno)
    return sorted(set(lines))


def masked_histograms(source: str) -> list[int]:
    """Lines of tl.histogram(..., mask=...): the mask argument needs Triton >= 3.4, and
    the torch versions the package supports (>= 2.6) ship Triton 3.2 and 3.3."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and ast.unparse(node.func).endswith("histogram")
        and (len(node.args) > 2 or any(k.arg == "mask" for k in node.keywords))
    ]


BAD_KERNEL = """
@triton.jit
def kernel(x, BITS: tl.constexpr):
    for i in tl.static_range(BITS):
        bp: tl.constexpr = BITS - 1 - i
    k = 0
    while k < 3:
        step: constexpr = 2
        k += step
    h = tl.histogram(x, 256, mask=x > 0)
    g = tl.histogram(x, 256, x > 0)
    ok: tl.constexpr = 4
"""


def test_scanners_find_the_patterns():
    assert constexpr_assignments_in_loops(BAD_KERNEL) == [5, 8]
    assert masked_histograms(BAD_KERNEL) == [10, 11]


@pytest.mark.parametrize("path", TRITON_SOURCES, ids=lambda p: p.name)
def test_triton_sources_avoid_the_patterns(path):
    source = path.read_text()
    assert constexpr_assignments_in_loops(source) == []
    assert masked_histograms(source) == []
