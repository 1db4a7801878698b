#!/usr/bin/env python3
"""Rewrite citations of the internal spec ("SPEC §2(a)", "SPEC.md §10.1", "§4(b)3", "the
SPEC") into citations of the algorithms reference users can open, docs/reference/algorithms.md.

Usage: python tools/replace_spec_citations.py [--check] [PATH ...]

Without PATHs it rewrites src/, docs/, README.md, benchmarks/ and tests/ in place. --check
rewrites nothing and exits 1 if anything would change. Running it twice changes nothing the
second time.

The convention (CONTRIBUTING.md, "Citing the algorithms reference"):

* Markdown: a relative link to the anchor,
  ``[Tiger: update rule](reference/algorithms.md#tiger-rule)``.
* Python comments, docstrings and strings, and Markdown code blocks: the repository path and
  anchor, ``docs/reference/algorithms.md#tiger-rule``; in a run of citations the later ones are
  the anchor alone (``docs/reference/algorithms.md#lion-defaults, #tiger-defaults``), and an item
  of a numbered list is ``#tiger-tests item 3``.

The anchors are read from the reference page itself: section N and subsection letter (a) to
(f) map to ``<topic>-rule``, ``-defaults``, ``-edge-cases``, ``-claims``, ``-tests`` and
``-differences`` where the page has that anchor, else to the topic's own anchor. A line of a
comment or docstring that becomes longer than the line limit is re-wrapped (the overflow moves
to the next line of the same paragraph, or onto a new line); other long lines are reported.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "docs/reference/algorithms.md"
DEFAULT_PATHS = ["src", "docs", "README.md", "benchmarks", "tests"]
LINE_LIMIT = 100
# a file that must keep the strings it searches for (tests/test_no_spec_citations.py)
SKIP_MARKER = "replace_spec_citations: " + "skip"

# spec section number -> topic anchor on the reference page
TOPICS = {
    "0": "conventions",
    "1": "lion",
    "2": "tiger",
    "3": "hidden-accumulation",
    "4": "embedding-drift",
    "5": "adafactor",
    "6": "adax",
    "7": "amos",
    "7.1": "amos-recipes",
    "7.2": "amos-optimizer",
    "8": "initialisation",
    "9": "lr-batch-size",
    "10": "lora",
    "10.1": "lora-ga",
    "10.2": "lora-pro",
    "10.3": "lora-claims",
    "10.4": "lora-differences",
    "11": "gradient-accumulation",
}
# subsection letter -> anchor suffix
LETTERS = {
    "a": "rule",
    "b": "defaults",
    "c": "edge-cases",
    "d": "claims",
    "e": "tests",
    "f": "differences",
}
# where a section's subsection is not the usual one
OVERRIDES = {
    ("4", "a"): "embedding-drift-mechanism",
    ("4", "a'"): "lazy-updates",
    ("4", "b"): "embedding-drift-fixes",
    ("9", "b"): "lr-batch-size-helpers",
    ("10.1", "b"): "lora-ga-code",
    ("11", "b"): "gradient-accumulation-claims",
}

# "§10.1", "§2(a)", "§4(a')", "§10.1 (b)", "§4(b)3", "§7(e)2-3", "§9(a)-(b)"
SECTION = (
    r"§(?P<num>\d+(?:\.\d+)?)(?![\d.]\d)"
    r"(?:\s?\((?P<letter>[a-f]'?)\)(?:-\([a-f]'?\))?(?P<item>\d+(?:-\d+)?)?)?"
)
# a citation: an optional "SPEC" / "SPEC.md" / "spec" prefix, the section, and what it absorbs
CITATION = re.compile(
    r"(?P<prefix>(?<![\w.])SPEC(?:\.md)?\s+)?" + SECTION + r"(?P<table>\s+table\b)?"
    r"(?P<ofspec>\s+of\s+the\s+spec\b)?(?P<poss>'s\b)?"
)
# what joins the citations of a run: "§1, §2", "§2(a)/§3", "§7(e)3 / §1(b)", "§3(a) and §3(b)"
SEPARATOR = re.compile(r"\s*(?:,|/|;)?\s*(?:and\s+|or\s+)?")
# "§8(a), (c)": a letter alone continues the section before it
LETTER_ONLY = re.compile(
    r"(§(\d+(?:\.\d+)?)\s?\([a-f]'?\)[\d-]*(?:\s*(?:,|/|and|or)\s*))\((?=[a-f]'?\))"
)
# the internal file mentioned without a section
BARE = re.compile(r"(?P<the>\b[Tt]he\s+)?(?<![\w.])SPEC(?:\.md)?(?![\w])(?P<poss>'s\b)?")
# Markdown only: "the spec" in lower case
BARE_LOWER = re.compile(r"(?P<the>\b[Tt]he\s+)(?<![\w.])spec(?![\w])(?P<poss>'s\b)?")


@dataclass(frozen=True)
class Reference:
    anchors: dict[str, str]  # anchor -> title used as link text

    @classmethod
    def load(cls, page: Path) -> Reference:
        anchors: dict[str, str] = {}
        parents: dict[int, str] = {}
        in_fence = False
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith(("```", "~~~")):
                in_fence = not in_fence
            if in_fence:
                continue
            m = re.match(r"(#{1,6})\s+(.*?)\s*\{#([a-z0-9-]+)\}\s*$", line)
            if not m:
                continue
            level, text, anchor = len(m.group(1)), m.group(2), m.group(3)
            parents[level] = text
            parent = parents.get(level - 1) if level >= 3 else None
            anchors[anchor] = f"{parent}: {_lower_first(text)}" if parent else text
        return cls(anchors)

    def anchor(self, num: str, letter: str | None) -> str:
        topic = TOPICS.get(num)
        if topic is None:
            raise ValueError(f"§{num}: no topic for this section in {REFERENCE}")
        candidates = []
        if letter:
            if (num, letter) in OVERRIDES:
                candidates.append(OVERRIDES[num, letter])
            suffix = LETTERS.get(letter.rstrip("'"))
            if suffix:
                candidates.append(f"{topic}-{suffix}")
                parent = num.split(".")[0]
                if parent != num:
                    candidates.append(f"{TOPICS[parent]}-{suffix}")
        candidates.append(topic)
        for anchor in candidates:
            if anchor in self.anchors:
                return anchor
        raise ValueError(f"none of {candidates} is an anchor of {REFERENCE}")


def _lower_first(text: str) -> str:
    word = text.split(" ", 1)[0]
    if word[:1].isupper() and word[1:].isalpha() and word[1:].islower():
        return text[0].lower() + text[1:]
    return text


class Rewriter:
    def __init__(self, reference: Reference) -> None:
        self.ref = reference

    # --- one piece of text ----------------------------------------------------------------

    def rewrite(self, text: str, *, markdown: bool, link_base: str, bare_sections: bool) -> str:
        """Rewrite the citations in ``text`` (one line, or part of one).

        markdown: links (else paths); link_base: the reference page's path relative to the
        file; bare_sections: also rewrite a "§N" without "SPEC" in front."""
        while LETTER_ONLY.search(text):
            text = LETTER_ONLY.sub(r"\1§\2(", text)
        out: list[str] = []
        pos = 0
        run_end = -1  # end of the previous citation, for runs "§1, §2"
        for m in CITATION.finditer(text):
            in_run = run_end >= 0 and SEPARATOR.fullmatch(text[run_end : m.start()]) is not None
            if not (m.group("prefix") or bare_sections or in_run):
                continue
            num, letter, item = m.group("num"), m.group("letter"), m.group("item")
            if m.group("table") and num == "0":
                anchor = "optimizer-state-memory"
            else:
                anchor = self.ref.anchor(num, letter)
            out.append(text[pos : m.start()])
            before = "".join(out)
            if markdown:
                title = self.ref.anchors[anchor]
                if item:
                    title += f", item{'s' if '-' in item else ''} {item}"
                cite = f"[{title}]({link_base}#{anchor})"
            else:
                cite = f"#{anchor}" if in_run else f"{REFERENCE}#{anchor}"
                if item:
                    cite += f" item{'s' if '-' in item else ''} {item}"
            if m.group("poss") and not markdown:
                # "SPEC §7.2's rules" -> "the docs/...#amos-optimizer rules"
                if not re.search(r"\b[Tt]he\s*$", before):
                    cite = "the " + cite
            elif m.group("poss"):
                cite += "'s"
            if m.group("table") and num != "0":
                cite += m.group("table")
            out.append(cite)
            pos = m.end()
            run_end = m.end()
        out.append(text[pos:])
        text = "".join(out)
        text = BARE.sub(lambda b: self._bare(b, markdown, link_base), text)
        if markdown:
            text = BARE_LOWER.sub(lambda b: self._bare(b, markdown, link_base), text)
        return text

    def _bare(self, m: re.Match[str], markdown: bool, link_base: str) -> str:
        the = m.group("the") or ""
        if markdown:
            words = "the algorithms reference" if the else "algorithms reference"
            if the[:1] == "T":
                words = "T" + words[1:]
            return f"[{words}]({link_base}){m.group('poss') or ''}"
        # Python: the path stands for the page; "the SPEC's X" -> "the docs/... X"
        keep_the = the if m.group("poss") else ""
        if m.group("poss") and not the:
            keep_the = "the "
        return f"{keep_the}{REFERENCE}"

    # --- files ----------------------------------------------------------------------------

    def markdown_file(self, path: Path, text: str) -> str:
        rel = os.path.relpath(ROOT / REFERENCE, (ROOT / path).parent).replace(os.sep, "/")
        lines = text.split("\n")
        kinds: list[str | None] = [None] * len(lines)
        changed: list[int] = []
        fence: str | None = None
        for i, line in enumerate(lines):
            stripped = line.lstrip()
            if fence is None and stripped.startswith(("```", "~~~")):
                fence = stripped[:3]
                continue
            if fence is not None:
                if stripped.startswith(fence):
                    fence = None
                else:  # code: the path form
                    lines[i] = self.rewrite(line, markdown=False, link_base=rel, bare_sections=True)
                continue
            if stripped and not stripped.startswith(MARKDOWN_BLOCKS):
                kinds[i] = "markdown"
            if _is_table_header(lines, i):
                line = re.sub(r"(?<=\|)(\s*)(?:SPEC|spec)(\s*)(?=\|)", r"\1reference\2", line)
            new = self._markdown_line(line, rel)
            if new != lines[i]:
                lines[i] = new
                changed.append(i)
        return _rewrap(lines, kinds, changed, path)[0]

    def _markdown_line(self, line: str, rel: str) -> str:
        # inline code spans keep the path form, the rest becomes links
        parts = re.split(r"(`[^`]*`)", line)
        for j, part in enumerate(parts):
            code = j % 2 == 1
            parts[j] = self.rewrite(part, markdown=not code, link_base=rel, bare_sections=True)
        return "".join(parts)

    def python_file(self, path: Path, text: str) -> tuple[str, list[str]]:
        prose, strings = _python_regions(text)
        lines = text.split("\n")
        kinds = [_line_kind(line, prose.get(i + 1, [])) for i, line in enumerate(lines)]
        changed: list[int] = []
        for i, line in enumerate(lines):
            if "§" not in line and "SPEC" not in line:
                continue
            new = self._python_line(line, prose.get(i + 1, []), strings.get(i + 1, []))
            if new != line:
                lines[i] = new
                changed.append(i)
        return _rewrap(lines, kinds, changed, path)

    def _python_line(self, line: str, prose: list[tuple[int, int]], strings) -> str:
        # comments and docstring text: every citation; other strings: only "SPEC ..." ones
        spans = sorted([(a, b, True) for a, b in prose] + [(a, b, False) for a, b in strings])
        out, pos = [], 0
        for a, b, is_prose in spans:
            a, b = max(a, pos), max(b, pos)
            out.append(line[pos:a])
            part = line[a:b]
            out.append(self.rewrite(part, markdown=False, link_base="", bare_sections=is_prose))
            pos = b
        out.append(line[pos:])
        return "".join(out)


def _is_table_header(lines: list[str], i: int) -> bool:
    return (
        lines[i].lstrip().startswith("|")
        and i + 1 < len(lines)
        and re.match(r"^\s*\|?\s*:?-{3,}", lines[i + 1]) is not None
    )


def _python_regions(text: str):
    """Per 1-based line, the column spans of prose (comments, triple-quoted strings) and of
    other string literals."""
    prose: dict[int, list[tuple[int, int]]] = {}
    strings: dict[int, list[tuple[int, int]]] = {}
    lines = text.split("\n")
    string_kinds = {tokenize.STRING}
    for name in ("FSTRING_MIDDLE", "TSTRING_MIDDLE"):
        if hasattr(tokenize, name):
            string_kinds.add(getattr(tokenize, name))
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            target = prose
        elif tok.type in string_kinds:
            body = tok.string.lstrip("rRbBuUfF")
            target = prose if body.startswith(('"""', "'''")) else strings
        else:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            a = c0 if r == r0 else 0
            b = c1 if r == r1 else len(lines[r - 1])
            target.setdefault(r, []).append((a, b))
    return prose, strings


BULLET = re.compile(r"(?:[*+-]|\d+[.)])\s+")
# Markdown lines that are not paragraph text: headings, tables, HTML, images, directives
MARKDOWN_BLOCKS = ("#", "|", "<", "!", ":::", "--8<--", "[^", ">", "```", "~~~")


def _prose_prefix(line: str, kind: str) -> tuple[str, str, str]:
    """(prefix, text, continuation prefix) of a comment, docstring or Markdown line."""
    in_comment = kind == "comment"
    if kind == "markdown":
        prefix = re.match(r"\s*", line).group(0)
        body = line[len(prefix) :]
    elif in_comment:
        m = re.match(r"(\s*#+:?\s?)(.*)", line)
        assert m
        prefix, body = m.group(1), m.group(2)
    else:
        m = re.match(r"(\s*(?:[rRbBuU]{0,2}(?:\"\"\"|'''))?)(.*)", line)
        assert m
        prefix, body = m.group(1), m.group(2)
    indent = re.match(r"\s*", line).group(0) if not in_comment else prefix
    bullet = BULLET.match(body)
    cont = indent + (" " * len(bullet.group(0)) if bullet else "")
    return prefix, body, cont


def _rewrap(
    lines: list[str], kinds: list[str | None], changed: list[int], path: Path
) -> tuple[str, list[str]]:
    """Re-wrap rewritten lines over the limit that are all comment or all docstring: the
    overflow joins the next line of the same paragraph, or goes onto a new line."""
    warnings: list[str] = []
    out, kinds = list(lines), list(kinds)
    pending = sorted(changed)
    while pending:
        i = pending.pop(0)
        line, kind = out[i], kinds[i]
        if len(line) <= LINE_LIMIT:
            continue
        if kind is not None and kind.startswith("trailing:"):
            # code + comment: the comment moves onto its own line above the code
            col = int(kind.split(":")[1])
            code = line[:col].rstrip()
            previous = out[i - 1] if i > 0 else ""
            if len(code) <= LINE_LIMIT and not previous.rstrip().endswith("\\"):
                indent = re.match(r"\s*", line).group(0)
                out[i : i + 1] = [indent + line[col:], code]
                kinds[i : i + 1] = ["comment", None]
                pending = [p + 1 if p > i else p for p in pending]
                pending.insert(0, i)
                continue
            kind = None
        if kind is None:
            if path.suffix == ".py":
                warnings.append(f"{path}:{i + 1}: {len(line)} characters (not re-wrapped)")
            continue
        banner = re.search(r"\s([-=])\1{4,}$", line)
        if banner and kind == "comment":  # "# --- title -----": shorten the rule
            out[i] = line[: max(LINE_LIMIT, banner.start() + 4)]
            continue
        prefix, body, cont = _prose_prefix(line, kind)
        bullet = BULLET.match(body)
        cut = _split_point(line, len(prefix) + (len(bullet.group(0)) if bullet else 0))
        if cut is None:
            warnings.append(f"{path}:{i + 1}: {len(line)} characters (no place to break)")
            continue
        head, tail = line[:cut].rstrip(), line[cut:].strip()
        out[i] = head
        if i + 1 < len(out) and kinds[i + 1] == kind and _continues(out[i + 1], cont):
            out[i + 1] = cont + tail + " " + out[i + 1][len(cont) :]
        else:
            out.insert(i + 1, cont + tail)
            kinds.insert(i + 1, kind)
            pending = [p + 1 if p > i else p for p in pending]
        if len(head) > LINE_LIMIT and path.suffix == ".py":
            warnings.append(f"{path}:{i + 1}: {len(head)} characters (no place to break)")
        pending.insert(0, i + 1)
    return "\n".join(out), warnings


def _line_kind(line: str, spans: list[tuple[int, int]]) -> str | None:
    """'comment' for a line that is only a comment, 'docstring' for one wholly inside a
    triple-quoted string (its opening and closing quotes included), 'trailing:COL' for code
    followed by a comment starting at COL, else None."""
    stripped = line.lstrip()
    if stripped.startswith("#"):
        return "comment"
    start = len(line) - len(stripped)
    covered = sum(b - a for a, b in spans)
    if spans and min(a for a, _ in spans) <= start and covered >= len(line) - start:
        return "docstring"
    for a, b in spans:
        if line[a : a + 1] == "#" and b == len(line) and line[:a].strip():
            return f"trailing:{a}"
    return None


def _split_point(line: str, min_col: int) -> int | None:
    """Where to break ``line``: the last space before the limit (else the first one after it)
    that is outside inline code and link targets, does not split "item 3", and does not make
    the rest start a list item."""
    protected = [m.span() for m in re.finditer(r"`+[^`]*`+|\]\([^)]*\)", line)]

    def allowed(cut: int) -> bool:
        return (
            line[cut] == " "
            and line[cut - 1] != " "
            and not any(a < cut < b for a, b in protected)
            and re.search(r"\bitems?$", line[:cut]) is None  # keep "item 3" together
            and re.search(r"\S", line[cut:]) is not None
            # the moved text would start a list item or a heading
            and re.match(r"(?:[-+*#>]|\d+[.)])(?:\s|$)", line[cut + 1 :]) is None
        )

    before = range(min(LINE_LIMIT, len(line) - 1), min_col, -1)
    after = range(LINE_LIMIT + 1, len(line) - 1)
    return next((cut for cut in [*before, *after] if cut > min_col and allowed(cut)), None)


def _continues(nxt: str, cont: str) -> bool:
    """Whether ``nxt`` (of the same kind) continues the paragraph, so the overflow can join it."""
    if not nxt.startswith(cont) or nxt[len(cont) : len(cont) + 1] in ("", " "):
        return False
    body = nxt[len(cont) :]
    starts = ('"""', "'''", ">>>", "..", "\\", *MARKDOWN_BLOCKS)
    if BULLET.match(body) or body.startswith(starts):
        return False
    return not re.match(r"[A-Z][\w ]*:\s*$", body)  # "Args:", "Returns:"


def files(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for name in paths:
        p = ROOT / name
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix in (".py", ".md") and q.is_file())
    reference = (ROOT / REFERENCE).resolve()
    return [p for p in found if p.resolve() != reference and "__pycache__" not in p.parts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=DEFAULT_PATHS)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if needed")
    args = parser.parse_args(argv)
    rewriter = Rewriter(Reference.load(ROOT / REFERENCE))
    todo, warnings = [], []
    for path in files(args.paths):
        text = path.read_text(encoding="utf-8")
        if SKIP_MARKER in text:
            continue
        if "§" not in text and "SPEC" not in text and not re.search(r"\bspec\b", text):
            continue
        rel = path.relative_to(ROOT)
        if path.suffix == ".md":
            new = rewriter.markdown_file(rel, text)
        else:
            new, warn = rewriter.python_file(rel, text)
            warnings += warn
        if new != text:
            todo.append(rel)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    for rel in todo:
        print(f"{'would rewrite' if args.check else 'rewrote'} {rel}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 1 if args.check and todo else 0


if __name__ == "__main__":
    sys.exit(main())
