"""What a configuration is made of before it is validated: included probe sets, their
per-entry overrides, and environment variables.

A configuration can keep probe sets in files of their own and include them::

    include = ["sets/heads.toml", { path = "sets/norms.toml", override = { weights = { layers = [0, -1] } } }]

An included file holds ``[[probes]]`` (and ``[[renderers]]`` drawing them, and more
``include``); its entries are added after the including file's own. ``override`` changes
keys of the included entries, by entry name. Values may name environment variables as
``${NAME}`` (``$${`` writes a literal ``${``); an unset variable is an error.

:func:`assemble` turns a parsed file into one mapping for :func:`probescope.config.validate`
and says, for each entry that came from another file, where it came from, so a problem
in it names that file (:func:`relocate`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from probescope.errors import Problem, location

#: Sections an included file may hold.
INCLUDABLE = ("include", "probes", "renderers")
_VARIABLE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Assembled:
    """A configuration with its includes merged and variables expanded."""

    raw: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    #: ``("probes", merged index) -> (file as shown, index in that file)`` for included entries
    origins: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)


def expand_variables(value: Any, where: Sequence[Any], problems: list[Problem],
                     environ: Mapping[str, str] | None = None) -> Any:
    """``value`` with ``${NAME}`` in every string replaced by the environment variable;
    a problem at the key path for each unset or malformed one."""
    environ = os.environ if environ is None else environ
    if isinstance(value, str):
        def replace(match: re.Match) -> str:
            if match.group(0) == "$${":
                return "${"
            name = match.group(1)
            if not _NAME.match(name):
                problems.append(Problem(location(where), f"${{{name}}} is not a variable name; "
                                                         "write ${NAME} (letters, digits, _) or $${ for a literal ${"))
            elif name not in environ:
                problems.append(Problem(location(where), f"environment variable {name!r} is not set "
                                                         f"(used as ${{{name}}}); set it or write the value"))
            else:
                return environ[name]
            return match.group(0)

        return _VARIABLE.sub(replace, value)
    if isinstance(value, Mapping):
        return {k: expand_variables(v, [*where, k], problems, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_variables(v, [*where, i], problems, environ) for i, v in enumerate(value)]
    return value


def assemble(raw: Mapping[str, Any], base_dir: Path, read: Callable[[Path], dict[str, Any]],
             environ: Mapping[str, str] | None = None) -> Assembled:
    """Expand variables and merge includes (depth first, each file once per chain).

    :param read: parses an included TOML file; raises :class:`probescope.errors.ConfigError`.
    """
    out = Assembled(raw={})
    top = expand_variables(dict(raw), [], out.problems, environ)
    includes = top.pop("include", [])
    out.raw = top
    for key in ("probes", "renderers"):
        if isinstance(top.get(key), list):
            top[key] = list(top[key])
    _include(out, includes, "", base_dir, base_dir, read, environ, chain=())
    return out


def _include(out: Assembled, includes: Any, shown: str, folder: Path, base_dir: Path,
             read: Callable[[Path], dict[str, Any]], environ: Mapping[str, str] | None,
             chain: tuple[Path, ...]) -> None:
    """Add the entries of each file in ``includes`` (the ``include`` of the file shown as
    ``shown``, "" for the configuration itself) to ``out.raw``."""
    from probescope.errors import ConfigError

    where = f"{shown}: include" if shown else "include"
    if not isinstance(includes, list):
        out.problems.append(Problem(where, "expected a list of files, such as include = [\"sets/heads.toml\"]"))
        return
    for i, item in enumerate(includes):
        spec, problem = _include_spec(item)
        if problem:
            out.problems.append(Problem(f"{where}[{i}]", problem))
            continue
        path = (folder / Path(spec["path"]).expanduser()).resolve()
        name = os.path.relpath(path, base_dir)
        if path in chain:
            out.problems.append(Problem(f"{where}[{i}]", f"{name} includes itself (through {' -> '.join(p.name for p in chain)})"))
            continue
        try:
            data = read(path)
        except ConfigError as exc:
            out.problems += [Problem(f"{where}[{i}]", f"{name}: {p.message}") for p in exc.problems]
            continue
        found: list[Problem] = []
        data = expand_variables(data, [], found, environ)
        out.problems += [_in_file(name, p) for p in found]
        for key in data:
            if key not in INCLUDABLE:
                out.problems.append(Problem(name, f"unknown key {key!r}; an included file holds "
                                                  f"{', '.join(INCLUDABLE)}"))
        _apply_overrides(data, spec.get("override", {}), f"{where}[{i}].override", name, out.problems)
        for key in ("probes", "renderers"):
            entries = data.get(key, [])
            if not isinstance(entries, list):
                out.problems.append(Problem(f"{name}: {key}", f"expected an array of tables ([[{key}]] entries)"))
                continue
            merged = out.raw.setdefault(key, [])
            if not isinstance(merged, list):
                continue  # the configuration's own mistake, reported by validate
            for j, entry in enumerate(entries):
                out.origins[(key, len(merged))] = (name, j)
                merged.append(entry)
        _include(out, data.get("include", []), name, path.parent, base_dir, read, environ, (*chain, path))


def _include_spec(item: Any) -> tuple[dict[str, Any], str | None]:
    """An ``include`` item as ``{"path": ..., "override": {...}}``, or why it is not one."""
    if isinstance(item, str):
        return {"path": item}, None
    if isinstance(item, Mapping):
        unknown = set(item) - {"path", "override"}
        if unknown:
            return {}, f"unknown key {sorted(unknown)[0]!r}; an include entry takes path, override"
        if not isinstance(item.get("path"), str):
            return {}, "path is missing: give { path = \"sets/heads.toml\" }"
        if not isinstance(item.get("override", {}), Mapping):
            return {}, "override must be a table of entry name -> { key = value }"
        return dict(item), None
    return {}, f"expected a file name or {{ path = ..., override = ... }}, got {item!r}"


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any], where: str, name: str,
                     problems: list[Problem]) -> None:
    """Change the keys of included probe entries, found by entry name (``name``, else ``use``)."""
    entries = [e for e in data.get("probes", []) if isinstance(e, dict)] if isinstance(data.get("probes"), list) else []
    by_label: dict[str, dict[str, Any]] = {}
    for entry in entries:
        label = entry.get("name") or entry.get("use")
        if isinstance(label, str):
            by_label.setdefault(label, entry)
    for label, changes in overrides.items():
        if label not in by_label:
            problems.append(Problem(f"{where}.{label}", f"{name} has no entry named {label!r}; "
                                                        f"its entries: {', '.join(by_label) or 'none'}"))
        elif not isinstance(changes, Mapping):
            problems.append(Problem(f"{where}.{label}", "expected a table of keys to change, such as { layers = [0, 1] }"))
        else:
            by_label[label].update(changes)


def _in_file(name: str, problem: Problem) -> Problem:
    return Problem(f"{name}: {problem.location}" if problem.location else name, problem.message)


_ENTRY = re.compile(r"^(probes|renderers)\[(\d+)\]")


def relocate(problems: Sequence[Problem], origins: Mapping[tuple[str, int], tuple[str, int]]) -> list[Problem]:
    """Problems of entries that came from an included file, located in that file
    (``sets/heads.toml: probes[1].layers``) instead of in the merged list."""
    out = []
    for problem in problems:
        match = _ENTRY.match(problem.location)
        origin = origins.get((match.group(1), int(match.group(2)))) if match else None
        if origin is None:
            out.append(problem)
        else:
            rest = problem.location[match.end():]
            out.append(Problem(f"{origin[0]}: {match.group(1)}[{origin[1]}]{rest}", problem.message))
    return out
