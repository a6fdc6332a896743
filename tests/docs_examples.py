"""Fenced code blocks of README.md and docs/, for the tests that run them.

A block that cannot run as it stands (it needs a hub model or files a reader makes
first) is marked on the line before its fence with ``<!-- no-run: why -->``, which
renderers of Markdown do not show.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"(<!-- no-run[^>]*-->\n)?```(\w+)\n(.*?)```", re.S)
GENERATED = {"datasets.md", "architectures.md"}  # generated from code, guarded by their own tests


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in GENERATED)]


def blocks(language: str, page: Path | None = None, runnable_only: bool = True) -> list[tuple[str, str]]:
    """``(where, code)`` of every ``language`` block (the runnable ones by default)."""
    out = []
    for path in [page] if page else pages():
        for k, match in enumerate(m for m in _BLOCK.finditer(path.read_text()) if m.group(2) == language):
            if runnable_only and match.group(1):
                continue
            out.append((f"{path.relative_to(ROOT)} {language} block {k}", match.group(3)))
    return out


def plugin_module(name: str, code: str) -> types.ModuleType:
    """A documented plugin's code as a module, to register in-process."""
    module = types.ModuleType(name)
    exec(compile(code, name, "exec"), module.__dict__)
    return module


def documented_plugins() -> list[tuple[str, types.ModuleType]]:
    """The probe and the renderer written out in docs/plugins.md, as plugins."""
    code = [c for _, c in blocks("python", ROOT / "docs" / "plugins.md")]
    probe = next(c for c in code if "register_probes" in c)
    renderer = next(c for c in code if "register_renderers" in c)
    return [("docs_mean_norm", plugin_module("docs_mean_norm", probe)),
            ("docs_layer_line", plugin_module("docs_layer_line", renderer))]
