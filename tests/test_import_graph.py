"""The package's import graph, imports inside functions included, has no circle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Return module -> the package modules it imports anywhere in its body."""
    files = {module_name(p): p for p in (SRC / "patchbalance").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from package import submodule` imports the submodule.
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_finds_a_circle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_the_package_has_no_import_circle():
    assert circles(import_graph()) == []


# The command packages, each behind one CLI command. `compare` runs the others (it builds,
# selects and trains each arm), so it is the one command package that may import them.
COMMANDS = ("balancing", "coreset", "reporting", "train", "compare")
# Entry points above every command: the CLI, the demo (build then report), the Lightning
# data module (train's plan on a user's Trainer), and the package root.
ENTRY_POINTS = ("patchbalance", "patchbalance.cli", "patchbalance.demo", "patchbalance.lightning")


def command_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in COMMANDS else None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Return the imports that run from a lower module, or from another command, into a
    command package."""
    found = []
    for module, targets in sorted(graph.items()):
        if module in ENTRY_POINTS or command_of(module) == "compare":
            continue
        for target in sorted(targets):
            if command_of(target) and command_of(target) != command_of(module):
                found.append((module, target))
    return found


def test_the_layer_check_finds_an_import_up_into_a_command():
    graph = {"patchbalance.config": {"patchbalance.balancing.methods"}, "patchbalance.cli": set()}
    assert upward_imports(graph) == [("patchbalance.config", "patchbalance.balancing.methods")]
    graph = {"patchbalance.coreset.weights": {"patchbalance.balancing.weights"}}
    assert upward_imports(graph) == [
        ("patchbalance.coreset.weights", "patchbalance.balancing.weights")
    ]


def test_no_import_runs_up_into_a_command_package():
    assert upward_imports(import_graph()) == []
