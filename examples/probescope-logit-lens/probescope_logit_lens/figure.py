"""The ``logit_lens_map`` renderer: one prompt's logit lens as a layer x position map.

One panel per model, stacked. Each column is a position of the prompt, labelled below
with the token read there and above with the token that follows it (the target); each
row a layer, the embedding (when read) at the bottom and the last block at the top. A
cell's colour says how well the layer already predicts the target: its rank among the
whole vocabulary on a log scale (1, the most likely, darkest), or its probability. The
cell's text is the layer's most likely token, in bold where it is the target. Every
panel shares one colour scale and one labelled colour bar, so models compare cell by
cell. The last position has no target (its cells are blank) but still shows what each
layer would say next.

Reads datasets only, so saved results are drawn again without the models.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from probescope import (
    Layer, Renderer, RendererError, RendererParameters, add_title, coord_text, distinct, index_values,
    known_colormap, layer_choice_problems, layer_label, lazy_import, prompt_problems, resolve_layer,
)

from probescope_logit_lens.lens import SCHEMA

# Imported on first use, so that listing plugins (`probescope plugins`) stays fast.
matplotlib = lazy_import("matplotlib")
mcolors = lazy_import("matplotlib.colors")
mfigure = lazy_import("matplotlib.figure")
mticker = lazy_import("matplotlib.ticker")
np = lazy_import("numpy")

_LABEL_CHARS = 8  # a cell's token is cut to this many characters
_CELL_WIDTH = 0.62  # inches
_CELL_HEIGHT = 0.24  # inches
_VALUE_LABELS = {"target_rank": "rank of the next token (1 = most likely)",
                 "target_prob": "probability of the next token"}


class LogitLensMapError(RendererError):
    """The datasets or the parameters cannot be drawn as a logit lens map."""


class MapParameters(RendererParameters):
    prompt: int = Field(0, ge=0, description="which prompt to draw, by its index in the run")
    value: Literal["target_rank", "target_prob"] = Field(
        "target_rank", description="what a cell's colour shows: the next token's rank (log scale) or probability")
    layers: Optional[list[Layer]] = Field(
        None, description='which layers to draw, bottom to top: block indices (negative from the end), "last", '
                          '"embed"; default every layer in the datasets')
    annotate: bool = Field(True, description="write each cell's most likely token in it")
    cmap: str = Field("Blues", description="a matplotlib colour map; its dark end marks a well-predicted target")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers):
        return distinct(layers)

    @field_validator("cmap")
    @classmethod
    def _known(cls, cmap):
        return known_colormap(cmap, "use one of matplotlib's sequential maps such as 'Blues', 'Greens' or 'viridis'")


def _label(text: str) -> str:
    """A token as a cell or tick label: surrounding spaces trimmed, a token of only spaces
    shown as open boxes, newlines and other control characters escaped (``\\n``), cut."""
    text = text.replace("\xa0", " ")  # a no-break space reads as a space
    shown = text.strip(" ") or ("␣" * len(text) if text else "∅")
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in shown)
    return shown if len(shown) <= _LABEL_CHARS else shown[:_LABEL_CHARS - 1] + "…"


class LogitLensMap(Renderer):
    name = "logit_lens_map"
    version = "0.1.0"
    description = "one prompt's logit lens: layer x position maps of the next token's rank, top-1 tokens written in"
    probe = "logit_lens"
    Parameters = MapParameters
    Error = LogitLensMapError
    schema = SCHEMA

    def check(self, params, *, prompts, probe_params, model):
        read = None
        if getattr(probe_params, "layers", None) is not None:
            try:
                read = [resolve_layer(layer, model.num_layers) for layer in probe_params.layers]
            except ValueError:  # the probe's own check reports it
                pass
        return prompt_problems(params.prompt, prompts) + layer_choice_problems(params.layers, model.num_layers, read)

    def render(self, datasets, params=None):
        params = self.parameters(params)
        panels = [self._panel(model, ds, params) for model, ds, _ in
                  self.models(datasets, needs=("top_text", params.value))]
        return _draw(panels, params)

    def _panel(self, model, ds, params):
        prompts = index_values(ds, "prompt")
        if params.prompt not in prompts:
            raise self.Error(f"model {model!r} has no prompt {params.prompt} (it has {len(prompts)})")
        one = ds.isel(prompt=prompts.index(params.prompt))
        n = int(one["n_tokens"]) if "n_tokens" in one.coords else int((one["token_id"] >= 0).sum())
        layers = index_values(ds, "layer")
        chosen = layers
        if params.layers is not None:
            depth = int(ds.attrs.get("num_layers", max(layers) + 1))
            chosen = [resolve_layer(layer, depth) for layer in params.layers]
            missing = [layer_label(layer) for layer in chosen if layer not in layers]
            if missing:
                raise self.Error(f"model {model!r}: the dataset has no layer {', '.join(missing)} "
                                 f"(it has {', '.join(map(layer_label, layers))})")
        chosen = sorted(chosen)  # the embedding (-1) at the bottom, then depth upwards
        one = one.sel(layer=chosen).isel(token=slice(0, n))
        return {
            "model": model,
            "values": one[params.value].transpose("layer", "token").values,
            "top": one["top_text"].isel(rank=0).transpose("layer", "token").values,
            "hit": (one["top_id"].isel(rank=0) == one["target_id"]).transpose("layer", "token").values,
            "tokens": [coord_text(t) for t in one["token_text"].values],
            "targets": [coord_text(t) for t in one["target_text"].values],
            "layers": [layer_label(layer) for layer in chosen],
            "vocab": int(ds.attrs.get("vocab_size", 0)) or None,
        }


def _norm(panels, params):
    if params.value == "target_prob":
        return mcolors.Normalize(0.0, 1.0)
    top = max([p["vocab"] or np.nanmax(p["values"], initial=10.0) for p in panels])
    return mcolors.LogNorm(1.0, max(float(top), 10.0))


def _draw(panels, params):
    cmap = matplotlib.colormaps[params.cmap]
    if params.value == "target_rank":  # rank 1 is best: it takes the map's dark end
        cmap = cmap.reversed()
    cmap = cmap.with_extremes(bad="#f2f2f2")
    norm = _norm(panels, params)
    width = max(len(p["tokens"]) for p in panels) * _CELL_WIDTH + 2.4
    heights = [len(p["layers"]) * _CELL_HEIGHT + 1.3 for p in panels]
    figure = mfigure.Figure(figsize=(min(width, 30.0), sum(heights) + 0.4), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, panel in zip(axes, panels):
        image = ax.imshow(np.ma.masked_invalid(panel["values"]), origin="lower", aspect="auto", cmap=cmap,
                          norm=norm, interpolation="nearest")
        n_layers, n_tokens = panel["values"].shape
        ax.set_yticks(range(n_layers), panel["layers"], fontsize=7)
        ax.set_ylabel(f"{panel['model']}\nlayer", fontsize=9, parse_math=False)
        ax.set_xticks(range(n_tokens), [_label(t) for t in panel["tokens"]], rotation=90, fontsize=7.5,
                      parse_math=False)
        ax.set_xlabel("token read at the position", fontsize=8)
        top = ax.secondary_xaxis("top")
        top.set_xticks(range(n_tokens), [_label(t) if t else "" for t in panel["targets"]], rotation=90,
                       fontsize=7.5, parse_math=False)
        top.set_xlabel("next token (the target)", fontsize=8)
        ax.tick_params(length=0)
        if params.annotate:
            for (row, col), text in np.ndenumerate(panel["top"]):
                value = panel["values"][row, col]
                dark = np.isfinite(value) and _luminance(cmap(norm(value))) < 0.45
                ax.text(col, row, _label(coord_text(text)), ha="center", va="center", fontsize=5.5,
                        color="white" if dark else "#222222", parse_math=False,
                        fontweight="bold" if panel["hit"][row, col] else "normal")
    colorbar = figure.colorbar(image, ax=list(axes), shrink=0.9 if len(panels) > 1 else 1.0, aspect=30, pad=0.01)
    colorbar.set_label(_VALUE_LABELS[params.value], fontsize=8.5)
    colorbar.ax.tick_params(labelsize=7.5)
    colorbar.outline.set_linewidth(0.6)
    if params.value == "target_rank":
        colorbar.ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        colorbar.ax.minorticks_off()
        colorbar.ax.invert_yaxis()  # the best rank (1) at the top, like the best probability
    add_title(figure, params.title)
    return figure


def _luminance(rgba) -> float:
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b
