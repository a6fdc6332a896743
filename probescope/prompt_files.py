"""Prompts kept in a file of their own (``[inputs] prompts_file``), one per line.

Two formats, told apart by the file's extension:

- ``.txt``: each line is one prompt, exactly as written (only the line break is removed).
  A prompt that holds a line break needs ``.jsonl``.
- ``.jsonl``: each line is one JSON value, either a string (the prompt) or an object
  whose ``"text"`` key holds the prompt (its other keys are ignored, so records can
  carry ids or labels beside the text).

In both, lines that are empty or only whitespace are skipped, and every other line must
be a prompt that is not empty or only whitespace. Each mistake names the file and the
line, and all of them are reported at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

#: The extensions a prompts file may have, and what each holds.
FORMATS = {".txt": "one prompt per line", ".jsonl": 'one JSON string or {"text": ...} object per line'}


@dataclass
class PromptFile:
    """The prompts read from one file, and the line each came from (1-based)."""

    path: Path
    prompts: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each naming the file and line

    def where(self, index: int) -> str:
        """Where prompt ``index`` is written: ``prompts.jsonl line 12``."""
        return f"{self.path.name} line {self.lines[index]}"


def read_prompts(path: Path) -> PromptFile:
    """Every prompt of ``path``, with a message for each line that is not one (and for a
    file that is missing, unreadable, of another format, or holds no prompt)."""
    out = PromptFile(path)
    shown = str(path)
    kind = path.suffix.lower()
    if kind not in FORMATS:
        expected = "; ".join(f"{ext} ({what})" for ext, what in FORMATS.items())
        out.problems.append(f"{shown!r} is neither a .txt nor a .jsonl file; expected {expected}")
        return out
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        out.problems.append(f"no prompts file at {shown!r}; the path is relative to the config file")
        return out
    except IsADirectoryError:
        out.problems.append(f"{shown!r} is a folder; expected a {kind} file of prompts")
        return out
    except UnicodeDecodeError as exc:
        line = text_line_of(path.read_bytes(), exc.start)
        out.problems.append(f"{shown!r} line {line}: not UTF-8 text ({exc.reason}); save the file as UTF-8")
        return out
    except OSError as exc:
        out.problems.append(f"cannot read {shown!r}: {exc.strerror or exc}")
        return out
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        prompt, problem = _jsonl_prompt(line) if kind == ".jsonl" else (line, None)
        if problem is None and not prompt.strip():
            problem = "the prompt is empty or only whitespace"
        if problem is not None:
            out.problems.append(f"{shown!r} line {number}: {problem}")
            continue
        out.prompts.append(prompt)
        out.lines.append(number)
    if not out.prompts and not out.problems:
        out.problems.append(f"{shown!r} holds no prompts; expected {FORMATS[kind]}")
    return out


def _jsonl_prompt(line: str) -> tuple[str, str | None]:
    """The prompt on one ``.jsonl`` line, or why there is none."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return "", f"not valid JSON ({exc.msg} at column {exc.colno}); expected a JSON string or {{\"text\": ...}}"
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict):
        if "text" not in value:
            keys = ", ".join(map(repr, value)) or "none"
            return "", f"the object has no \"text\" key (its keys: {keys}); the prompt goes in \"text\""
        if not isinstance(value["text"], str):
            return "", f"\"text\" holds {type(value['text']).__name__} {value['text']!r}; expected a string"
        return value["text"], None
    return "", f"expected a JSON string or an object with a \"text\" key, got {type(value).__name__} {value!r}"


def text_line_of(data: bytes, offset: int) -> int:
    """The 1-based line number of byte ``offset`` in ``data``."""
    return data.count(b"\n", 0, offset) + 1
