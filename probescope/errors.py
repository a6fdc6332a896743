"""Exceptions probescope raises for bad input, each carrying what was wrong and what is expected.

Every user-facing error derives from :class:`ProbescopeError`; the command line turns
those into a message and a non-zero exit status instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'metric'?"`` when one of ``choices`` is close to ``name`` (a
    misspelling), else ``""``. Appended to messages about unknown names."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


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


class DatasetSaveError(ProbescopeError):
    """A dataset holds something NetCDF cannot store (an attribute that is a dict, say):
    the failure of the probe that made it alone."""


class CombineError(ProbescopeError):
    """Datasets that cannot be combined along ``model`` (different probes or parameters)."""

    exit_code = 2


class ProbescopeWarning(UserWarning):
    """Something the user should know about a result that is still produced (a relation
    the head classifier could not score, say). The command line prints these as
    ``warning: ...`` lines."""


@dataclass(frozen=True)
class Failure:
    """One step of a run that failed while the others went on: what the lifecycle hook
    ``run_finished`` and :class:`RunFailed` report."""

    model: str  # the model's name; "" for a renderer (it draws every model)
    step: str  # "model" (could not be loaded), "probe" or "renderer"
    name: str  # the probe entry's or renderer's name (the model's, for "model")
    error: str  # "ExceptionType: message"

    @classmethod
    def of(cls, model: str, step: str, name: str, error: BaseException | str) -> "Failure":
        """A failure from an exception (its type and message) or a sentence."""
        return cls(model, step, name, error if isinstance(error, str) else f"{type(error).__name__}: {error}")

    def describe(self) -> str:
        """One line saying what failed and why."""
        if self.step == "model":
            return f"model {self.model!r} could not be loaded: {self.error}"
        where = f"model {self.model!r}: " if self.model else ""
        return f"{where}{self.step} {self.name!r} failed: {self.error}"

    __str__ = describe


class RunFailed(ProbescopeError):
    """A run finished but some probes or renderers failed; the others' outputs were written."""

    def __init__(self, failures: list[Failure], datasets: dict | None = None,
                 errors: list[BaseException | None] | None = None):
        self.failures = list(failures)
        self.datasets = datasets or {}  # what the other probes produced, by model and probe
        #: the exception behind each failure, in order (None where there was none); the
        #: first is also this error's ``__cause__``, so its traceback is not lost
        self.errors = list(errors) if errors is not None else [None] * len(self.failures)
        lines = ["  " + f.describe() for f in self.failures]
        super().__init__("\n".join([f"{len(self.failures)} step(s) failed:", *lines]))


class Interrupted(ProbescopeError):
    """The user interrupted a run (Ctrl-C). Files already written are complete; nothing
    half-written is left. The command line prints one line and exits 130."""

    exit_code = 130

    def __init__(self, written: list, unfinished: list[str]):
        self.written = list(written)
        self.unfinished = list(unfinished)
        done = f"{len(self.written)} file(s) written" if self.written else "nothing written"
        rest = ", ".join(self.unfinished) or "nothing"
        super().__init__(f"interrupted: {done}; not finished: {rest}")


def describe_failure(failure: Failure) -> str:
    """One line for one failed step of a run."""
    return failure.describe()
