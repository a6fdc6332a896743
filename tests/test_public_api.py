"""The public plugin kit: everything a probe or renderer needs comes from ``probescope``.

The built-in probes and renderers (and ``examples/``) are written as a third party would
write them: every probescope name they use is listed in ``probescope.__all__``, and none
comes from a private module (``probescope.probe``, ``probescope.errors``, ...). A plugin
may import its own submodules and another plugin's module (a renderer reads the schema
of the probe whose datasets it draws).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import probescope

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_FOLDERS = ("probes", "renderers", "examples")
PLUGIN_PACKAGES = ("probescope.probes", "probescope.renderers")


def plugin_files() -> list[Path]:
    return sorted(p for folder in PLUGIN_FOLDERS if (ROOT / folder).is_dir()
                  for p in (ROOT / folder).rglob("*.py"))


def private_uses(path: Path) -> list[str]:
    """``line: what`` for each use of a probescope name that is not public."""
    tree = ast.parse(path.read_text(), str(path))
    public = set(probescope.__all__)
    out = []
    aliases = set()  # names bound to the probescope package itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "probescope":
                    aliases.add(alias.asname or "probescope")
                elif alias.name.startswith("probescope.") and not alias.name.startswith(PLUGIN_PACKAGES):
                    out.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            module = node.module
            if module == "probescope":
                out += [f"{node.lineno}: from probescope import {a.name} (not in __all__)"
                        for a in node.names if a.name not in public]
            elif module.startswith("probescope.") and not module.startswith(PLUGIN_PACKAGES):
                out.append(f"{node.lineno}: from {module} import {', '.join(a.name for a in node.names)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr not in public:
                out.append(f"{node.lineno}: probescope.{node.attr} (not in __all__)")
    return out


def test_there_are_plugins_to_check():
    names = {p.name for p in plugin_files()}
    assert {"token_similarity.py", "component_norm.py", "similarity_grid.py"} <= names


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_use_only_the_public_kit(path):
    assert private_uses(path) == []


def test_the_check_sees_private_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import probescope\nfrom probescope.probe import Read\nfrom probescope import Read, secret\n"
                   "x = probescope.errors.Problem\n")
    found = private_uses(bad)
    assert any("probescope.probe" in f for f in found)
    assert any("secret" in f for f in found) and not any("import Read (" in f for f in found)
    assert any("probescope.errors" in f for f in found)


def test_every_public_name_exists():
    missing = [name for name in probescope.__all__ if not hasattr(probescope, name)]
    assert missing == []
    assert len(set(probescope.__all__)) == len(probescope.__all__)
