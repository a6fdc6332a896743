"""Canonical sites and the adapter interface that maps them onto one model family.

A probe never names a module path: it asks for a :class:`SiteRef` such as
``resid(3)`` (the residual stream after block 3). The model's adapter turns that into a
:class:`Site`: which module to read, whether its input or output, how to pick the
hidden-state tensor out of what the module returns, and where the read falls in
execution order (nnsight requires reads in that order inside a trace).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from probescope.errors import SiteError, UnsupportedArchitectureError

EMBED = "embed"
RESID = "resid"


@dataclass(frozen=True, order=True)
class SiteRef:
    """A place in any supported model, by canonical name.

    ``kind`` is ``"embed"`` (the residual stream entering block 0: token embeddings plus
    whatever the family adds, such as positions or Gemma's sqrt(d) scale) or ``"resid"``
    (the residual stream leaving block ``layer``).
    """

    kind: str
    layer: int | None = None

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}[{self.layer}]"


def embed() -> SiteRef:
    """The residual stream before the first block."""
    return SiteRef(EMBED)


def resid(layer: int) -> SiteRef:
    """The residual stream after block ``layer`` (0-based, non-negative)."""
    return SiteRef(RESID, layer)


def first_tensor(value: Any) -> torch.Tensor:
    """The hidden states in a module's input or output.

    Blocks of some families and versions return ``(hidden_states, ...)`` tuples; others
    return the tensor itself.
    """
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


@dataclass(frozen=True)
class Site:
    """Where a :class:`SiteRef` lives in one model.

    :param module: dotted path of the module from the model's root (``transformer.h.3``).
    :param port: ``"input"`` or ``"output"`` of that module.
    :param order: sort key in execution order; reads are issued sorted by it.
    :param select: picks a ``(batch, token, width)`` tensor out of the raw value.
    """

    module: str
    port: str
    order: tuple[int, ...]
    select: Callable[[Any], torch.Tensor] = field(default=first_tensor, compare=False)


def get_submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The submodule at a dotted path, or None when there is none."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


class ArchitectureAdapter:
    """Maps one model family's modules to canonical sites.

    Subclasses set :attr:`name`, :attr:`model_types` (values of the transformers config's
    ``model_type`` they handle) and :attr:`block_paths` (where the list of blocks may sit,
    tried in order, so both ``*ForCausalLM`` and bare base models work).
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]] = ()
    block_paths: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def handles(self, config: Any) -> bool:
        """Whether this adapter is the one for a model with this transformers config."""
        return getattr(config, "model_type", None) in self.model_types

    def num_layers(self, config: Any) -> int:
        """Number of blocks, read from the config (before any weights load)."""
        n = getattr(config, "num_hidden_layers", None)
        if n is None:
            raise UnsupportedArchitectureError(
                f"adapter {self.name!r}: the model config has no num_hidden_layers"
            )
        return int(n)

    def max_positions(self, config: Any) -> int | None:
        """Longest input the model takes, or None when it has no fixed limit."""
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def blocks(self, model: torch.nn.Module) -> str:
        """Dotted path of the block list in this model instance."""
        for path in self.block_paths:
            module = get_submodule(model, path)
            if isinstance(module, torch.nn.ModuleList):
                return path
        raise UnsupportedArchitectureError(
            f"adapter {self.name!r} found no block list in {type(model).__name__}; "
            f"looked for {', '.join(self.block_paths)}"
        )

    def site_kinds(self) -> tuple[str, ...]:
        """Canonical site kinds this adapter can place."""
        return (EMBED, RESID)

    def site(self, ref: SiteRef, blocks: str) -> Site:
        """Place ``ref`` in a model whose blocks sit at ``blocks``."""
        if ref.kind == EMBED:
            # The input of block 0 is the residual stream after everything the family
            # does to embeddings (positions, scaling), which no single module outputs.
            return Site(f"{blocks}.0", "input", (-1, 0))
        if ref.kind == RESID and ref.layer is not None:
            return Site(f"{blocks}.{ref.layer}", "output", (ref.layer, 1_000))
        raise SiteError(
            f"architecture {self.name!r} has no site {ref}; it provides {', '.join(self.site_kinds())}"
        )


class BlockListAdapter(ArchitectureAdapter):
    """An adapter for a model no plugin supports, made from the block list path the user names.

    Only the residual stream (``embed`` and ``resid``) is available through it.
    """

    name = "generic"
    description = "any model, given the path of its block list; residual stream only"

    def __init__(self, block_path: str):
        self.block_paths = (block_path,)

    def handles(self, config: Any) -> bool:
        return True
