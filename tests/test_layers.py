"""The one-way import layers of src/danlu (pyproject.toml ``[tool.importlinter]``, CONTRIBUTING.md
"Layout") hold, and the layout they describe is the one on disk."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration
from importlinter.domain.helpers import module_expressions_to_modules
from importlinter.domain.imports import ModuleExpression

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "danlu"


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    """import-linter reads pyproject.toml from the working directory."""
    monkeypatch.chdir(ROOT)


def _contracts() -> list[dict]:
    return read_configuration()["contracts_options"]


def test_import_linter_contracts_are_kept():
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(_contracts())} kept, 0 broken" in done.stdout


def test_every_package_and_top_level_module_sits_in_a_layer():
    """A new package or module outside the layers would escape the contract."""
    (layers,) = [c["layers"] for c in _contracts() if c["type"] == "layers"]
    listed = {name.strip() for layer in layers for name in layer.split("|")}
    on_disk = {
        f"danlu.{p.stem if p.is_file() else p.name}"
        for p in SRC.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists())
        or (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
    }
    assert on_disk == listed


def test_every_algorithm_is_in_the_independence_contract():
    """The contract names the homes by a pattern, so a new algorithm is covered without
    editing it; as import-linter resolves it, it must match every home and nothing else."""
    (expressions,) = [c["modules"] for c in _contracts() if c["type"] == "independence"]
    graph = grimp.build_graph("danlu", cache_dir=None)
    resolved = module_expressions_to_modules(graph, [ModuleExpression(e) for e in expressions])
    matched = {m.name for m in resolved}
    homes = {
        f"danlu.algorithms.{p.name}"
        for p in (SRC / "algorithms").iterdir()
        if (p / "__init__.py").exists()
    }
    assert matched == homes


def test_core_imports_nothing_else_from_danlu():
    """The same rule the layers contract enforces, read straight from the source (including
    imports inside functions), so that a failure names the file and the line."""
    offenders = []
    for path in sorted((SRC / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                for n in names
                if (n == "danlu" or n.startswith("danlu.")) and not n.startswith("danlu.core")
            ]
    assert not offenders
