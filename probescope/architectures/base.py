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

from probescope.errors import SiteError, UnsupportedArchitectureError
from probescope.lazy_imports import lazy_import

torch = lazy_import("torch")


EMBED = "embed"
RESID = "resid"
COMPONENT = "component"
ATTENTION = "attention"
HEAD_OUTPUT = "head_output"
MLP_HIDDEN = "mlp_hidden"
RESID_MID = "resid_mid"
ROTARY_Q = "rotary_q"
ROTARY_K = "rotary_k"
RESID_FINAL = "resid_final"
LOGITS = "logits"

#: Site kinds inside one block (they take a layer), in the order the docs list them.
BLOCK_SITES = (RESID, COMPONENT, RESID_MID, ATTENTION, HEAD_OUTPUT, MLP_HIDDEN, ROTARY_Q, ROTARY_K)
#: Site kinds of the whole model (no layer).
MODEL_SITES = (EMBED, RESID_FINAL, LOGITS)
SITE_KINDS = (EMBED, *BLOCK_SITES, RESID_FINAL, LOGITS)

#: The canonical components of a block, in the order figures and datasets list them.
#: Each names the output of one linear map: the attention's query, key, value and
#: output projections, and the MLP's up, down and gate projections.
COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "mlp.gate")


@dataclass(frozen=True, order=True)
class SiteRef:
    """A place in any supported model, by canonical name.

    ``kind`` is one of :data:`SITE_KINDS`; ``layer`` is set for the kinds inside a block
    (:data:`BLOCK_SITES`), ``component`` for component sites. Build them with the
    constructors (:func:`embed`, :func:`resid`, :func:`component`, :func:`resid_mid`,
    :func:`attention`, :func:`head_output`, :func:`mlp_hidden`, :func:`rotary_q`,
    :func:`rotary_k`, :func:`resid_final`, :func:`logits`), whose docstrings say what
    each holds and its shape.
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


def resid_mid(layer: int) -> SiteRef:
    """The residual stream between block ``layer``'s attention and its MLP (the block's
    input plus what attention wrote), ``(batch, token, d_model)``. Only sequential
    families have it: where attention and MLP run in parallel (GPT-J, Phi, GPT-NeoX
    unless ``use_parallel_residual = false``) no stream exists between them, and asking
    for it is a :class:`SiteError`."""
    return SiteRef(RESID_MID, layer)


def attention(layer: int) -> SiteRef:
    """Attention probabilities of block ``layer``, ``(batch, head, query, key)``: the
    softmax the model multiplies values by (after Gemma 2's score soft cap).

    Keys that are padding carry probability exactly 0; rows of padded queries are NaN,
    so a reduction that forgets ``batch.mask`` shows NaN instead of a plausible number.
    Reading this site makes the runner run that model with eager attention for the run
    (SDPA and flash attention compute no probabilities) and restore its previous
    implementation afterwards."""
    return SiteRef(ATTENTION, layer)


def head_output(layer: int) -> SiteRef:
    """Each head's result in block ``layer`` before the output projection mixes heads
    (the input of ``attn.o``), ``(batch, token, head, head_dim)``: summing
    ``head_output[..., h, :] @ W_O[h]`` over heads, plus ``b_O``, gives ``attn.o``."""
    return SiteRef(HEAD_OUTPUT, layer)


def mlp_hidden(layer: int) -> SiteRef:
    """The MLP's neurons in block ``layer`` (the input of ``mlp.down``),
    ``(batch, token, d_mlp)``: ``act(up)``, or ``act(gate) * up`` in a gated MLP."""
    return SiteRef(MLP_HIDDEN, layer)


def rotary_q(layer: int) -> SiteRef:
    """Block ``layer``'s queries as its attention scores use them, after rotary position
    embedding (and any query norm), ``(batch, token, head, head_dim)``. Only families
    with rotary positions have it; the architecture page says per family which part of
    each head is rotated."""
    return SiteRef(ROTARY_Q, layer)


def rotary_k(layer: int) -> SiteRef:
    """Block ``layer``'s keys as its attention scores use them, after rotary position
    embedding, ``(batch, token, kv_head, head_dim)``: one per key/value head, not repeated
    for grouped-query attention (query head ``h`` reads key head
    ``ModelLayout.heads(layer).kv_head[h]``)."""
    return SiteRef(ROTARY_K, layer)


def resid_final() -> SiteRef:
    """The residual stream as the output layer reads it, ``(batch, token, width)``: the
    last block's output after the final norm (and OPT-350m's ``project_out``, so its width
    is ``word_embed_proj_dim`` there); the last block's output itself where the model
    has neither."""
    return SiteRef(RESID_FINAL)


def logits() -> SiteRef:
    """The model's output logits, ``(batch, token, vocab)``, as the model returns them
    (after Gemma 2's final soft cap)."""
    return SiteRef(LOGITS)


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
    :param select: picks the site's tensor out of the raw value. A ``(tokens, width)``
        tensor (OPT flattens tokens around its MLP) is then unflattened to
        ``(batch, token, width)`` by the trace.
    :param finish: applied last, with the batch: the site's final shape and masking
        (heads split out, padded attention rows set to NaN).

    ``module`` is ``""`` for the model itself; ``port`` may name an operation inside a
    module's forward (``source.attention_interface_1.inputs``, through nnsight's
    ``.source``) for values no module returns.
    """

    module: str
    port: str
    order: tuple[int, ...]
    select: Callable[[Any], torch.Tensor] = field(default=first_tensor, compare=False)
    finish: Callable[[torch.Tensor, Any], torch.Tensor] | None = field(default=None, compare=False)


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
    #: A block's attention module, relative to the block; it returns
    #: ``(output, probabilities, ...)`` (None: the family gives no :func:`attention`).
    attention_path: ClassVar[str | None] = None
    #: The call inside the attention module's ``forward`` that turns queries and keys
    #: into scores, as nnsight's ``.source`` labels it, and the position of the query
    #: among its positional arguments (the key follows it). None: no rotary sites.
    scores_call: ClassVar[tuple[str, int] | None] = None
    #: For the docs: what the rotary sites hold in this family, or why it has none.
    rotary: ClassVar[str] = "no rotary position embedding (or the adapter does not name the call that scores it)"

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
        """Canonical site kinds this adapter can place (in some configuration)."""
        if not self.component_modules:
            return (EMBED, RESID)
        kinds = [EMBED, RESID, COMPONENT, RESID_MID, HEAD_OUTPUT, MLP_HIDDEN, RESID_FINAL, LOGITS]
        if self.attention_path is not None:
            kinds.insert(4, ATTENTION)
            if self.scores_call is not None:
                kinds[5:5] = [ROTARY_Q, ROTARY_K]
        return tuple(kinds)

    def resid_mid_port(self, config: Any) -> tuple[str, str]:
        """Where the stream between attention and MLP is read, relative to a block:
        ``(module, port)``. By default the input of the norm in front of the MLP.

        :raises SiteError: with the reason, where the family (or this configuration)
            has no such stream.
        """
        if self.parallel(config):
            raise SiteError("attention and MLP run in parallel here: both read the block's input and "
                            "add to the stream together, so there is no stream between them")
        if self.mlp_norm_path is None:
            raise SiteError("the adapter does not name the norm in front of the MLP")
        return self.mlp_norm_path, "input"

    def final_stream_path(self, config: Any) -> str | None:
        """The module whose output is the stream the output layer reads, relative to the
        module holding the blocks (by default the final norm); None: the last block's output."""
        return self.final_norm_path

    def _component(self, name: str, config: Any) -> Component:
        components = self.components(config)
        if name not in components:
            raise SiteError(f"it has no component {name!r}; it has {', '.join(components) or 'none'}")
        return components[name]

    def site(self, ref: SiteRef, blocks: str, config: Any = None) -> Site:
        """Place ``ref`` in a model whose blocks sit at ``blocks``.

        Everything but ``embed`` and ``resid`` needs the model's ``config`` (fused modules
        are split by head count and width; whether blocks are parallel, how many layers).

        :raises SiteError: naming the architecture, the site and why it is missing. Only
            the config is read, so this runs at validation, before any weights load.
        """
        try:
            return self._place(ref, blocks, config)
        except SiteError as exc:
            raise SiteError(f"architecture {self.name!r} has no site {ref}: {exc}") from None

    def _place(self, ref: SiteRef, blocks: str, config: Any) -> Site:
        if ref.kind == EMBED:
            # The input of block 0 is the residual stream after everything the family
            # does to embeddings (positions, scaling), which no single module outputs.
            return Site(f"{blocks}.0", "input", (-1, 0))
        if ref.kind not in SITE_KINDS:
            raise SiteError(f"unknown kind {ref.kind!r}; the kinds are {', '.join(SITE_KINDS)}")
        if ref.kind in (ROTARY_Q, ROTARY_K) and self.scores_call is None and self.component_modules:
            raise SiteError(self.rotary)
        if ref.kind not in self.site_kinds():
            raise SiteError(f"the adapter provides {', '.join(self.site_kinds())}")
        if ref.kind == RESID and ref.layer is not None and config is None:
            return Site(f"{blocks}.{ref.layer}", "output", (ref.layer, 1_000))
        if config is None:
            raise SiteError("placing it needs the model's config")
        layers = self.num_layers(config)
        if ref.kind in MODEL_SITES:
            return self._place_model_site(ref, blocks, config, layers)
        if ref.layer is None or not 0 <= ref.layer < layers:
            raise SiteError(f"layer {ref.layer} is out of range: the model has {layers} layers, so give 0..{layers - 1}")
        return self._place_block_site(ref, f"{blocks}.{ref.layer}", config)

    def _place_model_site(self, ref: SiteRef, blocks: str, config: Any, layers: int) -> Site:
        body = blocks.rpartition(".")[0]
        if ref.kind == LOGITS:
            return Site("", "output", (FINAL, 1), _logits_of)
        path = self.final_stream_path(config)
        if path is None:
            return Site(f"{blocks}.{layers - 1}", "output", (layers - 1, 1_000))
        return Site(f"{body}.{path}" if body else path, "output", (FINAL, 0))

    def _place_block_site(self, ref: SiteRef, block: str, config: Any) -> Site:
        layer = ref.layer
        if ref.kind == RESID:
            return Site(block, "output", (layer, 1_000))
        if ref.kind == COMPONENT:
            part = self._component(ref.component, config)

            def select(value: Any, part: Component = part) -> torch.Tensor:
                return part.take(first_tensor(value))

            return Site(f"{block}.{part.module}", "output", (layer, self._rank(ref.component, config)), select)
        if ref.kind == RESID_MID:
            module, port = self.resid_mid_port(config)
            return Site(f"{block}.{module}", port, (layer, RANKS[RESID_MID]))
        if ref.kind == HEAD_OUTPUT:
            shape = self.attention_shape(config)
            part = self._component("attn.o", config)

            def split(hidden: torch.Tensor, batch: Any, heads: int = shape.n_heads) -> torch.Tensor:
                return hidden.unflatten(-1, (heads, -1))

            return Site(f"{block}.{part.module}", "input", (layer, RANKS[HEAD_OUTPUT]), finish=split)
        if ref.kind == MLP_HIDDEN:
            part = self._component("mlp.down", config)
            return Site(f"{block}.{part.module}", "input", (layer, RANKS[MLP_HIDDEN]))
        attention_module = f"{block}.{self.attention_path}"
        if ref.kind == ATTENTION:
            return Site(attention_module, "output", (layer, RANKS[ATTENTION]), _probabilities_of, _mask_padding)
        label, query = self.scores_call  # rotary_q, rotary_k: in site_kinds only when set
        index = query if ref.kind == ROTARY_Q else query + 1

        def per_token(value: Any, index: int = index) -> torch.Tensor:
            args, _ = value
            return args[index].transpose(1, 2)  # (batch, head, token, hd) -> (batch, token, head, hd)

        return Site(attention_module, f"source.{label}.inputs", (layer, RANKS[ROTARY_Q]), per_token)

    def _rank(self, name: str, config: Any) -> int:
        """Where a component's output falls among a block's reads (see :data:`RANKS`):
        attention projections and MLP projections in the adapter's execution order."""
        if name in RANKS:
            return RANKS[name]
        order = list(self.components(config))
        return (10 if name.startswith("attn.") else 60) + order.index(name)


#: Position of each read within a block, in the order nnsight's hooks fire: a module's
#: input before its output, a module's output after its submodules' (attention's
#: probabilities come with its output, after ``attn.o``). Components other than these
#: take 10 + i (attention side) or 60 + i (MLP side) by their index in the adapter's order.
RANKS = {
    ROTARY_Q: 20, ROTARY_K: 20, HEAD_OUTPUT: 30, "attn.o": 31, ATTENTION: 40, RESID_MID: 50,
    MLP_HIDDEN: 70, "mlp.down": 71, RESID: 1_000,
}
#: First element of the order of sites after the last block.
FINAL = 1 << 30


def _logits_of(value: Any) -> torch.Tensor:
    found = getattr(value, "logits", None)
    if found is None:
        raise SiteError(f"the model returned {type(value).__name__} without logits: it has no output layer; "
                        "load it with its language-modelling head (a *ForCausalLM class)")
    return found


def _probabilities_of(value: Any) -> torch.Tensor:
    probabilities = value[1] if isinstance(value, (tuple, list)) and len(value) > 1 else None
    if not isinstance(probabilities, torch.Tensor):
        raise SiteError(
            "the attention module returned no probabilities; it computes them only with eager "
            "attention, which the runner switches on for runs that read attention(); a model whose "
            "attention class was fixed when it was loaded (older transformers, GPT-J with flash "
            "attention) must be loaded with attn_implementation='eager'"
        )
    return probabilities


def _mask_padding(probabilities: torch.Tensor, batch: Any) -> torch.Tensor:
    """Rows of padded queries become NaN. (Padding keys already carry probability 0: batches
    are right-padded, so every padding key comes after each real query, which the causal
    mask hides from it.)"""
    real = batch.mask.to(probabilities.device)
    return probabilities.masked_fill(~real[:, None, :, None], float("nan"))


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
