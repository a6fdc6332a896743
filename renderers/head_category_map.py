"""The ``head_category_map`` renderer: which kinds of operation each attention head implements.

It draws the datasets of the ``head_classifier`` probe (MAPS, Elhelo & Geva, "Inferring
Functionality of Attention Heads from their Parameters", ACL 2025), one per model: one
panel per model, **layers on the x axis** and **heads on the y axis with head 0 at the
bottom** (as in the paper's figure, which draws heads against layers), every cell coloured
by the head's ``category`` flag:

- grey for *unclassified* heads (in no category),
- one fixed colour per category for heads in exactly one: the four built-in categories
  (algorithmic, knowledge, linguistic, translation) always get the same colour-blind
  friendly Okabe-Ito colours, categories a user adds get further palette colours,
- a dark purple ramp for heads in several categories, darker for more ("2 categories",
  "3 categories", ...; with more than four categories the ramp has more steps).

The colours come from the CF flag attributes of ``category`` (``flag_values``,
``flag_meanings``), not from positions, so the same meaning has the same colour in every
panel and every figure. A cell without a flag (NaN: layers or heads a smaller model lacks
after :func:`probescope.results.combine`, or any other missing value) is left blank
(white), never drawn as unclassified.

One legend for the whole figure, below the panels so it never covers a cell. It lists
**every meaning the datasets' ``flag_meanings`` define**, used by a head or not, so that
figures of different models or thresholds share one legend and can be compared side by
side; a "No data" entry is added when some cell is blank.

With ``scores`` it draws numbers instead of categories: each head's relation score
(``relation_score``) for one relation, the highest over one category's relations, or the
highest over all relations (``scores = "max"``), on one sequential scale from 0 to 1 with
a colour bar, so heads just under the threshold are visible too.

Several models: one panel each, side by side (up to three in a row, a 2 x 2 grid for
four, three per row beyond; ``columns`` chooses), titled with the model names. Each panel
has its own axis limits, so models of different depth and width each fill their panel.
Ticks are integers at round steps (at most eight per axis) and include 0.

It reads datasets only, so a saved result can be drawn again without the models::

    import xarray as xr
    from probescope.renderers.head_category_map import HeadCategoryMapRenderer

    renderer = HeadCategoryMapRenderer()
    params = renderer.Parameters(title="Head categories", colors={"knowledge": "tab:red"})
    figure = renderer.render([xr.open_dataset("gpt2.nc"), xr.open_dataset("phi2.nc")], params)
    figure.savefig("heads.pdf")
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Union

from pydantic import Field, field_validator

from probescope import (
    Renderer, RendererError, RendererParameters, add_title, coord_text, hookimpl, index_values, known_colormap,
    panel_grid, lazy_import,
)
from probescope.probes.head_classifier import SCHEMA

matplotlib = lazy_import("matplotlib")
np = lazy_import("numpy")
xr = lazy_import("xarray")
mcolors = lazy_import("matplotlib.colors")
mfigure = lazy_import("matplotlib.figure")
mpatches = lazy_import("matplotlib.patches")
mticker = lazy_import("matplotlib.ticker")


#: The flag meaning of heads in no category.
UNCLASSIFIED = "unclassified"

#: Light grey for unclassified heads: visible against the white of blank cells, and
#: quieter than any category colour.
UNCLASSIFIED_COLOR = "#d9d9d9"

#: Fixed colours of the four built-in MAPS categories (Okabe-Ito, colour-blind friendly):
#: blue, orange, bluish green, reddish purple.
CATEGORY_COLORS = {
    "algorithmic": "#0072b2",
    "knowledge": "#e69f00",
    "linguistic": "#009e73",
    "translation": "#cc79a7",
}

#: Colours for categories a user adds, in the order they first appear in the datasets:
#: the rest of Okabe-Ito (sky blue, vermillion, yellow), then Tableau brown, cyan and
#: olive. Beyond these, Tableau 20's colours are used in turn.
EXTRA_CATEGORY_COLORS = ("#56b4e9", "#d55e00", "#f0e442", "#8c564b", "#17becf", "#bcbd22")

#: The sequential colour map the multi-category flags are drawn from, light to dark: the
#: more categories a head is in, the darker its cell.
MULTI_CATEGORY_CMAP = "Purples"
_MULTI_RAMP = (0.45, 1.0)  # the part of MULTI_CATEGORY_CMAP used: no near-white purples

#: Colour of cells without a flag (NaN), and their legend entry.
NO_DATA_COLOR = "#ffffff"
NO_DATA_LABEL = "No data"

_MULTI_MEANING = re.compile(r"^(\d+)_categor(?:y|ies)$")

# Layout, in inches unless noted.
_TICK_FONT = 8.0  # points
_MAX_TICKS = 8  # per axis
_TITLE_H = 0.35
_XLABEL_H = 0.5
_YLABEL_W = 0.65
_LEGEND_ENTRY_W = 1.45
_LEGEND_ROW_H = 0.24


def multi_category_colors(count: int) -> list[str]:
    """``count`` colours for the multi-category flags (2, 3, ... categories), light to
    dark, sampled evenly from :data:`MULTI_CATEGORY_CMAP`."""
    if count <= 0:
        return []
    cmap = matplotlib.colormaps[MULTI_CATEGORY_CMAP]
    low, high = _MULTI_RAMP
    points = [0.5 * (low + high)] if count == 1 else np.linspace(low, high, count)
    return [mcolors.to_hex(cmap(float(p))) for p in points]


def meaning_label(meaning: str) -> str:
    """A flag meaning as a legend label: ``"knowledge"`` -> ``"Knowledge"``,
    ``"2_categories"`` -> ``"2 categories"``, ``"word_order"`` -> ``"Word order"``."""
    text = meaning.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


class HeadCategoryMapError(RendererError):
    """The datasets or the parameters cannot be drawn as a head category map."""


ColorValue = Union[str, tuple[float, float, float], tuple[float, float, float, float]]


class HeadCategoryMapParameters(RendererParameters):
    """Parameters of the ``head_category_map`` renderer."""

    columns: Optional[int] = Field(
        None,
        ge=1,
        description="Panels per row. Default: all in one row for up to three models, "
        "2 x 2 for four, three per row beyond.",
    )
    colors: Optional[dict[str, ColorValue]] = Field(
        None,
        description="Colours to use instead of the defaults, by flag meaning as the "
        "datasets' `flag_meanings` spell it: \"unclassified\", a category "
        "(\"knowledge\"), or \"2_categories\", \"3_categories\", ... Any matplotlib "
        "colour: a name (\"tab:red\"), a hex code (\"#1f77b4\") or an RGB(A) tuple. Every "
        "meaning named must be defined by some dataset drawn.",
    )
    scores: Optional[str] = Field(
        None,
        description="Draw relation scores instead of categories: \"max\" (each head's highest "
        "score over every relation), a relation name (\"name_copying\") or a category name "
        "(\"knowledge\": the highest over its relations). Default: categories.",
    )
    score_cmap: str = Field("viridis", description="Colour map of `scores` (sequential).")
    panel_size: Optional[tuple[float, float]] = Field(
        None,
        description="(width, height) of each panel in inches. Default: from the number of "
        "layers and heads of the largest model.",
    )
    threshold: Optional[float] = Field(
        None, gt=0.0, le=1.0,
        description="Classify heads again from the datasets' stored scores with this threshold "
        "(probescope.probes.head_classifier.reclassify); default: as the probe classified them.",
    )
    classify_by: Optional[Literal["relation", "suppression", "either"]] = Field(
        None, description="With threshold: which score places heads in categories; default: the datasets' own.",
    )

    @field_validator("score_cmap")
    @classmethod
    def _check_score_cmap(cls, cmap: str) -> str:
        return known_colormap(cmap, "use a sequential one such as 'viridis', 'magma' or 'Blues'")

    @field_validator("colors")
    @classmethod
    def _check_colors(cls, colors: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if colors is None:
            return None
        for meaning, color in colors.items():
            if not meaning or meaning.split() != [meaning]:
                raise ValueError(
                    f"{meaning!r} is not a flag meaning: flag meanings are single words such "
                    "as 'unclassified', 'knowledge' or '2_categories'"
                )
            if not mcolors.is_color_like(color):
                raise ValueError(
                    f"colors[{meaning!r}] = {color!r} is not a matplotlib colour; give a name "
                    "('tab:red'), a hex code ('#1f77b4') or an RGB(A) tuple of numbers in [0, 1]"
                )
        return colors

    @field_validator("panel_size")
    @classmethod
    def _check_panel_size(cls, size: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if size is None:
            return None
        for what, value in zip(("width", "height"), size):
            if not math.isfinite(value) or not 0 < value <= 30:
                raise ValueError(
                    f"panel {what} {value} must be a positive number of inches, at most 30"
                )
        return size


@dataclass
class _Panel:
    model: str
    layers: list[int]  # x positions, left to right, contiguous
    heads: list[int]  # y positions, bottom to top, contiguous
    flags: np.ndarray  # (head, layer) floats; NaN where there is no flag
    flag_values: list[int]  # sorted
    flag_meanings: list[str]  # the meaning of each of flag_values


class HeadCategoryMapRenderer(Renderer):
    """Which categories of operation each (layer, head) implements: one panel per model.

    Draws the ``head_classifier`` datasets of a run: layers along the x axis, heads up the
    y axis from 0, one colour per flag of the ``category`` variable (grey unclassified, a
    colour per category, a purple ramp for several categories) and one legend.
    """

    name = "head_category_map"
    version = "0.1.0"
    probe = "head_classifier"
    description = (
        "Which categories of operation (algorithmic, knowledge, linguistic, translation) "
        "each attention head implements, per MAPS: one map of heads by layers per model, "
        "one colour per category, grey for unclassified, purples for several categories."
    )
    Parameters = HeadCategoryMapParameters
    Error = HeadCategoryMapError
    schema = SCHEMA

    def render(self, datasets: Sequence[xr.Dataset], params: Any = None) -> mfigure.Figure:
        """Draw the ``head_classifier`` datasets (one per model, in order).

        :param datasets: the probe's datasets; a dataset with a ``model`` dimension
            (results combined along models) counts as one dataset per model.
        :param params: :class:`HeadCategoryMapParameters`, a mapping of them, or None for
            the defaults.
        :raises HeadCategoryMapError: no datasets; a dataset without a ``category``
            variable, with dimensions other than (layer, head), without the CF flag
            attributes or with flags they do not define; a colour given for a meaning no
            dataset defines.
        """
        params = self.parameters(params)
        if params.scores is not None:
            score_panels = [_score_panel(model, ds, combined, params.scores)
                            for model, ds, combined in self.models(datasets, needs=("relation_score", "layer", "head"))]
            return _draw_scores(score_panels, params)
        panels = [_panel(model, _reclassified(model, ds, params), combined)
                  for model, ds, combined in self.models(datasets, needs=("category", "layer", "head"))]
        meanings = _legend_meanings(panels)
        colors = _meaning_colors(meanings, params.colors)
        return _draw(panels, meanings, colors, params)


# --------------------------------------------------------------------------------------
# Reading the datasets


def _reclassified(model: str, ds: xr.Dataset, params: HeadCategoryMapParameters) -> xr.Dataset:
    """``ds`` classified again for the renderer's ``threshold`` / ``classify_by``, if given."""
    if params.threshold is None and params.classify_by is None:
        return ds
    from probescope.probes.head_classifier import reclassify

    try:
        return reclassify(ds, params.threshold, params.classify_by)
    except (ValueError, KeyError) as exc:
        raise HeadCategoryMapError(f"model {model!r}: cannot classify the heads again: {exc}") from None


def _panel(model: str, ds: xr.Dataset, combined: bool) -> _Panel:
    category = ds["category"]  # the schema has checked its dimensions and type
    flag_values, flag_meanings = _flags(model, category, combined)

    layers = index_values(ds, "layer")
    heads = index_values(ds, "head")
    data = np.asarray(category.transpose("head", "layer").values, dtype=float)

    finite = np.isfinite(data)
    unknown = sorted(set(data[finite].tolist()) - set(flag_values))
    if unknown:
        shown = ", ".join(_number(v) for v in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise HeadCategoryMapError(
            f"model {model!r}: 'category' holds value(s) {shown} that its flag_values "
            f"({', '.join(map(str, flag_values))}) do not define"
        )

    x, y, grid = _placed(data, heads, layers, combined)
    order = np.argsort(flag_values)
    return _Panel(
        model, x, y, grid,
        [flag_values[i] for i in order], [flag_meanings[i] for i in order],
    )


def _score_panel(model: str, ds: xr.Dataset, combined: bool, choice: str) -> _Panel:
    """A panel whose ``flags`` hold the chosen score per (head, layer) instead of flags."""
    if "relation_score" not in ds.data_vars:
        raise HeadCategoryMapError(f"model {model!r}: the dataset has no 'relation_score' variable to draw scores from")
    scores = ds["relation_score"]
    if set(scores.dims) != {"layer", "head", "relation"}:
        raise HeadCategoryMapError(
            f"model {model!r}: 'relation_score' has dimensions {tuple(scores.dims)}, expected "
            "('layer', 'head', 'relation')"
        )
    relations = [coord_text(r) for r in ds["relation"].values] if "relation" in ds.coords else []
    categories = ([coord_text(c) for c in ds["relation_category"].values]
                  if "relation_category" in ds.coords else [])
    if choice == "max":
        pick = list(range(len(relations) or scores.sizes["relation"]))
    elif choice in relations:
        pick = [relations.index(choice)]
    elif choice in categories:
        pick = [i for i, c in enumerate(categories) if c == choice]
    else:
        raise HeadCategoryMapError(
            f"model {model!r}: scores = {choice!r} is neither \"max\", a relation ({', '.join(relations)}) "
            f"nor a category ({', '.join(dict.fromkeys(categories))})"
        )
    chosen = scores.isel(relation=pick)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN heads stay NaN
        data = np.nanmax(np.asarray(chosen.transpose("head", "layer", "relation").values, dtype=float), axis=-1)
    layers = index_values(ds, "layer")
    heads = index_values(ds, "head")
    x, y, grid = _placed(data, heads, layers, combined)
    return _Panel(model, x, y, grid, [], [])


def _placed(data: np.ndarray, heads: list[int], layers: list[int], combined: bool
            ) -> tuple[list[int], list[int], np.ndarray]:
    """``data`` (head x layer) placed on a contiguous grid of layers ``x`` and heads ``y``:
    layers or heads the dataset does not list stay blank (NaN).

    Combining models of different size pads the smaller ones with NaN layers and heads:
    for a combined dataset those are left out, so each panel's limits are the model's own."""
    finite = np.isfinite(data)
    if combined and finite.any():
        keep_h, keep_l = finite.any(axis=1), finite.any(axis=0)
        heads = [h for h, k in zip(heads, keep_h) if k]
        layers = [la for la, k in zip(layers, keep_l) if k]
        data = data[keep_h][:, keep_l]
    x = list(range(min(layers), max(layers) + 1))
    y = list(range(min(heads), max(heads) + 1))
    grid = np.full((len(y), len(x)), np.nan)
    grid[np.ix_([h - y[0] for h in heads], [la - x[0] for la in layers])] = data
    return x, y, grid


def _score_label(choice: str) -> str:
    if choice == "max":
        return "highest relation score of the head"
    return f"relation score: {choice.replace('_', ' ')}"


def _draw_scores(panels: list[_Panel], params: HeadCategoryMapParameters) -> mfigure.Figure:
    """Scores on one 0-1 sequential scale, one colour bar for every panel."""
    n_rows, n_cols = panel_grid(len(panels), params.columns)
    width, height = _panel_size(panels, params)
    fig_w = max(3.6, n_cols * (_YLABEL_W + width + 0.15) + 1.0)
    fig_h = n_rows * (_TITLE_H + height + _XLABEL_H) + (0.45 if params.title else 0.1)
    figure = mfigure.Figure(figsize=(fig_w, fig_h), layout="constrained")
    cmap = matplotlib.colormaps[params.score_cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    norm = mcolors.Normalize(0.0, 1.0)
    spec = figure.add_gridspec(n_rows, n_cols)
    axes, image = [], None
    for i, panel in enumerate(panels):
        ax = figure.add_subplot(spec[i // n_cols, i % n_cols])
        axes.append(ax)
        x0, x1 = panel.layers[0] - 0.5, panel.layers[-1] + 0.5
        y0, y1 = panel.heads[0] - 0.5, panel.heads[-1] + 0.5
        ax.set_facecolor(NO_DATA_COLOR)
        image = ax.imshow(np.ma.masked_invalid(panel.flags), cmap=cmap, norm=norm, origin="lower",
                          aspect="auto", interpolation="nearest", extent=(x0, x1, y0, y1))
        _axes_style(ax, panel, first=i % n_cols == 0, x0=x0, x1=x1, y0=y0, y1=y1)
    colorbar = figure.colorbar(image, ax=axes, location="right", fraction=0.05, aspect=25, pad=0.02)
    colorbar.set_label(_score_label(params.scores), fontsize=8.5, parse_math=False)
    colorbar.ax.tick_params(labelsize=7.5)
    colorbar.outline.set_linewidth(0.6)
    add_title(figure, params.title)
    return figure


def _flags(model: str, category: xr.DataArray, combined: bool) -> tuple[list[int], list[str]]:
    """The ``flag_values`` and ``flag_meanings`` of ``category``, checked."""
    expected = (
        "expected the CF flag convention: flag_values (0, 1, 2, ...) and flag_meanings, "
        "one word per value ('unclassified algorithmic knowledge ... 2_categories ...')"
    )
    missing = [key for key in ("flag_values", "flag_meanings") if key not in category.attrs]
    if missing:
        hint = (
            "; combining datasets along 'model' keeps these only when every model has the "
            "same categories, so draw such models from their own datasets"
            if combined else ""
        )
        raise HeadCategoryMapError(
            f"model {model!r}: 'category' has no {' or '.join(missing)} attribute; "
            f"{expected}{hint}"
        )
    raw_values = np.atleast_1d(np.asarray(category.attrs["flag_values"]))
    raw_meanings = category.attrs["flag_meanings"]
    if isinstance(raw_meanings, (str, bytes)):
        meanings = coord_text(raw_meanings).split()
    else:
        meanings = [coord_text(m) for m in np.atleast_1d(np.asarray(raw_meanings)).ravel()]
    if raw_values.ndim != 1 or not np.issubdtype(raw_values.dtype, np.number) or not np.all(
        np.isfinite(raw_values) & (raw_values == np.round(raw_values))
    ):
        raise HeadCategoryMapError(
            f"model {model!r}: 'category' flag_values {raw_values.tolist()!r} are not "
            f"integers; {expected}"
        )
    values = [int(v) for v in raw_values]
    if not values:
        raise HeadCategoryMapError(f"model {model!r}: 'category' has no flag_values; {expected}")
    if len(values) != len(meanings):
        raise HeadCategoryMapError(
            f"model {model!r}: 'category' has {len(values)} flag_values but "
            f"{len(meanings)} flag_meanings ({' '.join(meanings) or 'none'}); each value "
            "needs exactly one meaning"
        )
    for what, items in (("flag_values", values), ("flag_meanings", meanings)):
        twice = sorted({str(v) for v in items if items.count(v) > 1})
        if twice:
            raise HeadCategoryMapError(
                f"model {model!r}: 'category' {what} list {', '.join(twice)} more than once"
            )
    return values, meanings


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


# --------------------------------------------------------------------------------------
# Colours


def _kind(meaning: str) -> tuple[int, int]:
    """Sort key of a meaning: unclassified, then single categories, then by count."""
    if meaning.lower() == UNCLASSIFIED:
        return (0, 0)
    multi = _MULTI_MEANING.match(meaning)
    if multi:
        return (2, int(multi.group(1)))
    return (1, 0)


def _legend_meanings(panels: list[_Panel]) -> list[str]:
    """Every meaning any dataset defines: unclassified, the categories in the order they
    first appear, then the multi-category flags by their number of categories."""
    seen: list[str] = []
    for panel in panels:
        for meaning in panel.flag_meanings:
            if meaning not in seen:
                seen.append(meaning)
    return sorted(seen, key=_kind)  # stable: categories keep their order of appearance


def _meaning_colors(meanings: list[str], overrides: Optional[dict[str, Any]]) -> dict[str, tuple]:
    """An RGBA colour per meaning: the defaults, then the user's ``colors``."""
    overrides = dict(overrides or {})
    unknown = [m for m in overrides if m not in meanings]
    if unknown:
        raise HeadCategoryMapError(
            f"colors names {', '.join(map(repr, unknown))}, which no dataset's 'category' "
            f"flag_meanings define; the meanings drawn are: {', '.join(meanings)}"
        )
    multi = [m for m in meanings if _kind(m)[0] == 2]
    ramp = dict(zip(multi, multi_category_colors(len(multi))))
    spare = list(EXTRA_CATEGORY_COLORS) + [mcolors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
    colors: dict[str, tuple] = {}
    extra = 0
    for meaning in meanings:
        kind = _kind(meaning)[0]
        if kind == 0:
            color = UNCLASSIFIED_COLOR
        elif kind == 2:
            color = ramp[meaning]
        elif meaning.lower() in CATEGORY_COLORS:
            color = CATEGORY_COLORS[meaning.lower()]
        else:
            color = spare[extra % len(spare)]
            extra += 1
        colors[meaning] = mcolors.to_rgba(overrides.get(meaning, color))
    return colors


# --------------------------------------------------------------------------------------
# Drawing


def _panel_size(panels: list[_Panel], params: HeadCategoryMapParameters) -> tuple[float, float]:
    if params.panel_size is not None:
        return params.panel_size
    n_layers = max(len(panel.layers) for panel in panels)
    n_heads = max(len(panel.heads) for panel in panels)
    width = min(5.0, max(2.2, 1.6 + 0.045 * n_layers))
    height = min(4.0, max(2.0, 1.4 + 0.045 * n_heads))
    return width, height


def _draw(
    panels: list[_Panel], meanings: list[str], colors: dict[str, tuple],
    params: HeadCategoryMapParameters,
) -> mfigure.Figure:
    n_rows, n_cols = panel_grid(len(panels), params.columns)
    width, height = _panel_size(panels, params)

    blank = any(np.isnan(panel.flags).any() for panel in panels)
    handles = [
        mpatches.Patch(facecolor=colors[m], edgecolor="#666666", linewidth=0.5, label=meaning_label(m))
        for m in meanings
    ]
    if blank:
        handles.append(
            mpatches.Patch(facecolor=NO_DATA_COLOR, edgecolor="#666666", linewidth=0.5, label=NO_DATA_LABEL)
        )

    fig_w = max(3.6, n_cols * (_YLABEL_W + width + 0.15) + 0.2)
    legend_cols = max(1, min(len(handles), int((fig_w - 0.2) / _LEGEND_ENTRY_W)))
    legend_h = math.ceil(len(handles) / legend_cols) * _LEGEND_ROW_H + 0.2
    fig_h = n_rows * (_TITLE_H + height + _XLABEL_H) + legend_h + (0.45 if params.title else 0.1)
    figure = mfigure.Figure(figsize=(fig_w, fig_h), layout="constrained")

    spec = figure.add_gridspec(n_rows, n_cols)
    for i, panel in enumerate(panels):
        ax = figure.add_subplot(spec[i // n_cols, i % n_cols])
        _draw_panel(ax, panel, colors, first=i % n_cols == 0)

    figure.legend(
        handles=handles, loc="outside lower center", ncols=legend_cols, frameon=False,
        fontsize=8, handlelength=1.4, handleheight=1.1, columnspacing=1.2,
    )
    add_title(figure, params.title)
    return figure


def _draw_panel(ax, panel: _Panel, colors: dict[str, tuple], first: bool) -> None:
    values = panel.flag_values
    cmap = mcolors.ListedColormap([colors[m] for m in panel.flag_meanings]).with_extremes(
        bad=(0.0, 0.0, 0.0, 0.0)  # blank: the axes' white shows through
    )
    # One bin per flag value, edges halfway between neighbouring values.
    edges = [values[0] - 0.5] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 0.5]
    norm = mcolors.BoundaryNorm(edges, cmap.N)
    x0, x1 = panel.layers[0] - 0.5, panel.layers[-1] + 0.5
    y0, y1 = panel.heads[0] - 0.5, panel.heads[-1] + 0.5
    ax.set_facecolor(NO_DATA_COLOR)
    ax.imshow(
        np.ma.masked_invalid(panel.flags), cmap=cmap, norm=norm, origin="lower",
        aspect="auto", interpolation="nearest", extent=(x0, x1, y0, y1),
    )
    _axes_style(ax, panel, first, x0, x1, y0, y1)


def _axes_style(ax, panel: _Panel, first: bool, x0: float, x1: float, y0: float, y1: float) -> None:
    """Limits (head 0 at the bottom), round integer ticks, labels and the model's title."""
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)  # head 0 at the bottom
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(mticker.MaxNLocator(nbins=_MAX_TICKS - 1, integer=True, steps=[1, 2, 5, 10]))
    ax.tick_params(labelsize=_TICK_FONT, length=2, width=0.6, pad=1.5)
    ax.set_xlabel("layer", fontsize=9)
    if first:
        ax.set_ylabel("head", fontsize=9)
    ax.set_title(panel.model, fontsize=10, pad=4, parse_math=False)


@hookimpl
def register_renderers(register):
    register(HeadCategoryMapRenderer())
