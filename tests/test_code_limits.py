"""The package keeps its size limits: no module over 500 lines, no function over 80."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "patchbalance"
MODULE_LINES, FUNCTION_LINES = 500, 80


def long_functions(source: str, limit: int = FUNCTION_LINES) -> list[tuple[str, int]]:
    """Return (name, lines) of each function longer than `limit`, counted from `def` (its
    decorators left out) to its last line."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append((node.name, lines))
    return found


def test_the_function_check_counts_from_def_to_the_last_line():
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    assert long_functions(f"def f():\n{body}\n") == [("f", 81)]
    assert long_functions(f"def f():\n{body}\n", limit=81) == []


def test_no_module_or_function_is_over_its_limit():
    modules, functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = str(path.relative_to(PACKAGE))
        if len(source.splitlines()) > MODULE_LINES:
            modules.append((name, len(source.splitlines())))
        functions += [(name, *found) for found in long_functions(source)]
    assert modules == []
    assert functions == []
