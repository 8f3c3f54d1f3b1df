"""Every example in the package's docstrings runs and prints what it says; the README keeps its
quick start first, and the docs site's API reference covers every public name."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import overlap_sgd

MODULES = sorted(m.name for m in pkgutil.walk_packages(overlap_sgd.__path__, "overlap_sgd."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"


# -- the README and the docs site ----------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: The quick start: the first thing the README shows, run from a fresh clone by CI and newcomers.
QUICK_START = [
    "bash tools/venv.sh torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --mode both",
    "bash tools/venv.sh python -m pytest",
]


def _section(text: str, heading: str) -> str:
    """The body of the Markdown section ``heading`` (up to the next heading of its level)."""
    level = heading.split(" ", 1)[0]
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^{level} |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section {heading!r}"
    return match.group(1)


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_readme_quick_start_is_the_first_block() -> None:
    readme = (ROOT / "README.md").read_text()
    first = _fenced_blocks(readme[readme.index("## Quick start"):])[0]
    assert first.splitlines() == QUICK_START
    # Nothing is shown before it but the picture of the timeline.
    before = _fenced_blocks(readme[: readme.index("## Quick start")])
    assert len(before) == 1 and "overlap-sgd" in before[0] and "allreduce" in before[0]


def test_readme_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme) if "://" not in t]
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def _documented() -> set[str]:
    """Every object the API reference renders with a ``::: name`` directive."""
    names: set[str] = set()
    for page in (DOCS / "api").glob("*.md"):
        names.update(re.findall(r"^::: ([\w.]+)", page.read_text(), re.MULTILINE))
    return names


def _rendered_with_members(documented: set[str]) -> set[str]:
    """Modules rendered whole (their ``__all__`` members are on the page too)."""
    pages = "".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    whole = set()
    for name in documented:
        block = pages.split(f"::: {name}\n", 1)[1].split(":::", 1)[0]
        if "members: false" not in block:
            whole.add(name)
    return whole


def _resolve(name: str) -> object:
    """The object a ``::: name`` directive renders."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


PUBLIC_MODULES = [
    "overlap_sgd", "overlap_sgd.hooks", "overlap_sgd.functional", "overlap_sgd.registry",
    "overlap_sgd.checkpoint", "overlap_sgd.dcp", "overlap_sgd.accelerated", "overlap_sgd.consistency",
    "overlap_sgd.shutdown", "overlap_sgd.options", "overlap_sgd.fsdp",
]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_reference(module: str) -> None:
    documented = _documented()
    rendered = {id(_resolve(name)) for name in documented}
    # A module rendered whole shows the members of its __all__.
    for name in _rendered_with_members(documented):
        obj = _resolve(name)
        rendered.update(id(getattr(obj, member)) for member in getattr(obj, "__all__", ()))
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if id(getattr(mod, name)) not in rendered]
    assert not missing, f"{module}: not in docs/api/*.md: {missing}"


def test_api_overview_lists_every_argument_of_overlap() -> None:
    table = _section((DOCS / "api" / "index.md").read_text(), "## `overlap_sgd.overlap(ddp_model, optimizer, "
                     "comm_hook=None, comm_state=None, *, executor=\"auto\", check_finite=False, "
                     "clip_grad_value=None, clip_grad_norm=None, clip_grad_norm_per_param=None, "
                     "check_consistency_every=0, slice_mb=\"auto\", grad_views=True, shard=False)`")
    rows = re.findall(r"^\| (.+?) \|", table, re.MULTILINE)
    listed = {arg for row in rows for arg in re.findall(r"`(\w+)`", row)}
    arguments = set(inspect.signature(overlap_sgd.overlap).parameters) - {"ddp_model", "optimizer"}
    assert arguments <= listed, f"missing from the argument table: {sorted(arguments - listed)}"


def test_every_docs_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    missing = [p for p in sorted(pages) if p not in nav]
    assert not missing, f"docs pages not in mkdocs.yml's nav: {missing}"
