"""``attention_scores``: three numbers per (layer, head), read from the attention
probabilities inside probescope's shared traced pass, and ``attention_map``, which draws
them as layer x head maps.

- **entropy**: mean over real query tokens (from the second one; the first can attend only
  to itself) of the entropy, in nats, of the query's attention over keys.
- **previous_token**: mean over real query tokens i >= 1 of the probability on key i - 1.
- **induction**: for a query token t at position i that occurred before at position k < i,
  the probability on the keys k + 1 that followed its earlier occurrences (k + 1 <= i),
  averaged over such queries; NaN when a run has none (say, no repeated token).

Uses only names exported by ``probescope``.
"""

from __future__ import annotations

from pydantic import Field, field_validator

import probescope
from probescope import (
    Block, Parameters, Probe, Read, Renderer, attention, distinct, layer_problems, lazy_import, resolve_layers,
)

# Imported on first use, so that listing plugins (`probescope plugins`) stays fast.
np = lazy_import("numpy")
torch = lazy_import("torch")
xr = lazy_import("xarray")
mfigure = lazy_import("matplotlib.figure")

SCORES = ("entropy", "previous_token", "induction")
_LONG_NAMES = {"entropy": "attention entropy (nats)", "previous_token": "previous-token score",
               "induction": "induction score"}


class ScoreParameters(Parameters):
    layers: list[Block] | None = Field(default=None, description='block indices (negative count from the end) '
                                                                  'or "last"; default every block')

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers):
        return distinct(layers)


def _layers(params: ScoreParameters, num_layers: int) -> list[int]:
    """The blocks read, in depth order."""
    return sorted(resolve_layers(params.layers, num_layers))


def head_sums(probs: torch.Tensor, batch) -> torch.Tensor:
    """``(6, head)``: sum and count of each score over the batch's real queries.

    ``probs`` is ``(batch, head, query, key)``; rows of padded queries are NaN."""
    probs = probs.double()
    mask = batch.mask  # (batch, token)
    b, h, n, _ = probs.shape
    real_q = mask.clone()
    real_q[:, 0] = False  # the first token has one key: no entropy, no previous token
    weights = real_q[:, None, :].double()  # (batch, 1, query)
    clean = torch.nan_to_num(probs, nan=0.0)
    entropy = -(clean * torch.log(clean.clamp_min(1e-30))).sum(-1)  # (batch, head, query)
    previous = torch.diagonal(clean, offset=-1, dim1=-2, dim2=-1)  # (batch, head, query - 1): p[i, i-1]
    previous = torch.cat([torch.zeros(b, h, 1, dtype=clean.dtype, device=clean.device), previous], dim=-1)
    ids = batch.input_ids
    # induction targets: key j with ids[j-1] == ids[i], 1 <= j <= i, and j - 1 < i
    same = ids[:, :, None] == ids[:, None, :]  # (batch, query, key-1)
    earlier = torch.tril(torch.ones(n, n, dtype=torch.bool, device=ids.device), diagonal=-1)
    source = same & earlier & mask[:, None, :] & mask[:, :, None]  # (batch, query i, earlier k)
    target = torch.zeros_like(source)
    target[:, :, 1:] = source[:, :, :-1]  # key k + 1 follows the earlier occurrence k (k + 1 <= i)
    has = target.any(-1) & mask  # (batch, query)
    induction = (clean * target[:, None].double()).sum(-1)  # (batch, head, query)
    has_w = has[:, None, :].double()
    count = weights.sum(dim=(0, 2)).expand(h)
    return torch.stack([
        (entropy * weights).sum(dim=(0, 2)), count,
        (previous * weights).sum(dim=(0, 2)), count,
        (induction * has_w).sum(dim=(0, 2)), has_w.sum(dim=(0, 2)).expand(h),
    ])


class AttentionScores(Probe):
    name = "attention_scores"
    version = "0.1.0"
    description = "attention entropy, previous-token and induction scores per layer and head"
    Parameters = ScoreParameters

    def check(self, params, model):
        """Every layer asked for must be one of the model's blocks: found before weights load."""
        return layer_problems(params.layers, model.num_layers)

    def reads(self, params, model):
        return [Read(f"attention_{layer}", attention(layer), head_sums)
                for layer in _layers(params, model.num_layers)]

    def build(self, params, run):
        layers = _layers(params, run.model.info.num_layers)
        sums = np.stack([sum(t.double() for t in run.reductions[f"attention_{layer}"]).cpu().numpy()
                         for layer in layers])  # (layer, 6, head)
        variables = {}
        for k, score in enumerate(SCORES):
            with np.errstate(invalid="ignore", divide="ignore"):
                value = np.where(sums[:, 2 * k + 1] > 0, sums[:, 2 * k] / sums[:, 2 * k + 1], np.nan)
            variables[score] = (("layer", "head"), value, {"long_name": _LONG_NAMES[score]})
        return xr.Dataset(variables, coords={"layer": layers, "head": np.arange(sums.shape[-1])})


class MapParameters(Parameters):
    scores: list[str] = Field(default=list(SCORES), description="which scores to draw, one column each")
    cmap: str = Field(default="viridis", description="a matplotlib colour map")
    title: str | None = Field(default=None, description="title above the figure")


class AttentionMap(Renderer):
    name = "attention_map"
    version = "0.1.0"
    description = "attention scores as layer x head maps: one row per model, one column per score"
    probe = "attention_scores"
    Parameters = MapParameters

    def render(self, datasets, params):
        scores = [s for s in params.scores if s in SCORES]
        rows, cols = len(datasets), len(scores)
        figure = mfigure.Figure(figsize=(2.8 * cols + 0.6, 2.4 * rows + 0.4), layout="constrained")
        axes = figure.subplots(rows, cols, squeeze=False)
        for c, score in enumerate(scores):
            # One scale per score, shared by every model: probabilities on [0, 1], entropy
            # from 0 to the largest value drawn, so models compare cell by cell.
            top = 1.0 if score != "entropy" else max(float(np.nanmax(ds[score].values)) for ds in datasets)
            for r, ds in enumerate(datasets):
                ax = axes[r][c]
                values = ds[score].transpose("head", "layer")
                image = ax.imshow(values.values, origin="lower", aspect="auto", cmap=params.cmap,
                                  interpolation="nearest", vmin=0.0, vmax=top)
                ax.set_xticks(range(ds.sizes["layer"]), [str(v) for v in ds["layer"].values])
                ax.set_yticks(range(ds.sizes["head"]), [str(v) for v in ds["head"].values])
                ax.set_xlabel("layer")
                if c == 0:
                    ax.set_ylabel(f"{ds.attrs.get('model', f'model {r + 1}')}\nhead")
                if r == 0:
                    ax.set_title(ds[score].attrs.get("long_name", score), fontsize=10)
            figure.colorbar(image, ax=[row[c] for row in axes], shrink=0.8)
        if params.title:
            figure.suptitle(params.title)
        return figure


@probescope.hookimpl
def register_probes(register):
    register(AttentionScores())


@probescope.hookimpl
def register_renderers(register):
    register(AttentionMap())
