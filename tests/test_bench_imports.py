"""Every name the benchmark scripts import from the package exists: a rename in `src/` that
forgets a script fails here, not when someone next runs the benchmark."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def missing_names(source: str) -> list[str]:
    """Return `module.name` for each package import in `source` that does not resolve."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.ImportFrom) and (node.module or "").startswith("patchbalance")
        ):
            continue
        module = importlib.import_module(node.module)
        for alias in node.names:
            if hasattr(module, alias.name):
                continue
            try:
                importlib.import_module(f"{node.module}.{alias.name}")
            except ImportError:
                missing.append(f"{node.module}.{alias.name}")
    return missing


def test_the_check_finds_a_renamed_function():
    assert missing_names("from patchbalance.table import no_such_name") == [
        "patchbalance.table.no_such_name"
    ]
    assert missing_names("from patchbalance import sampling") == []


def test_every_benchmark_imports_names_that_exist():
    found = {
        str(path.relative_to(BENCH)): missing_names(path.read_text(encoding="utf-8"))
        for path in sorted(BENCH.rglob("*.py"))
    }
    assert {name: names for name, names in found.items() if names} == {}
