"""A griffe extension for the API reference: the docstrings' reStructuredText bits as Markdown.

The package's docstrings are Google style with a few reStructuredText habits that Python's own
tools read (``help()``, doctest): cross-reference roles such as ``:class:`~overlap_sgd.X```
and literal blocks introduced by ``::``. mkdocstrings renders Markdown, so before a docstring is
parsed this extension turns

- a role naming something in ``overlap_sgd`` into a cross-reference to its API entry (plain
  code where the entry is not in the reference), and any other role into inline code;
- a paragraph ending in ``::`` and the indented block after it into the paragraph and a fenced
  Python code block;
- an ``Example:`` section of doctest lines into ``Examples:``, the section the Google style
  renders as code (``Example:`` alone is an admonition, whose ``>>>`` lines read as quotes).

It changes nothing in the package; mkdocs.yml loads it for the ``python`` handler.
"""

from __future__ import annotations

import html
import re
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`<]+?)`")
_SECTION = re.compile(r"^\s*(Example|Examples|Note|Notes)::\s*$")
_DOCTEST_SECTION = re.compile(r"^(\s*)Example:\s*\n(\s*)>>>", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2).strip()
    shown = target.rsplit(".", 1)[-1] if short else target
    if not target.startswith("overlap_sgd"):
        return f"`{shown}`"
    # An optional cross-reference: a link where the target is documented, plain code elsewhere.
    return f'<autoref identifier="{html.escape(target)}" optional><code>{html.escape(shown)}</code></autoref>'


def _literal_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and not line.strip().startswith(">>>"):
            indent = len(line) - len(line.lstrip())
            header = _SECTION.match(line)
            if header:
                out.append(" " * indent + f"**{header.group(1)}**")
            else:
                out.append(line.rstrip()[:-1])
            j = i + 1
            block: list[str] = []
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
                j -= 1
            code = [b for b in block if b.strip()]
            if code:
                cut = min(len(b) - len(b.lstrip()) for b in code)
                pad = " " * indent
                out.append("")
                out.append(pad + "```python")
                first = next(k for k, b in enumerate(block) if b.strip())  # blank lines after "::"
                out.extend(pad + b[cut:] if b.strip() else "" for b in block[first:])
                out.append(pad + "```")
                i = j
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class SphinxRoles(Extension):
    """Rewrite each docstring of the loaded objects once, before it is parsed."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(_role, obj.docstring.value)
            text = _DOCTEST_SECTION.sub(r"\1Examples:\n\2>>>", text)
            obj.docstring.value = _literal_blocks(text)
