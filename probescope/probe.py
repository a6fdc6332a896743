"""What a probe is: parameters, the sites it reads, and how it builds its dataset.

A probe does not run the model. It declares :class:`Read` s (a canonical site plus a
reduction); the runner performs every probe's reads inside one traced forward pass per
batch, applies each reduction there, and hands back only the reduced tensors. The probe
then builds an ``xarray.Dataset`` from them. A probe that needs only weights declares no
reads and reads the weights in :meth:`Probe.build`.

Which hook gets what, in the order the runner calls them:

===================  ============================================  ========================
hook                 gets                                          when
===================  ============================================  ========================
``check``            parameters, :class:`ModelInfo` (no weights)   validation, nothing loaded
``sites``            parameters, :class:`ModelInfo` (no weights)   validation, nothing loaded
``needs_prompts``    parameters, :class:`ModelInfo` (no weights)   validation, nothing loaded
``reads``            parameters, :class:`LoadedModel` (weights)    after loading, before the pass
reductions           ``(hidden, batch)`` inside the traced pass    once per batch
``build``            parameters, :class:`ProbeRun` (weights too)   after every batch
===================  ============================================  ========================

Validation stays weight-free: every mistake a user can make is reported before anything
loads, a site the family lacks included (``sites``). Planning may use weights: ``reads`` gets the loaded model, so a reduction can
close over them (a logit lens unembeds inside the pass and returns top-k ids, never
residual streams).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Hashable, Mapping, Optional, Sequence

from probescope.architectures.base import SiteRef
from probescope.errors import Problem
from probescope.inputs import Batch, Prompt
from probescope.params import Parameters
from probescope.lazy_imports import lazy_import

torch = lazy_import("torch")
xr = lazy_import("xarray")


if TYPE_CHECKING:
    from probescope.models import LoadedModel, ModelInfo
    from probescope.schema import DatasetSchema

Reduction = Callable[["torch.Tensor", Batch], Any]


@dataclass(frozen=True)
class Read:
    """One reduction of one site, computed inside the trace.

    :param key: the probe's own name for the result, any hashable value (``(layer,
        "attn.q")``, say); results come back under it in :attr:`ProbeRun.reductions`.
        Keys are the probe's own: two probes may use the same keys.
    :param site: the canonical site to read.
    :param reduce: called as ``reduce(hidden, batch)`` with ``hidden`` shaped as the
        site's constructor says (``(batch, token, width)`` for the residual stream and
        components, ``(batch, head, query, key)`` for ``attention``...); returns a
        (small) tensor. It runs inside the forward pass, so it must only compute: no
        I/O, and nothing kept beyond its return value.
    :param accumulate: add the reductions of all batches up as they come, in place, in
        the dtype and shape of the first batch's (every batch must return that shape):
        :attr:`ProbeRun.reductions` then holds one tensor under ``key``, the total, and
        memory does not grow with the number of prompts. For sums and counts that the
        probe turns into means in :meth:`Probe.build`.
    :param last_dim_grows: with ``accumulate``, the result's last dimension may differ
        from batch to batch (it follows the batch's longest prompt, say: a total per
        token position or token distance); every other dimension may not. The running
        total and each new result are zero-padded at the end of that dimension to the
        longer of the two before they are added, so the total ends as long as the
        longest result and index ``k`` means the same in every batch. Lay the result out
        so that this holds: index 0 first, growing upward, nothing centred (put negative
        offsets in a separate row, not before index 0), and zero meaning "nothing here".
    :param spill: write each batch's result to a temporary file as the batch finishes,
        instead of keeping it in memory: :attr:`ProbeRun.reductions` then holds under
        ``key`` a sequence of one tensor per batch, each read back from the file when
        indexed (memory-mapped: only what is touched is read). For results that are
        part of the dataset itself and grow with the prompt count; a :meth:`Probe.build`
        that also keeps its dataset small builds the large variable with
        :func:`probescope.lazy_variable` from them.
    """

    key: Hashable
    site: SiteRef
    reduce: Reduction
    accumulate: bool = False
    last_dim_grows: bool = False
    spill: bool = False

    def __post_init__(self) -> None:
        if self.last_dim_grows and not self.accumulate:
            raise ValueError(f"Read {self.key!r}: last_dim_grows=True pads a running total, so it needs "
                             "accumulate=True too")
        if self.accumulate and self.spill:
            raise ValueError(f"Read {self.key!r}: accumulate and spill exclude each other (a running "
                             "total is one tensor; spilling keeps one per batch)")


@dataclass
class ProbeRun:
    """Everything a probe gets back to build its dataset.

    ``prompts`` are in the user's order (``prompts[i].index == i``). ``batches`` are in
    the order they ran: when every probe on the model says :attr:`Probe.any_prompt_order`,
    the runner batches prompts longest first, so row ``r`` of batch ``b`` is prompt
    ``batches[b].prompts[r].index``, not the ``r``-th of the run.
    """

    model: "LoadedModel"
    prompts: list[Prompt]
    batches: list[Batch]
    # key -> one tensor per batch, in batch order; one tensor, the total, for a Read
    # that accumulates; a sequence read from disk per item for a Read that spills
    reductions: dict[Hashable, Sequence[torch.Tensor]] = field(default_factory=dict)


class Probe:
    """Base class for probes. Register instances through ``register_probes``.

    Subclasses set :attr:`name`, :attr:`version`, :attr:`description`, :attr:`Parameters`
    and :attr:`schema` (their dataset's :class:`~probescope.DatasetSchema`; with
    :attr:`forms` and :meth:`schema_for` when a parameter changes its shape) and implement
    :meth:`build`; probes that read activations also implement :meth:`reads`.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    Parameters: ClassVar[type[Parameters]] = Parameters
    schema: ClassVar[Optional["DatasetSchema"]] = None
    #: Whether :meth:`build` is right whatever order prompts run in: it only sums over
    #: prompts, or it places row ``r`` of batch ``b`` at prompt
    #: ``run.batches[b].prompts[r].index``. When every probe on a model says so, the
    #: runner batches prompts sorted by length (less padding, same results). Off by
    #: default, so a probe that takes batch rows to be prompts in order stays right.
    any_prompt_order: ClassVar[bool] = False
    #: Schemas of the other shapes a parameter can give the dataset, by form name
    #: (token_similarity's ``form = "by_distance"``); :meth:`schema_for` picks one.
    forms: ClassVar[Mapping[str, "DatasetSchema"]] = {}

    def schema_for(self, params: Any) -> Optional["DatasetSchema"]:
        """The schema of the dataset :meth:`build` makes with ``params``: :attr:`schema`,
        unless a parameter selects one of :attr:`forms`."""
        return self.schema

    def check(self, params: Any, model: "ModelInfo") -> list[Problem]:
        """Problems with ``params`` for this particular model, found before weights load
        (a layer index out of range, say). Locations are relative to the probe's entry."""
        return []

    def reads(self, params: Any, model: "LoadedModel") -> list[Read]:
        """The reductions this probe needs from the forward pass (none by default).

        Called once per model after its weights loaded, so reductions may use them
        (``model.layout.unembedding()``, say); ``model.num_layers``, ``model.config``
        and ``model.adapter`` are there as in :meth:`check`.
        """
        return []

    def sites(self, params: Any, model: "ModelInfo") -> list[SiteRef]:
        """The sites :meth:`reads` will read, known before weights load, so that a site
        the model's family lacks is a configuration error naming it.

        By default, the sites of :meth:`reads` called with the :class:`ModelInfo`, which
        works for every probe whose ``reads`` plans without weights. A probe whose
        ``reads`` uses weights overrides this (else a missing site fails the probe only
        when the model runs).
        """
        return [read.site for read in self.reads(params, model)]

    def needs_prompts(self, params: Any, model: "ModelInfo") -> bool:
        """Whether the run's prompts are needed, so that a config without ``[inputs]`` is
        an error before anything loads. By default: when the probe defines :meth:`reads`
        (override this when whether it reads depends on its parameters)."""
        return type(self).reads is not Probe.reads

    def weights_only(self, params: Any, model: "ModelInfo") -> bool:
        """Whether :meth:`build` reads nothing but weights, through ``run.model.layout``.
        When every probe on a model says so, the model is not loaded: its layout streams
        tensors from the checkpoint's safetensors files one layer at a time, and
        ``run.model.model`` is unavailable (and :meth:`reads`, if called, gets that
        streamed model). By default: the probe needs no prompts (it defines no
        :meth:`reads`, or says so in :meth:`needs_prompts`). Return False when
        :meth:`build` needs the model object itself."""
        return not self.needs_prompts(params, model)

    def build(self, params: Any, run: ProbeRun) -> xr.Dataset:
        """The probe's result for one model. Provenance ``attrs`` are added by the runner."""
        raise NotImplementedError
