"""Release hygiene (CONTRIBUTING.md "Versions and releases"): one version number, and a wheel
whose only runtime requirement is torch."""

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import danlu

ROOT = Path(__file__).resolve().parents[1]


def pyproject_version():
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match, "pyproject.toml has no static version"
    return match.group(1)


def test_version_is_in_one_place():
    assert danlu.__version__ == pyproject_version()
    # semantic versioning: MAJOR.MINOR.PATCH with an optional pre-release
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", danlu.__version__)


def test_changelog_has_an_unreleased_section():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(r"^## \[Unreleased\]", text, re.M)


def test_wheel_requires_only_torch(tmp_path):
    # Build from a copy, so the checkout gets no build/ or egg-info; offline (no isolation:
    # the dev extra provides setuptools).
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(
        ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    out = tmp_path / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip_wheel, "--wheel-dir", str(out), str(project)], check=True)
    (wheel,) = out.glob("danlu-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(metadata_name).decode())
    assert metadata["Name"] == "danlu"
    assert metadata["Version"] == pyproject_version()
    requires = metadata.get_all("Requires-Dist") or []
    runtime = [r for r in requires if "extra ==" not in r]
    assert [re.split(r"[<>=!~;\s\[]", r)[0] for r in runtime] == ["torch"], runtime
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert {"compare", "dev", "docs"} <= extras
    assert "danlu/py.typed" in names  # type information ships with the package
    assert not [n for n in names if n.startswith(("tests/", "docs/", "benchmarks/"))]
