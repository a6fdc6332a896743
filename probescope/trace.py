"""The single traced forward pass that serves every probe of one model.

The runner, not each probe, owns the trace. It places every requested site, groups reads
of the same module, orders them as the model executes (nnsight refuses reads out of
order), and applies each reduction inside the trace, so that only reductions leave it:
no activation is cached beyond the moment it is reduced. The pass stops right after the
last site anyone asked for, so layers after it and the unembedding never run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import nnsight
import torch

from probescope.architectures.base import Site
from probescope.inputs import Batch
from probescope.probe import Read


@dataclass
class Step:
    """Everything read from one module port: the value is fetched once, then every
    read of it is reduced in turn."""

    module: str
    port: str
    order: tuple[int, ...]
    reads: list[tuple[str, Site, Read]] = field(default_factory=list)  # (owner, site, read)


def plan_steps(reads: list[tuple[str, Read]], place: Callable[[Any], Site]) -> list[Step]:
    """Group reads by module port and sort them in execution order.

    :param reads: ``(owner, read)`` pairs; ``owner`` names the probe entry asking.
    :param place: maps a :class:`SiteRef` to the :class:`Site` in this model.
    """
    steps: dict[tuple[str, str], Step] = {}
    for owner, read in reads:
        site = place(read.site)
        step = steps.setdefault((site.module, site.port), Step(site.module, site.port, site.order))
        step.order = min(step.order, site.order)
        step.reads.append((owner, site, read))
    return sorted(steps.values(), key=lambda s: s.order)


def without(step: Step, owners: Any) -> Step:
    """``step`` minus the reads of ``owners`` (probes that already failed)."""
    return Step(step.module, step.port, step.order, [r for r in step.reads if r[0] not in owners])


def _apply(step: Step, value: Any, batch: Batch, sink: dict, failed: dict, totals: dict | None) -> None:
    """Reduce one module's value for every read of it; a read that raises marks its
    owner failed and the other owners go on. A read that accumulates is added to its
    running total in ``totals`` at once (:func:`fold`), so no result of it waits in
    ``sink`` while the rest of the pass allocates around it."""
    for owner, site, read in step.reads:
        if owner in failed:
            continue
        try:
            hidden = site.select(value)
            if hidden.dim() == 2:  # (tokens, width): OPT flattens tokens around its MLP
                hidden = hidden.reshape(*batch.input_ids.shape, -1)
            if site.finish is not None:
                hidden = site.finish(hidden, batch)
            result = read.reduce(hidden, batch)
            if read.accumulate and totals is not None:
                fold(totals.setdefault(owner, {}), read.key, result, read.last_dim_grows)
            else:
                sink[owner][read.key] = result
        except Exception as exc:
            failed[owner] = exc


def fold(totals: dict, key: Any, result: torch.Tensor, last_dim_grows: bool = False) -> None:
    """Add one batch's ``result`` to the running total of ``key``, in place; the first
    batch's result is copied (a reduction may return a view of the activation, which
    must not be kept alive).

    :param last_dim_grows: the last dimension may differ between batches
        (:attr:`probescope.Read.last_dim_grows`): the shorter of the total and ``result``
        counts as zero-padded at its end. A longer result replaces the total by a longer
        one (in the total's dtype); a shorter one is added to the total's first columns.
    :raises ValueError: the result's shape differs from the first batch's (with
        ``last_dim_grows``: in any but the last dimension).
    """
    total = totals.get(key)
    if total is None:
        totals[key] = result.detach().clone()
    elif total.shape == result.shape:
        total += result
    elif last_dim_grows and result.dim() == total.dim() >= 1 and result.shape[:-1] == total.shape[:-1]:
        have = total.shape[-1]
        if result.shape[-1] > have:
            grown = total.new_zeros(result.shape)
            grown[..., :have] = total
            grown += result
            totals[key] = grown
        else:
            total[..., : result.shape[-1]] += result
    elif last_dim_grows:
        raise ValueError(f"the reduction of {key!r} accumulates over batches with a last dimension that may "
                         f"grow, but returned shape {tuple(result.shape)} after {tuple(total.shape)}; every "
                         "dimension but the last must stay the same")
    else:
        raise ValueError(f"the reduction of {key!r} accumulates over batches, but returned shape "
                         f"{tuple(result.shape)} after {tuple(total.shape)}; an accumulating "
                         "reduction returns the same shape for every batch (a read whose last dimension "
                         "follows the batch says last_dim_grows=True)")


def _envoy_at(envoy: Any, path: str) -> Any:
    """The envoy at a dotted module path (``""``: the model itself)."""
    for part in filter(None, path.split(".")):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _port(module: Any, port: str) -> Any:
    """``module.input``, ``module.output``, or an operation inside its forward
    (``source.attention_interface_1.inputs``)."""
    for part in port.split("."):
        module = getattr(module, part)
    return module


def run_batch(envoy: Any, steps: list[Step], batch: Batch, backend: Any = None,
              totals: dict | None = None) -> tuple[dict, dict]:
    """One traced forward pass over ``batch``.

    :param backend: an nnsight backend that runs the pass elsewhere (NDIF, or its local
        simulation: :mod:`probescope.remote`); the block then travels as a request and
        only what it saves (the reductions and the failures) comes back.
    :param totals: ``totals[owner][key]``, the running total of each read that
        accumulates, updated in place inside the pass (made on the first batch). None
        (always for a remote pass, whose changes to outside objects do not come back):
        those reads' results come back in ``results`` like the others.
    :returns: ``(results, failures)``: ``results[owner][key]`` is each read's reduction
        (reads that accumulate are in ``totals`` instead, when given), ``failures[owner]``
        the exception that stopped an owner's reads.
    """
    owners = {owner for step in steps for owner, _, _ in step.reads}
    ports = [(_envoy_at(envoy, step.module), step.port) for step in steps]
    remote = backend is not None
    options = {"backend": backend} if remote else {}
    if not remote:
        _instrument(ports)
    # input_ids goes positionally: nnsight 0.5 finds no batch in keyword-only inputs.
    # The processor's other tensors (pixels, image grids, token types) go by keyword.
    kwargs = {"attention_mask": batch.attention_mask, "use_cache": False, **batch.extras}
    with torch.inference_mode():
        with envoy.trace(batch.input_ids, **kwargs, **options) as tracer:
            if remote:  # where the model runs: first thing in the block, before any module runs
                _instrument(ports)
            sink = nnsight.save({owner: {} for owner in owners})
            failed = nnsight.save({})
            for step, (module, port) in zip(steps, ports):
                _apply(step, _port(module, port), batch, sink, failed, totals)
            tracer.stop()
    return sink, failed


def _instrument(ports: list[tuple[Any, str]]) -> None:
    """Have nnsight instrument the forwards whose operations are read (``source.`` ports).

    nnsight does so when ``.source`` is first used; done at a module's own step, a module
    already running (its q_proj read) would miss it, so it is done before the pass.
    """
    for module, port in ports:
        if port.startswith("source."):
            module.source


@contextmanager
def wrapped(model: torch.nn.Module, wrap: Callable[[torch.nn.Module], Any] | None = None) -> Iterator[Any]:
    """The nnsight view of ``model`` for the duration of a block.

    nnsight installs a controller ``forward`` (and its state, under ``__nnsight...``
    keys) in each module's ``__dict__``, and leaves them there. On leaving the block
    those are removed and any ``forward`` it replaced is put back, so a model the user
    handed in comes back exactly as it was: a later bare forward pays nothing for having
    been probed. Attributes the model set on itself during the pass stay: transformers
    marks a module ``_output_capturing_hooks_installed`` when it registers hooks that
    stay registered, and deleting the mark would install them twice.

    :param wrap: builds the nnsight view (default ``nnsight.NNsight``); a remote run
        wraps the model so that its trace can travel (:func:`probescope.remote.wrapper`).
    """
    before = {module: dict(module.__dict__) for module in model.modules()}
    try:
        yield (wrap or nnsight.NNsight)(model)
    finally:
        for module, attrs in before.items():
            for key in [k for k in module.__dict__ if _added_by_nnsight(k) and k not in attrs]:
                del module.__dict__[key]
            if "forward" in attrs and module.__dict__.get("forward") is not attrs["forward"]:
                module.__dict__["forward"] = attrs["forward"]


def _added_by_nnsight(key: str) -> bool:
    """Whether a module ``__dict__`` key is one nnsight installs: its controller
    ``forward`` and its per-module state (``__nnsight__`` and kin)."""
    return key == "forward" or key.startswith("__nnsight")


@contextmanager
def attention_implementation(model: torch.nn.Module, implementation: str = "eager") -> Iterator[None]:
    """Run ``model`` with another attention implementation for the duration of a block,
    then put its previous one back (a model the user passed in comes back as it was).

    Only eager attention computes attention probabilities; SDPA and flash attention
    return None in their place.
    """
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if config is None or before is None or before == implementation:
        yield
        return
    _set_attention(model, implementation)
    try:
        yield
    finally:
        _set_attention(model, before)


def _set_attention(model: torch.nn.Module, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # recent transformers: every submodel too
        model.set_attn_implementation(implementation)
    else:  # earlier releases look the implementation up in the config at each forward
        model.config._attn_implementation = implementation


def gather(per_batch: list[dict[Any, torch.Tensor]], totals: dict[Any, torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    """One probe's reductions for :attr:`probescope.ProbeRun.reductions`: per-batch
    ``{key: tensor}`` dicts as ``{key: [tensor per batch]}``, and each accumulated total
    as ``{key: [total]}``."""
    out: dict[Any, list[torch.Tensor]] = {}
    for results in per_batch:
        for key, tensor in results.items():
            out.setdefault(key, []).append(tensor.detach())
    for key, total in totals.items():
        out[key] = [total.clone()]  # a plain tensor, no longer an inference-mode one
    return out


def on_cpu(reductions: dict[Any, Sequence[torch.Tensor]]) -> dict[Any, Sequence[torch.Tensor]]:
    """``{key: [tensor, ...]}`` with every tensor moved to the CPU. Parts that are not a
    list (:class:`probescope.spill.Spilled`: read from a file when indexed) already are."""
    return {key: [t.to("cpu") for t in parts] if isinstance(parts, list) else parts
            for key, parts in reductions.items()}


def release_freed_memory() -> None:
    """Hand memory freed since the last call back to the operating system (glibc's
    ``malloc_trim``; nothing elsewhere).

    glibc keeps freed blocks below its mmap threshold, and raises that threshold to the
    size of each large block freed, so after the first batch a pass's activations come
    from the heap and stay in the process once freed; with a few small allocations
    kept between them (results, Python objects), the heap cannot shrink and the resident
    set grows batch after batch above what is live. Called after each batch, it keeps
    the resident set near the live memory of one batch.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: list = []


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    if not _TRIM:
        import ctypes
        import ctypes.util

        try:
            _TRIM.append(getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim"))
        except (OSError, AttributeError):
            _TRIM.append(None)
    return _TRIM[0]
