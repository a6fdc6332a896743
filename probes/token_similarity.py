"""Token similarity: how alike the hidden states of every pair of tokens are, layer by layer.

Answers "do token representations become more alike with depth?" (DESIGN.md, figure 1).
For each prompt and chosen layer, the similarity of token i's residual stream with each
token j <= i (causal: a token only sees its past), computed inside the trace so that
only a (token x token) matrix per prompt and layer leaves it.
"""

from __future__ import annotations

from typing import Literal, Union

import numpy as np
import torch
import xarray as xr
from pydantic import Field, StrictInt, field_validator

from probescope.architectures.base import EMBED, embed, resid
from probescope.errors import Problem
from probescope.inputs import THUMBNAIL_SIDE, TOKEN_KINDS, Batch, thumbnails, token_kind_codes
from probescope.plugins import hookimpl
from probescope.probe import Parameters, Probe, ProbeRun, Read

EMBED_LAYER = -1  # value of the `layer` coordinate for the embedding output

LayerSpec = Union[StrictInt, Literal["embed"]]


class TokenSimilarityParameters(Parameters):
    """Parameters of ``token_similarity``."""

    layers: list[LayerSpec] | None = Field(
        default=None,
        description='block indices (negative count from the end) and/or "embed" for the '
        "embedding output; default: every block",
    )
    metric: Literal["cosine", "centred_cosine"] = Field(
        default="cosine",
        description="cosine of the hidden states, or cosine after subtracting the prompt's "
        "mean token vector (raw cosine in real models is dominated by one shared direction)",
    )

    centre_without_first_token: bool = Field(
        default=False,
        description="centred_cosine: subtract the mean of the tokens after the first. Trained "
        "models give the first token massive activations (SmolLM2: a norm a hundred times the "
        "others'), which otherwise set the mean, so that every later token looks alike",
    )

    @field_validator("layers")
    @classmethod
    def _not_empty(cls, layers: list[LayerSpec] | None) -> list[LayerSpec] | None:
        if layers is not None and not layers:
            raise ValueError('give at least one layer, or leave layers out for all of them')
        return layers


def resolve_layers(layers: list[LayerSpec] | None, num_layers: int) -> list[int]:
    """Absolute layer coordinates, in the order given, without duplicates.

    Block indices become non-negative; "embed" becomes :data:`EMBED_LAYER`.
    """
    if layers is None:
        return list(range(num_layers))
    out: list[int] = []
    for layer in layers:
        value = EMBED_LAYER if layer == EMBED else (layer + num_layers if layer < 0 else layer)
        if value not in out:
            out.append(value)
    return out


def similarity_matrix(hidden: torch.Tensor, mask: torch.Tensor, metric: str,
                      centre_without_first_token: bool = False,
                      prefix: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, token, token)`` similarities of a ``(batch, token, width)`` tensor.

    Entry ``[b, i, j]`` compares token i with token j; it is NaN unless j <= i (or both
    are in a bidirectional ``prefix``, ``(batch, token)`` bool) and both are real tokens.
    Computed in float32 at least, whatever the model's dtype. With
    ``centre_without_first_token`` the centring mean leaves out position 0 (in prompts
    of two or more tokens).
    """
    h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    real = mask.to(h.dtype).unsqueeze(-1)  # (batch, token, 1)
    if metric == "centred_cosine":
        weight = real
        if centre_without_first_token:
            weight = real.clone()
            weight[:, 0] = torch.where(real.sum(dim=1) > 1, 0.0, weight[:, 0])
        mean = (h * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True)
        h = h - mean
    unit = torch.nn.functional.normalize(h, dim=-1)
    sims = unit @ unit.transpose(1, 2)
    n = h.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
    if prefix is not None:  # tokens of a bidirectional prefix also see later ones
        causal = causal | (prefix.unsqueeze(2) & prefix.unsqueeze(1))
    keep = causal & mask.unsqueeze(2) & mask.unsqueeze(1)
    return sims.masked_fill(~keep, float("nan"))


class TokenSimilarity(Probe):
    name = "token_similarity"
    version = "0.1.0"
    description = "similarity of the hidden states of every pair of tokens (j <= i), per layer"
    Parameters = TokenSimilarityParameters

    def check(self, params: TokenSimilarityParameters, model) -> list[Problem]:
        n = model.num_layers
        problems = []
        for i, layer in enumerate(params.layers or []):
            if layer != EMBED and not -n <= layer < n:
                problems.append(Problem(
                    f"layers[{i}]",
                    f"layer {layer} is out of range: the model has {n} layers, so give "
                    f'{-n}..{n - 1} or "embed"',
                ))
        return problems

    def reads(self, params: TokenSimilarityParameters, model) -> list[Read]:
        metric, skip_first = params.metric, params.centre_without_first_token

        def reduce(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
            return similarity_matrix(hidden, batch.mask, metric, skip_first, batch.prefix_mask)

        return [
            Read(str(layer), embed() if layer == EMBED_LAYER else resid(layer), reduce)
            for layer in resolve_layers(params.layers, model.num_layers)
        ]

    def build(self, params: TokenSimilarityParameters, run: ProbeRun) -> xr.Dataset:
        layers = resolve_layers(params.layers, run.model.info.num_layers)
        width = max(len(p) for p in run.prompts)
        values = np.full((len(run.prompts), len(layers), width, width), np.nan, dtype=np.float32)
        for li, layer in enumerate(layers):
            row = 0
            for matrix in run.reductions[str(layer)]:
                b, t, _ = matrix.shape
                values[row : row + b, li, :t, :t] = matrix.float().numpy()
                row += b

        texts = np.full((len(run.prompts), width), "", dtype=object)
        ids = np.full((len(run.prompts), width), -1, dtype=np.int64)
        for p in run.prompts:
            texts[p.index, : len(p)] = p.tokens
            ids[p.index, : len(p)] = p.token_ids
        positions = np.arange(width)
        label = {"cosine": "cosine similarity", "centred_cosine": "centred cosine similarity"}[params.metric]
        vision = run.model.info.vision
        bidirectional = vision is not None and vision.bidirectional_prefix
        description = ("similarity of token i's hidden state with context token j <= i; NaN above the "
                       "diagonal and over padding")
        if bidirectional:
            description += ("; the first n_prefix_tokens tokens (image and prompt) attend to each other "
                            "both ways, so among them j > i is kept too")
        variables: dict = {
            "similarity": (("prompt", "layer", "token", "context_token"), values,
                           {"long_name": label, "description": description}),
        }
        coords: dict = {}
        images = thumbnails(run.prompts)
        if images is not None:
            pixels, sizes = images
            variables["thumbnail"] = (
                ("prompt", "pixel_row", "pixel_column", "channel"), pixels,
                {"long_name": "image thumbnail",
                 "description": f"each prompt's image, at most {THUMBNAIL_SIDE} px a side, RGB, padded "
                                "with 0 beyond thumbnail_height x thumbnail_width"})
            coords["channel"] = ("channel", np.array(["red", "green", "blue"], dtype=object))
            coords["thumbnail_height"] = ("prompt", sizes[:, 0])
            coords["thumbnail_width"] = ("prompt", sizes[:, 1])
            coords["image_file"] = ("prompt", np.array(
                [p.image.name if p.image is not None else "" for p in run.prompts], dtype=object))
        if bidirectional:
            coords["n_prefix_tokens"] = ("prompt", np.array([p.prefix for p in run.prompts], dtype=np.int64),
                                         {"description": "leading tokens that attend both ways"})
        return xr.Dataset(
            variables,
            coords={
                "prompt": np.arange(len(run.prompts)),
                "prompt_text": ("prompt", np.array([p.text for p in run.prompts], dtype=object)),
                "n_tokens": ("prompt", np.array([len(p) for p in run.prompts], dtype=np.int64)),
                "n_image_tokens": ("prompt", np.array([p.n_image_tokens for p in run.prompts], dtype=np.int64),
                                   {"description": "tokens standing for the prompt's image"}),
                **coords,
                "layer": ("layer", np.array(layers, dtype=np.int64),
                          {"description": "block index (0-based); -1 is the embedding output, "
                                          "the residual stream entering block 0"}),
                "layer_label": ("layer", np.array(["embed" if l == EMBED_LAYER else str(l) for l in layers], dtype=object)),
                "token": ("token", positions, {"description": "token position"}),
                "context_token": ("context_token", positions, {"description": "position of the earlier (or same) token compared with"}),
                "token_text": (("prompt", "token"), texts),
                "token_id": (("prompt", "token"), ids, {"description": "-1 on padding"}),
                "context_token_text": (("prompt", "context_token"), texts.copy()),
                "token_kind": (("prompt", "token"), token_kind_codes(run.prompts, width),
                               {"long_name": "token kind", "flag_values": np.arange(len(TOKEN_KINDS), dtype=np.int8),
                                "flag_meanings": " ".join(TOKEN_KINDS),
                                "description": "text, image (the model's image token) or special (other "
                                               "special and added tokens); -1 on padding"}),
            },
            attrs={"metric": params.metric,
                   "centre_without_first_token": int(params.centre_without_first_token),
                   "attention": "bidirectional prefix" if bidirectional else "causal"},
        )


@hookimpl
def register_probes(register):
    register(TokenSimilarity())
