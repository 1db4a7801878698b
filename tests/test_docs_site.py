"""The documentation site (mkdocs.yml, docs/): what `mkdocs build --strict` cannot check.

Every nav entry exists, every page is in the nav, every relative link (Markdown and raw
HTML, which mkdocs does not check) resolves, and every optimizer has a complete page."""

import re
from pathlib import Path

import pytest
import yaml

import danlu

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def nav_files(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from nav_files(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from nav_files(value)


def load_config():
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs' own tags (!ENV, !relative) are not used; any other tag would fail here
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def pages():
    return sorted(p for p in DOCS.rglob("*.md") if "examples" not in p.parts)


def links(page: Path):
    """Relative link targets of a page, outside code blocks: Markdown links and images, and
    raw HTML src/href attributes."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    targets += re.findall(r"""(?:src|href)=["']([^"']+)["']""", text)
    for target in targets:
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # external, or an anchor on the same page
        yield target.split("#")[0]


def test_every_nav_entry_exists():
    config = load_config()
    listed = list(nav_files(config["nav"]))
    assert listed, "mkdocs.yml has no nav"
    missing = [f for f in listed if not (DOCS / f).exists()]
    assert not missing, missing
    assert len(listed) == len(set(listed))


def test_every_page_is_in_the_nav():
    listed = set(nav_files(load_config()["nav"]))
    pages_in_docs = {str(p.relative_to(DOCS)) for p in pages()}
    assert pages_in_docs <= listed, pages_in_docs - listed


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_relative_link_resolves(page):
    for target in links(page):
        resolved = (page.parent / target).resolve()
        assert resolved.exists(), f"{page.name}: broken link {target}"


@pytest.mark.parametrize("name", sorted(danlu.REGISTRY))
def test_every_optimizer_has_a_page(name):
    """The update rule, the defaults and their source, the deviations, the blog article and
    paper, and the API reference pulled from the docstring."""
    page = DOCS / "optimizers" / f"{name}.md"
    assert page.exists(), f"add docs/optimizers/{name}.md and its nav entry"
    text = page.read_text()
    for heading in (
        "## Update rule",
        "## Defaults and where they come from",
        "## Deviations from the reference",
        "## References",
        "## API",
    ):
        assert heading in text, f"{page.name} lacks {heading!r}"
    assert "kexue.fm/archives/" in text
    cls = danlu.REGISTRY[name].cls
    assert f"::: danlu.{cls.__name__}" in text
    # every numeric default of the signature is in the defaults table
    table = text.split("## Defaults and where they come from")[1].split("\n## ")[0]
    for arg, default in danlu.REGISTRY[name].defaults.items():
        if isinstance(default, int | float | tuple) and not isinstance(default, bool):
            assert f"`{arg}`" in table, f"{page.name}: {arg} (default {default!r}) not in the table"


@pytest.mark.parametrize("name", sorted(danlu.REGISTRY))
def test_every_optimizer_is_in_the_nav_and_the_readme_table(name):
    """Generated from the registry: its page in mkdocs.yml's nav, and its row in README's
    optimizer table (the class, a link to its section of the algorithms reference)."""
    listed = set(nav_files(load_config()["nav"]))
    assert f"optimizers/{name}.md" in listed, f"add optimizers/{name}.md to mkdocs.yml's nav"
    cls = danlu.REGISTRY[name].cls
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith(f"| `danlu.{cls.__name__}` |")]
    assert rows, f"add a `danlu.{cls.__name__}` row to README.md's optimizer table"
    assert len(rows) == 1 and "docs/reference/algorithms.md#" in rows[0], rows


def test_docs_extra_and_make_target():
    pyproject = (ROOT / "pyproject.toml").read_text()
    docs_extra = re.search(r"^docs = \[(.*?)\]", pyproject, flags=re.S | re.M)
    assert docs_extra, "pyproject.toml needs a docs extra"
    for tool in ("mkdocs", "mkdocs-material", "mkdocstrings"):
        assert f'"{tool}' in docs_extra.group(1)
    runtime = re.search(r"^dependencies = \[(.*?)\]", pyproject, flags=re.S | re.M).group(1)
    assert "mkdocs" not in runtime
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^docs:", makefile, flags=re.M)
    assert "mkdocs build --strict" in makefile
    assert "make docs" in (ROOT / ".ci" / "run").read_text()
