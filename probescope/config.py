"""The run configuration (a TOML file or a dict): its schema and its validation.

Validation happens in full before any model loads and reports every problem at once,
each with the file, the key path and what was expected. It has two stages:

1. :func:`validate` checks each section and entry of the file on its own (so one mistake
   does not hide another) against the schema and each probe's and renderer's parameter
   schema, and that referenced folders exist; no model is touched. It returns a
   :class:`Plan` of what is valid, carrying the problems found;
2. :func:`probescope.runner.prepare` adds what needs each model's config and tokenizer
   but no weights (layers in range, prompts no longer than the model takes, the adapter
   finds the blocks) and raises one :class:`ConfigError` with the problems of both stages.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from probescope.errors import ConfigError, PluginError, Problem, did_you_mean, location
from probescope.formats import figure_format_problem, weight_files_problem
from probescope.params import validation_context

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # names become file and folder names


def _check_name(name: str) -> str:
    """Names become file and folder names: keep them to safe characters."""
    import re

    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(
            f"{name!r} is not a valid name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (it becomes a folder or file name)"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    """``[[models]]``: one model to probe."""

    name: str = Field(description="the model's name in results (`DIR/NAME/...`), figures and messages; "
                      "unique among models")
    path: str | None = Field(None, description="a local model folder holding `config.json`, the tokenizer and the "
                             "weights (as `save_pretrained` writes them), relative to the config file; give this or `hub`")
    hub: str | None = Field(None, description='a Hugging Face hub id such as "gpt2" or "EleutherAI/pythia-160m"; '
                            "give this or `path`")
    revision: str | None = Field(None, description="hub branch, tag or commit (default: the latest); recorded in "
                                 "each dataset's `attrs`")
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = Field(
        "auto", description='dtype the weights load in; "auto" keeps the checkpoint\'s own')
    device: str = Field("cpu", description='torch device the model runs on, such as "cpu", "cuda", "cuda:1" or "mps"')
    # accelerate's placement across devices, CPU and disk (probescope.offload)
    device_map: str | dict[str, Any] | None = Field(
        None, description='place the model across GPUs, CPU and disk with accelerate (the `offload` extra): "auto", '
        '"balanced", "balanced_low_0", "sequential", one device, or a table of module path = device, GPU index or '
        '"disk"; excludes `device` (see docs/scale.md)')
    max_memory: dict[str, Any] | None = Field(
        None, description='with `device_map`: the most each device may hold, e.g. { 0 = "20GiB", cpu = "64GiB" } '
        "(bytes, or KiB/MiB/GiB/KB/MB/GB)")
    offload_folder: str | None = Field(
        None, description='with `device_map`: folder for modules sent to "disk", relative to the config file')
    architecture: str | None = Field(None, description="name of the architecture adapter to use (see `probescope "
                                     "plugins`); default: chosen from the `model_type` in the model's config")
    blocks: str | None = Field(None, description='dotted path of the block list (for example "gpt_neox.layers") '
                               "for a model no adapter handles; only the residual stream is then available")
    trust_remote_code: bool = Field(False, description="allow a hub model's own Python code to run")
    use_safetensors: bool = Field(True, description="load weights only from `.safetensors` files; false also allows "
                                  "pickled checkpoints (`.bin`), which can run code when loaded")
    # probescope.remote
    remote: StrictBool | Literal["local"] = Field(
        False, description='run the trace plan on NDIF through nnsight (true; a hub model NDIF hosts, an NDIF API '
        'key set), or through nnsight\'s local simulation of it ("local"); see docs/scale.md')

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return _check_name(name)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        import torch

        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"{device!r} is not a torch device; expected e.g. \"cpu\", \"cuda\", \"cuda:1\" or \"mps\"") from None
        return device

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        from probescope.offload import check_device_map

        return None if value is None else check_device_map(value)

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from probescope.offload import check_max_memory

        return None if value is None else check_max_memory(value)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelEntry":
        problems = []
        if (self.path is None) == (self.hub is None):
            problems.append("give exactly one of path (a local folder) or hub (a hub id)")
        if self.device_map is None:
            needs = [key for key in ("max_memory", "offload_folder") if getattr(self, key) is not None]
            if needs:
                problems.append(f"{' and '.join(needs)} only apply with device_map (e.g. device_map = \"auto\")")
        elif "device" in self.model_fields_set:
            problems.append(f"give device ({self.device!r}) or device_map ({self.device_map!r}), not both: "
                            "device_map places every module itself")
        if self.remote is True and self.path is not None:
            problems.append("remote = true runs the model NDIF hosts, named by its hub id: give hub, not path "
                            "(remote = \"local\" simulates a remote run on a local folder)")
        if self.remote:
            placed = [key for key in ("device", "device_map") if key in self.model_fields_set]
            if placed:
                problems.append(f"remote = {self.remote!r} runs the model where NDIF places it: "
                                f"leave out {' and '.join(placed)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Inputs(_Strict):
    """``[inputs]``: what is fed to every model."""

    prompts: Optional[Annotated[list[str], Field(min_length=1)]] = Field(
        None, description="the prompts, inline; give this or prompts_file")
    prompts_file: Optional[str] = Field(
        None, description="a .txt (one prompt per line) or .jsonl (one JSON string or "
        '{"text": ...} object per line) file of prompts, relative to the config file; '
        "blank lines are skipped; give this or prompts")
    batch_size: StrictInt = Field(default=8, ge=1, description="prompts per forward pass")
    # checked in validate(): files exist and open as images
    images: list[str] | None = Field(None, description="vision-language models: one image file per prompt, in the "
                                     'same order ("" for a prompt without one), relative to the config file')
    chat_template: bool = Field(False, description="vision-language models: put each prompt (and its image) in one "
                                "user turn of the processor's chat template, ending where the answer would begin")

    @field_validator("prompts")
    @classmethod
    def _no_empty_prompt(cls, prompts: list[str] | None) -> list[str] | None:
        for i, prompt in enumerate(prompts or []):
            if not prompt.strip():
                raise ValueError(f"prompt {i} is empty")
        return prompts

    @model_validator(mode="after")
    def _one_source_of_prompts(self) -> "Inputs":
        if self.prompts is not None and self.prompts_file is not None:
            raise ValueError("give prompts (inline) or prompts_file, not both")
        if self.prompts is None and self.prompts_file is None:
            raise ValueError('give prompts = ["...", ...] or prompts_file = "prompts.txt" (or .jsonl)')
        return self

    @model_validator(mode="after")
    def _one_image_per_prompt(self) -> "Inputs":
        # prompts from a file are counted against the images in validate(), once read
        if self.images is not None and self.prompts is not None:
            images_problem = image_count_problem(len(self.images), len(self.prompts))
            if images_problem:
                raise ValueError(images_problem)
        return self


def image_count_problem(images: int, prompts: int, prompts_file: str | None = None) -> str | None:
    """Why ``images`` image entries do not pair with ``prompts`` prompts (read from
    ``prompts_file``, if given), if they do not."""
    if images == prompts:
        return None
    source = f" in {prompts_file}" if prompts_file else ""
    return (f"images has {images} entries for {prompts} prompts{source}; give one per "
            'prompt, in the same order ("" for a prompt without an image)')


class _PluginEntry(BaseModel):
    """An entry naming a plugin in ``use``; every key its schema does not declare is one of
    the plugin's parameters, validated against the plugin's own schema."""

    model_config = ConfigDict(extra="allow")
    use: str = Field(description="the plugin's name (list them with `probescope plugins`)")

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ProbeEntry(_PluginEntry):
    """``[[probes]]``: ``use`` names the probe, ``models`` the models it runs on (all by
    default); every other key is one of its parameters."""

    name: str | None = Field(None, description="the entry's name (default: the value of `use`): results are saved as "
                             "`NAME.nc` and renderers refer to it; a second entry of the same probe needs one")
    models: list[str] | None = Field(default=None, min_length=1, description="run this entry only on these "
                                     "`[[models]]` names (default: every model)")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        return None if name is None else _check_name(name)

    @property
    def label(self) -> str:
        return self.name or self.use


class RendererEntry(_PluginEntry):
    """``[[renderers]]``: ``use`` names the renderer, ``probe`` the ``[[probes]]`` entry
    whose datasets it draws, ``output`` the figure file; other keys are its parameters."""

    # its format is checked in validate(), so a bad one hides nothing else
    output: str = Field(description="the figure file, relative to `[output] dir`; `.png`, `.pdf` or `.svg` sets "
                        "the format; unique among renderers")
    probe: str | None = Field(None, description="the name of the `[[probes]]` entry whose datasets it draws; may be "
                              "left out when exactly one entry uses the probe the renderer draws")


class Output(_Strict):
    """``[output]``: where results go (relative to the config file)."""

    dir: str = Field("results", description="folder for datasets (`DIR/MODEL/ENTRY.nc`), figures and the "
                     "manifest, relative to the config file")


class Include(_Strict):
    """An ``include`` item given as a table: the file, and keys to change in its probe
    entries, by entry name (see :mod:`probescope.config_files`)."""

    path: str = Field(description="a TOML file of `[[probes]]` (and `[[renderers]]`) entries, relative to the "
                      "including file")
    override: dict[str, dict[str, Any]] = Field(default_factory=dict, description="keys to change in the included "
                                                "entries, by entry name: `{ENTRY = {KEY = VALUE}}`")


class RunConfig(_Strict):
    """The file's sections. :func:`validate` checks each one separately against its own
    schema; this class names them and their defaults. ``include`` is merged in before
    (:func:`probescope.config_files.assemble`)."""

    include: list[str | Include] = Field(default_factory=list, description="probe sets kept in other TOML files, "
                                         "merged in before validation: paths, or tables with a path and overrides")
    models: list[ModelEntry] = Field(default_factory=list, description="the models to probe, one table each")
    inputs: Inputs = Field(description="what is fed to every model: the prompts (and images); needed when some "
                           "probe reads activations")
    probes: list[ProbeEntry] = Field(min_length=1, description="the probe entries: `use` names the probe; every other "
                                     "key but `name` and `models` is one of its parameters")
    renderers: list[RendererEntry] = Field(default_factory=list, description="the figures: `use` names the renderer, "
                                           "`output` the file; other keys are its parameters")
    output: Output = Field(default_factory=Output, description="where results go")


@dataclass(frozen=True)
class ProbeTask:
    name: str  # the entry's label: results are saved as <name>.nc
    probe: Any  # the Probe instance
    params: Any  # its validated Parameters
    index: int  # position in [[probes]], for error locations
    models: tuple[str, ...] | None = None  # the models it runs on; None: every model

    def runs_on(self, model: str) -> bool:
        return self.models is None or model in self.models


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
    models: list[tuple[int, ModelEntry]]  # (position in [[models]], entry), valid entries only
    prompts: list[str]
    batch_size: int
    probes: list[ProbeTask]
    renderers: list[RendererTask]
    output_dir: Path
    problems: list[Problem] = field(default_factory=list)  # found so far; see runner.prepare
    images: list[Any] = field(default_factory=list)  # inputs.Image or None per prompt; empty: none
    chat_template: bool = False
    #: where entries merged from included files came from (:func:`probescope.config_files.relocate`)
    origins: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)

    def probes_for(self, model: str) -> list[ProbeTask]:
        """The probe entries that run on ``model`` (an entry's ``models`` limits it)."""
        return [task for task in self.probes if task.runs_on(model)]

    def located(self, problems: Sequence[Problem]) -> list[Problem]:
        """``problems`` with those of included entries located in their own file."""
        from probescope.config_files import relocate

        return relocate(problems, self.origins)
    #: whether the file has an ``[inputs]`` section (valid or not): a missing one is reported
    #: only when it is really missing, not when its prompts or batch size are wrong
    inputs_given: bool = True
    #: the prompts as written, for checks that need only how many there are (a renderer's
    #: prompt index), even when some prompt is invalid; None when not even a list
    prompts_as_written: list[str] | None = None
    #: the :class:`probescope.prompt_files.PromptFile` the prompts came from; None: inline
    prompt_file: Any = None

    def prompt_location(self, index: int) -> str:
        """Where prompt ``index`` is written, for a problem with it: ``inputs.prompts[3]``,
        or ``inputs.prompts_file (prompts.jsonl line 12)``."""
        if self.prompt_file is None:
            return f"inputs.prompts[{index}]"
        return f"inputs.prompts_file ({self.prompt_file.where(index)})"


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


_UNION_PARTS = ("str", "int", "float", "bool", "list[...]", "dict[str,any]")


def _is_noise(part: Any) -> bool:
    """Path parts pydantic adds for union members and validators; they say nothing to a user."""
    return isinstance(part, str) and (
        part in _UNION_PARTS or part.startswith(("function-", "literal[", "constrained-"))
    )


def _problems(exc: ValidationError, prefix: Sequence[Any] = (), schema: type[BaseModel] | None = None) -> list[Problem]:
    """Pydantic errors as problems, one per place, worded for people.

    :param schema: the model validated at ``prefix``; its keys are listed when a key is unknown.
    """
    by_place: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = [p for p in err["loc"] if not _is_noise(p)]
        kind = err["type"]
        if kind == "extra_forbidden":
            expected = _known_keys(schema, loc[:-1])
            hint = f"{did_you_mean(loc[-1], expected.split(', '))}; expected {expected}" if expected else ""
            place, message = location([*prefix, *loc[:-1]]), f"unknown key {loc[-1]!r}{hint}"
        elif kind == "missing":
            place, message = location([*prefix, *loc]), "required key is missing"
        else:
            message = err["msg"].removeprefix("Value error, ").replace(" after validation", "")
            if kind != "value_error" and not isinstance(err.get("input"), (dict, list)) and "input" in err:
                message += f" (got {err['input']!r})"
            place = location([*prefix, *loc])
        messages = by_place.setdefault(place, [])
        if message not in messages:
            messages.append(message)
    # A union (say an int or "embed") fails once per member: one problem saying either.
    return [Problem(place, "; or ".join(messages)) for place, messages in by_place.items()]


def _known_keys(schema: type[BaseModel] | None, loc: Sequence[Any]) -> str:
    """The keys the schema accepts at ``loc`` (nested sections and list items followed)."""
    for part in loc:
        if schema is None:
            return ""
        if isinstance(part, int):
            continue
        field = schema.model_fields.get(part)
        if field is None:
            return ""
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        schema = candidates[0] if candidates else None
    if schema is None:
        return ""
    return ", ".join(schema.model_fields)


def parameter_problems(
    plugin: Any, values: Mapping[str, Any], prefix: Sequence[Any], base_dir: Path | None = None,
) -> tuple[Any, list[Problem]]:
    """A plugin's validated parameters and the problems found. File paths among them
    (:data:`probescope.ConfigPath`) are taken relative to ``base_dir``, the config
    file's folder."""
    try:
        return plugin.Parameters.model_validate(dict(values), context=validation_context(base_dir)), []
    except ValidationError as exc:
        problems = _problems(exc, prefix)
        fields = list(plugin.Parameters.model_fields)
        accepted = ", ".join(fields) or "no parameters"
        problems = [
            Problem(p.location, f"{p.message}{did_you_mean(_unknown_key(p.message), fields)}; "
                                f"{plugin.name} takes {accepted}")
            if p.message.startswith("unknown key") else p
            for p in problems
        ]
        return None, problems


def _unknown_key(message: str) -> str:
    """The key of an ``unknown key 'name'`` message."""
    import re

    found = re.match(r"unknown key '(.*)'", message)
    return found.group(1) if found else ""


def without_mistakes(schema: type[BaseModel], values: Any, context: Mapping[str, Any] | None = None) -> Any:
    """``schema`` validated from ``values`` with the keys at fault left out (taking their
    defaults), or None when that is not valid either (a required key at fault, a rule
    across keys). Never run: it only lets the checks that need a valid entry (layers
    against each model, a renderer's prompt index) look at the rest of an entry that has
    a mistake, so that one mistake does not hide another."""
    if not isinstance(values, Mapping):
        return None
    data = dict(values)
    while True:
        try:
            return schema.model_validate(data, context=context)
        except ValidationError as exc:
            errors = exc.errors()
            at_fault = {err["loc"][0] for err in errors if err["loc"] and err["loc"][0] in data}
            if not at_fault or any(not err["loc"] or err["loc"][0] not in data for err in errors):
                return None
            for key in at_fault:
                del data[key]


def _section(schema: type[BaseModel], value: Any, prefix: Sequence[Any], problems: list[Problem]) -> Any:
    """Validate one part of the file on its own, so a mistake in one part does not hide
    the mistakes in the others. Returns None when it is invalid, or what remains valid
    of it (:func:`without_mistakes`) for the checks of stage two, its problems recorded."""
    try:
        return schema.model_validate(value)
    except ValidationError as exc:
        problems += _problems(exc, prefix, schema)
        return without_mistakes(schema, value)


def _entries(schema: type[BaseModel], raw: Mapping[str, Any], key: str, problems: list[Problem]) -> list[tuple[int, Any]]:
    """``(index, entry)`` for each valid entry of an array of tables such as ``[[probes]]``."""
    value = raw.get(key, [])
    if not isinstance(value, list):
        problems.append(Problem(key, f"expected an array of tables ([[{key}]] entries), got {type(value).__name__}"))
        return []
    out = []
    for i, item in enumerate(value):
        entry = _section(schema, item, (key, i), problems)
        if entry is not None:
            out.append((i, entry))
    return out


def _looks_like_path(text: str) -> bool:
    """Whether a value could not be a hub id (``name`` or ``org/name``)."""
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1


def validate(
    raw: Mapping[str, Any], registry: Any, *, source: str, base_dir: Path,
    given_models: Sequence[str] = (),
) -> Plan:
    """Check a parsed configuration completely, every section on its own, and return the
    :class:`Plan` of what is valid with every problem found in :attr:`Plan.problems`.

    The caller (:func:`probescope.runner.prepare`) adds the problems that need each
    model's config and tokenizer, and raises one :class:`ConfigError` with all of them.

    :param given_models: names of models the Python API passes in as objects; they count
        as models next to the ``[[models]]`` entries.
    """
    problems: list[Problem] = []
    for key in raw:
        if key not in RunConfig.model_fields:
            problems.append(Problem("", f"unknown key {key!r}{did_you_mean(key, RunConfig.model_fields)}; "
                                        f"expected {', '.join(RunConfig.model_fields)}"))

    models = _entries(ModelEntry, raw, "models", problems)
    if not raw.get("models") and not given_models:
        problems.append(Problem("models", "at least one [[models]] entry is required"))
    # [inputs] may be left out when no probe reads activations (the head classifier reads
    # only weights); runner.prepare asks each probe and reports it missing otherwise.
    inputs = _section(Inputs, raw["inputs"], ("inputs",), problems) if "inputs" in raw else None
    written = raw["inputs"].get("prompts") if isinstance(raw.get("inputs"), Mapping) else None
    prompts_as_written = [str(p) for p in written] if isinstance(written, list) else \
        None if "inputs" in raw else []
    prompt_file = None
    if inputs is not None and inputs.prompts_file is not None:
        prompt_file, found = _prompt_file(inputs, base_dir)
        problems += found
        prompts_as_written = list(prompt_file.prompts) if not found else None
    probe_entries = _entries(ProbeEntry, raw, "probes", problems)
    if not raw.get("probes"):
        problems.append(Problem("probes", "at least one [[probes]] entry is required"))
    renderer_entries = _entries(RendererEntry, raw, "renderers", problems)
    output = _section(Output, raw.get("output", {}), ("output",), problems) or Output()

    seen: set[str] = set(given_models)
    valid_models = []
    for i, model in models:
        if model.name in seen:
            problems.append(Problem(f"models[{i}].name", f"model name {model.name!r} is used twice"))
        seen.add(model.name)
        if model.path is not None:
            folder = (base_dir / model.path).expanduser()
            if not folder.is_dir():
                hint = "" if _looks_like_path(model.path) else \
                    f", or write hub = {model.path!r} to load from the Hugging Face hub"
                problems.append(Problem(
                    f"models[{i}].path",
                    f"no model folder at {str(folder)!r}; give a folder holding config.json{hint}",
                ))
                continue
            if not (folder / "config.json").is_file():
                problems.append(Problem(f"models[{i}].path", f"folder {str(folder)!r} has no config.json"))
                continue
            weights = weight_files_problem(folder, model.use_safetensors)
            if weights:
                problems.append(Problem(f"models[{i}].path", weights))
            model.path = str(folder)
        problems += _placement_problems(model, i, base_dir)
        if model.architecture is not None and model.architecture not in registry.names("architecture"):
            problems.append(Problem(
                f"models[{i}].architecture",
                f"unknown architecture {model.architecture!r}; available: {', '.join(registry.names('architecture'))}",
            ))
            continue
        valid_models.append((i, model))

    probes: list[ProbeTask] = []
    labels: dict[str, str] = {}  # entry label -> probe it uses
    for i, entry in probe_entries:
        if entry.label in labels:
            problems.append(Problem(
                f"probes[{i}]", f"two probe entries are named {entry.label!r}; give one a distinct name = \"...\""
            ))
        labels[entry.label] = entry.use
        try:
            probe = registry.get("probe", entry.use)
        except PluginError as exc:
            problems.append(Problem(f"probes[{i}].use", str(exc)))
            continue
        params, found = parameter_problems(probe, entry.parameters, ("probes", i), base_dir)
        problems += found
        if params is None:  # what remains valid is still checked against each model
            params = without_mistakes(probe.Parameters, entry.parameters, validation_context(base_dir))
        if params is not None:
            probes.append(ProbeTask(entry.label, probe, params, i,
                                    None if entry.models is None else tuple(entry.models)))
    problems += _entry_model_problems(probe_entries, [m.name for _, m in models] + list(given_models))

    renderers: list[RendererTask] = []
    outputs: set[str] = set()
    output_dir = (base_dir / output.dir).expanduser()
    for i, entry in renderer_entries:
        bad_format = figure_format_problem(entry.output)
        if bad_format:
            problems.append(Problem(f"renderers[{i}].output", bad_format))
        if entry.output in outputs:
            problems.append(Problem(f"renderers[{i}].output", f"two renderers write {entry.output!r}"))
        outputs.add(entry.output)
        try:
            renderer = registry.get("renderer", entry.use)
        except PluginError as exc:
            problems.append(Problem(f"renderers[{i}].use", str(exc)))
            continue
        params, found = parameter_problems(renderer, entry.parameters, ("renderers", i), base_dir)
        problems += found
        if params is None:
            params = without_mistakes(renderer.Parameters, entry.parameters, validation_context(base_dir))
        drawable = [label for label, use in labels.items() if use == renderer.probe]
        if entry.probe is None:
            if len(drawable) != 1:
                what = "none" if not drawable else ", ".join(map(repr, drawable))
                problems.append(Problem(
                    f"renderers[{i}].probe",
                    f"{renderer.name} draws {renderer.probe} datasets; name the probe entry to draw "
                    f"(entries using {renderer.probe}: {what})",
                ))
                continue
            probe_label = drawable[0]
        elif entry.probe not in labels:
            problems.append(Problem(
                f"renderers[{i}].probe",
                f"no probe entry named {entry.probe!r}; entries: {', '.join(sorted(labels)) or 'none'}",
            ))
            continue
        elif labels[entry.probe] != renderer.probe:
            problems.append(Problem(
                f"renderers[{i}].probe",
                f"{renderer.name} draws {renderer.probe} datasets, but {entry.probe!r} uses {labels[entry.probe]}",
            ))
            continue
        else:
            probe_label = entry.probe
        if params is not None:
            renderers.append(RendererTask(renderer, params, probe_label, output_dir / entry.output, i))

    images: list[Any] = []
    if inputs is not None and inputs.images is not None and prompt_file is not None and prompt_file.prompts:
        images_problem = image_count_problem(len(inputs.images), len(prompt_file.prompts), inputs.prompts_file)
        if images_problem:
            problems.append(Problem("inputs.images", images_problem))
    if inputs is not None and inputs.images is not None:
        from probescope.inputs import read_images

        images, found = read_images(inputs.images, base_dir)
        problems += [Problem(f"inputs.images[{i}]", message) for i, message in found]
    problems += output_problems(output_dir, [m.name for _, m in valid_models] + list(given_models),
                                [(f"renderers[{t.index}].output", t.output) for t in renderers])

    return Plan(
        source=source,
        models=valid_models,
        prompts=(prompt_file.prompts if prompt_file is not None else inputs.prompts or []) if inputs is not None else [],
        batch_size=inputs.batch_size if inputs is not None else 1,
        probes=probes,
        renderers=renderers,
        output_dir=output_dir,
        problems=problems,
        images=images,
        chat_template=inputs.chat_template if inputs is not None else False,
        inputs_given="inputs" in raw,
        prompts_as_written=prompts_as_written,
        prompt_file=prompt_file,
    )


def _prompt_file(inputs: Inputs, base_dir: Path) -> tuple[Any, list[Problem]]:
    """The prompts of ``inputs.prompts_file`` (relative to the config file's folder), and
    a problem for each line, or the file, that is wrong."""
    from probescope.prompt_files import read_prompts

    read = read_prompts((base_dir / Path(inputs.prompts_file).expanduser()).resolve())
    return read, [Problem("inputs.prompts_file", message) for message in read.problems]


def _placement_problems(model: ModelEntry, i: int, base_dir: Path) -> list[Problem]:
    """What stops a ``device_map`` entry from loading (accelerate missing, an offload
    folder that is a file), or a ``remote`` one from running (this nnsight cannot, no
    NDIF API key); its ``offload_folder`` is made absolute."""
    if model.remote:
        from probescope.remote import remote_problem

        found = remote_problem(model.remote)
        return [Problem(f"models[{i}].remote", found)] if found else []
    if model.device_map is None:
        return []
    from probescope.offload import accelerate_missing

    problems = []
    missing = accelerate_missing()
    if missing:
        problems.append(Problem(f"models[{i}].device_map", missing))
    if model.offload_folder is not None:
        folder = (base_dir / model.offload_folder).expanduser()
        if folder.exists() and not folder.is_dir():
            problems.append(Problem(f"models[{i}].offload_folder",
                                    f"{str(folder)!r} is a file; give a folder (it is created when missing)"))
        model.offload_folder = str(folder)
    return problems


def _entry_model_problems(entries: Sequence[tuple[int, ProbeEntry]], names: Sequence[str]) -> list[Problem]:
    """A problem for each name in a probe entry's ``models`` that no model has."""
    problems = []
    for i, entry in entries:
        for k, name in enumerate(entry.models or []):
            if name not in names:
                problems.append(Problem(f"probes[{i}].models[{k}]", f"no model named {name!r}; "
                                                                   f"models: {', '.join(names) or 'none'}"))
    return problems


def assembled_plan(
    raw: Mapping[str, Any], registry: Any, *, source: str, base_dir: Path, given_models: Sequence[str] = (),
) -> Plan:
    """:func:`validate` after merging included probe sets and expanding ``${VARIABLES}``
    (:mod:`probescope.config_files`); problems of included entries name their file."""
    from dataclasses import replace

    from probescope.config_files import assemble

    assembled = assemble(raw, base_dir, read_toml)
    plan = validate(assembled.raw, registry, source=source, base_dir=base_dir, given_models=given_models)
    plan = replace(plan, origins=assembled.origins)
    return replace(plan, problems=assembled.problems + plan.located(plan.problems))


def output_problems(output_dir: Path, models: Sequence[str], figures: Sequence[tuple[str, Path]]) -> list[Problem]:
    """What would stop results from being written, found before any model loads: the
    output folder (or a folder above it) is a file or cannot be written to, a model's
    result folder is a file, a figure's path is a folder."""
    for folder in [output_dir, *output_dir.parents]:
        if folder.exists():
            if not folder.is_dir():
                what = "the output folder" if folder == output_dir else f"{str(folder)!r}, above the output folder,"
                return [Problem("output.dir", f"{what} is a file, not a folder: {str(folder)!r}; "
                                              "give a folder (it is created when missing)")]
            if not os.access(folder, os.W_OK | os.X_OK):
                return [Problem("output.dir", f"cannot write to {str(folder)!r}; give a folder you can write to")]
            break
    problems = []
    for name in models:
        if (output_dir / name).exists() and not (output_dir / name).is_dir():
            problems.append(Problem("output.dir", f"model {name!r} writes its datasets into "
                                                  f"{str(output_dir / name)!r}, which is a file; move it away"))
    for where, path in figures:
        if path.is_dir():
            problems.append(Problem(where, f"{str(path)!r} is a folder; give a figure file name"))
    return problems


def load_plan(
    config: str | Path | Mapping[str, Any], registry: Any, given_models: Sequence[str] = ()
) -> Plan:
    """Validate a config given as a TOML path or as a dict (paths relative to the cwd)."""
    if isinstance(config, Mapping):
        return assembled_plan(config, registry, source="<config dict>", base_dir=Path.cwd(),
                              given_models=given_models)
    path = Path(config)
    return assembled_plan(read_toml(path), registry, source=str(path),
                          base_dir=path.resolve().parent, given_models=given_models)
