"""A Griffe extension for the docs build (mkdocs.yml): danlu's docstrings are reStructuredText
flavoured (``.. math::`` blocks, ``:math:`...``` roles, ``:func:`...``` references), which the
Google-style Markdown renderer would print verbatim. This rewrites them, in the rendered copy
only, into the Markdown that pymdownx.arithmatex and the site understand."""

from __future__ import annotations

import re
from typing import Any

import griffe

# ".. math::" and the lines after it that are indented deeper (or blank)
_MATH_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+.*\n?|[ \t]*\n)+)",
    re.M,
)
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):`~?([^`]+)`")


def _math_block(match: re.Match[str]) -> str:
    indent = match.group("indent")
    lines = [line.strip() for line in match.group("body").splitlines() if line.strip()]
    return f"{indent}\\[\n{indent}" + f"\n{indent}".join(lines) + f"\n{indent}\\]\n\n"


def rst_to_markdown(text: str) -> str:
    text = _MATH_BLOCK.sub(_math_block, text)
    text = _MATH_ROLE.sub(lambda m: f"\\({m.group(1)}\\)", text)
    return _XREF_ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class RstToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
