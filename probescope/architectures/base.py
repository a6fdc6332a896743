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
COMPONENT = "component"

#: The canonical components of a block, in the order figures and datasets list them.
#: Each names the output of one linear map: the attention's query, key, value and
#: output projections, and the MLP's up, down and gate projections.
COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "mlp.gate")


@dataclass(frozen=True, order=True)
class SiteRef:
    """A place in any supported model, by canonical name.

    ``kind`` is ``"embed"`` (the residual stream entering block 0: token embeddings plus
    whatever the family adds, such as positions or Gemma's sqrt(d) scale), ``"resid"``
    (the residual stream leaving block ``layer``) or ``"component"`` (the output of
    canonical component ``component`` of block ``layer``). Build them with
    :func:`embed`, :func:`resid` and :func:`component`.
    """

    kind: str
    layer: int | None = None
    component: str | None = None

    def __str__(self) -> str:
        if self.layer is None:
            return self.kind
        if self.component is not None:
            return f"{self.component}[{self.layer}]"
        return f"{self.kind}[{self.layer}]"


def embed() -> SiteRef:
    """The residual stream before the first block."""
    return SiteRef(EMBED)


def resid(layer: int) -> SiteRef:
    """The residual stream after block ``layer`` (0-based, non-negative)."""
    return SiteRef(RESID, layer)


def component(name: str, layer: int) -> SiteRef:
    """The output of canonical component ``name`` (one of :data:`COMPONENTS`) in block ``layer``."""
    if name not in COMPONENTS:
        raise SiteError(f"unknown component {name!r}; the components are {', '.join(COMPONENTS)}")
    return SiteRef(COMPONENT, layer, name)


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


@dataclass(frozen=True)
class Features:
    """Which output features of a fused module belong to one component.

    The module's output features are ``groups`` consecutive groups of ``stride``
    features; the component owns ``size`` features starting at ``offset`` in each group.
    A plain slice is one group (GPT-2 ``c_attn``: q is features ``[0, d)`` of ``3d``);
    GPT-NeoX's ``query_key_value`` interleaves per head, so q is ``heads`` groups of
    ``3 * head_dim`` with ``size = head_dim`` at offset 0.
    """

    groups: int
    stride: int
    offset: int
    size: int

    @classmethod
    def span(cls, start: int, stop: int, total: int) -> "Features":
        """Features ``[start, stop)`` of ``total``."""
        return cls(1, total, start, stop - start)

    @property
    def total(self) -> int:
        return self.groups * self.stride

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This component's part of ``tensor`` along ``dim`` (a view when one group)."""
        dim = dim % tensor.dim()
        if tensor.shape[dim] != self.total:
            raise SiteError(
                f"expected {self.total} features along dimension {dim}, found {tensor.shape[dim]}"
            )
        if self.groups == 1:
            return tensor.narrow(dim, self.offset, self.size)
        grouped = tensor.unflatten(dim, (self.groups, self.stride))
        return grouped.narrow(dim + 1, self.offset, self.size).flatten(dim, dim + 1)


@dataclass(frozen=True)
class Component:
    """Where one canonical component lives in a block of one model.

    :param module: path of the linear module relative to the block (``attn.c_attn``).
    :param features: for a fused module, which of its output features are this
        component's; None when the module is the component alone.
    """

    module: str
    features: Features | None = None

    def take(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return tensor if self.features is None else self.features.take(tensor, dim)


@dataclass(frozen=True)
class AttentionShape:
    """Heads of one attention layer: query heads, key/value heads, width of a head."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self) -> torch.Tensor:
        """For each query head, the key/value head it reads (``h // group_size``, as
        transformers' ``repeat_kv`` arranges them)."""
        return torch.arange(self.n_heads) // self.group_size


def config_value(config: Any, *keys: str) -> Any:
    """The first of ``keys`` the config sets to a value other than None."""
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return None


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
    #: Canonical component -> linear module relative to a block, in execution order
    #: (reads are issued in this order inside a trace). Fused modules appear once per
    #: component they hold; :meth:`components` says which features each one owns.
    #: Components the family lacks are left out, never faked.
    component_modules: ClassVar[dict[str, str]] = {}
    #: Human description of how fused modules are split, by component, for the docs.
    fused: ClassVar[dict[str, str]] = {}
    #: Final norm, relative to the module that holds the block list (None: none).
    final_norm_path: ClassVar[str | None] = None
    #: Projections between a narrower embedding and the residual stream (OPT-350m),
    #: relative to the module that holds the block list; absent modules are skipped.
    project_in_path: ClassVar[str | None] = None
    project_out_path: ClassVar[str | None] = None
    #: A block's MLP and the norm in front of it, relative to the block (None: the
    #: family does not name them, and :meth:`mlp_output` is unavailable unless overridden).
    mlp_path: ClassVar[str | None] = None
    mlp_norm_path: ClassVar[str | None] = None

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

    def hidden_size(self, config: Any) -> int:
        """Width of the residual stream."""
        return int(config_value(config, "hidden_size", "n_embd", "d_model"))

    def attention_shape(self, config: Any) -> AttentionShape:
        """Query heads, key/value heads and head width, read from the config."""
        n_heads = int(config_value(config, "num_attention_heads", "n_head"))
        n_kv = int(config_value(config, "num_key_value_heads") or n_heads)
        head_dim = config_value(config, "head_dim")
        head_dim = int(head_dim) if isinstance(head_dim, int) else self.hidden_size(config) // n_heads
        return AttentionShape(n_heads, n_kv, head_dim)

    def components(self, config: Any) -> dict[str, Component]:
        """The components this model has, in execution order. Fused adapters override
        this to give each part of a fused module its :class:`Features`."""
        return {name: Component(module) for name, module in self.component_modules.items()}

    def parallel(self, config: Any) -> bool:
        """Whether attention and MLP read the same input and add to the residual stream
        together (GPT-J, GPT-NeoX by default, Phi) rather than one after the other."""
        return False

    def embedding_scale(self, config: Any) -> float:
        """Factor the family multiplies token embeddings by (Gemma: sqrt(d))."""
        return 1.0

    def names_mlp(self) -> bool:
        """Whether :meth:`mlp_output` works for this family (it names the MLP, or overrides
        :meth:`mlp_output` for a family without an MLP module)."""
        return self.mlp_path is not None or type(self).mlp_output is not ArchitectureAdapter.mlp_output

    def mlp_output(self, block: torch.nn.Module, x: torch.Tensor, config: Any) -> torch.Tensor:
        """What ``block``'s MLP writes into a residual stream holding ``x`` ``(..., d)``,
        the block's attention left out: ``mlp(norm(x))`` with the norm the family puts
        in front of the MLP (shared with attention in parallel blocks).

        MAPS (Elhelo & Geva 2025) passes token embeddings through block 0's MLP this way
        before projecting them through the value-output circuits of later heads.
        """
        if self.mlp_path is None:
            raise SiteError(f"architecture {self.name!r} does not name its blocks' MLP")
        mlp = block.get_submodule(self.mlp_path)
        norm = block.get_submodule(self.mlp_norm_path) if self.mlp_norm_path else None
        return mlp(norm(x) if norm is not None else x)

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
        return (EMBED, RESID, COMPONENT) if self.component_modules else (EMBED, RESID)

    def site(self, ref: SiteRef, blocks: str, config: Any = None) -> Site:
        """Place ``ref`` in a model whose blocks sit at ``blocks``.

        Component sites need the model's ``config`` (fused modules are split by head
        count and width).
        """
        if ref.kind == EMBED:
            # The input of block 0 is the residual stream after everything the family
            # does to embeddings (positions, scaling), which no single module outputs.
            return Site(f"{blocks}.0", "input", (-1, 0))
        if ref.kind == RESID and ref.layer is not None:
            return Site(f"{blocks}.{ref.layer}", "output", (ref.layer, 1_000))
        if ref.kind == COMPONENT and ref.layer is not None and config is not None:
            components = self.components(config)
            if ref.component in components:
                part = components[ref.component]
                rank = list(components).index(ref.component) + 1  # execution order in the block

                def select(value: Any, part: Component = part) -> torch.Tensor:
                    return part.take(first_tensor(value))

                return Site(f"{blocks}.{ref.layer}.{part.module}", "output", (ref.layer, rank), select)
            raise SiteError(
                f"architecture {self.name!r} has no component {ref.component!r}; it has "
                f"{', '.join(components) or 'none'}"
            )
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
