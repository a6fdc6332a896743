"""What a probe is: parameters, the sites it reads, and how it builds its dataset.

A probe does not run the model. It declares :class:`Read` s (a canonical site plus a
reduction); the runner performs every probe's reads inside one traced forward pass per
batch, applies each reduction there, and hands back only the reduced tensors. The probe
then builds an ``xarray.Dataset`` from them. A probe that needs only weights declares no
reads and reads the weights in :meth:`Probe.build`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Sequence

import torch
import xarray as xr

from probescope.architectures.base import SiteRef
from probescope.errors import Problem
from probescope.inputs import Batch, Prompt
from probescope.params import ConfigPath, Parameters  # noqa: F401  (Parameters is the schema's base)

if TYPE_CHECKING:
    from probescope.models import LoadedModel, ModelInfo


Reduction = Callable[[torch.Tensor, Batch], torch.Tensor]


@dataclass(frozen=True)
class Read:
    """One reduction of one site, computed inside the trace.

    :param key: the probe's own name for the result; results come back under it.
    :param site: the canonical site to read.
    :param reduce: called as ``reduce(hidden, batch)`` with ``hidden`` shaped as the
        site's constructor says (``(batch, token, width)`` for the residual stream and
        components, ``(batch, head, query, key)`` for ``attention``...); returns a (small) tensor. It runs inside the forward
        pass, so it must only compute: no I/O, and nothing kept beyond its return value.
    """

    key: str
    site: SiteRef
    reduce: Reduction


@dataclass
class ProbeRun:
    """Everything a probe gets back to build its dataset."""

    model: "LoadedModel"
    prompts: list[Prompt]
    batches: list[Batch]
    # key -> one tensor per batch, in batch order
    reductions: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class Probe:
    """Base class for probes. Register instances through ``register_probes``.

    Subclasses set :attr:`name`, :attr:`version`, :attr:`description`, :attr:`Parameters`
    and implement :meth:`build`; probes that read activations also implement
    :meth:`reads`.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    Parameters: ClassVar[type[Parameters]] = Parameters

    def check(self, params: Any, model: "ModelInfo") -> list[Problem]:
        """Problems with ``params`` for this particular model, found before weights load
        (a layer index out of range, say). Locations are relative to the probe's entry."""
        return []

    def reads(self, params: Any, model: "ModelInfo") -> list[Read]:
        """The reductions this probe needs from the forward pass (none by default)."""
        return []

    def needs_prompts(self, params: Any, model: "ModelInfo") -> bool:
        """Whether the run's prompts are needed, so that a config without ``[inputs]`` is
        an error before anything loads. By default: when the probe reads activations."""
        return bool(self.reads(params, model))

    def weights_only(self, params: Any, model: "ModelInfo") -> bool:
        """Whether :meth:`build` reads nothing but weights, through ``run.model.layout``.
        When every probe on a model says so, the model is not loaded: its layout streams
        tensors from the checkpoint's safetensors files one layer at a time, and
        ``run.model.model`` is unavailable. By default: the probe reads no activations and
        needs no prompts. Return False when :meth:`build` needs the model object itself."""
        return not self.reads(params, model) and not self.needs_prompts(params, model)

    def build(self, params: Any, run: ProbeRun) -> xr.Dataset:
        """The probe's result for one model. Provenance ``attrs`` are added by the runner."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# Helpers for probes whose ``layers`` parameter lists block indices.


def block_layers(layers: Optional[Sequence[int]], num_layers: int) -> list[int]:
    """Block indices (negative ones count from the end) as non-negative indices in
    ascending order; every block when ``layers`` is None."""
    if layers is None:
        return list(range(num_layers))
    return sorted({layer + num_layers if layer < 0 else layer for layer in layers})


def layer_problems(layers: Optional[Sequence[int]], num_layers: int, key: str = "layers") -> list[Problem]:
    """A problem for each block index out of range for a model with ``num_layers`` blocks."""
    n = num_layers
    return [Problem(f"{key}[{i}]", f"layer {layer} is out of range: the model has {n} layers, so give {-n}..{n - 1}")
            for i, layer in enumerate(layers or []) if not -n <= layer < n]
