"""Exceptions probescope raises for bad input, each carrying what was wrong and what is expected.

Every user-facing error derives from :class:`ProbescopeError`; the command line turns
those into a message and a non-zero exit status instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence


class ProbescopeError(Exception):
    """Base class of every error caused by the user's input rather than a probescope bug."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One mistake in a configuration: where it is and what was expected."""

    location: str  # key path such as ``probes[0].layers[2]``; empty for the whole file
    message: str

    def format(self, source: str) -> str:
        where = f"{source}: {self.location}" if self.location else source
        return f"{where}: {self.message}"


def location(loc: Sequence[Any]) -> str:
    """``("probes", 0, "layers", 2)`` -> ``probes[0].layers[2]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class ConfigError(ProbescopeError):
    """The configuration is invalid. Holds every problem found, not just the first."""

    exit_code = 2

    def __init__(self, source: str, problems: Iterable[Problem]):
        self.source = source
        self.problems = list(problems)
        lines = [p.format(source) for p in self.problems]
        header = f"{source}: {len(self.problems)} problem(s) in the configuration"
        super().__init__("\n".join([header, *("  " + line for line in lines)]))


class PluginError(ProbescopeError):
    """A plugin could not be used (unknown name, bad registration)."""


class PluginConflictError(PluginError):
    """Two plugins registered the same name."""


class ModelLoadError(ProbescopeError):
    """A model, its config or its tokenizer could not be loaded.

    ``key`` names the model entry's key at fault, when one is.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class UnsupportedArchitectureError(ProbescopeError):
    """No adapter handles the model and the user did not name its block list."""


class SiteError(ProbescopeError):
    """A probe asked for a site the model's architecture does not have."""


class InputError(ProbescopeError):
    """An input cannot be fed to a model (e.g. a prompt longer than the model takes)."""


class ProbescopeWarning(UserWarning):
    """Something the user should know about a result that is still produced (a relation
    the head classifier could not score, say). The command line prints these as
    ``warning: ...`` lines."""


class RunFailed(ProbescopeError):
    """A run finished but some probes or renderers failed; the others' outputs were written."""

    def __init__(self, failures: list[dict[str, str]], datasets: dict | None = None):
        self.failures = failures
        self.datasets = datasets or {}  # what the other probes produced, by model and probe
        lines = ["  " + describe_failure(f) for f in failures]
        super().__init__("\n".join([f"{len(failures)} step(s) failed:", *lines]))


def describe_failure(failure: dict[str, str]) -> str:
    """One line for one failed step of a run."""
    if failure["step"] == "model":
        return f"model {failure['model']!r} could not be loaded: {failure['error']}"
    where = f"model {failure['model']!r}: " if failure["model"] else ""
    return f"{where}{failure['step']} {failure['name']!r} failed: {failure['error']}"
