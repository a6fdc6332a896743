"""The run configuration (a TOML file or a dict): its schema and its validation.

Validation happens in full before any model loads and reports every problem at once,
each with the file, the key path and what was expected. It has two stages:

1. :func:`validate` checks the file against the schema and each probe's and renderer's
   own parameter schema, and that referenced folders exist (no model is touched);
2. the runner (:func:`probescope.runner.prepare`) then checks what needs a model's config
   and tokenizer but no weights: layer indices in range, prompts no longer than the model
   takes; its problems are reported the same way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from probescope.errors import ConfigError, PluginError, Problem
from probescope.renderer import FIGURE_FORMATS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # names become file and folder names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """``[[models]]``: one model to probe."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str | None = None  # local folder (relative to the config file)
    hub: str | None = None  # hub id such as "gpt2"
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = "cpu"
    device_map: str | dict[str, Any] | None = None
    architecture: str | None = None  # adapter name, when detection should be overridden
    blocks: str | None = None  # block list path, for a family without an adapter
    trust_remote_code: bool = False
    use_safetensors: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> "ModelEntry":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path (a local folder) or hub (a hub id)")
        return self


class Inputs(_Strict):
    """``[inputs]``: what is fed to every model."""

    prompts: list[str] = Field(min_length=1)
    batch_size: int = Field(default=8, ge=1)

    @field_validator("prompts")
    @classmethod
    def _no_empty_prompt(cls, prompts: list[str]) -> list[str]:
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ValueError(f"prompt {i} is empty")
        return prompts


class ProbeEntry(BaseModel):
    """``[[probes]]``: ``use`` names the probe; every other key is one of its parameters."""

    model_config = ConfigDict(extra="allow")
    use: str
    name: str | None = Field(default=None, pattern=NAME_PATTERN)

    @property
    def label(self) -> str:
        return self.name or self.use

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RendererEntry(BaseModel):
    """``[[renderers]]``: ``use`` names the renderer, ``probe`` the ``[[probes]]`` entry
    whose datasets it draws, ``output`` the figure file; other keys are its parameters."""

    model_config = ConfigDict(extra="allow")
    use: str
    output: str
    probe: str | None = None

    @field_validator("output")
    @classmethod
    def _figure_format(cls, output: str) -> str:
        if Path(output).suffix.lower() not in FIGURE_FORMATS:
            raise ValueError(
                f"figure file {output!r} must end in one of {', '.join(FIGURE_FORMATS)}"
            )
        return output

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Output(_Strict):
    """``[output]``: where results go (relative to the config file)."""

    dir: str = "results"


class RunConfig(_Strict):
    models: list[ModelEntry] = Field(default_factory=list)
    inputs: Inputs
    probes: list[ProbeEntry] = Field(min_length=1)
    renderers: list[RendererEntry] = Field(default_factory=list)
    output: Output = Field(default_factory=Output)


@dataclass(frozen=True)
class ProbeTask:
    name: str  # the entry's label: results are saved as <name>.nc
    probe: Any  # the Probe instance
    params: Any  # its validated Parameters
    index: int  # position in [[probes]], for error locations


@dataclass(frozen=True)
class RendererTask:
    renderer: Any
    params: Any
    probe: str  # label of the probe entry it draws
    output: Path
    index: int


@dataclass(frozen=True)
class Plan:
    """A validated configuration, with plugins resolved and paths made absolute."""

    source: str
    models: list[ModelEntry]
    prompts: list[str]
    batch_size: int
    probes: list[ProbeTask]
    renderers: list[RendererTask]
    output_dir: Path


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, turning a syntax error into a :class:`ConfigError`."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(str(path), [Problem("", "no such file")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [Problem("", f"not valid TOML: {exc}")]) from None


def location(loc: Sequence[Any]) -> str:
    """``("probes", 0, "layers", 2)`` -> ``probes[0].layers[2]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _problems(exc: ValidationError, prefix: Sequence[Any] = ()) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = [*prefix, *(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))]
        # Union members show up as extra path parts ("str", "int"); they say nothing useful.
        loc = [p for p in loc if p not in ("str", "int", "float", "bool", "list[...]", "dict[str,any]")]
        kind = err["type"]
        if kind == "extra_forbidden":
            problems.append(Problem(location(loc[:-1]), f"unknown key {loc[-1]!r}"))
            continue
        if kind == "missing":
            problems.append(Problem(location(loc), "required key is missing"))
            continue
        message = err["msg"].removeprefix("Value error, ")
        if "input" in err and kind not in ("value_error",) and not isinstance(err["input"], (dict, list)):
            message += f" (got {err['input']!r})"
        problems.append(Problem(location(loc), message))
    # Report each place once (a union yields one error per member).
    unique = list(dict.fromkeys(problems))
    return unique


def _parameter_problems(plugin: Any, values: Mapping[str, Any], prefix: Sequence[Any]) -> tuple[Any, list[Problem]]:
    try:
        return plugin.Parameters(**values), []
    except ValidationError as exc:
        problems = _problems(exc, prefix)
        accepted = ", ".join(plugin.Parameters.model_fields) or "no parameters"
        problems = [
            Problem(p.location, f"{p.message}; {plugin.name} takes {accepted}")
            if p.message.startswith("unknown key") else p
            for p in problems
        ]
        return None, problems


def validate(
    raw: Mapping[str, Any], registry: Any, *, source: str, base_dir: Path,
    given_models: Sequence[str] = (),
) -> Plan:
    """Check a parsed configuration completely; raise one :class:`ConfigError` listing
    every problem, or return the :class:`Plan`.

    :param given_models: names of models the Python API passes in as objects; they count
        as models next to the ``[[models]]`` entries.
    """
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None

    problems: list[Problem] = []
    if not config.models and not given_models:
        problems.append(Problem("models", "at least one [[models]] entry is required"))

    seen: set[str] = set(given_models)
    for i, model in enumerate(config.models):
        if model.name in seen:
            problems.append(Problem(f"models[{i}].name", f"model name {model.name!r} is used twice"))
        seen.add(model.name)
        if model.path is not None:
            folder = (base_dir / model.path).expanduser()
            if not folder.is_dir():
                problems.append(Problem(
                    f"models[{i}].path",
                    f"no model folder at {str(folder)!r}; give a folder holding config.json, "
                    f"or write hub = {model.path!r} to load from the Hugging Face hub",
                ))
            elif not (folder / "config.json").is_file():
                problems.append(Problem(f"models[{i}].path", f"folder {str(folder)!r} has no config.json"))
            model.path = str(folder)
        if model.architecture is not None and model.architecture not in registry.names("architecture"):
            problems.append(Problem(
                f"models[{i}].architecture",
                f"unknown architecture {model.architecture!r}; available: {', '.join(registry.names('architecture'))}",
            ))

    probes: list[ProbeTask] = []
    labels: set[str] = set()
    for i, entry in enumerate(config.probes):
        if entry.label in labels:
            problems.append(Problem(
                f"probes[{i}]", f"two probe entries are named {entry.label!r}; give one a distinct name = \"...\""
            ))
        labels.add(entry.label)
        try:
            probe = registry.get("probe", entry.use)
        except PluginError as exc:
            problems.append(Problem(f"probes[{i}].use", str(exc)))
            continue
        params, found = _parameter_problems(probe, entry.parameters, ("probes", i))
        problems += found
        if params is not None:
            probes.append(ProbeTask(entry.label, probe, params, i))

    renderers: list[RendererTask] = []
    outputs: set[str] = set()
    output_dir = (base_dir / config.output.dir).expanduser()
    for i, entry in enumerate(config.renderers):
        if entry.output in outputs:
            problems.append(Problem(f"renderers[{i}].output", f"two renderers write {entry.output!r}"))
        outputs.add(entry.output)
        try:
            renderer = registry.get("renderer", entry.use)
        except PluginError as exc:
            problems.append(Problem(f"renderers[{i}].use", str(exc)))
            continue
        drawable = [p for p in config.probes if p.use == renderer.probe]
        if entry.probe is None:
            if len(drawable) != 1:
                what = "none" if not drawable else ", ".join(repr(p.label) for p in drawable)
                problems.append(Problem(
                    f"renderers[{i}].probe",
                    f"{renderer.name} draws {renderer.probe} datasets; name the probe entry to draw "
                    f"(entries using {renderer.probe}: {what})",
                ))
                continue
            probe_label = drawable[0].label
        else:
            match = [p for p in config.probes if p.label == entry.probe]
            if not match:
                problems.append(Problem(
                    f"renderers[{i}].probe",
                    f"no probe entry named {entry.probe!r}; entries: {', '.join(sorted(labels))}",
                ))
                continue
            if match[0].use != renderer.probe:
                problems.append(Problem(
                    f"renderers[{i}].probe",
                    f"{renderer.name} draws {renderer.probe} datasets, but {entry.probe!r} uses {match[0].use}",
                ))
                continue
            probe_label = entry.probe
        params, found = _parameter_problems(renderer, entry.parameters, ("renderers", i))
        problems += found
        if params is not None:
            renderers.append(RendererTask(renderer, params, probe_label, output_dir / entry.output, i))

    if problems:
        raise ConfigError(source, problems)
    return Plan(
        source=source,
        models=config.models,
        prompts=config.inputs.prompts,
        batch_size=config.inputs.batch_size,
        probes=probes,
        renderers=renderers,
        output_dir=output_dir,
    )


def load_plan(
    config: str | Path | Mapping[str, Any], registry: Any, given_models: Sequence[str] = ()
) -> Plan:
    """Validate a config given as a TOML path or as a dict (paths relative to the cwd)."""
    if isinstance(config, Mapping):
        return validate(config, registry, source="<config dict>", base_dir=Path.cwd(),
                        given_models=given_models)
    path = Path(config)
    return validate(read_toml(path), registry, source=str(path),
                    base_dir=path.resolve().parent, given_models=given_models)
