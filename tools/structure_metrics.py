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


def is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """``@triton.jit`` functions: Triton passes every pointer and constant as an argument."""
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def public_functions(trees: dict[str, ast.Module]) -> set[str]:
    """The names ``danlu.functional`` exports: public API whose signatures stay as they are."""
    for node in ast.walk(trees["danlu.functional"]):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__":
            return set(ast.literal_eval(node.value))
    return set()


def parameter_lists(trees: dict[str, ast.Module], *, triton: bool = False) -> list[tuple[int, str]]:
    """(number of parameters, qualified name) of every function except ``__init__``s and the
    public functional API, either outside Triton kernels (default) or of the kernels only."""
    public = public_functions(trees)
    found = []
    for mod, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                count -= bool(a.args and a.args[0].arg in ("self", "cls"))
                if node.name == "__init__" or node.name in public:
                    continue
                if is_triton_kernel(node) != triton:
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
    kernels = parameter_lists(trees, triton=True)
    print(f"longest parameter lists (outside __init__, danlu.functional and kernels): {lists[:5]}")
    print(f"functions with >= 12 parameters: {sum(n >= 12 for n, _ in lists)}")
    print(f"Triton kernels: {len(kernels)}, the longest: {kernels[:2]}")
    threaded = sum(ast.unparse(tree).count("first_micro_step") for tree in trees.values())
    print(f"mentions of first_micro_step: {threaded}")
    cycles = cycles_between_packages(import_graph(trees))
    print(f"package pairs importing each other: {len(cycles)}")
    for a, b in cycles:
        print(f"  {a} <-> {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
