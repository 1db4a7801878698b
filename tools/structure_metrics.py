"""Structure figures for src/danlu: parameter-list lengths and import cycles.

Run from the repository root: ``python tools/structure_metrics.py``. Reads the sources with
``ast`` (nothing is imported); imports inside functions count as edges, as they do for
import-linter.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "danlu"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {
        module_name(p): ast.parse(p.read_text(), str(p))
        for p in sorted((ROOT / PACKAGE).rglob("*.py"))
    }


def parameter_lists(trees: dict[str, ast.Module]) -> list[tuple[int, str]]:
    """(number of parameters, qualified name) of every function except public ``__init__``s."""
    found = []
    for mod, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                count -= bool(a.args and a.args[0].arg in ("self", "cls"))
                if node.name == "__init__":
                    continue
                found.append((count, f"{mod}.{node.name}"))
    return sorted(found, reverse=True)


def import_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    names = set(trees)
    graph: dict[str, set[str]] = {m: set() for m in trees}
    for mod, tree in trees.items():
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in names:
                    t = t.rpartition(".")[0]
                if t and t.startswith(PACKAGE) and t != mod and t != PACKAGE:
                    graph[mod].add(t)
    return graph


def package_of(mod: str) -> str:
    """The first level below danlu (danlu.algorithms.tiger.optimizer → danlu.optim)."""
    return ".".join(mod.split(".")[:2])


def cycles_between_packages(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    edges = {(package_of(a), package_of(b)) for a, bs in graph.items() for b in bs}
    edges = {(a, b) for a, b in edges if a != b}
    reach: dict[str, set[str]] = {}
    for a, _ in edges:
        seen, todo = set(), [a]
        while todo:
            x = todo.pop()
            for s, t in edges:
                if s == x and t not in seen:
                    seen.add(t)
                    todo.append(t)
        reach[a] = seen
    return sorted({tuple(sorted((a, b))) for a, b in edges if a in reach.get(b, set())})


def main() -> int:
    trees = modules()
    lists = parameter_lists(trees)
    print(f"longest parameter lists (outside __init__): {lists[:5]}")
    print(f"functions with >= 12 parameters: {sum(n >= 12 for n, _ in lists)}")
    cycles = cycles_between_packages(import_graph(trees))
    print(f"package pairs importing each other: {len(cycles)}")
    for a, b in cycles:
        print(f"  {a} <-> {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
