"""Layers as users write them, and as datasets hold them: the one resolver.

In a configuration (a probe's or a renderer's ``layers``) a layer is a block index,
negative ones counting from the end (``-1`` is the last block), ``"last"`` (the last
block, whatever the depth) or, where the probe reads it, ``"embed"`` (the residual
stream entering block 0). In a dataset's ``layer`` coordinate every layer is absolute:
block indices from 0 and :data:`EMBED_LAYER` (``-1``) for the embedding output.
Every probe and renderer turns one into the other here, so they cannot disagree.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

from pydantic import StrictInt

from probescope.architectures.base import EMBED  # the site kind and the layer name are one word
from probescope.errors import Problem

LAST = "last"

#: The ``layer`` coordinate of the embedding output in a dataset.
EMBED_LAYER = -1

#: A block as written in a configuration: an index (negative from the end) or "last".
Block = Union[StrictInt, Literal["last"]]

#: A layer as written in a configuration: a block, or "embed" for the embedding output.
Layer = Union[StrictInt, Literal["last", "embed"]]


def resolve_layer(layer: Union[int, str], num_layers: int) -> int:
    """The dataset coordinate of one configured layer in a model of ``num_layers`` blocks:
    a block index from 0, or :data:`EMBED_LAYER` for ``"embed"``.

    :raises ValueError: the index is out of range or the value is not a layer; check
        with :func:`layer_problems` first to report every one.
    """
    if layer == EMBED:
        return EMBED_LAYER
    if layer == LAST:
        layer = -1
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f'{layer!r} is not a layer: give a block index, "{LAST}" or "{EMBED}"')
    if not -num_layers <= layer < num_layers:
        raise ValueError(_out_of_range(layer, num_layers))
    return layer + num_layers if layer < 0 else layer


def resolve_layers(layers: Optional[Sequence[Union[int, str]]], num_layers: int) -> list[int]:
    """The dataset coordinates of configured layers, in the order given, each once
    (``-1`` and ``"last"`` are the same block); every block when ``layers`` is None."""
    if layers is None:
        return list(range(num_layers))
    return list(dict.fromkeys(resolve_layer(layer, num_layers) for layer in layers))


def distinct_layers(layers: Optional[Sequence[Union[int, str]]]) -> Optional[Sequence[Union[int, str]]]:
    """A ``layers`` parameter's validator: None, or layers none of which is listed twice,
    ``-1`` and ``"last"`` counting as the same block (as :func:`probescope.distinct`)."""
    from probescope.params import distinct

    if layers is None:
        return None
    return distinct(tuple(-1 if layer == LAST else layer for layer in layers)) and layers


def layer_problems(layers: Optional[Sequence[Union[int, str]]], num_layers: int,
                   key: str = "layers", *, embed: bool = False) -> list[Problem]:
    """A :class:`Problem` at ``key[i]`` for each configured layer a model of
    ``num_layers`` blocks does not have; for a probe's or renderer's ``check``.

    :param embed: the parameter also takes ``"embed"`` (a :data:`Layer`, not a
        :data:`Block`); the message then offers it.
    """
    problems = []
    for i, layer in enumerate(layers or []):
        try:
            resolve_layer(layer, num_layers)
        except ValueError as exc:
            message = str(exc)
            if embed and message.endswith(f'or "{LAST}"'):
                message = message.removesuffix(f' or "{LAST}"') + f', "{LAST}" or "{EMBED}"'
            problems.append(Problem(f"{key}[{i}]", message))
    return problems


def layer_label(layer: int) -> str:
    """How a dataset's layer coordinate reads: ``"embed"`` or the block index."""
    return EMBED if layer == EMBED_LAYER else str(int(layer))


def _out_of_range(layer: int, num_layers: int) -> str:
    n = num_layers
    return f'layer {layer} is out of range: the model has {n} layers, so give {-n}..{n - 1} or "{LAST}"'
