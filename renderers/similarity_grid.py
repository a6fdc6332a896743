"""The ``similarity_grid`` renderer: token-by-token similarity heatmaps, models by layers.

It draws the datasets of the ``token_similarity`` probe (one per model) for one prompt:
one row per model, one column per chosen layer, each panel a lower-triangular heatmap of
the similarity between token ``i`` (row, top to bottom) and each earlier or equal
context token ``j <= i`` (column, left to right). Every panel shares one colour scale,
explained by a single labelled colour bar; the prompt's text is shown beside the grid.

Cosine similarity is signed, so the default colour map is diverging (red above 0, blue
below, white at 0) on limits symmetric about 0. The limits come from the pairs of
*distinct* tokens: the diagonal (a token against itself, always 1) is drawn but does not
set the top of the scale, and by default neither does the first token, whose massive
activations in trained models (its norm is a hundred times the others' in SmolLM2) make
it unlike every other token; values beyond the limits get the end colours and the colour
bar an arrow. Token labels are cleaned of tokenizers' markers: GPT-2's ``Ġ`` and
SentencePiece's ``▁`` become spaces (then trimmed), byte tokens (``<0xE2>``, or byte-level
characters of an incomplete UTF-8 sequence) become ``\xe2``.
Only the prompt's real tokens are drawn: padding added to batch prompts never appears.

The question the figure answers: do token representations become more alike with depth,
and does model size change that?

It reads datasets only, so a saved result can be drawn again without the models::

    from probescope.renderers.similarity_grid import SimilarityGridRenderer

    renderer = SimilarityGridRenderer()
    params = renderer.Parameters(prompt=0, layers=[1, 5, "last"])
    figure = renderer.render([small_ds, large_ds], params)
    figure.savefig("grid.pdf")
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from pydantic import Field, field_validator, model_validator

from probescope import (
    EMBED, EMBED_LAYER, Layer, Problem, Renderer, RendererError, RendererParameters, add_title, check_dataset,
    coord_text, distinct_layers,
    clean_token, hookimpl, index_values, known_colormap, layer_label, resolve_layer, lazy_import,
    layer_choice_problems, prompt_problems,
)
from probescope.probes.token_similarity import SCHEMA, as_pairs, layers_read, prompt_matrix

matplotlib = lazy_import("matplotlib")
np = lazy_import("numpy")
xr = lazy_import("xarray")
mcolors = lazy_import("matplotlib.colors")
mfigure = lazy_import("matplotlib.figure")
mticker = lazy_import("matplotlib.ticker")


#: How a layer is chosen, as in the token_similarity probe's ``layers``: a block index
#: (0-based; negative counts from the end of each model's blocks, so -1 is its last block),
#: ``"embed"`` for the embedding output, or ``"last"`` (the same as -1).
LayerChoice = Layer

_METRIC_LABELS = {
    "cosine": "cosine similarity",
    "centred_cosine": "centred cosine similarity",
}

# Layout constants, in inches unless noted.
_MAX_GRID_WIDTH = 15.0
_MIN_PANEL = 1.5
_PROMPT_PANEL_WIDTH = 2.4
_PROMPT_FONT = 8.5  # points
_MAX_TICK_FONT = 8.0  # points
_MIN_TICK_FONT = 4.5  # points: below this token labels give way to positions
_TOKEN_LABEL_CHARS = 12


class SimilarityGridError(RendererError):
    """The datasets or the parameters cannot be drawn as a similarity grid."""


class SimilarityGridParameters(RendererParameters):
    """Parameters of the ``similarity_grid`` renderer."""

    prompt: int = Field(
        0,
        ge=0,
        description="Which prompt to draw, by its index in the run (the dataset's "
        "`prompt` coordinate, 0 for the first prompt).",
    )
    layers: Optional[tuple[LayerChoice, ...]] = Field(
        None,
        description="Which layers to draw, one column each, in this order: block indices "
        "(0-based; negative ones count from the end of each model's blocks, as in the "
        "probe's `layers`), \"embed\" or \"last\" (each model's last block, like -1). Every model must have every layer asked for. Default: every layer in the "
        "datasets (at most `max_columns` of them, evenly spaced); models with different "
        "layers then each get their own row of layers, every panel titled.",
    )
    max_columns: Optional[int] = Field(
        8,
        ge=1,
        description="When `layers` is not given and a model has more layers than this, "
        "draw this many evenly spaced ones, first and last included. None draws them all.",
    )
    vmin: Optional[float] = Field(
        None,
        allow_inf_nan=False,
        description="Bottom of the shared colour scale. Default: minus the top (`symmetric`), "
        "else the smallest similarity of two distinct tokens.",
    )
    vmax: Optional[float] = Field(
        None,
        allow_inf_nan=False,
        description="Top of the shared colour scale. Default: the largest |similarity| of "
        "two distinct tokens (`symmetric`), else the largest; never the diagonal's 1.",
    )
    symmetric: bool = Field(
        True,
        description="Default limits symmetric about 0, so that 0 is the diverging map's "
        "white. False: the default limits span the values drawn (pick a sequential `cmap`).",
    )
    first_token_in_limits: bool = Field(
        False,
        description="Let the first token's similarities set the default limits. Off by "
        "default: trained models give the first token massive activations that make it "
        "unlike every other token (it is still drawn).",
    )
    cmap: str = Field(
        "RdBu_r",
        description="Name of a matplotlib colour map; the default diverging red-blue suits "
        "signed similarity with `symmetric` limits.",
    )
    show_diagonal: bool = Field(
        True,
        description="Draw the diagonal (each token against itself, always 1). Hiding it "
        "lets the default colour scale spread over the pairs of distinct tokens.",
    )
    max_token_labels: int = Field(
        40,
        ge=0,
        description="Label the axes with the tokens' text when a prompt has at most this "
        "many tokens (and the labels fit); otherwise mark token positions.",
    )
    panel_size: Optional[float] = Field(
        None,
        gt=0,
        le=20,
        description="Side of each square panel in inches. Default: chosen from the "
        "number of tokens and columns.",
    )
    show_prompt: bool = Field(True, description="Show the prompt's text beside the grid.")
    show_image: bool = Field(
        True,
        description="Show the prompt's image (the dataset's thumbnail, when it has one) beside "
        "the grid, above the prompt, and mark its tokens' spans on the axes.",
    )

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, layers: Optional[tuple[Any, ...]]) -> Optional[tuple[Any, ...]]:
        return distinct_layers(layers)

    @field_validator("cmap")
    @classmethod
    def _check_cmap(cls, cmap: str) -> str:
        return known_colormap(cmap, "use one of matplotlib's names such as 'YlOrRd', 'Reds', "
                                    "'Blues', 'viridis' or 'magma'")

    @model_validator(mode="after")
    def _check_limits(self) -> "SimilarityGridParameters":
        if self.vmin is not None and self.vmax is not None and self.vmin >= self.vmax:
            raise ValueError(f"vmin ({self.vmin}) must be below vmax ({self.vmax})")
        return self


@dataclass
class _Panel:
    layer: int  # value of the ``layer`` coordinate
    label: str  # value of ``layer_label``: "embed" or the block index
    data: np.ma.MaskedArray  # (n, n), masked above the diagonal and where NaN

    @property
    def title(self) -> str:
        return "Embedding" if self.label == "embed" else f"Layer {self.label}"


@dataclass
class _Row:
    model: str
    n_tokens: int
    tokens: list[str]
    prompt_text: Optional[str]
    metric: Optional[str]
    layers: list[tuple[int, str]]  # every layer the dataset has: (value, label)
    similarity: xr.DataArray  # this prompt's values, dims (layer, token, context_token)
    num_layers: int  # blocks in the model, for negative layer choices
    panels: list[_Panel] = field(default_factory=list)
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # image tokens: (start, stop, label)
    thumbnail: Optional[np.ndarray] = None  # (height, width, 3) uint8


class SimilarityGridRenderer(Renderer):
    """Lower-triangular token similarity heatmaps: one row per model, one column per layer.

    Draws the ``token_similarity`` datasets of one run for one prompt, all panels on one
    colour scale with a labelled colour bar, model names as row labels, ``Layer N`` as
    column titles, token text on the axes when it fits, and the prompt beside the grid.
    """

    name = "similarity_grid"
    version = "0.1.0"
    probe = "token_similarity"
    description = (
        "Token-by-token similarity of hidden states for one prompt, as lower-triangular "
        "heatmaps: one row per model, one column per layer, one shared colour scale."
    )
    Parameters = SimilarityGridParameters
    Error = SimilarityGridError
    schema = SCHEMA

    def check(self, params, *, prompts, probe_params, model):
        """The prompt must be one of the run's, and every layer one the probe reads."""
        problems = []
        if getattr(probe_params, "form", "full") != "full":
            problems.append(Problem("probe", f'similarity_grid draws every pair of tokens of one prompt, which '
                                             f'token_similarity\'s form = "{probe_params.form}" does not keep: '
                                             'draw it with similarity_by_distance, or give the probe form = "full"'))
        problems += prompt_problems(params.prompt, prompts)
        read = layers_read(probe_params, model.num_layers)
        return problems + layer_choice_problems(params.layers, model.num_layers, read)

    def render(self, datasets: Sequence[xr.Dataset], params: Any = None) -> mfigure.Figure:
        """Draw one prompt of the ``token_similarity`` datasets (one per model, in order).

        :param datasets: the probe's datasets; a dataset with a ``model`` dimension
            (results combined along models) counts as one dataset per model.
        :param params: :class:`SimilarityGridParameters`, a mapping of them, or None
            for the defaults.
        :raises SimilarityGridError: no datasets, a dataset that is not a
            ``token_similarity`` result, a prompt or layer a model does not have.
        """
        params = self.parameters(params)
        for index, ds in enumerate([datasets] if isinstance(datasets, xr.Dataset) else list(datasets or [])):
            if isinstance(ds, xr.Dataset) and "distance" in ds.dims:
                raise self.Error(f'dataset {index} holds token_similarity\'s form = "by_distance" summary (a mean per '
                                 "layer and distance), not every pair of tokens of each prompt: draw it with "
                                 'similarity_by_distance, or run the probe with form = "full"')
        # Files of earlier probescope versions hold the dense layout: read as pairs alike.
        models = [(model, as_pairs(ds) if "similarity" in ds else ds, combined)
                  for model, ds, combined in self.models(datasets, needs=())]
        for model, ds, _ in models:
            check_dataset(ds, self.schema, model=model, renderer=self.name, error=self.Error, needs=("similarity",))
        rows = _rows(models, params)
        metric = _metric_label(rows)
        norm = _norm(rows, params)
        return _draw(rows, params, norm, metric)


# --------------------------------------------------------------------------------------
# Reading the datasets


def _without_padding(models: list[tuple[str, xr.Dataset, bool]]) -> list[tuple[str, xr.Dataset]]:
    """(model name, dataset) per model; in datasets combined along ``model``, the layers
    combining padded with NaN (a layer another model has) are dropped."""
    out = []
    for model, ds, combined in models:
        if combined:
            sim = ds["similarity"]
            other = [d for d in sim.dims if d != "layer"]
            ds = ds.isel(layer=np.flatnonzero(sim.notnull().any(other).values))
        out.append((model, ds))
    return out


def _rows(models: list[tuple[str, xr.Dataset, bool]], params: SimilarityGridParameters) -> list[_Row]:
    rows = [_row(model, ds, params.prompt) for model, ds in _without_padding(models)]

    texts = {row.prompt_text for row in rows if row.prompt_text is not None}
    if len(texts) > 1:
        listing = "; ".join(f"{row.model!r}: {row.prompt_text!r}" for row in rows)
        raise SimilarityGridError(
            f"the datasets disagree on the text of prompt {params.prompt} ({listing}); "
            "draw datasets of the same prompts together"
        )

    for row in rows:
        chosen = _choose_layers(row, params)
        row.panels = [_panel(row, value, label, params) for value, label in chosen]
    return rows


def _row(model: str, ds: xr.Dataset, prompt: int) -> _Row:
    # The schema has checked 'similarity' and its dimensions.
    # Find the prompt by its index (the coordinate), not by position in the file.
    indices = index_values(ds, "prompt")
    if prompt not in indices:
        if not indices:
            have = "no prompts"
        elif indices == list(range(len(indices))):
            have = f"{len(indices)} prompt(s), indices 0 to {len(indices) - 1}"
        else:
            have = f"prompts {', '.join(map(str, indices))}"
        raise SimilarityGridError(
            f"prompt {prompt} is out of range for model {model!r}: it has {have}"
        )
    pos = indices.index(prompt)
    one = ds.isel(prompt=pos)
    similarity = prompt_matrix(ds, prompt)  # (layer, token, context_token) of its real tokens

    size = similarity.sizes["token"]
    if "n_tokens" in one:
        n = int(one["n_tokens"].values)
    elif "token_id" in one:
        n = int((one["token_id"].values >= 0).sum())
    else:
        diagonal = np.diagonal(similarity.values, axis1=-2, axis2=-1)
        n = int(np.isfinite(diagonal).any(axis=0).sum())
    n = min(n, size)
    if n <= 0:
        raise SimilarityGridError(f"model {model!r}: prompt {prompt} has no tokens to draw")

    if "token_text" in one:
        tokens = [coord_text(t) for t in one["token_text"].values[:n]]
    else:
        tokens = [str(i) for i in range(n)]

    prompt_text = coord_text(one["prompt_text"].values) if "prompt_text" in one else None
    metric = ds.attrs.get("metric")

    values = index_values(ds, "layer")
    if "layer_label" in ds.coords or "layer_label" in ds:
        labels = [coord_text(v) for v in ds["layer_label"].values]
    else:
        labels = [layer_label(v) for v in values]
    layers = list(zip(values, labels))
    # The model's depth, for negative layer choices; datasets written without it fall
    # back to the deepest block they hold.
    num_layers = int(ds.attrs.get("num_layers", max([v + 1 for v, lab in layers if lab != "embed"], default=0)))
    row = _Row(model, n, tokens, prompt_text, str(metric) if metric else None, layers, similarity, num_layers)
    row.spans = _image_spans(one, n)
    row.thumbnail = _thumbnail(one)
    return row


def _image_spans(one: xr.Dataset, n: int) -> list[tuple[int, int, str]]:
    """Runs of consecutive image tokens (``token_kind`` 1) among the first ``n`` tokens,
    as ``(start, stop, label)``: one label per run (an image, or each tile of a split
    image), never one per token."""
    if "token_kind" not in one:
        return []
    meanings = str(one["token_kind"].attrs.get("flag_meanings", "text image special")).split()
    if "image" not in meanings:
        return []
    image = np.asarray(one["token_kind"].values[:n]) == meanings.index("image")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], image.astype(np.int8), [0]])))
    runs = list(zip(edges[::2].tolist(), edges[1::2].tolist()))
    if len(runs) == 1:
        return [(runs[0][0], runs[0][1], "image")]
    return [(start, stop, f"tile {k + 1}") for k, (start, stop) in enumerate(runs)]


def _thumbnail(one: xr.Dataset) -> Optional[np.ndarray]:
    """This prompt's image as kept in the dataset, or None."""
    if "thumbnail" not in one or "thumbnail_height" not in one or "thumbnail_width" not in one:
        return None
    h, w = int(one["thumbnail_height"].values), int(one["thumbnail_width"].values)
    if h <= 0 or w <= 0:
        return None
    return np.asarray(one["thumbnail"].transpose("pixel_row", "pixel_column", "channel").values[:h, :w],
                      dtype=np.uint8)


def _choose_layers(row: _Row, params: SimilarityGridParameters) -> list[tuple[int, str]]:
    available = sorted(row.layers)
    if not available:
        raise SimilarityGridError(f"model {row.model!r}: the dataset has no layers")
    if params.layers is None:
        if params.max_columns is not None and len(available) > params.max_columns:
            picks = np.unique(np.round(np.linspace(0, len(available) - 1, params.max_columns)))
            return [available[int(i)] for i in picks]
        return available

    chosen = []
    for want in params.layers:
        try:
            value = resolve_layer(want, row.num_layers)
        except ValueError:  # a block this model does not have
            value = None
        if want == EMBED:
            match = [layer for layer in available if layer[1] == EMBED or layer[0] == EMBED_LAYER]
        else:
            match = [layer for layer in available if layer[0] == value and layer[1] != EMBED]
        if not match:
            have = ", ".join(label for _, label in available)
            raise SimilarityGridError(
                f"model {row.model!r} has no layer {want!r}; its layers are: {have}"
            )
        chosen.append(match[0])
    return chosen


def _panel(row: _Row, value: int, label: str, params: SimilarityGridParameters) -> _Panel:
    values = [v for v, _ in row.layers]
    n = row.n_tokens
    data = np.asarray(row.similarity.isel(layer=values.index(value)).values, dtype=float)[:n, :n]
    hide = np.triu(np.ones((n, n), dtype=bool), k=0 if not params.show_diagonal else 1)
    hide |= ~np.isfinite(data)
    return _Panel(value, label, np.ma.masked_array(data, mask=hide))


def _metric_label(rows: list[_Row]) -> str:
    metrics = {row.metric for row in rows if row.metric}
    if len(metrics) > 1:
        listing = ", ".join(f"{row.model!r}: {row.metric}" for row in rows)
        raise SimilarityGridError(
            f"the datasets use different similarity metrics ({listing}); one colour scale "
            "cannot compare them: draw each metric in its own figure"
        )
    if not metrics:
        return "similarity"
    metric = metrics.pop()
    return _METRIC_LABELS.get(metric, f"{metric.replace('_', ' ')} similarity")


def _limit_values(row: _Row, panel: _Panel, params: SimilarityGridParameters) -> np.ndarray:
    """The values that set the default limits: distinct tokens only (below the
    diagonal), without the first token unless asked (and unless nothing else is left)."""
    data = panel.data.filled(np.nan)
    below = np.tril(np.ones(data.shape, dtype=bool), k=-1)
    if not params.first_token_in_limits and row.n_tokens > 2:
        below[:, 0] = False
    values = data[below]
    values = values[np.isfinite(values)]
    if values.size == 0:  # one or two tokens: only the diagonal (or one pair) to go by
        values = panel.data.compressed()
    return values


def _norm(rows: list[_Row], params: SimilarityGridParameters) -> mcolors.Normalize:
    drawn = [panel.data.compressed() for row in rows for panel in row.panels]
    values = np.concatenate(drawn) if drawn else np.array([])
    if values.size == 0:
        raise SimilarityGridError(
            f"prompt {params.prompt}: no similarity values to draw (every value is NaN)"
        )
    basis = np.concatenate([_limit_values(row, panel, params) for row in rows for panel in row.panels])
    low, high = float(values.min()), float(values.max())
    if params.symmetric:
        top = float(np.abs(basis).max()) or 1.0
        default_low, default_high = -top, top
    else:
        default_low, default_high = float(basis.min()), float(basis.max())
    if params.vmin is not None and params.vmax is None and params.symmetric:
        default_high = max(default_high, -params.vmin)
    if params.vmax is not None and params.vmin is None and params.symmetric:
        default_low = min(default_low, -params.vmax)
    vmin = params.vmin if params.vmin is not None else default_low
    vmax = params.vmax if params.vmax is not None else default_high
    if vmin >= vmax:
        if params.vmin is None and params.vmax is None:  # every value drawn is the same
            vmin, vmax = (vmax - 1.0, vmax) if vmax > 0 else (vmin, vmin + 1.0)
        elif params.vmax is None:
            raise SimilarityGridError(
                f"vmin ({vmin}) is not below the largest value drawn ({high:.4g}); "
                "give vmax as well, or a smaller vmin"
            )
        else:
            raise SimilarityGridError(
                f"vmax ({vmax}) is not above the smallest value drawn ({low:.4g}); "
                "give vmin as well, or a larger vmax"
            )
    return mcolors.Normalize(vmin=vmin, vmax=vmax)


def _extend(rows: list[_Row], norm: mcolors.Normalize) -> str:
    """Colour bar arrows on the sides where drawn values lie beyond the limits."""
    values = np.concatenate([panel.data.compressed() for row in rows for panel in row.panels])
    low, high = values.min() < norm.vmin - 1e-6, values.max() > norm.vmax + 1e-6
    return {(True, True): "both", (True, False): "min", (False, True): "max"}.get((bool(low), bool(high)), "neither")


# --------------------------------------------------------------------------------------
# Drawing


def _draw(
    rows: list[_Row], params: SimilarityGridParameters, norm: mcolors.Normalize, metric: str
) -> mfigure.Figure:
    n_rows = len(rows)
    n_cols = max(len(row.panels) for row in rows)
    shared_columns = all(
        [p.label for p in row.panels] == [p.label for p in rows[0].panels] for row in rows
    )

    # Panel size: room for the token labels of the longest labelled prompt, within a
    # sensible figure width.
    labelled = [row.n_tokens for row in rows if row.n_tokens <= params.max_token_labels]
    if params.panel_size is not None:
        side = params.panel_size
    else:
        side = min(4.4, max(1.9, 0.1 * max(labelled) + 0.9)) if labelled else 2.2
        side = max(_MIN_PANEL, min(side, _MAX_GRID_WIDTH / n_cols - 0.2))

    # Per row: token labels (and their font size) or plain positions.
    fonts = []
    for row in rows:
        size = min(_MAX_TICK_FONT, 0.8 * side * 72 / row.n_tokens)
        use = row.n_tokens <= params.max_token_labels and size >= _MIN_TICK_FONT
        fonts.append(size if use else None)

    def label_extent(row: _Row, font: Optional[float]) -> float:
        """Inches taken by a row's tick labels (their longest text, rotated or not)."""
        if font is None:
            return 0.25
        longest = max(len(_display_token(t)) for t in row.tokens)
        return 0.1 + longest * 0.62 * font / 72

    y_label = max(label_extent(r, f) for r, f in zip(rows, fonts)) + 0.35
    title_h = 0.3
    heights = [side + title_h + label_extent(r, f) + 0.1 for r, f in zip(rows, fonts)]
    grid_w = y_label + n_cols * (side + 0.15) + 1.0  # + colour bar
    grid_h = sum(heights) + (0.45 if params.title else 0.1)
    prompt_w = _PROMPT_PANEL_WIDTH if params.show_prompt else 0.0
    figure = mfigure.Figure(figsize=(grid_w + prompt_w, max(grid_h, 2.4)), layout="constrained")

    if params.show_prompt:
        grid_fig, prompt_fig = figure.subfigures(
            1, 2, width_ratios=[grid_w, prompt_w], wspace=0.0
        )
    else:
        grid_fig, prompt_fig = figure, None

    cmap = matplotlib.colormaps[params.cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    spec = grid_fig.add_gridspec(n_rows, n_cols, height_ratios=heights)
    axes = []
    image = None
    for r, (row, font) in enumerate(zip(rows, fonts)):
        labels = [_display_token(t) for t in row.tokens]
        for c, panel in enumerate(row.panels):
            ax = grid_fig.add_subplot(spec[r, c])
            axes.append(ax)
            image = ax.imshow(
                panel.data, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal"
            )
            ax.set_xlim(-0.5, row.n_tokens - 0.5)
            ax.set_ylim(row.n_tokens - 0.5, -0.5)
            for side_name in ("top", "right"):
                ax.spines[side_name].set_visible(False)
            ax.tick_params(length=2, width=0.6, pad=1.5)
            if font is not None:
                ax.set_xticks(range(row.n_tokens))
                ax.set_xticklabels(labels, rotation=90, fontsize=font, parse_math=False)
                ax.set_yticks(range(row.n_tokens))
                ax.set_yticklabels(labels, fontsize=font, parse_math=False)
            else:
                for axis in (ax.xaxis, ax.yaxis):
                    axis.set_major_locator(mticker.MaxNLocator(nbins=5, integer=True, min_n_ticks=2))
                ax.tick_params(labelsize=7)
            if params.show_image and row.spans:
                _mark_spans(ax, row, labels if font is not None else None, font)
            if c > 0:
                ax.tick_params(labelleft=False)
            else:
                ax.set_ylabel(
                    row.model, fontsize=11, fontweight="bold", labelpad=6, parse_math=False
                )
            if r == 0 or not shared_columns:
                ax.set_title(panel.title, fontsize=10, pad=4)

    colorbar = grid_fig.colorbar(
        image, ax=axes, location="right", shrink=min(1.0, 0.35 + 0.3 * n_rows), aspect=30, pad=0.02,
        extend=_extend(rows, norm), extendfrac=0.04,
    )
    colorbar.set_label(metric, fontsize=9)
    colorbar.ax.tick_params(labelsize=8)
    colorbar.outline.set_linewidth(0.6)

    if prompt_fig is not None:
        _draw_prompt(prompt_fig, rows, params, figure.get_figheight())
    add_title(figure, params.title)
    return figure


def _draw_prompt(
    sub: Any, rows: list[_Row], params: SimilarityGridParameters, height: float
) -> None:
    """The prompt's image (when the dataset keeps one) and text, beside the grid."""
    thumbnail = next((row.thumbnail for row in rows if row.thumbnail is not None), None)
    if params.show_image and thumbnail is not None:
        _draw_image(sub, thumbnail, rows)
        top = 0.47
    else:
        top = 0.93
    text = rows[0].prompt_text
    if text is None:  # no prompt_text coordinate: rebuild it from the first model's tokens
        text = "".join(rows[0].tokens)
    chars = max(12, int(_PROMPT_PANEL_WIDTH * 0.85 * 72 / (_PROMPT_FONT * 0.55)))
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, chars, replace_whitespace=False) or [""])
    room = max(1, int(height * 0.8 * 72 / (_PROMPT_FONT * 1.35)) - 2)
    if len(lines) > room:
        lines = lines[: room - 1] + [lines[room - 1][: chars - 1] + "…"]
    if top < 0.9:  # the image takes the top half: keep the text to the rest
        room = max(1, room // 2)
        if len(lines) > room:
            lines = lines[: room - 1] + [lines[room - 1][: chars - 1] + "…"]
    sub.text(
        0.06, top, f"Prompt {params.prompt}", fontsize=9.5, fontweight="bold",
        va="bottom", ha="left", transform=sub.transSubfigure, parse_math=False,
    )
    sub.text(
        0.06, top - 0.02, "\n".join(lines), fontsize=_PROMPT_FONT, va="top", ha="left",
        linespacing=1.35, transform=sub.transSubfigure, parse_math=False,
        bbox={"boxstyle": "round,pad=0.5", "facecolor": "#f6f6f6", "edgecolor": "#bbbbbb",
              "linewidth": 0.6},
    )


#: Colour of the marks of image tokens on the axes.
_IMAGE_COLOUR = "#2b6cb0"


def _draw_image(sub: Any, thumbnail: np.ndarray, rows: list[_Row]) -> None:
    """The prompt's image in the top half of the panel beside the grid, with how many
    tokens each model makes of it."""
    ax = sub.add_axes((0.06, 0.53, 0.88, 0.38))
    ax.imshow(thumbnail, interpolation="lanczos" if max(thumbnail.shape[:2]) < 96 else "antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(_IMAGE_COLOUR)
        spine.set_linewidth(1.2)
    counts = {sum(stop - start for start, stop, _ in row.spans) for row in rows}
    what = f"{counts.pop()} image tokens" if len(counts) == 1 else "image tokens: " + ", ".join(
        f"{row.model} {sum(b - a for a, b, _ in row.spans)}" for row in rows)
    sub.text(0.06, 0.93, "Image", fontsize=9.5, fontweight="bold", va="bottom", ha="left",
             transform=sub.transSubfigure, parse_math=False)
    sub.text(0.94, 0.93, what, fontsize=7.5, color=_IMAGE_COLOUR, va="bottom", ha="right",
             transform=sub.transSubfigure, parse_math=False)


def _mark_spans(ax: Any, row: _Row, labels: Optional[list[str]], font: Optional[float]) -> None:
    """Mark each run of image tokens with a coloured bar beside both axes and one label
    per run at its middle, in place of its tokens' own labels (real checkpoints have
    hundreds of image tokens)."""
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import blended_transform_factory

    along_x = blended_transform_factory(ax.transData, ax.transAxes)
    along_y = blended_transform_factory(ax.transAxes, ax.transData)
    for start, stop, _ in row.spans:
        width = stop - start
        ax.add_patch(Rectangle((start - 0.5, -0.022), width, 0.016, transform=along_x, clip_on=False,
                               facecolor=_IMAGE_COLOUR, edgecolor="none"))
        ax.add_patch(Rectangle((-0.022, start - 0.5), 0.016, width, transform=along_y, clip_on=False,
                               facecolor=_IMAGE_COLOUR, edgecolor="none"))
    middles = {(start + stop - 1) // 2: label for start, stop, label in row.spans}
    inside = {i for start, stop, _ in row.spans for i in range(start, stop)}
    if labels is not None:  # token labels: the image's tokens give way to one label per run
        ticks = [i for i in range(row.n_tokens) if i not in inside or i in middles]
        shown = [middles.get(i, labels[i]) for i in ticks]
    else:  # positions: keep those outside the image, add one label per run
        every = mticker.MaxNLocator(nbins=5, integer=True, min_n_ticks=2).tick_values(0, row.n_tokens - 1)
        plain = [int(t) for t in every if 0 <= t < row.n_tokens and int(t) not in inside]
        ticks = sorted(set(plain) | set(middles))
        shown = [middles.get(t, str(t)) for t in ticks]
        font = 7
    ax.set_xticks(ticks)
    ax.set_xticklabels(shown, rotation=90, fontsize=font, parse_math=False)
    ax.set_yticks(ticks)
    ax.set_yticklabels(shown, fontsize=font, parse_math=False)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for tick, text in zip(tick_labels, shown):
            if text in middles.values() and ticks[shown.index(text)] in middles:
                tick.set_color(_IMAGE_COLOUR)
                tick.set_fontweight("bold")
                tick.set_fontsize(max(font or 0, 7.5))


def _display_token(text: str, limit: int = _TOKEN_LABEL_CHARS) -> str:
    """A token's text as a readable tick label: markers cleaned (:func:`clean_token`),
    surrounding spaces trimmed, control characters escaped, a token of only spaces shown
    as open boxes, long tokens shortened."""
    text = clean_token(text)
    if text == "":
        return "∅"
    if text.strip(" ") == "":
        shown = "␣" * len(text)
    else:
        shown = "".join(
            ch if ch == " " or ch.isprintable() else repr(ch)[1:-1] for ch in text.strip(" ")
        )
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return shown


@hookimpl
def register_renderers(register):
    register(SimilarityGridRenderer())
