"""Token similarity: how alike the hidden states of every pair of tokens are, layer by layer.

Answers "do token representations become more alike with depth?" (the token similarity grid).
For each prompt and chosen layer, the similarity of token i's residual stream with each
token j <= i (causal: a token only sees its past), computed inside the trace so that
only a (token x token) matrix per prompt and layer leaves it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from probescope import (
    EMBED_LAYER, THUMBNAIL_SIDE, TOKEN_KINDS, Batch, DatasetSchema, Layer, Parameters, Probe, ProbeRun, Problem, Read, Variable, distinct, embed,
    hookimpl, layer_label, layer_problems, resid, resolve_layers, thumbnails, token_kind_codes, lazy_import,
)

np = lazy_import("numpy")
torch = lazy_import("torch")
xr = lazy_import("xarray")


class TokenSimilarityParameters(Parameters):
    """Parameters of ``token_similarity``."""

    layers: list[Layer] | None = Field(
        default=None,
        description='block indices (negative count from the end), "last", and/or "embed" for the '
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
    def _distinct(cls, layers: list[Layer] | None) -> list[Layer] | None:
        return distinct(layers)


SCHEMA = DatasetSchema(
    probe="token_similarity",
    dims={
        "prompt": "the run's prompts, in order",
        "layer": "the layers read: block index from 0; -1 is the embedding output",
        "token": "position i of the token compared",
        "context_token": "position j of the earlier (or same) token it is compared with",
        "pixel_row": "rows of a prompt's image thumbnail (prompts with images only)",
        "pixel_column": "columns of a prompt's image thumbnail (prompts with images only)",
        "channel": "colour channels of the thumbnail",
    },
    coords={
        "prompt": Variable(("prompt",), "int64", "prompt index"),
        "prompt_text": Variable(("prompt",), "str", "the prompt"),
        "n_tokens": Variable(("prompt",), "int64", "real (non-padding) tokens of the prompt"),
        "n_image_tokens": Variable(("prompt",), "int64", "tokens standing for the prompt's image"),
        "n_prefix_tokens": Variable(("prompt",), "int64", "leading tokens that attend both ways "
                                    "(vision-language models with a bidirectional prefix)", optional=True),
        "image_file": Variable(("prompt",), "str", "the prompt's image file name; \"\" for none", optional=True),
        "thumbnail_height": Variable(("prompt",), "int64", "height of the thumbnail in pixels", optional=True),
        "thumbnail_width": Variable(("prompt",), "int64", "width of the thumbnail in pixels", optional=True),
        "channel": Variable(("channel",), "str", "red, green, blue", optional=True),
        "layer": Variable(("layer",), "int64", "block index; -1 the embedding output (the residual stream entering block 0)"),
        "layer_label": Variable(("layer",), "str", '"embed" or the block index'),
        "token": Variable(("token",), "int64", "token position"),
        "context_token": Variable(("context_token",), "int64", "token position"),
        "token_text": Variable(("prompt", "token"), "str", 'the token as text; "" on padding'),
        "token_id": Variable(("prompt", "token"), "int64", "the token's id; -1 on padding"),
        "context_token_text": Variable(("prompt", "context_token"), "str", "token_text along context_token"),
        "token_kind": Variable(("prompt", "token"), "int8",
                               "text, image (the model's image token) or special; -1 on padding", flags=True),
    },
    variables={
        "similarity": Variable(("prompt", "layer", "token", "context_token"), "float32",
                               "similarity of token i's hidden state with token j's, for j <= i; NaN for j > i and over "
                               "padding (with a bidirectional prefix, j > i is kept among its tokens)"),
        "thumbnail": Variable(("prompt", "pixel_row", "pixel_column", "channel"), "uint8",
                              "each prompt's image, RGB, padded with 0 beyond its thumbnail size", optional=True),
    },
    attrs={"metric": "cosine or centred_cosine",
           "centre_without_first_token": "0 or 1: the first token left out of the centring mean",
           "attention": "causal, or bidirectional prefix"},
)


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
    schema = SCHEMA
    any_prompt_order = True  # build places each batch's rows by prompt index

    def check(self, params: TokenSimilarityParameters, model) -> list[Problem]:
        return layer_problems(params.layers, model.num_layers, embed=True)

    def reads(self, params: TokenSimilarityParameters, model) -> list[Read]:
        metric, skip_first = params.metric, params.centre_without_first_token

        def reduce(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
            return similarity_matrix(hidden, batch.mask, metric, skip_first, batch.prefix_mask)

        return [
            Read(layer, embed() if layer == EMBED_LAYER else resid(layer), reduce)
            for layer in resolve_layers(params.layers, model.num_layers)
        ]

    def build(self, params: TokenSimilarityParameters, run: ProbeRun) -> xr.Dataset:
        layers = resolve_layers(params.layers, run.model.info.num_layers)
        width = max(len(p) for p in run.prompts)
        values = np.full((len(run.prompts), len(layers), width, width), np.nan, dtype=np.float32)
        for li, layer in enumerate(layers):
            for matrix, batch in zip(run.reductions[layer], run.batches):
                t = matrix.shape[1]  # batches may run in any order: rows go to their prompts
                values[[p.index for p in batch.prompts], li, :t, :t] = matrix.float().numpy()

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
                "layer_label": ("layer", np.array([layer_label(layer) for layer in layers], dtype=object)),
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
