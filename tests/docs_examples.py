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


def single_blocks(language: str) -> list[tuple[str, str]]:
    """:func:`blocks` of the pages whose blocks stand alone (not :data:`SESSIONS`)."""
    return [(where, code) for where, code in blocks(language)
            if not any(where.startswith(f"docs/{name} ") for name in SESSIONS)]


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


#: Pages a reader follows from top to bottom: their blocks run in order, in one folder
#: and one namespace (:func:`run_session`), not one by one.
SESSIONS = ("getting-started.md", "adding-an-architecture.md")
#: The probescope commands a session runs from its shell blocks. ``demo`` is left to the
#: test's own set-up (it builds models and runs a config: slow); installs and other
#: programs are not run.
SESSION_COMMANDS = {"check", "run", "render", "plugins", "schema"}
_NAMED_FILE = re.compile(r"#\s*(\S+\.(?:py|toml))\s*$")


def session_pages() -> list[Path]:
    return [ROOT / "docs" / name for name in SESSIONS]


def run_session(page: Path, folder: Path) -> dict:
    """Follow ``page`` in ``folder``: a block whose first line names a file
    (``# probes.toml``, ``# my_package/plugin.py``) is written there, as the reader
    would save it; each probescope command of a shell block runs and must exit 0; Python
    blocks run in one namespace, with ``folder`` on ``sys.path`` so the files written
    import. Blocks marked ``no-run`` are skipped. Returns the namespace."""
    import os
    import shlex
    import sys

    from probescope.cli import main

    namespace: dict = {"__name__": "docs_session"}
    before, modules = os.getcwd(), set(sys.modules)
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    try:
        for k, match in enumerate(_BLOCK.finditer(page.read_text())):
            if match.group(1):
                continue
            language, code = match.group(2), match.group(3)
            where = f"{page.relative_to(ROOT)} block {k} ({language})"
            named = _NAMED_FILE.match(code.splitlines()[0]) if code.strip() else None
            if named:
                target = folder / named.group(1)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(code)
            elif language == "bash":
                for line in code.splitlines():
                    words = shlex.split(line.split("#")[0])
                    if len(words) > 1 and words[0] == "probescope" and words[1] in SESSION_COMMANDS:
                        assert main(words[1:]) == 0, f"{where}: {line.strip()}"
            elif language == "python":
                exec(compile(code, where, "exec"), namespace)
    finally:
        os.chdir(before)
        sys.path.remove(str(folder))
        for name in set(sys.modules) - modules:  # the reader's own packages, written above
            module = sys.modules[name]
            places = [getattr(module, "__file__", None) or "", *(getattr(module, "__path__", None) or [])]
            if any(str(place).startswith(str(folder)) for place in places):
                del sys.modules[name]
    return namespace


def page_sections(page: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """``(heading, [(where, code), ...])`` of each ``## `` section's runnable Python blocks."""
    out = []
    for k, part in enumerate(page.read_text().split("\n## ")):
        heading = part.splitlines()[0] if k else "(top)"
        code = [(f"{page.relative_to(ROOT)} section {heading!r} block {j}", m.group(3))
                for j, m in enumerate(m for m in _BLOCK.finditer(part) if m.group(2) == "python")
                if not m.group(1)]
        out.append((heading, code))
    return out
