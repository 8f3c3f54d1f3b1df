"""The package's modules form layers: no module imports, even inside a function, from a module
that imports it back (directly or through others)."""

from __future__ import annotations

import ast
from pathlib import Path

import overlap_sgd

ROOT = Path(overlap_sgd.__file__).parent


def _module_name(path: Path) -> tuple[str, list[str]]:
    parts = ["overlap_sgd", *path.relative_to(ROOT).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def _is_module(name: str) -> bool:
    path = ROOT.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its code (not its docstrings)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        name, package = _module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                if not module.startswith("overlap_sgd"):
                    continue
                for alias in node.names:  # ``from . import x`` names a module, not the package
                    sub = f"{module}.{alias.name}"
                    deps.add(sub if _is_module(sub) else module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("overlap_sgd"))
        graph[name] = deps
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "overlap_sgd.drop_in" in graph and "overlap_sgd.consistency" in graph
    cycles = [
        f"{module} -> {dep}"
        for module, deps in sorted(graph.items())
        for dep in sorted(deps)
        # A package and its own submodules import each other by design (re-exports).
        if not module.startswith(dep + ".") and not dep.startswith(module + ".")
        and module in _reachable(graph, dep)
    ]
    assert not cycles, f"imports that close a cycle: {cycles}"
