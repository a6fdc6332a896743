"""The shape of the code base: no import cycles, and the core stands without its plugins.

Every ``import`` of a probescope module counts, wherever it is written (top level, under
``TYPE_CHECKING``, inside a function): a cycle any of them closes is a cycle a reader and
a type checker must untangle. Run alone with::

    python -m pytest -q tests/test_imports.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed package name -> folder in the repository (see pyproject's package-dir).
PACKAGES = {
    "probescope": "probescope",
    "probescope.probes": "probes",
    "probescope.renderers": "renderers",
    "probescope.plugins": "plugins",
}
PLUGIN_PACKAGES = ("probescope.probes", "probescope.renderers")


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The probescope module that ``name`` (a module, or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> set[str]:
    """Every probescope module ``path`` imports, anywhere in the file. ``from pkg import
    sub`` counts as importing ``pkg.sub`` when that is a module, else ``pkg``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        found |= {owner for owner in map(_owner, names) if owner}
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: imports_of(path) - {module} for module, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_packages():
    graph = import_graph()
    assert "probescope.config" in graph and "probescope.probes.token_similarity" in graph
    assert "probescope.runner" in graph["probescope.api"]


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(PLUGIN_PACKAGES)))
def test_the_core_imports_no_plugin(module):
    """probescope's core, plugin contract included, never imports a built-in probe or
    renderer: those are plugins like anyone's, loaded through entry points."""
    wrong = sorted(m for m in imports_of(MODULES[module]) if m.startswith(PLUGIN_PACKAGES))
    assert wrong == [], f"{module} imports {wrong}"
