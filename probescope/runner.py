"""Running a validated plan: models one at a time, one traced pass per batch shared by all
probes, then datasets written and figures drawn.

A probe that fails is recorded with its name and error; the other probes' datasets are
still written, and the run ends with :class:`RunFailed` so the command exits non-zero.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import xarray as xr

from probescope import inputs as inputs_mod
from probescope import models as models_mod
from probescope import results, spill, trace
from probescope.architectures.base import ATTENTION, get_submodule
from probescope.config import Plan, ProbeTask
from probescope.errors import (
    ConfigError,
    Failure,
    InputError,
    Interrupted,
    ModelLoadError,
    Problem,
    ProbescopeError,
    RunFailed,
    SiteError,
)
from probescope.architectures.streamed import StreamedModel
from probescope.probe import ProbeRun
from probescope.progress import progress


@dataclass
class Prepared:
    """One model checked against the plan, weights not loaded yet (or given in memory)."""

    info: models_mod.ModelInfo
    tokenizer: Any
    prompts: list[inputs_mod.Prompt]
    entry: Any = None  # ModelEntry, or None for a model given as an object
    loaded: models_mod.LoadedModel | None = None
    processor: Any = None  # a vision-language model's processor


@dataclass
class Outcome:
    """What a run produced: datasets by model and probe entry, files written, failures."""

    datasets: dict[str, dict[str, xr.Dataset]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    #: the exception behind each failure (None for a failure without one), in order
    errors: list[BaseException | None] = field(default_factory=list)

    def fail(self, model: str, step: str, name: str, error: BaseException | str) -> None:
        """Record a failed step; its exception and full traceback are kept (``--debug``
        prints them; :class:`RunFailed` takes the first as its ``__cause__``)."""
        self.failures.append(Failure.of(model, step, name, error))
        self.errors.append(None if isinstance(error, str) else error)


def prepare(plan: Plan, registry: Any, given: Mapping[str, models_mod.LoadedModel] = {}) -> list[Prepared]:
    """Stage two of validation: read every model's config and tokenizer (no weights),
    build its skeleton on the meta device to find its blocks, then check devices, probes
    and prompts against it. Raises one :class:`ConfigError` with the problems of both
    stages, or returns the models ready to load."""
    problems: list[Problem] = list(plan.problems)
    prepared: list[Prepared] = []
    probe_params = {task.name: task.params for task in plan.probes}
    candidates: list[tuple[str, Any, Any]] = []  # (location, entry, loaded)
    asked_for_prompts = False
    for i, entry in plan.models:
        candidates.append((f"models[{i}]", entry, None))
    for name, loaded in given.items():
        candidates.append((f"models.{name}", None, loaded))

    for where, entry, loaded in candidates:
        try:
            if loaded is not None:
                info, tokenizer, processor = loaded.info, loaded.tokenizer, loaded.processor
            else:
                info = models_mod.inspect(entry, registry)
                models_mod.check_layout(entry, info, registry)
                processor = models_mod.load_processor(entry) if info.vision else None
                tokenizer = processor.tokenizer if processor is not None else models_mod.load_tokenizer(entry)
        except ProbescopeError as exc:
            key = getattr(exc, "key", None)
            problems.append(Problem(f"{where}.{key}" if key else where, str(exc)))
            continue
        if entry is not None:
            from probescope.offload import devices_named

            for key, device in devices_named(entry):
                unavailable = models_mod.unavailable_device(device)
                if unavailable:
                    problems.append(Problem(f"{where}.{key}", unavailable))
        try:
            prompts, found = _prompts(plan, info, tokenizer, processor)
        except InputError as exc:
            problems.append(Problem("inputs.prompts", str(exc)))
            continue
        problems += found
        for prompt in prompts:
            if info.max_positions is not None and len(prompt) > info.max_positions:
                images = f" ({prompt.n_image_tokens} of them for its image)" if prompt.n_image_tokens else ""
                problems.append(Problem(
                    plan.prompt_location(prompt.index),
                    f"model {info.name!r}: the prompt is {len(prompt)} tokens long{images}, but the model "
                    f"takes at most {info.max_positions}; shorten it",
                ))
        if entry is not None and entry.remote:
            from probescope.remote import unservable

            for task in plan.probes_for(info.name):
                problems += _scoped(f"probes[{task.index}]", info.name,
                                    [Problem("", m) for m in unservable(task, info, entry.remote)])
        for task in plan.probes_for(info.name):
            own = task.probe.check(task.params, info)
            # Sites are checked once the probe's parameters are (a layer out of range is said once).
            found = own or _site_problems(task, info)
            problems += _scoped(f"probes[{task.index}]", info.name, found)
        if not plan.inputs_given and not asked_for_prompts:  # once, not once per model
            problems += _needs_prompts(plan, info)
            asked_for_prompts = True
        runs_here = {task.name for task in plan.probes_for(info.name)}
        for task in plan.renderers:
            if task.probe in probe_params and task.probe in runs_here and plan.prompts_as_written is not None:
                found = task.renderer.check(task.params, prompts=plan.prompts_as_written,
                                            probe_params=probe_params[task.probe], model=info)
                problems += _scoped(f"renderers[{task.index}]", info.name, found)
        prepared.append(Prepared(info, tokenizer, prompts, entry, loaded, processor))
    if problems:
        raise ConfigError(plan.source, plan.located(problems))
    return prepared


def _prompts(plan: Plan, info: models_mod.ModelInfo, tokenizer: Any, processor: Any) -> tuple[list, list[Problem]]:
    """One model's prompts as tokens: through the processor (images and chat template
    included) for a vision-language model, through the tokenizer otherwise."""
    if info.vision is None:
        found = []
        if any(image is not None for image in plan.images):
            found.append(Problem("inputs.images", f"model {info.name!r} is a text-only model and takes no "
                                                  "images; probe it in a run without images"))
        if plan.chat_template:
            found.append(Problem("inputs.chat_template", f"model {info.name!r}: chat templates apply to "
                                                         "vision-language models only"))
        return inputs_mod.tokenize(tokenizer, plan.prompts, model_name=info.name), found
    prompts, found = inputs_mod.process(
        processor, plan.prompts, plan.images, chat_template=plan.chat_template,
        model_type=info.vision.model_type, image_token_id=info.vision.image_token_id,
        bidirectional_prefix=info.vision.bidirectional_prefix,
    )
    return prompts, [Problem(plan.prompt_location(i), f"model {info.name!r}: {message}") for i, message in found]


def _needs_prompts(plan: Plan, info: models_mod.ModelInfo) -> list[Problem]:
    """A problem when some probe needs prompts but the config gives none."""
    readers = []
    for task in plan.probes:
        try:
            if task.probe.needs_prompts(task.params, info):
                readers.append(task.name)
        except Exception:  # the probe's own failure is reported when it runs
            continue
    if not readers:
        return []
    return [Problem("inputs", f"required section is missing; it holds prompts = [...] or prompts_file, which "
                              f"{', '.join(map(repr, readers))} need{'s' if len(readers) == 1 else ''}")]


def _site_problems(task: ProbeTask, info: models_mod.ModelInfo) -> list[Problem]:
    """A problem for each site the probe reads that the model's architecture lacks (an
    ``attention`` read of a family without it, ``resid_mid`` of a parallel family),
    found from the config alone, before weights load."""
    try:
        sites = task.probe.sites(task.params, info)
    except Exception:  # the probe's own failure is reported when it runs
        return []
    adapter = info.adapter
    blocks = adapter.block_paths[0] if adapter.block_paths else ""
    found: dict[str, None] = {}
    for site in sites:
        try:
            adapter.site(site, blocks, info.config)
        except ProbescopeError as exc:
            found[str(exc)] = None
    return [Problem("", message) for message in found]


def _scoped(entry: str, model: str, problems: Sequence[Problem]) -> list[Problem]:
    """A plugin's problems (located within its entry) as problems of the whole file."""
    return [Problem(entry + (f".{p.location}" if p.location else ""), f"model {model!r}: {p.message}")
            for p in problems]


def _probe_reads(tasks: Sequence[ProbeTask], loaded: models_mod.LoadedModel, outcome: Outcome) -> list:
    """Every probe's reads as ``(probe entry name, read)``, planned with the loaded model
    (weights included); a probe whose ``reads`` raises, or repeats a key, fails alone."""
    reads = []
    for task in tasks:
        try:
            planned = list(task.probe.reads(task.params, loaded))
            keys = [read.key for read in planned]
            repeated = [key for i, key in enumerate(keys) if key in keys[:i]]
            if repeated:
                raise ValueError(f"reads() gave the key {repeated[0]!r} to more than one read; "
                                 "each read's results come back under its own key")
        except Exception as exc:
            outcome.fail(loaded.name, "probe", task.name, exc)
            continue
        reads += [(task.name, read) for read in planned]
    return reads


def _trace_all(loaded: models_mod.LoadedModel, reads: list, batches: list,
               outcome: Outcome, store: spill.SpillStore | None = None) -> dict[str, dict[Any, Sequence]]:
    """Run every batch through one trace shared by all reads; per owner, its reductions
    by key (:func:`probescope.trace.gather`): one tensor per batch, or one running total
    for a read that accumulates (added to in place inside the pass, so nothing per batch
    is kept), or, for a read that spills, the batches written to ``store`` as each
    finished (:class:`probescope.spill.Spilled`). Owners whose reductions raise are
    recorded as failed."""
    name = loaded.name
    owners = list(dict.fromkeys(owner for owner, _ in reads))
    per_owner: dict[str, list[dict]] = {owner: [] for owner in owners}  # per batch: {key: tensor}
    totals: dict[str, dict] = {}  # owner -> key -> running total of a read that accumulates
    # owner -> key -> its read, for the reads that accumulate
    accumulating = {owner: {read.key: read for o, read in reads if o == owner and read.accumulate} for owner in owners}
    spilling = {owner: {read.key for o, read in reads if o == owner and read.spill} for owner in owners}
    if store is None and any(spilling.values()):
        raise ValueError("reads that spill need a SpillStore")

    def forget(owner: str) -> None:
        per_owner.pop(owner, None)
        totals.pop(owner, None)
        if store is not None:
            store.drop(owner)
    adapter = loaded.info.adapter

    sites: dict = {}  # SiteRef -> Site: each site is placed once, however many probes read it

    def place(ref):
        if ref not in sites:
            site = adapter.site(ref, loaded.blocks, loaded.info.config)
            if get_submodule(loaded.model, site.module) is None:  # a base model has no output layer
                raise SiteError(f"{type(loaded.model).__name__} has no module {site.module!r} for site {ref}")
            sites[ref] = site
        return sites[ref]

    # A probe asking for a site this family lacks (GPT-2 has no mlp.gate) fails alone.
    unplaceable: dict[str, Exception] = {}
    for owner, read in reads:
        if owner not in unplaceable:
            try:
                place(read.site)
            except Exception as exc:
                unplaceable[owner] = exc
    for owner, exc in unplaceable.items():
        outcome.fail(name, "probe", owner, exc)
        per_owner.pop(owner)
    reads = [(owner, read) for owner, read in reads if owner not in unplaceable]
    if not reads:
        return {owner: {} for owner in per_owner}
    # Only eager attention computes probabilities: switched on for this model's pass, then back.
    reads_attention = any(read.site.kind == ATTENTION for _, read in reads)
    remote = getattr(loaded, "remote", False)  # the plan runs on NDIF, or its local simulation
    try:
        steps = trace.plan_steps(reads, place)
        eager = trace.attention_implementation(loaded.model, "eager") if reads_attention else nullcontext()
        wrap = backend = None
        if remote:
            from probescope import remote as remote_mod

            shipped = remote_mod.register(steps)  # probescope's and the plugins' reduction code
            wrap = remote_mod.wrapper(loaded)
        with eager, trace.wrapped(loaded.model, wrap) as envoy:
            for batch in progress(batches, desc=f"{name}: batches"):
                if remote:
                    backend = remote_mod.backend(envoy, remote, shipped)
                # a remote pass cannot add to totals here: its results are folded in below
                sink, failed = trace.run_batch(envoy, steps, batch, backend, None if remote else totals)
                for owner, exc in failed.items():
                    outcome.fail(name, "probe", owner, exc)
                    forget(owner)
                for owner in per_owner:
                    try:
                        kept = {key: value for key, value in sink[owner].items() if key not in accumulating[owner]}
                        for key in set(sink[owner]) - set(kept):
                            trace.fold(totals.setdefault(owner, {}), key, sink[owner][key],
                                       accumulating[owner][key].last_dim_grows)
                        for key in spilling[owner] & set(kept):  # to disk now: nothing of it stays
                            store.append(owner, key, kept.pop(key))
                    except Exception as exc:
                        failed[owner] = exc
                        continue
                    if kept:
                        per_owner[owner].append(kept)
                for owner, exc in failed.items():
                    if owner in per_owner:
                        outcome.fail(name, "probe", owner, exc)
                        forget(owner)
                del sink
                trace.release_freed_memory()  # what this batch freed goes back to the system
                steps = [s for s in (trace.without(step, failed) for step in steps) if s.reads]
    except Exception as exc:  # the pass itself broke: every probe still reading fails
        for owner in per_owner:
            outcome.fail(name, "probe", owner, exc)
        return {}
    return {owner: {**trace.gather(parts, totals.get(owner, {})), **(store.reductions(owner) if store else {})}
            for owner, parts in per_owner.items()}


def _weights_only(tasks: Sequence[ProbeTask], info: models_mod.ModelInfo) -> bool:
    """Whether every probe on this model reads only weights (a probe that cannot say
    counts as reading more: it fails later, on a loaded model, with its own error)."""
    try:
        return all(task.probe.weights_only(task.params, info) for task in tasks)
    except Exception:
        return False


def open_model(plan: Plan, prepared: Prepared,
               tasks: Sequence[ProbeTask] | None = None) -> models_mod.LoadedModel | StreamedModel:
    """The model for a run: given in memory; streamed from its safetensors files when every
    probe (of ``tasks``, default all) reads only weights (the model is never built); else
    loaded whole (a vision-language model streams its text decoder's weights too)."""
    if prepared.loaded is not None:
        return prepared.loaded
    entry = prepared.entry
    tasks = plan.probes_for(prepared.info.name) if tasks is None else tasks
    if tasks and _weights_only(tasks, prepared.info):
        try:
            return StreamedModel.of(entry, prepared.info, prepared.tokenizer)
        except ModelLoadError:
            if entry.use_safetensors:
                raise
            # pickled weights the user allowed: no safetensors to stream, load them whole
    loaded = models_mod.load(entry, prepared.info, prepared.tokenizer, prepared.processor)
    if loaded.remote is True:  # weights stay on NDIF: a probe reading them gets them streamed
        from probescope.architectures.streamed import streamed_layout

        loaded.streamed = lambda: streamed_layout(entry, prepared.info.config, prepared.info.adapter)
    return loaded


def run_model(plan: Plan, prepared: Prepared, registry: Any, outcome: Outcome, write: bool,
              tasks: Sequence[ProbeTask] | None = None, record: Any = None) -> None:
    """Every probe (of ``tasks``, default all) on one model: one trace per batch, then
    each probe's dataset. ``record(path, task)`` is called for each dataset saved."""
    name = prepared.info.name
    tasks = list(plan.probes_for(name) if tasks is None else tasks)
    loaded = open_model(plan, prepared, tasks)
    sort = _any_prompt_order(tasks, prepared.info)
    if getattr(loaded, "processor", None) is not None:
        batches = inputs_mod.processed_batches(loaded.processor, prepared.prompts, plan.batch_size,
                                               device=loaded.device, dtype=next(loaded.model.parameters()).dtype,
                                               sort=sort)
    else:
        batches = inputs_mod.batches(prepared.prompts, plan.batch_size, sort=sort,
                                     pad_id=inputs_mod.pad_id_of(prepared.tokenizer), device=loaded.device)
    reads = _probe_reads(tasks, loaded, outcome)
    # Reads that spill go to files beside the results (or in the system's temporary
    # folder when nothing is written), removed once every dataset is written or loaded.
    with _spill_store(reads, plan.output_dir if write else None) as store:
        reduced = _trace_all(loaded, reads, batches, outcome, store)
        failed = {f.name for f in outcome.failures if f.model == name}

        for task in progress(tasks, desc=f"{name}: probes"):
            if task.name in failed:
                continue
            run = ProbeRun(loaded, prepared.prompts, batches, trace.on_cpu(reduced.pop(task.name, {})))
            try:
                dataset = task.probe.build(task.params, run)
                dataset.attrs.update(results.provenance(
                    probe=task.probe, params=task.params, model_info=prepared.info, entry_name=task.name,
                    prompts=plan.prompts if _needs(task, prepared.info) else None))
                if not write:  # the spilled files go: what the Python API returns is in memory
                    dataset = results.loaded(dataset)
            except Exception as exc:
                outcome.fail(name, "probe", task.name, exc)
                continue
            del run
            registry.hook.dataset_produced(dataset=dataset, model=name, probe=task.name)
            outcome.datasets.setdefault(name, {})[task.name] = dataset
            if write:
                try:
                    path = results.save(dataset, results.result_path(plan.output_dir, name, task.name))
                except Exception as exc:  # this probe's failure alone; the others are still written
                    # (a lazily computed variable runs the probe's own code while it is written)
                    outcome.fail(name, "probe", task.name, exc)
                    if results.is_lazy(dataset):  # its spilled files go with the store
                        outcome.datasets[name].pop(task.name)
                    continue
                if results.is_lazy(dataset):  # computed from the spilled files: read back from the file
                    outcome.datasets[name][task.name] = results.open_saved(path)
                outcome.files.append(path)
                if record is not None:
                    record(path, task)


@contextmanager
def _spill_store(reads: list, where: Path | None):
    """A :class:`~probescope.spill.SpillStore` in ``where`` (made if missing, removed
    again if left empty) when some read spills, else None; removed on leaving."""
    if not any(read.spill for _, read in reads):
        yield None
        return
    created = results.make_folders(where) if where is not None else []
    store = spill.SpillStore(where)
    try:
        yield store
    finally:
        store.close()
        results.remove_empty(created)


def _any_prompt_order(tasks: Sequence[ProbeTask], info: models_mod.ModelInfo) -> bool:
    """Whether prompts may run sorted by length: every probe that reads them builds its
    dataset right whatever order they run in (:attr:`probescope.Probe.any_prompt_order`)."""
    return all(getattr(task.probe, "any_prompt_order", False) for task in tasks if _needs(task, info))


def _needs(task: ProbeTask, info: models_mod.ModelInfo) -> bool:
    """Whether a probe's dataset depends on the prompts (it reads activations)."""
    try:
        return bool(task.probe.needs_prompts(task.params, info))
    except Exception:  # its own failure is reported when it runs
        return True


def draw(plan: Plan, outcome: Outcome, model_order: Sequence[str], record: Any = None) -> None:
    """Every renderer of the plan, from the datasets the run produced."""
    for task in plan.renderers:
        datasets = [outcome.datasets[m][task.probe] for m in model_order
                    if task.probe in outcome.datasets.get(m, {})]
        if not datasets:
            outcome.fail("", "renderer", task.renderer.name, f"no {task.probe!r} dataset to draw")
            continue
        try:
            figure = task.renderer.render(datasets, task.params)
            outcome.files.append(save_figure(figure, task.output))
            if record is not None:
                record(task.output)
        except Exception as exc:
            outcome.fail("", "renderer", task.renderer.name, exc)


#: How figures are written for papers: PDF (and PostScript) embed TrueType (Type 42)
#: fonts, which journals accept and editors can change, instead of Type 3; SVG keeps text
#: as text elements instead of paths.
FIGURE_RC = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none"}


def save_figure(figure: Any, path: Path) -> Path:
    """Write a matplotlib figure atomically, in the format its extension names."""
    import matplotlib

    fmt = path.suffix.lower().lstrip(".")
    with results.atomic_path(path) as tmp, matplotlib.rc_context(FIGURE_RC):
        figure.savefig(tmp, format=fmt, bbox_inches="tight", dpi=200)
    return path


def execute(
    plan: Plan, registry: Any, given: Mapping[str, models_mod.LoadedModel] = {}, *, write: bool = True,
    raise_on_failure: bool = True, resume: bool = False,
) -> Outcome:
    """Validate against the models, run every probe on every model, draw every figure.

    With ``write``, a manifest is kept beside the datasets (:mod:`probescope.manifest`);
    with ``resume`` too, datasets an earlier run left on disk for an unchanged
    configuration are read back instead of computed again.

    :raises ConfigError: stage-two validation failed (nothing was written).
    :raises RunFailed: some probes or renderers failed; the rest was written.
    """
    prepared = prepare(plan, registry, given)
    outcome = Outcome()
    book = _Bookkeeping(plan, resume) if write else None
    try:
        for item in progress(prepared, desc="models"):
            try:
                tasks = book.start_model(item, outcome) if book else plan.probes_for(item.info.name)
                if tasks:
                    run_model(plan, item, registry, outcome, write, tasks, book.dataset_saved if book else None)
            except ModelLoadError as exc:
                outcome.fail(item.info.name, "model", item.info.name, exc)
        if write:
            draw(plan, outcome, [p.info.name for p in prepared], book.figure_saved)
            book.finish(outcome)
    except KeyboardInterrupt:
        raise Interrupted(outcome.files, _unfinished(plan, outcome, prepared, write)) from None
    registry.hook.run_finished(results=outcome.datasets, failures=list(outcome.failures))
    if outcome.failures and raise_on_failure:
        first = next((e for e in outcome.errors if e is not None), None)
        raise RunFailed(outcome.failures, outcome.datasets, outcome.errors) from first
    return outcome


class _Bookkeeping:
    """The manifest of a run that writes, and what ``resume`` may skip."""

    def __init__(self, plan: Plan, resume: bool):
        from probescope import manifest

        self.plan = plan
        self.done = manifest.finished(manifest.read(plan.output_dir), plan.output_dir) if resume else {}
        self.manifest = manifest.Manifest(plan.output_dir, manifest.resolved_config(plan), list(plan.prompts))
        self.keys: dict[tuple[str, str], str] = {}

    def start_model(self, item: Prepared, outcome: Outcome) -> list[ProbeTask]:
        """Record the model; read back the datasets ``resume`` can skip; return the rest."""
        from probescope import manifest

        info = item.info
        identity = manifest.model_identity(item.entry, info, item.loaded.model if item.loaded else None)
        entry = item.entry.model_dump(mode="json") if item.entry is not None else {"name": info.name, "given": True}
        self.manifest.models[info.name] = {**identity, "entry": entry}
        todo = []
        for task in self.plan.probes_for(info.name):
            key = manifest.dataset_fingerprint(model_entry=entry, identity=identity,
                                               prompts=self.plan.prompts if _needs(task, info) else None,
                                               probe=task.probe, params=task.params)
            self.keys[(info.name, task.name)] = key
            path = results.result_path(self.plan.output_dir, info.name, task.name)
            relative = self.manifest.relative(path)
            if self.done.get(relative) == key:
                try:
                    outcome.datasets.setdefault(info.name, {})[task.name] = results.load(path)
                except Exception:  # unreadable: compute it again
                    todo.append(task)
                    continue
                self.manifest.resumed.append(relative)
                self.manifest.record_dataset(path, info.name, task.name, key)
            else:
                todo.append(task)
        return todo

    def dataset_saved(self, path: Path, task: ProbeTask) -> None:
        model = path.parent.name
        self.manifest.record_dataset(path, model, task.name, self.keys[(model, task.name)])

    def figure_saved(self, path: Path) -> None:
        self.manifest.record_figure(path)

    def finish(self, outcome: Outcome) -> None:
        self.manifest.failures = [dataclasses.asdict(f) for f in outcome.failures]
        if self.manifest.datasets or self.manifest.figures:  # never a manifest of nothing
            outcome.files.append(self.manifest.write())


def _unfinished(plan: Plan, outcome: Outcome, prepared: Sequence[Prepared], write: bool) -> list[str]:
    """What an interrupted run had not finished: datasets not produced, figures not drawn."""
    failed = {(f.model, f.name) for f in outcome.failures}
    written = set(outcome.files)

    def finished(model: str, probe: str) -> bool:
        if write:
            return results.result_path(plan.output_dir, model, probe) in written
        return probe in outcome.datasets.get(model, {})

    missing = []
    for item in prepared:
        name = item.info.name
        probes = [t.name for t in plan.probes_for(name) if not finished(name, t.name) and (name, t.name) not in failed]
        if probes:
            missing.append(f"model {name!r} ({', '.join(probes)})")
    if write:
        done = set(outcome.files)
        missing += [task.output.name for task in plan.renderers if task.output not in done]
    return missing
