"""The ``similarity_by_distance`` renderer: mean token similarity against token distance.

It draws the ``token_similarity`` probe's summary (``form = "by_distance"``): for each
model one panel, for each layer one line of the mean similarity of a token's hidden state
with the tokens ``d`` positions before it, against ``d``. Lines are coloured by depth on
a sequential colour map (early layers dark, late ones light), labelled in a legend or,
beyond a dozen layers, by a colour bar of layers. The question it answers for a large
prompt set: does depth make near and far tokens alike, and how fast does similarity
fall with distance?

Every distance ``d`` averages over fewer pairs the larger it is (only prompts longer than
``d`` tokens have any), so the far end of a line is noisier: distances averaged over fewer
than ``min_pairs`` pairs are left out. Distance 0 (each token against itself, always 1
for cosine) is left out unless ``show_self``. Models share the y axis so their levels
compare; datasets combined along ``model`` count as one dataset per model.

It reads datasets only::

    from probescope.renderers.similarity_by_distance import SimilarityByDistanceRenderer

    figure = SimilarityByDistanceRenderer().render([small_ds, large_ds], {"log_distance": True})
    figure.savefig("distance.pdf")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from pydantic import Field, field_validator

from probescope import (
    EMBED, EMBED_LAYER, Layer, Problem, Renderer, RendererError, RendererParameters, add_title, coord_text,
    distinct_layers, hookimpl, known_colormap, layer_label, lazy_import, panel_grid, resolve_layer,
    layer_choice_problems,
)
from probescope.probes.token_similarity import BY_DISTANCE_SCHEMA, layers_read

matplotlib = lazy_import("matplotlib")
np = lazy_import("numpy")
xr = lazy_import("xarray")
mcolors = lazy_import("matplotlib.colors")
mfigure = lazy_import("matplotlib.figure")
mcm = lazy_import("matplotlib.cm")

#: Beyond this many layers a colour bar of layers replaces the legend.
_LEGEND_LAYERS = 12


class SimilarityByDistanceError(RendererError):
    """The datasets or the parameters cannot be drawn as similarity against distance."""


class SimilarityByDistanceParameters(RendererParameters):
    """Parameters of the ``similarity_by_distance`` renderer."""

    layers: Optional[tuple[Layer, ...]] = Field(
        None,
        description="Which layers to draw, one line each: block indices (0-based; negative "
        'ones count from the end of each model\'s blocks), "embed" or "last". Default: every '
        "layer in the datasets.",
    )
    min_pairs: int = Field(
        10,
        ge=1,
        description="Leave out distances averaged over fewer pairs of tokens than this (the "
        "far end, where only the longest prompts have pairs, is noisy).",
    )
    max_distance: Optional[int] = Field(
        None, ge=1, description="Draw distances up to this one. Default: every distance with enough pairs."
    )
    show_self: bool = Field(
        False,
        description="Draw distance 0, each token against itself (always 1 for cosine, so it "
        "stretches the scale).",
    )
    log_distance: bool = Field(
        False, description="A logarithmic distance axis (long prompts: near distances get the room)."
    )
    cmap: str = Field("viridis", description="Sequential matplotlib colour map; a line's colour is its depth.")
    columns: Optional[int] = Field(
        None, ge=1, description="At most this many model panels per row. Default: up to three."
    )

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, layers: Optional[tuple[Any, ...]]) -> Optional[tuple[Any, ...]]:
        return distinct_layers(layers)

    @field_validator("cmap")
    @classmethod
    def _check_cmap(cls, cmap: str) -> str:
        return known_colormap(cmap, "use a sequential one such as 'viridis', 'magma' or 'cividis'")


@dataclass
class _Panel:
    model: str
    layers: list[tuple[int, str]]  # (layer coordinate, label), drawn in this order
    distance: np.ndarray  # (distance,)
    mean: np.ndarray  # (layer, distance), NaN where left out
    num_layers: int


class SimilarityByDistanceRenderer(Renderer):
    """Mean similarity against token distance: one panel per model, one line per layer."""

    name = "similarity_by_distance"
    version = "0.1.0"
    probe = "token_similarity"
    description = (
        "Mean token similarity against token distance i - j (the token_similarity probe's "
        'form = "by_distance"): one panel per model, one line per layer coloured by depth.'
    )
    Parameters = SimilarityByDistanceParameters
    Error = SimilarityByDistanceError
    schema = BY_DISTANCE_SCHEMA

    def check(self, params, *, prompts, probe_params, model):
        problems = []
        if getattr(probe_params, "form", "by_distance") != "by_distance":
            problems.append(Problem("probe", 'similarity_by_distance draws token_similarity\'s summary: give the '
                                             'probe entry form = "by_distance" (similarity_grid draws "full")'))
        read = layers_read(probe_params, model.num_layers)
        return problems + layer_choice_problems(params.layers, model.num_layers, read)

    def render(self, datasets: Sequence[xr.Dataset], params: Any = None) -> mfigure.Figure:
        """Draw the ``by_distance`` datasets of ``token_similarity`` (one per model, in order).

        :raises SimilarityByDistanceError: no datasets, a dataset of the full form or of
            another probe, a layer a model does not have, nothing left to draw.
        """
        params = self.parameters(params)
        for index, ds in enumerate([datasets] if isinstance(datasets, xr.Dataset) else list(datasets or [])):
            if isinstance(ds, xr.Dataset) and "distance" not in ds.dims and "similarity" in ds:
                raise self.Error(
                    f"dataset {index} holds token_similarity's full form (every pair of tokens); "
                    'similarity_by_distance draws the probe\'s form = "by_distance" summary: run the probe '
                    'with form = "by_distance", or draw this one with similarity_grid')
        panels = [_panel(model, ds, params) for model, ds, _ in self.models(datasets, needs=("similarity", "n_pairs"))]
        return _draw(panels, params, _metric_label(datasets))


def _metric_label(datasets: Any) -> str:
    items = [datasets] if isinstance(datasets, xr.Dataset) else list(datasets)
    metrics = {ds.attrs.get("metric") for ds in items}
    if len(metrics) > 1:
        raise SimilarityByDistanceError(
            f"the datasets use different similarity metrics ({', '.join(sorted(map(str, metrics)))}); "
            "one axis cannot compare them: draw each metric in its own figure")
    metric = metrics.pop()
    return "mean " + {"cosine": "cosine similarity", "centred_cosine": "centred cosine similarity"}.get(
        metric, "similarity")


def _panel(model: str, ds: xr.Dataset, params: SimilarityByDistanceParameters) -> _Panel:
    sim = ds["similarity"].transpose("layer", "distance")
    present = np.isfinite(sim.values).any(axis=1)  # combined datasets: layers another model has are NaN
    available = [(int(v), coord_text(lab) if "layer_label" in ds.coords else layer_label(int(v)))
                 for v, lab, keep in zip(ds["layer"].values,
                                         ds["layer_label"].values if "layer_label" in ds.coords else ds["layer"].values,
                                         present) if keep]
    num_layers = int(ds.attrs.get("num_layers") or max([v for v, _ in available] + [0]) + 1)
    if params.layers is None:
        chosen = available
    else:
        chosen = []
        for want in params.layers:
            value = EMBED_LAYER if want == EMBED else _block(want, num_layers)
            match = [layer for layer in available if layer[0] == value]
            if not match:
                have = ", ".join(label for _, label in available)
                raise SimilarityByDistanceError(f"model {model!r} has no layer {want!r}; its layers are: {have}")
            chosen.append(match[0])
    rows = [[v for v, _ in available].index(v) for v, _ in chosen]
    mean = sim.values[present][rows].astype(float)
    distance = ds["distance"].values.astype(int)
    pairs = np.asarray(ds["n_pairs"].values, dtype=float)
    keep = (pairs >= params.min_pairs) & (distance >= (0 if params.show_self else 1))
    if params.max_distance is not None:
        keep &= distance <= params.max_distance
    if not keep.any() or not np.isfinite(mean[:, keep]).any():
        most = int(np.nanmax(np.where(distance > 0, pairs, np.nan))) if (distance > 0).any() else 0
        raise SimilarityByDistanceError(
            f"model {model!r}: no distance to draw (the most pairs at any distance above 0 is {most}, "
            f"min_pairs is {params.min_pairs}); lower min_pairs, or give longer prompts")
    return _Panel(model, chosen, distance[keep], mean[:, keep], num_layers)


def _block(want: Any, num_layers: int) -> Optional[int]:
    try:
        return resolve_layer(want, num_layers)
    except ValueError:
        return None


def _draw(panels: list[_Panel], params: SimilarityByDistanceParameters, ylabel: str) -> mfigure.Figure:
    n_rows, n_cols = panel_grid(len(panels), params.columns)
    figure = mfigure.Figure(figsize=(4.3 * n_cols + 1.2, 3.4 * n_rows + (0.4 if params.title else 0)), layout="constrained")
    axes = figure.subplots(n_rows, n_cols, sharey=True, squeeze=False)
    cmap = matplotlib.colormaps[params.cmap]
    # Colour = relative depth, so models of different depth read alike; the embedding is 0.
    legend = all(len(p.layers) <= _LEGEND_LAYERS for p in panels)
    for k, panel in enumerate(panels):
        ax = axes[k // n_cols][k % n_cols]
        for (value, label), line in zip(panel.layers, panel.mean):
            marker = "o" if len(panel.distance) <= 12 else None
            if value == EMBED_LAYER:  # not a block: grey and dashed, apart from block 0's dark line
                ax.plot(panel.distance, line, color="0.45", linestyle="--", linewidth=1.2, label="embedding",
                        marker=marker, markersize=3)
                continue
            depth = (value + 1) / panel.num_layers
            ax.plot(panel.distance, line, color=cmap(0.9 * depth), linewidth=1.4, label=f"layer {label}",
                    marker=marker, markersize=3)
        ax.axhline(0.0, color="0.6", linewidth=0.6, zorder=0)
        if params.log_distance:
            ax.set_xscale("log")
        ax.set_title(panel.model, fontsize=11, fontweight="bold", parse_math=False)
        ax.set_xlabel("token distance i − j", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, linewidth=0.4, color="0.9")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if k % n_cols == 0:
            ax.set_ylabel(ylabel, fontsize=9)
    for k in range(len(panels), n_rows * n_cols):
        axes[k // n_cols][k % n_cols].set_visible(False)
    same_layers = all([l for l in p.layers] == panels[0].layers for p in panels)
    if legend and same_layers:  # one legend beside the panels, not over any line
        handles, labels = axes[0][0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    elif legend:
        for k in range(len(panels)):
            axes[k // n_cols][k % n_cols].legend(fontsize=7, frameon=False)
    else:  # a colour bar of depth instead of a legend of many layers
        _depth_bar(figure, axes, panels, cmap)
    add_title(figure, params.title)
    return figure


def _depth_bar(figure: mfigure.Figure, axes: Any, panels: list[_Panel], cmap: Any) -> None:
    """The colour bar that stands for the legend of many layers. It spans the blocks
    only, in exactly the colours their lines have (block ``l`` of ``n``: ``0.9 * (l + 1) /
    n`` along the colour map): by block index when every model has the same depth, else
    by relative depth. The embedding's line is grey and dashed, not a colour of the bar:
    the label says so when it is drawn, and says nothing of the embedding when it is not."""
    depths = {p.num_layers for p in panels}
    top = depths.pop() if len(depths) == 1 else None
    embedding = any(value == EMBED_LAYER for p in panels for value, _ in p.layers)
    if top:
        shades = mcolors.ListedColormap(cmap(0.9 * np.linspace(1 / top, 1.0, 256)))
        norm, label = mcolors.Normalize(0, max(top - 1, 1)), "layer"
    else:
        shades = mcolors.ListedColormap(cmap(np.linspace(0.0, 0.9, 256)))
        norm, label = mcolors.Normalize(0, 1), "relative depth (1: last block)"
    if embedding:  # a second line, so that the label fits beside the bar
        label += "\n(grey dashed line: embedding)"
    bar = figure.colorbar(mcm.ScalarMappable(norm=norm, cmap=shades), ax=axes.ravel().tolist(), location="right",
                          aspect=30, pad=0.02)
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)


@hookimpl
def register_renderers(register):
    register(SimilarityByDistanceRenderer())
