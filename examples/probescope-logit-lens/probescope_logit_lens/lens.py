"""The ``logit_lens`` probe: what the residual stream after each layer would predict if
the model stopped there.

At every layer asked for, each token's residual stream goes through the model's own
final norm and output layer (the "logit lens", nostalgebraist 2020), inside probescope's
shared traced pass: the reduction closes over those weights (``reads`` gets the loaded
model), so only the top-k token ids and probabilities and the next token's rank and
probability leave the pass, never a residual stream or a vocabulary-wide row of logits.

The target of position i is the prompt's own token i + 1 (what the model is trained to
predict there); the last token of a prompt has none (NaN), though its top-k are still
what the model would say next.

Uses only names exported by ``probescope``.
"""

from __future__ import annotations

import dataclasses

from pydantic import Field, field_validator

from probescope import (
    EMBED_LAYER, DatasetSchema, Layer, Parameters, Probe, Read, Variable, clean_token, distinct, embed,
    layer_label, layer_problems, lazy_import, resid, resolve_layers,
)

# Imported on first use, so that listing plugins (`probescope plugins`) stays fast.
np = lazy_import("numpy")
torch = lazy_import("torch")
xr = lazy_import("xarray")


class LensParameters(Parameters):
    layers: list[Layer] | None = Field(
        default=None,
        description='block indices (negative count from the end), "last", and/or "embed" for the embedding '
                    "output; default: every block")
    top_k: int = Field(default=5, ge=1, le=100, description="how many of the most likely tokens to keep per position")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers):
        return distinct(layers)


SCHEMA = DatasetSchema(
    probe="logit_lens",
    dims={
        "prompt": "the run's prompts, in order",
        "layer": "the layers read: block index from 0; -1 is the embedding output",
        "token": "position i of the token whose residual stream is unembedded",
        "rank": "place among the most likely tokens, 0 for the most likely",
    },
    coords={
        "prompt": Variable(("prompt",), "int64", "prompt index"),
        "prompt_text": Variable(("prompt",), "str", "the prompt"),
        "n_tokens": Variable(("prompt",), "int64", "real (non-padding) tokens of the prompt"),
        "layer": Variable(("layer",), "int64", "block index; -1 the embedding output"),
        "layer_label": Variable(("layer",), "str", '"embed" or the block index'),
        "token": Variable(("token",), "int64", "token position"),
        "rank": Variable(("rank",), "int64", "0 for the most likely token"),
        "token_text": Variable(("prompt", "token"), "str", 'the token as text; "" on padding'),
        "token_id": Variable(("prompt", "token"), "int64", "the token's id; -1 on padding"),
        "target_text": Variable(("prompt", "token"), "str", 'the next token of the prompt; "" where none'),
        "target_id": Variable(("prompt", "token"), "int64", "the next token's id; -1 where none"),
    },
    variables={
        "top_id": Variable(("prompt", "layer", "token", "rank"), "int64",
                           "ids of the top-k tokens of the unembedded residual stream; -1 on padding"),
        "top_text": Variable(("prompt", "layer", "token", "rank"), "str", 'the top-k tokens as text; "" on padding'),
        "top_prob": Variable(("prompt", "layer", "token", "rank"), "float32",
                             "their probabilities (softmax over the vocabulary); NaN on padding"),
        "target_rank": Variable(("prompt", "layer", "token"), "float32",
                                "rank of the next token among the whole vocabulary, 1 for the most likely; "
                                "NaN where there is no next token"),
        "target_prob": Variable(("prompt", "layer", "token"), "float32",
                                "probability of the next token; NaN where there is no next token"),
    },
    attrs={"top_k": "tokens kept per position", "vocab_size": "size of the output layer's vocabulary"},
)


def _unembedder(model):
    """``(final norm or None, output layer computing in float32 at least)`` of a loaded model."""
    layout = model.layout
    norm = layout.final_norm()
    unembed = layout.unembedding()
    wide = torch.promote_types(unembed.weight.dtype, torch.float32)

    def widen(t):
        return None if t is None else t.to(wide)

    return norm, dataclasses.replace(unembed, weight=widen(unembed.weight), bias=widen(unembed.bias),
                                     project=widen(unembed.project))


def lens_reduction(norm, unembed, k: int):
    """The reduction of one layer's ``(batch, token, width)`` residual stream, run inside
    the pass: ``(batch, token, 2k + 2)`` float64 holding, per position, the top-k ids
    (exact as float64), their probabilities, the next token's rank (1 for the most likely)
    and its probability; NaN on padding, and in the last two where there is no next token.

    One tensor carries all four, so the vocabulary-wide logits are computed once per layer."""

    def reduce(hidden, batch):
        x = hidden if norm is None else norm(hidden)
        logits = unembed(x.to(unembed.weight.dtype))  # (batch, token, vocab)
        logp = torch.log_softmax(logits.double(), dim=-1)
        top = logp.topk(k, dim=-1)
        ids, mask = batch.input_ids, batch.mask
        target = torch.full_like(ids, -1)
        target[:, :-1] = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
        has = (target >= 0) & mask
        target_logp = logp.gather(-1, target.clamp_min(0).unsqueeze(-1))  # (batch, token, 1)
        rank = (logp > target_logp).sum(-1, keepdim=True).double() + 1
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=logp.device)
        tail = torch.cat([rank, target_logp.exp()], dim=-1).where(has.unsqueeze(-1), nan)
        out = torch.cat([top.indices.double(), top.values.exp(), tail], dim=-1)
        return out.where(mask.unsqueeze(-1), nan)

    return reduce


def token_texts(tokenizer, ids: np.ndarray) -> np.ndarray:
    """Each id's vocabulary entry as readable text (markers such as GPT-2's ``Ġ`` cleaned);
    ``""`` for -1."""
    known = sorted({int(i) for i in ids.ravel() if i >= 0})
    text = dict(zip(known, (clean_token(str(t), vocabulary_entry=True)
                            for t in tokenizer.convert_ids_to_tokens(known))))
    text[-1] = ""
    return np.vectorize(lambda i: text[int(i)], otypes=[object])(ids) if ids.size else ids.astype(object)


class LogitLens(Probe):
    name = "logit_lens"
    version = "0.1.0"
    description = "top-k tokens and the next token's rank after each layer, unembedded inside the pass"
    Parameters = LensParameters
    schema = SCHEMA

    def check(self, params, model):
        return layer_problems(params.layers, model.num_layers, embed=True)

    def sites(self, params, model):  # reads() needs the weights; the sites do not
        return [embed() if layer == EMBED_LAYER else resid(layer)
                for layer in resolve_layers(params.layers, model.num_layers)]

    def reads(self, params, model):
        norm, unembed = _unembedder(model)
        reduce = lens_reduction(norm, unembed, params.top_k)
        return [Read(layer, site, reduce)
                for layer, site in zip(resolve_layers(params.layers, model.num_layers), self.sites(params, model))]

    def build(self, params, run):
        layers = resolve_layers(params.layers, run.model.info.num_layers)
        k, n_prompts = params.top_k, len(run.prompts)
        width = max(len(p) for p in run.prompts)
        values = np.full((n_prompts, len(layers), width, 2 * k + 2), np.nan)
        for li, layer in enumerate(layers):
            row = 0
            for part in run.reductions[layer]:
                b, t, _ = part.shape
                values[row:row + b, li, :t] = part.cpu().numpy()
                row += b
        top_id = np.where(np.isnan(values[..., :k]), -1, values[..., :k]).astype(np.int64)
        ids = np.full((n_prompts, width), -1, dtype=np.int64)
        texts = np.full((n_prompts, width), "", dtype=object)
        for p in run.prompts:
            ids[p.index, :len(p)] = p.token_ids
            texts[p.index, :len(p)] = p.tokens
        target_id = np.full_like(ids, -1)
        target_id[:, :-1] = ids[:, 1:]
        target_text = np.full_like(texts, "")
        target_text[:, :-1] = texts[:, 1:]
        vocab = run.model.layout.unembedding().weight.shape[0]
        return xr.Dataset(
            {
                "top_id": (("prompt", "layer", "token", "rank"), top_id, {"description": "-1 on padding"}),
                "top_text": (("prompt", "layer", "token", "rank"), token_texts(run.model.tokenizer, top_id)),
                "top_prob": (("prompt", "layer", "token", "rank"), values[..., k:2 * k].astype(np.float32),
                             {"long_name": "probability"}),
                "target_rank": (("prompt", "layer", "token"), values[..., 2 * k].astype(np.float32),
                                {"long_name": "rank of the next token", "description": "1 for the most likely"}),
                "target_prob": (("prompt", "layer", "token"), values[..., 2 * k + 1].astype(np.float32),
                                {"long_name": "probability of the next token"}),
            },
            coords={
                "prompt": np.arange(n_prompts),
                "prompt_text": ("prompt", np.array([p.text for p in run.prompts], dtype=object)),
                "n_tokens": ("prompt", np.array([len(p) for p in run.prompts], dtype=np.int64)),
                "layer": ("layer", np.array(layers, dtype=np.int64)),
                "layer_label": ("layer", np.array([layer_label(layer) for layer in layers], dtype=object)),
                "token": np.arange(width),
                "rank": np.arange(k),
                "token_text": (("prompt", "token"), texts),
                "token_id": (("prompt", "token"), ids),
                "target_text": (("prompt", "token"), target_text),
                "target_id": (("prompt", "token"), target_id),
            },
            attrs={"top_k": k, "vocab_size": int(vocab)},
        )
