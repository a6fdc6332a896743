"""The weights of one model, by canonical name.

An :class:`~probescope.architectures.base.ArchitectureAdapter` describes a family; a
:class:`ModelLayout` applies it to one model instance so probes can ask for weights
without knowing module paths or storage conventions:

- :meth:`ModelLayout.weight` gives a component's weight as ``(out, in)`` whatever the
  module stores (GPT-2's ``Conv1D`` keeps ``(in, out)``), sliced out of fused modules;
- :meth:`ModelLayout.heads` splits the attention weights by head, grouped-query
  attention resolved;
- :meth:`ModelLayout.embedding`, :meth:`ModelLayout.unembedding` and
  :meth:`ModelLayout.final_norm` give the ends of the residual stream;
- :meth:`ModelLayout.mlp_output` runs one block's MLP (with its norm) on given vectors.

Weights come back as views of the model's parameters where the layout allows (no copy);
treat them as read-only.

Where tensors come from is one of two hooks, :meth:`ModelLayout.tensor` and
:meth:`ModelLayout.runnable`; everything else (orientation, slicing of fused modules,
head splitting, tying) is shared by every source. :class:`ModelLayout` reads a loaded
model; :class:`~probescope.architectures.streamed.StreamedLayout` reads the same
structure off a skeleton on the meta device and the values off the checkpoint's
safetensors files, one layer at a time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from probescope.architectures.base import (
    ArchitectureAdapter,
    AttentionShape,
    Component,
    get_submodule,
)
from probescope.errors import SiteError
from probescope.lazy_imports import lazy_import

torch = lazy_import("torch")


def _is_conv1d(module: torch.nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return isinstance(module, Conv1D)


def out_by_in(module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like ``module.weight``) in ``(out, in)`` orientation.

    ``nn.Linear`` stores ``(out, in)``; transformers' ``Conv1D`` (GPT-2) stores
    ``(in, out)`` and computes ``x @ W``.
    """
    return tensor.t() if _is_conv1d(module) else tensor


@dataclass
class HeadWeights:
    """Per-head attention weights of one layer, oriented for row vectors.

    For a residual-stream row vector ``x`` (the attention's normalised input), head ``h``
    computes query ``x @ W_Q[h] + b_Q[h]``, key ``x @ W_K[h] + b_K[h]`` and value
    ``x @ W_V[h] + b_V[h]``; its attention-weighted values ``z`` add ``z @ W_O[h]`` to
    the output, which also gets ``b_O`` once. So the head's value-output circuit is
    ``W_V[h] @ W_O[h]`` (``d_model x d_model``), as in MAPS and TransformerLens.

    Shapes: ``W_Q, W_K, W_V`` are ``(n_heads, d_model, head_dim)``; ``W_O`` is
    ``(n_heads, head_dim, d_model)``; ``b_Q, b_K, b_V`` are ``(n_heads, head_dim)``;
    ``b_O`` is ``(d_model,)``; biases are None where the model has none.

    With grouped-query attention ``W_K`` and ``W_V`` are given per *query* head: heads
    ``h`` and ``h'`` with ``kv_head[h] == kv_head[h']`` share the same key and value
    weights (copies of one key/value head). The key/value weights are held once per
    key/value head, as the model stores them, in ``W_K_kv``, ``W_V_kv``
    ``(n_kv_heads, d_model, head_dim)`` and ``b_K_kv``, ``b_V_kv`` ``(n_kv_heads,
    head_dim)`` (views of the weights, like ``W_Q``); ``W_K[h]`` is
    ``W_K_kv[kv_head[h]]``. ``W_K``, ``W_V``, ``b_K`` and ``b_V`` are made from them when
    first read (a copy, kept with this object, when the heads are grouped; the same
    tensors otherwise), so a probe that works per key/value head never pays for the
    repeats: use ``kv_head`` and the ``*_kv`` weights to compute shared work once.
    """

    W_Q: torch.Tensor
    W_K_kv: torch.Tensor
    W_V_kv: torch.Tensor
    W_O: torch.Tensor
    b_Q: torch.Tensor | None
    b_K_kv: torch.Tensor | None
    b_V_kv: torch.Tensor | None
    b_O: torch.Tensor | None
    kv_head: torch.Tensor  # (n_heads,) long: the key/value head each query head reads
    shape: AttentionShape

    def _per_query(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A per-key/value-head tensor repeated for each query head that reads it."""
        if t is None or self.shape.n_kv_heads == self.shape.n_heads:
            return t
        return t[self.kv_head.to(t.device)]

    @functools.cached_property
    def W_K(self) -> torch.Tensor:
        """``(n_heads, d_model, head_dim)``: query head ``h``'s key weights."""
        return self._per_query(self.W_K_kv)

    @functools.cached_property
    def W_V(self) -> torch.Tensor:
        """``(n_heads, d_model, head_dim)``: query head ``h``'s value weights."""
        return self._per_query(self.W_V_kv)

    @functools.cached_property
    def b_K(self) -> torch.Tensor | None:
        """``(n_heads, head_dim)`` or None: query head ``h``'s key bias."""
        return self._per_query(self.b_K_kv)

    @functools.cached_property
    def b_V(self) -> torch.Tensor | None:
        """``(n_heads, head_dim)`` or None: query head ``h``'s value bias."""
        return self._per_query(self.b_V_kv)


@dataclass
class Embedding:
    """Token embedding: what each token id adds to the residual stream before block 0,
    positions aside.

    :param weight: the embedding matrix, ``(vocab, d_embed)``, the model's own parameter.
    :param scale: factor the family applies (Gemma: sqrt(d_model); 1 elsewhere).
    :param project: ``(d_model, d_embed)`` map applied after scaling, for models whose
        embeddings are narrower than the residual stream (OPT-350m's ``project_in``).
    """

    weight: torch.Tensor
    scale: float = 1.0
    project: torch.Tensor | None = None

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Residual-stream vectors ``(..., d_model)`` of ``token_ids``."""
        vectors = self.weight[token_ids]
        if self.scale != 1.0:
            vectors = vectors * torch.tensor(self.scale, dtype=vectors.dtype)
        if self.project is not None:
            vectors = vectors @ self.project.t()
        return vectors


@dataclass
class Unembedding:
    """The map from the (final-normed) residual stream to logits.

    :param weight: ``(vocab, d_in)``, the output layer's parameter.
    :param bias: ``(vocab,)`` or None.
    :param project: ``(d_in, d_model)`` applied first (OPT-350m's ``project_out``).
    :param tied: whether ``weight`` is the embedding matrix (the same tensor, or equal
        values), detected from the tensors rather than assumed from the family.
    :param softcap: Gemma 2 caps logits as ``softcap * tanh(logits / softcap)``; a
        monotone map, so token rankings are unchanged. None where the family has none.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    project: torch.Tensor | None = None
    tied: bool = False
    softcap: float | None = None

    def matrix(self) -> torch.Tensor:
        """``W_U``, ``(d_model, vocab)``: logits are ``x @ W_U (+ bias)`` for a normed ``x``."""
        w = self.weight if self.project is None else self.weight @ self.project
        return w.t()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final-normed residual vectors ``(..., d_model)``, softcap included."""
        if self.project is not None:
            hidden = hidden @ self.project.t()
        logits = hidden @ self.weight.t()
        if self.bias is not None:
            logits = logits + self.bias
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        return a is b
    return a.data_ptr() == b.data_ptr() or bool(torch.equal(a, b))


class ModelLayout:
    """One model seen through its adapter: weights by canonical name.

    :param model: the transformers model (a ``*ForCausalLM`` or its base model).
    :param adapter: the model family's adapter.
    :param blocks: dotted path of the block list in ``model``.
    """

    def __init__(self, model: torch.nn.Module, adapter: ArchitectureAdapter, blocks: str):
        self.model = model
        self.adapter = adapter
        self.blocks = blocks
        config = model.config  # a vision-language model's adapter reads its text decoder's config
        self.config = config.get_text_config() if getattr(config, "vision_config", None) is not None else config
        self.components: dict[str, Component] = adapter.components(self.config)
        self.num_layers = len(model.get_submodule(blocks))
        self.parallel = adapter.parallel(self.config)
        self.body = blocks.rpartition(".")[0]  # the module holding the blocks

    # -- where values come from (overridden by layouts that do not hold the model) --------

    def tensor(self, path: str, module: torch.nn.Module, name: str) -> torch.Tensor | None:
        """The value of parameter ``name`` (``weight``, ``bias``) of ``module``, which
        sits at dotted ``path`` in :attr:`model`; None when the module has none."""
        return getattr(module, name, None)

    def runnable(self, path: str, skip: tuple[str, ...] = ()) -> torch.nn.Module:
        """The module at ``path`` ready to run. Submodules under the paths in ``skip``
        (relative to it) will not be run, so a layout that has to materialise the
        module may leave them out."""
        return self.model.get_submodule(path)

    def _path(self, module: torch.nn.Module) -> str:
        """Dotted path of ``module`` in :attr:`model`."""
        paths = self.__dict__.setdefault("_paths", {})
        if not paths:
            paths.update({id(m): name for name, m in self.model.named_modules(remove_duplicate=False)})
        return paths[id(module)]

    # -- components --------------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise SiteError(f"layer {layer} is out of range: the model has {self.num_layers} layers")

    def module(self, layer: int, name: str) -> torch.nn.Module | None:
        """The linear module holding component ``name`` of block ``layer`` (a fused
        module holds several), or None when the family lacks the component."""
        self._check_layer(layer)
        part = self.components.get(name)
        if part is None:
            return None
        module = get_submodule(self.model, f"{self.blocks}.{layer}.{part.module}")
        if module is None:
            raise SiteError(
                f"architecture {self.adapter.name!r}: block {layer} has no module {part.module!r} "
                f"for component {name!r}"
            )
        return module

    def oriented(self, layer: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Component ``name``'s part of a tensor shaped like its module's weight (the
        weight itself, its gradient, a reference checkpoint's copy), as ``(out, in)``."""
        module = self.module(layer, name)
        if module is None:
            raise SiteError(f"architecture {self.adapter.name!r} has no component {name!r}")
        return self.components[name].take(out_by_in(module, tensor), dim=0)

    def weight(self, layer: int, name: str) -> torch.Tensor | None:
        """Component ``name``'s weight in block ``layer`` as ``(out, in)``, or None when
        the family lacks the component."""
        module = self.module(layer, name)
        if module is None:
            return None
        weight = self.tensor(self._component_path(layer, name), module, "weight")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise SiteError(
                f"architecture {self.adapter.name!r}: module for {name!r} in block {layer} "
                f"({type(module).__name__}) has no two-dimensional weight"
            )
        return self.oriented(layer, name, weight)

    def bias(self, layer: int, name: str) -> torch.Tensor | None:
        """Component ``name``'s bias in block ``layer``, or None (no bias or no component)."""
        module = self.module(layer, name)
        bias = self.tensor(self._component_path(layer, name), module, "bias") if module is not None else None
        if bias is None:
            return None
        return self.components[name].take(bias, dim=0)

    def _component_path(self, layer: int, name: str) -> str:
        return f"{self.blocks}.{layer}.{self.components[name].module}"

    def mlp_output(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """What block ``layer``'s MLP writes into a residual stream holding ``x``
        ``(..., d_model)``, its attention left out (see
        :meth:`~probescope.architectures.base.ArchitectureAdapter.mlp_output`)."""
        self._check_layer(layer)
        block = self.runnable(f"{self.blocks}.{layer}", skip=self._attention_modules())
        return self.adapter.mlp_output(block, x, self.config)

    def _attention_modules(self) -> tuple[str, ...]:
        """Paths in a block of the modules that hold the attention components (their
        parent, ``self_attn``, where they have one): what an MLP never runs."""
        paths = [self.components[c].module for c in self.components if c.startswith("attn.")]
        return tuple(dict.fromkeys(p.rpartition(".")[0] or p for p in paths))

    # -- heads -------------------------------------------------------------------------

    @property
    def attention_shape(self) -> AttentionShape:
        return self.adapter.attention_shape(self.config)

    def heads(self, layer: int) -> HeadWeights:
        """Per-head attention weights of block ``layer`` (see :class:`HeadWeights`)."""
        shape = self.attention_shape
        H, KV, hd = shape.n_heads, shape.n_kv_heads, shape.head_dim
        kv_head = shape.kv_head()
        missing = [c for c in ("attn.q", "attn.k", "attn.v", "attn.o") if c not in self.components]
        if missing:
            raise SiteError(f"architecture {self.adapter.name!r} lacks {', '.join(missing)}: no per-head weights")

        def split_in(name: str, n: int) -> torch.Tensor:  # (n*hd, d) -> (n, d, hd)
            w = self.weight(layer, name)
            return w.reshape(n, hd, w.shape[1]).transpose(1, 2)

        def split_bias(name: str, n: int) -> torch.Tensor | None:
            b = self.bias(layer, name)
            return None if b is None else b.reshape(n, hd)

        w_o = self.weight(layer, "attn.o")  # (d, H*hd)
        return HeadWeights(
            W_Q=split_in("attn.q", H),
            W_K_kv=split_in("attn.k", KV),
            W_V_kv=split_in("attn.v", KV),
            W_O=w_o.reshape(w_o.shape[0], H, hd).permute(1, 2, 0),
            b_Q=split_bias("attn.q", H),
            b_K_kv=split_bias("attn.k", KV),
            b_V_kv=split_bias("attn.v", KV),
            b_O=self.bias(layer, "attn.o"),
            kv_head=kv_head,
            shape=shape,
        )

    # -- ends of the residual stream -----------------------------------------------------

    def _body_path(self, path: str | None) -> str | None:
        """The dotted path of a module given relative to the module holding the blocks,
        or None when the model has no module there."""
        if path is None:
            return None
        full = f"{self.body}.{path}" if self.body else path
        return full if get_submodule(self.model, full) is not None else None

    def _projection(self, path: str | None) -> torch.Tensor | None:
        """An ``(out, in)`` projection's weight (OPT-350m's ``project_in``/``project_out``)."""
        full = self._body_path(path)
        if full is None:
            return None
        module = self.model.get_submodule(full)
        return out_by_in(module, self.tensor(full, module, "weight"))

    def final_norm(self) -> torch.nn.Module | None:
        """The norm applied to the residual stream after the last block, or None where
        the family (or this model, e.g. post-norm OPT-350m) has none."""
        path = self._body_path(self.adapter.final_norm_path)
        return None if path is None else self.runnable(path)

    def _embedding_weight(self) -> torch.Tensor:
        module = self.model.get_input_embeddings()
        return self.tensor(self._path(module), module, "weight")

    def embedding(self) -> Embedding:
        """The token embedding (see :class:`Embedding`)."""
        return Embedding(
            weight=self._embedding_weight(),
            scale=self.adapter.embedding_scale(self.config),
            project=self._projection(self.adapter.project_in_path),
        )

    def unembedding(self) -> Unembedding:
        """The output layer (see :class:`Unembedding`).

        :raises SiteError: the model is a base model without an output layer.
        """
        module = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if module is None or getattr(module, "weight", None) is None:
            raise SiteError(
                f"{type(self.model).__name__} has no output layer; load the model with its "
                "language-modelling head (a *ForCausalLM class)"
            )
        path = self._path(module)
        weight = self.tensor(path, module, "weight")
        softcap = getattr(self.config, "final_logit_softcapping", None)
        return Unembedding(
            weight=weight,
            bias=self.tensor(path, module, "bias"),
            project=self._projection(self.adapter.project_out_path),
            tied=_same_tensor(weight, self._embedding_weight()),
            softcap=float(softcap) if softcap else None,
        )

