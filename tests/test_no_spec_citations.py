"""Citations users can follow (issue 17): nothing shipped cites the internal spec, and every
citation of the algorithms reference (docs/reference/algorithms.md) points at a heading that
exists.

replace_spec_citations: skip (this file keeps the strings it searches for)
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from danlu.cli import main as cli_main
from danlu.cli.compare import run as compare_run

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference" / "algorithms.md"
SHIPPED = ["src", "docs", "README.md", "benchmarks"]
TOOL = ROOT / "tools" / "replace_spec_citations.py"

FULL = re.compile(r"docs/reference/(?P<page>[\w-]+)\.md(?:#(?P<anchor>[A-Za-z0-9_-]+))?")
# "docs/reference/algorithms.md#lion-defaults, #tiger-defaults and #amos-tests item 3"; a run
# may continue on the next comment line
ITEM = r"(?:\s+items?\s+(?P<item>\d+)(?:-(?P<last>\d+))?)?"
RUN_NEXT = re.compile(
    r"(?:\s*[,/;]?\s*(?:and\s+|or\s+)?(?:\n\s*#:?\s*)?)#(?P<anchor>[a-z0-9-]+)" + ITEM
)
MD_LINK = re.compile(r"\]\((?P<path>[^)\s#]*reference/algorithms\.md)(?:#(?P<anchor>[^)\s]+))?\)")


def text_files(roots, suffixes=(".py", ".md", ".yml", ".yaml", ".js", ".txt", ".toml")):
    for name in roots:
        path = ROOT / name
        if path.is_file():
            yield path
        else:
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts:
                    yield p


def reference_sections():
    """{anchor: text under the heading, up to the next heading}; every heading must carry an
    explicit {#id}, unique on the page, so that the anchors cannot change with the wording."""
    sections: dict[str, list[str]] = {}
    current = None
    in_fence = False
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not in_fence and re.match(r"#{2,6}\s", line):  # below the page title
            m = re.search(r"\{#([a-z0-9-]+)\}\s*$", line)
            assert m, f"heading without an explicit anchor in {REFERENCE.name}: {line!r}"
            current = m.group(1)
            assert current not in sections, f"anchor #{current} is used twice"
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {anchor: "\n".join(lines) for anchor, lines in sections.items()}


SECTIONS = reference_sections()


def numbered_items(anchor: str) -> int:
    return len(re.findall(r"^\d+\.\s", SECTIONS[anchor], flags=re.M))


def python_citations(text: str):
    """(anchor, first item, last item) of every citation of the reference page in ``text``."""
    for m in FULL.finditer(text):
        assert m.group("page") == "algorithms", f"no such reference page: {m.group(0)}"
        if m.group("anchor") is None:
            continue
        tail = ITEM_AFTER.match(text, m.end())
        yield m.group("anchor"), tail.group("item"), tail.group("last")
        pos = tail.end()
        while (more := RUN_NEXT.match(text, pos)) is not None:
            yield more.group("anchor"), more.group("item"), more.group("last")
            pos = more.end()


ITEM_AFTER = re.compile(ITEM)


def check_citation(where: str, anchor: str, item: str | None, last: str | None) -> None:
    assert anchor in SECTIONS, f"{where}: #{anchor} is not a heading of {REFERENCE.name}"
    if item is not None:
        n = int(last or item)
        assert n <= numbered_items(anchor), f"{where}: #{anchor} has no item {n}"


# -- nothing shipped cites the internal spec ------------------------------------------------------


@pytest.mark.parametrize("path", list(text_files(SHIPPED)), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_internal_spec_in_shipped_files(path):
    text = path.read_text(encoding="utf-8")
    for pattern in ("SPEC §", "SPEC.md", "SPEC's"):
        assert pattern not in text, f"{path.relative_to(ROOT)} cites {pattern!r}"
    bare = [m.start() for m in re.finditer(r"(?<![\w.])SPEC(?![\w])", text)]
    assert not bare, (
        f"{path.relative_to(ROOT)} mentions SPEC: {text[bare[0] - 40 : bare[0] + 40]!r}"
    )
    # a section sign alone is as unfollowable; the registry's spec_section values are data
    stray = [
        line
        for line in text.splitlines()
        if "§" in line and not re.search(r"""spec_section=["']§[\d.]+["']""", line)
    ]
    assert not stray, f"{path.relative_to(ROOT)}: {stray[0].strip()!r}"


def test_compare_help_cites_no_spec(capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_run(["--help"])
    assert exit_info.value.code == 0
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "danlu compare" in out and "--task" in out  # the help really was printed
    assert "SPEC" not in out and "§" not in out


# -- every citation points at a heading that exists -----------------------------------------------


def test_reference_page_has_the_topics_of_the_spec():
    """One anchor per topic the code cites (the spec's sections 0 to 11)."""
    topics = [
        "conventions",
        "lion",
        "tiger",
        "hidden-accumulation",
        "embedding-drift",
        "lazy-updates",
        "adafactor",
        "adax",
        "amos",
        "amos-recipes",
        "amos-optimizer",
        "initialisation",
        "lr-batch-size",
        "adam-epsilon",
        "lora-ga",
        "lora-pro",
        "lora-claims",
        "lora-differences",
        "gradient-accumulation",
    ]
    missing = [t for t in topics if t not in SECTIONS]
    assert not missing
    # every optimizer and technique says what the tests check
    for topic in ["lion", "tiger", "adafactor", "adax", "amos", "lora-ga", "lora-pro"]:
        assert f"{topic}-tests" in SECTIONS, topic


@pytest.mark.parametrize(
    "path",
    [p for p in text_files([*SHIPPED, "tests"]) if p.suffix == ".py" and p != Path(__file__)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_python_citations_point_at_existing_headings(path):
    text = path.read_text(encoding="utf-8")
    for anchor, item, last in python_citations(text):
        check_citation(str(path.relative_to(ROOT)), anchor, item, last)


@pytest.mark.parametrize(
    "path",
    [p for p in text_files(["docs", "README.md"]) if p.suffix == ".md"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_markdown_links_to_the_reference_resolve(path):
    """mkdocs --strict checks the links of docs/; README.md is not part of the site."""
    text = path.read_text(encoding="utf-8")
    for m in MD_LINK.finditer(text):
        target = (path.parent / m.group("path")).resolve()
        assert target == REFERENCE.resolve(), f"{path.name}: {m.group(0)} points at {target}"
        if m.group("anchor"):
            check_citation(path.name, m.group("anchor"), None, None)
    # the code blocks of the docs use the Python form
    for anchor, item, last in python_citations(text):
        check_citation(path.name, anchor, item, last)


def test_citation_check_catches_a_missing_anchor():
    text = "see docs/reference/algorithms.md#tiger-rule, #no-such-heading item 2"
    found = list(python_citations(text))
    assert found == [("tiger-rule", None, None), ("no-such-heading", "2", None)]
    with pytest.raises(AssertionError, match="no-such-heading"):
        for citation in found:
            check_citation("example", *citation)
    with pytest.raises(AssertionError, match="no item 99"):
        check_citation("example", "tiger-tests", "99", None)


# -- the rewriting tool ---------------------------------------------------------------------------


def load_tool():
    spec = importlib.util.spec_from_file_location("replace_spec_citations", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    module = load_tool()
    return module, module.Rewriter(module.Reference.load(REFERENCE))


PYTHON_FORMS = [
    ("Lion, SPEC.md §1.", "Lion, docs/reference/algorithms.md#lion."),
    ("(SPEC §2(a))", "(docs/reference/algorithms.md#tiger-rule)"),
    ("SPEC §4(a')", "docs/reference/algorithms.md#lazy-updates"),
    ("SPEC §10.1 (b)", "docs/reference/algorithms.md#lora-ga-code"),
    ("SPEC §10.1(c)", "docs/reference/algorithms.md#lora-ga-edge-cases"),
    ("SPEC §7.2(c)", "docs/reference/algorithms.md#amos-edge-cases"),
    ("SPEC §10.3", "docs/reference/algorithms.md#lora-claims"),
    ("SPEC §9(a)-(b)", "docs/reference/algorithms.md#lr-batch-size"),
    ("SPEC §2(e)3", "docs/reference/algorithms.md#tiger-tests item 3"),
    ("SPEC §7(e)2-3", "docs/reference/algorithms.md#amos-tests items 2-3"),
    (
        "(SPEC §1(b), §2(b), §5(b), §7.2)",
        "(docs/reference/algorithms.md#lion-defaults, #tiger-defaults, #adafactor-defaults,"
        " #amos-optimizer)",
    ),
    (
        "SPEC §3 and §11",
        "docs/reference/algorithms.md#hidden-accumulation and #gradient-accumulation",
    ),
    ("SPEC §2(a)/§3(a)", "docs/reference/algorithms.md#tiger-rule/#hidden-accumulation-rule"),
    ("SPEC §8(a), (c)", "docs/reference/algorithms.md#initialisation, #initialisation-edge-cases"),
    ("the SPEC §0 table)", "the docs/reference/algorithms.md#optimizer-state-memory)"),
    ("applies SPEC §7.2's rules", "applies the docs/reference/algorithms.md#amos-optimizer rules"),
    ("written from SPEC.md.", "written from docs/reference/algorithms.md."),
    ("from the SPEC equations", "from docs/reference/algorithms.md equations"),
    ("G_SPEC = SPECS[name]", "G_SPEC = SPECS[name]"),
]


@pytest.mark.parametrize(("before", "after"), PYTHON_FORMS)
def test_tool_python_forms(tool, before, after):
    _, rewriter = tool
    got = rewriter.rewrite(before, markdown=False, link_base="", bare_sections=True)
    assert got == after
    assert rewriter.rewrite(got, markdown=False, link_base="", bare_sections=True) == got
    for anchor, item, last in python_citations(got):
        check_citation("tool output", anchor, item, last)


def test_tool_markdown_forms(tool):
    _, rewriter = tool
    text = (
        "| optimizer | SPEC |\n|---|---|\n| `danlu.Lion` | §1 |\n\n"
        "Tiger (SPEC §2(b)) and §3 of the spec; the spec suggests it.\n\n"
        "```python\nopt = danlu.Tiger(params)  # SPEC §2\n```\n"
    )
    got = rewriter.markdown_file(Path("docs/example.md"), text)
    assert got == (
        "| optimizer | reference |\n|---|---|\n"
        "| `danlu.Lion` | [Lion](reference/algorithms.md#lion) |\n\n"
        # re-wrapped at 100 characters, never inside a link target
        "Tiger ([Tiger: defaults](reference/algorithms.md#tiger-defaults)) and [Gradient"
        " accumulation hidden\nin the momentum](reference/algorithms.md#hidden-accumulation);"
        " [the algorithms\nreference](reference/algorithms.md) suggests it.\n\n"
        "```python\nopt = danlu.Tiger(params)  # docs/reference/algorithms.md#tiger\n```\n"
    )
    assert rewriter.markdown_file(Path("docs/example.md"), got) == got


def test_tool_keeps_python_within_the_line_limit(tool):
    module, rewriter = tool
    source = (
        "def f():\n"
        '    """Fill ``tensor`` with zero-mean values of variance ``scale / n`` (SPEC §8(a)), n\n'
        "    the fan_in, fan_out or their average.\n"
        '    """\n'
        "    x = 1  # the truncated normal of TensorFlow, cut at ±2 std (SPEC §8(c))"
        + " "
        * 9
        + "\n"
        "    # --- SPEC §5(e) oracles " + "-" * 70 + "\n"
        "    return x\n"
    )
    got, warnings = rewriter.python_file(Path("example.py"), source)
    assert warnings == []
    assert all(len(line) <= module.LINE_LIMIT for line in got.splitlines())
    compile(got, "example.py", "exec")
    assert "(docs/reference/algorithms.md#initialisation)" in got
    # the trailing comment moved above its code line
    assert "    # the truncated normal" in got and "\n    x = 1\n" in got
    assert rewriter.python_file(Path("example.py"), got) == (got, [])


def test_tool_finds_nothing_left_to_rewrite():
    """Nothing in src/, docs/, README.md, benchmarks/ or tests/ still needs the tool."""
    done = subprocess.run(
        [sys.executable, str(TOOL), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
