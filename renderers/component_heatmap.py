"""The ``component_heatmap`` renderer: one statistic for every (layer, component) of a model.

It draws the datasets of the ``component_norm`` probe (one per model): one panel per
model, layers on the y axis with layer 0 at the bottom, the seven canonical components
(``attn.q`` ... ``mlp.gate``) on the x axis in canonical order, and a colour bar labelled
with the statistic.

Colours are chosen to show a trained model's structure at a glance:

- **Sequential** (viridis, dark to light) for the statistics, which are all non-negative;
  **diverging** (blue -> white -> orange) only around a centre: ``center`` given, or
  ``normalize = "component"``, which divides each component's column by its median over
  layers, so the centre 1 is "typical for this component" and each column shows its own
  profile over depth whatever its size.
- A **log scale** for norms (``scale = "auto"``: whenever every value drawn is positive
  and the statistic is a norm; a trained model's norms span orders of magnitude).
- **Robust limits**: the colour scale runs between the 1st and 99th ``percentiles`` of
  the values drawn, so one outlier cannot wash the rest out; cells beyond get the end
  colours and the colour bar grows arrows on the side where values were cut.

A component the model family does not have (GPT-2 has no ``mlp.gate``; ``present`` is
False and the value NaN) is drawn hatched, never as a colour, and a legend says so: absent
is not zero. A value that is NaN for a component the model does have (or whose presence
is unknown) is drawn plain grey, "no value".

Several models: one panel each, side by side (a grid beyond ``columns`` panels), model
names as titles, each panel on its own colour scale with its own colour bar, or one
shared scale and colour bar with ``shared_scale``. Datasets combined along a ``model``
dimension (``probescope.results.combine``) count as one dataset per model.

It reads datasets only, so a saved result can be drawn again without the models::

    from probescope.renderers.component_heatmap import ComponentHeatmapRenderer

    renderer = ComponentHeatmapRenderer()
    params = renderer.Parameters(shared_scale=True, title="Weight norms")
    figure = renderer.render([gpt2_ds, llama_ds], params)
    figure.savefig("components.pdf")
"""

from __future__ import annotations

import functools
import math
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from pydantic import Field, field_validator, model_validator

from probescope import (
    COMPONENTS, Renderer, RendererError, RendererParameters, add_title, coord_text, hookimpl, index_values,
    known_colormap, panel_grid, lazy_import,
)
from probescope.probes.component_norm import SCHEMA

matplotlib = lazy_import("matplotlib")
np = lazy_import("numpy")
xr = lazy_import("xarray")
mcolors = lazy_import("matplotlib.colors")
mfigure = lazy_import("matplotlib.figure")
mpatches = lazy_import("matplotlib.patches")
mticker = lazy_import("matplotlib.ticker")


#: The default colour map's stops: ColorBrewer blues (RdBu's) through white to ColorBrewer
#: oranges (PuOr's), so values below the centre read blue and values above it orange.
BLUE_WHITE_ORANGE = ("#2166ac", "#67a9cf", "#d1e5f0", "#ffffff", "#fee0b6", "#fdb863", "#e66101")


@functools.cache
def blue_white_orange() -> mcolors.Colormap:
    """The default colour map, built on first use (matplotlib is imported only to draw)."""
    return mcolors.LinearSegmentedColormap.from_list("probescope_blue_white_orange", list(BLUE_WHITE_ORANGE))

#: The default colour map without a centre: sequential, perceptually uniform, readable in grey.
SEQUENTIAL_CMAP = "viridis"

#: Colour bar labels of the probe's statistics, for datasets without ``long_name``.
STATISTIC_LABELS = {
    "activation_norm": "mean L2 norm of the output",
    "weight_norm": "Frobenius norm of the weight",
    "relative_update": "relative weight change ||W - W_ref|| / ||W_ref||",
    "grad_norm": "norm of the loss gradient",
}

# How cells without a colour look.
ABSENT_FACE = "#f2f2f2"
ABSENT_HATCH_COLOR = "#8c8c8c"
ABSENT_HATCH = "//"
NO_VALUE_FACE = "#c8c8c8"

# Layout constants, in inches unless noted.
_TICK_FONT = 8.0  # points
_MIN_ANNOTATION_FONT = 4.5  # points: below this, values are not written in the cells
_MAX_ANNOTATION_FONT = 7.5  # points
_MAX_LAYER_LABELS = 24  # more layers than this: ticks at round steps, not every layer
_YLABEL_W = 0.6
_COLORBAR_W = 0.95
_TITLE_H = 0.35


class ComponentHeatmapError(RendererError):
    """The datasets or the parameters cannot be drawn as a component heatmap."""


class ComponentHeatmapParameters(RendererParameters):
    """Parameters of the ``component_heatmap`` renderer."""

    center: Optional[float] = Field(
        None,
        allow_inf_nan=False,
        description="Draw on a diverging blue -> white -> orange map, white at this value "
        "(0 for a signed statistic, 1 for a ratio). Default: none, a sequential map; 1 with "
        "`normalize = \"component\"`.",
    )
    vmin: Optional[float] = Field(
        None,
        allow_inf_nan=False,
        description="Bottom of the colour scale. Default: the lower of `percentiles` of the "
        "values drawn (mirrored about a centre when nothing lies below it).",
    )
    vmax: Optional[float] = Field(
        None,
        allow_inf_nan=False,
        description="Top of the colour scale. Default: the upper of `percentiles` of the "
        "values drawn (mirrored about a centre when nothing lies above it).",
    )
    percentiles: tuple[float, float] = Field(
        (1.0, 99.0),
        description="The default colour limits, as percentiles (0-100) of the values drawn: "
        "values beyond them get the end colours and the colour bar an arrow. (0, 100) "
        "spans every value.",
    )
    scale: Literal["auto", "linear", "log"] = Field(
        "auto",
        description="Colour scale: \"log\" (every value must be positive), \"linear\", or "
        "\"auto\": log for norms (activation, weight, gradient) when every value drawn is "
        "positive, linear otherwise.",
    )
    normalize: Literal["none", "component"] = Field(
        "none",
        description="\"component\": divide each component's values by their median over "
        "the layers drawn, so every column shows its own profile over depth, 1 being "
        "typical for that component (drawn diverging around 1).",
    )
    shared_scale: bool = Field(
        False,
        description="Draw every panel on one colour scale with one colour bar, so models "
        "can be compared cell by cell. Default: each panel its own scale and colour bar.",
    )
    annotate: bool = Field(
        False,
        description="Write each value in its cell (3 significant digits). Readable for a "
        "few dozen layers at most; panels grow taller to make room, and when the cells "
        "are still too small the values are left out with a warning.",
    )
    cmap: Optional[str] = Field(
        None,
        description="Name of a matplotlib colour map to use instead of the default "
        "blue -> white -> orange; pick a diverging one (RdBu_r, PuOr_r, coolwarm).",
    )
    columns: int = Field(
        4,
        ge=1,
        description="Panels per row: with more models than this the panels form a grid.",
    )
    panel_width: Optional[float] = Field(
        None,
        gt=0,
        le=20,
        description="Width of each panel's heatmap in inches. Default: from the number of "
        "components.",
    )
    panel_height: Optional[float] = Field(
        None,
        gt=0,
        le=30,
        description="Height of each panel's heatmap in inches. Default: from the number "
        "of layers.",
    )

    @field_validator("cmap")
    @classmethod
    def _check_cmap(cls, cmap: Optional[str]) -> Optional[str]:
        if cmap is None:
            return None
        return known_colormap(cmap, "use a sequential one such as 'viridis' or 'magma', a "
                                    "diverging one such as 'RdBu_r' with `center`, or leave `cmap` out")

    @field_validator("percentiles")
    @classmethod
    def _check_percentiles(cls, percentiles: tuple[float, float]) -> tuple[float, float]:
        low, high = percentiles
        if not (0.0 <= low < high <= 100.0):
            raise ValueError(f"percentiles {list(percentiles)} must be two numbers 0 <= low < high <= 100")
        return percentiles

    @model_validator(mode="after")
    def _check_limits(self) -> "ComponentHeatmapParameters":
        if self.scale == "log":
            bad = [f"{name} ({value})" for name, value in (("vmin", self.vmin), ("center", self.center),
                                                           ("vmax", self.vmax)) if value is not None and value <= 0]
            if bad:
                raise ValueError(f"{', '.join(bad)} must be positive on a log scale")
        if self.vmin is not None and self.vmax is not None and self.vmin >= self.vmax:
            raise ValueError(f"vmin ({self.vmin}) must be below vmax ({self.vmax})")
        if self.center is not None:
            if self.vmin is not None and not self.vmin < self.center:
                raise ValueError(
                    f"center ({self.center}) must be above vmin ({self.vmin}): the colour "
                    "map runs from blue at vmin through white at center"
                )
            if self.vmax is not None and not self.center < self.vmax:
                raise ValueError(
                    f"center ({self.center}) must be below vmax ({self.vmax}): the colour "
                    "map runs from white at center to orange at vmax"
                )
        return self


@dataclass
class _Panel:
    model: str
    layers: list[int]  # the layer coordinate, bottom to top
    components: list[str]  # the figure's columns, canonical order
    values: np.ndarray  # (layer, component) floats; NaN where there is nothing to colour
    absent: np.ndarray  # (layer, component) bool: the model does not have the component
    label: str  # colour bar label
    statistic: Optional[str] = None  # the probe's statistic, when the dataset says
    raw: Optional[np.ndarray] = None  # the values as given, when `values` is transformed

    @property
    def drawn(self) -> np.ndarray:
        """The finite values that get a colour."""
        return self.values[np.isfinite(self.values)]

    @property
    def no_value(self) -> np.ndarray:
        return ~np.isfinite(self.values) & ~self.absent


class ComponentHeatmapRenderer(Renderer):
    """One statistic per (layer, component): one heatmap panel per model.

    Draws the ``component_norm`` datasets of a run: layers up the y axis from 0, the
    canonical components along the x axis, a blue -> white -> orange colour map centred
    on the median of the values (or on ``center``), a colour bar labelled with the
    statistic, and absent components hatched.
    """

    name = "component_heatmap"
    version = "0.1.0"
    probe = "component_norm"
    description = (
        "One statistic (output norm, weight norm, relative weight change, gradient norm) "
        "for every layer and component, as one diverging heatmap per model; components "
        "a model family lacks are hatched."
    )
    Parameters = ComponentHeatmapParameters
    Error = ComponentHeatmapError
    schema = SCHEMA

    def render(self, datasets: Sequence[xr.Dataset], params: Any = None) -> mfigure.Figure:
        """Draw the ``component_norm`` datasets (one per model, in order).

        :param datasets: the probe's datasets; a dataset with a ``model`` dimension
            (results combined along models) counts as one dataset per model.
        :param params: :class:`ComponentHeatmapParameters`, a mapping of them, or None
            for the defaults.
        :raises ComponentHeatmapError: no datasets, a dataset that is not a
            ``component_norm`` result (no ``value`` variable, other dimensions, component
            names outside :data:`~probescope.architectures.base.COMPONENTS`), or
            different statistics asked to share one colour scale.
        """
        params = self.parameters(params)
        panels = _panels(self.models(datasets, needs=("value", "layer", "component")))
        log = _transform(panels, params)
        norms = _norms(panels, params, log)
        return _draw(panels, norms, params, log)


# --------------------------------------------------------------------------------------
# Reading the datasets


def component_label(component: str, wrap: bool = False) -> str:
    """A component's tick label: ``"attn.q"`` -> ``"attn. q"`` (``"attn.\\nq"`` wrapped)."""
    block, dot, part = component.partition(".")
    if not dot:
        return component
    return f"{block}.\n{part}" if wrap else f"{block}. {part}"


def _panels(models: list[tuple[str, xr.Dataset, bool]]) -> list[_Panel]:
    checked = [(model, ds, _components(model, ds), combined) for model, ds, combined in models]
    # Every panel gets the same columns: every component any model's dataset lists, in
    # the canonical order whatever order the datasets have.
    listed = {c for _, _, components, _ in checked for c in components}
    columns = [c for c in COMPONENTS if c in listed]
    return [
        _panel(model, ds, components, columns, combined)
        for model, ds, components, combined in checked
    ]


def _components(model: str, ds: xr.Dataset) -> list[str]:
    """The dataset's component names (the schema has checked them), and ``present``
    checked: per component, or per cell where combining models broadcast it."""
    if "present" in ds and not set(ds["present"].dims) <= {"layer", "component"}:
        raise ComponentHeatmapError(
            f"model {model!r}: 'present' has dimensions {tuple(ds['present'].dims)}, "
            "expected ('component',) or ('layer', 'component')"
        )
    return [coord_text(c) for c in ds["component"].values]


def _panel(
    model: str, ds: xr.Dataset, components: list[str], columns: list[str], combined: bool
) -> _Panel:
    value = ds["value"].transpose("layer", "component")
    layers = index_values(ds, "layer")
    data = np.asarray(value.values, dtype=float)

    # Presence: True / False per cell, or unknown (no `present`, or NaN where combining
    # models of different component lists padded it).
    if "present" in ds:
        present = ds["present"].broadcast_like(value).transpose("layer", "component").values
        known = ~_isnull(present)
        absent = known & ~np.asarray(np.where(known, present, True), dtype=bool)
    else:
        # Without `present`, a component with no value at any layer is one the model
        # does not have.
        absent = np.broadcast_to(np.isnan(data).all(axis=0), data.shape).copy()
    data = np.where(absent, np.nan, data)

    # Sort the rows by layer (bottom to top) and the columns into the canonical order;
    # columns this model's dataset lacks are "no value".
    order = np.argsort(layers, kind="stable")
    layers = [layers[i] for i in order]
    values = np.full((len(layers), len(columns)), np.nan)
    gone = np.zeros(values.shape, dtype=bool)
    for j, name in enumerate(columns):
        if name in components:
            k = components.index(name)
            values[:, j] = data[order, k]
            gone[:, j] = absent[order, k]

    if combined:
        # Combining models of different depth pads the shallower ones with NaN layers:
        # drop the layers without a single value (unless nothing would be left).
        keep = np.isfinite(values).any(axis=1)
        if keep.any() and not keep.all():
            layers = [layer for layer, k in zip(layers, keep) if k]
            values, gone = values[keep], gone[keep]

    statistic = ds["value"].attrs.get("statistic") or ds.attrs.get("statistic")
    return _Panel(model, layers, list(columns), values, gone, _statistic_label(ds),
                  str(statistic) if statistic else None)


def _statistic_label(ds: xr.Dataset) -> str:
    attrs = ds["value"].attrs
    label = attrs.get("long_name") or ds.attrs.get("long_name")
    if not label:
        statistic = attrs.get("statistic") or ds.attrs.get("statistic")
        if statistic:
            label = STATISTIC_LABELS.get(str(statistic), str(statistic).replace("_", " "))
        else:
            label = "value"
    units = attrs.get("units")
    if units and str(units) not in ("1", ""):
        label = f"{label} ({units})"
    return str(label)


# --------------------------------------------------------------------------------------
# Colour scales


#: Statistics that are norms: drawn on a log scale by default (``scale = "auto"``).
NORM_STATISTICS = ("activation_norm", "weight_norm", "grad_norm")


def _transform(panels: list[_Panel], params: ComponentHeatmapParameters) -> bool:
    """Normalise per component and take log10 in place, as asked; True when the colours
    are on a log scale (the panels' ``values`` then hold log10 of ``raw``)."""
    for panel in panels:
        panel.raw = panel.values.copy()
        if params.normalize == "component":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
                median = np.nanmedian(np.where(panel.values > 0, panel.values, np.nan), axis=0)
            panel.values = panel.values / np.where(median > 0, median, np.nan)
            panel.raw = panel.values.copy()
            panel.label = f"{panel.label} / the component's median over layers"
    drawn = np.concatenate([panel.drawn for panel in panels])
    if params.scale == "log":
        if (drawn <= 0).any():
            raise ComponentHeatmapError(
                f"scale = \"log\" needs positive values, but {int((drawn <= 0).sum())} value(s) drawn "
                f"are zero or negative (smallest {drawn.min():.3g}); use scale = \"linear\""
            )
        log = True
    elif params.scale == "auto":
        norms = params.normalize == "component" or all(p.statistic in NORM_STATISTICS for p in panels)
        log = bool(norms and drawn.size and (drawn > 0).all())
    else:
        log = False
    if log:
        for panel in panels:
            with np.errstate(divide="ignore", invalid="ignore"):
                panel.values = np.log10(panel.values)
    return log


def _center(params: ComponentHeatmapParameters) -> Optional[float]:
    if params.center is not None:
        return params.center
    return 1.0 if params.normalize == "component" else None


def _norms(panels: list[_Panel], params: ComponentHeatmapParameters, log: bool) -> list[mcolors.Normalize]:
    """One norm per panel, on the panels' (transformed) values; the very same object for
    all of them with ``shared_scale``."""
    if params.shared_scale:
        labels = {panel.label for panel in panels}
        if len(labels) > 1:
            listing = "; ".join(f"{panel.model!r}: {panel.label}" for panel in panels)
            raise ComponentHeatmapError(
                f"shared_scale needs one statistic, but the datasets hold different ones "
                f"({listing}); one colour scale cannot compare them: draw them without "
                "shared_scale, or each statistic in its own figure"
            )
        values = np.concatenate([panel.drawn for panel in panels])
        norm = _norm(values, params, log)
        return [norm] * len(panels)
    return [_norm(panel.drawn, params, log) for panel in panels]


def _norm(values: np.ndarray, params: ComponentHeatmapParameters, log: bool) -> mcolors.Normalize:
    """A TwoSlopeNorm around the centre, else a plain Normalize between robust limits;
    user values are in data units and move to log10 on a log scale."""
    def t(v: Optional[float]) -> Optional[float]:
        return None if v is None else (math.log10(v) if log else v)

    center = t(_center(params))
    vmin, vmax = t(params.vmin), t(params.vmax)
    values = values[np.isfinite(values)]
    low_p, high_p = params.percentiles
    if center is not None:
        robust = values
        if values.size and (low_p, high_p) != (0.0, 100.0):
            lo, hi = np.percentile(values, [low_p, high_p])
            robust = np.clip(values, lo, hi)
        return mcolors.TwoSlopeNorm(*_scale(robust, center, vmin, vmax))
    if values.size:
        lo, hi = (float(v) for v in np.percentile(values, [low_p, high_p]))
    else:
        lo, hi = 0.0, 1.0
    lo = vmin if vmin is not None else lo
    hi = vmax if vmax is not None else hi
    if not lo < hi:
        if vmax is None:
            hi = lo + _pad(lo)
        else:
            lo = hi - _pad(hi)
    return mcolors.Normalize(lo, hi)


def _pad(x: float) -> float:
    """A sensible half-width for a scale around ``x`` when the data give none."""
    return 0.1 * abs(x) if x != 0 else 1.0


def _scale(values: np.ndarray, center: float, vmin: Optional[float], vmax: Optional[float]) -> tuple[float, float, float]:
    """``(vcenter, vmin, vmax)`` with ``vmin < vcenter < vmax``, as TwoSlopeNorm needs.

    The user's ``vmin`` and ``vmax`` are kept as given (the parameters' validation keeps
    them in order around ``center``); a centre outside them moves to their middle. The
    ends default to the values' extent. A default end that does not lie strictly beyond
    the centre (nothing below it, all values equal, no values at all) mirrors the other
    end about the centre, so the scale stays linear; when both ends coincide with the
    centre they move a tenth of its size (or 1 around 0) away.
    """
    values = values[np.isfinite(values)]
    if vmin is not None and vmax is not None and not vmin < center < vmax:
        center = (vmin + vmax) / 2
    low = vmin if vmin is not None else min(float(values.min()), center) if values.size else center
    high = vmax if vmax is not None else max(float(values.max()), center) if values.size else center
    if not low < center:  # only a default vmin can be here
        low = center - (high - center if high > center else _pad(center))
    if not center < high:  # only a default vmax can be here; low < center by now
        high = center + (center - low)
    return float(center), float(low), float(high)


# --------------------------------------------------------------------------------------
# Drawing


@dataclass
class _Layout:
    width: float  # heatmap, inches
    height: float
    wrap_labels: bool
    annotation_font: Optional[float]


def _layout(panels: list[_Panel], params: ComponentHeatmapParameters) -> _Layout:
    n_comp = len(panels[0].components)
    n_layers = max(len(panel.layers) for panel in panels)
    if params.panel_width is not None:
        width = params.panel_width
    else:
        per = 0.5 if params.annotate else 0.36
        width = max(1.4, per * n_comp + 0.25)
    if params.panel_height is not None:
        height = params.panel_height
    elif params.annotate:
        height = min(12.0, max(2.4, 0.2 * n_layers + 0.5))
    else:
        height = min(6.0, max(2.4, 0.2 * n_layers + 0.6))

    column_pt = width * 72 / n_comp
    longest = max(len(component_label(c)) for c in panels[0].components)
    wrap = longest * 0.6 * _TICK_FONT > 0.95 * column_pt

    font = None
    if params.annotate:
        row_pt = height * 72 / n_layers
        chars = max((len(_format_value(v)) for panel in panels for v in panel.drawn), default=1)
        font = min(_MAX_ANNOTATION_FONT, 0.6 * row_pt, 0.9 * column_pt / (0.6 * chars))
        if font < _MIN_ANNOTATION_FONT:
            warnings.warn(
                f"component_heatmap: cells of {n_layers} layers are too small to write "
                "their values in (annotate); leaving them out. Give a larger panel_height "
                "or draw fewer layers.",
                stacklevel=4,
            )
            font = None
    return _Layout(width, height, wrap, font)


def _draw(
    panels: list[_Panel], norms: list[mcolors.Normalize], params: ComponentHeatmapParameters, log: bool = False
) -> mfigure.Figure:
    layout = _layout(panels, params)
    n = len(panels)
    n_rows, n_cols = panel_grid(n, params.columns)
    shared = params.shared_scale

    xlabel_h = 0.55 if layout.wrap_labels else 0.35
    cell_w = _YLABEL_W + layout.width + (0.0 if shared else _COLORBAR_W) + 0.15
    cell_h = _TITLE_H + layout.height + xlabel_h
    has_absent = any(panel.absent.any() for panel in panels)
    has_no_value = any(panel.no_value.any() for panel in panels)
    legend_h = 0.4 if (has_absent or has_no_value) else 0.0
    fig_w = n_cols * cell_w + (_COLORBAR_W + 0.2 if shared else 0.0) + 0.2
    fig_h = n_rows * cell_h + legend_h + (0.45 if params.title else 0.1)
    figure = mfigure.Figure(figsize=(fig_w, fig_h), layout="constrained")

    if params.cmap:
        base = matplotlib.colormaps[params.cmap]
    else:
        base = blue_white_orange() if _center(params) is not None else matplotlib.colormaps[SEQUENTIAL_CMAP]
    cmap = base.with_extremes(bad=NO_VALUE_FACE)

    spec = figure.add_gridspec(n_rows, n_cols)
    axes = []
    image = None
    for i, (panel, norm) in enumerate(zip(panels, norms)):
        ax = figure.add_subplot(spec[i // n_cols, i % n_cols])
        axes.append(ax)
        image = _draw_panel(ax, panel, norm, cmap, layout, first=i % n_cols == 0)
        if not shared:
            _colorbar(figure, image, [ax], panel.label, layout.height, _extend(norm, [panel]), log)
    if shared:
        _colorbar(figure, image, axes, panels[0].label, layout.height * n_rows, _extend(norms[0], panels), log)

    handles = []
    if has_absent:
        handles.append(
            mpatches.Patch(
                facecolor=ABSENT_FACE, edgecolor=ABSENT_HATCH_COLOR, hatch=ABSENT_HATCH,
                linewidth=0.0, label="hatched: component absent in this model family",
            )
        )
    if has_no_value:
        handles.append(mpatches.Patch(facecolor=NO_VALUE_FACE, label="grey: no value"))
    if handles:
        figure.legend(
            handles=handles, loc="outside lower center", ncols=len(handles), frameon=False,
            fontsize=8, handlelength=1.6, handleheight=1.2,
        )
    add_title(figure, params.title)
    return figure


def _draw_panel(ax, panel: _Panel, norm: mcolors.Normalize, cmap, layout: _Layout, first: bool):
    n_layers, n_comp = panel.values.shape
    data = np.ma.masked_invalid(panel.values)
    image = ax.imshow(
        data, cmap=cmap, norm=norm, origin="lower", aspect="auto", interpolation="nearest",
        extent=(-0.5, n_comp - 0.5, -0.5, n_layers - 0.5),
    )
    ax.set_xlim(-0.5, n_comp - 0.5)
    ax.set_ylim(-0.5, n_layers - 0.5)  # layer 0 (row 0) at the bottom

    # Absent components: hatched boxes, one per run of absent layers in a column.
    for j in range(n_comp):
        column = panel.absent[:, j]
        start = None
        for row in range(n_layers + 1):
            inside = row < n_layers and column[row]
            if inside and start is None:
                start = row
            elif not inside and start is not None:
                ax.add_patch(
                    mpatches.Rectangle(
                        (j - 0.5, start - 0.5), 1.0, row - start, facecolor=ABSENT_FACE,
                        edgecolor=ABSENT_HATCH_COLOR, hatch=ABSENT_HATCH, linewidth=0.0,
                        gid="absent", zorder=2,
                    )
                )
                start = None

    ax.set_xticks(range(n_comp))
    ax.set_xticklabels(
        [component_label(c, wrap=layout.wrap_labels) for c in panel.components],
        fontsize=_TICK_FONT, parse_math=False,
    )
    _layer_ticks(ax, panel.layers, layout.height)
    ax.tick_params(length=2, width=0.6, pad=1.5)
    ax.tick_params(axis="y", labelsize=_TICK_FONT)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if first:
        ax.set_ylabel("layer", fontsize=9)
    ax.set_title(panel.model, fontsize=10, pad=4, parse_math=False)

    if layout.annotation_font is not None:
        for r in range(n_layers):
            for j in range(n_comp):
                v = panel.values[r, j]
                if not np.isfinite(v):
                    continue
                red, green, blue, _ = cmap(norm(v))
                v = panel.raw[r, j] if panel.raw is not None else v
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(
                    j, r, _format_value(v), ha="center", va="center",
                    fontsize=layout.annotation_font, color="white" if dark else "black",
                    parse_math=False, zorder=3,
                )
    return image


def _layer_ticks(ax, layers: list[int], height: float) -> None:
    """Y ticks: every layer when their labels fit, else a few integer steps; rows are at
    positions 0, 1, 2... and labelled with their layer index."""
    n = len(layers)
    if n <= _MAX_LAYER_LABELS and n * _TICK_FONT * 1.5 <= height * 72:
        ax.yaxis.set_major_locator(mticker.FixedLocator(range(n)))
    else:
        nbins = max(3, min(10, int(height * 72 / (_TICK_FONT * 3.5))))
        ax.yaxis.set_major_locator(
            mticker.MaxNLocator(nbins=nbins, integer=True, steps=[1, 2, 5, 10], min_n_ticks=3)
        )

    def label(position: float, _: Any) -> str:
        i = int(round(position))
        return str(layers[i]) if 0 <= i < n and abs(position - i) < 1e-6 else ""

    ax.yaxis.set_major_formatter(mticker.FuncFormatter(label))


def _extend(norm: mcolors.Normalize, panels: list[_Panel]) -> str:
    """Which ends of the colour bar get an arrow: where values drawn lie beyond the limits."""
    values = np.concatenate([panel.drawn for panel in panels])
    if not values.size:
        return "neither"
    low, high = values.min() < norm.vmin, values.max() > norm.vmax
    return {(True, True): "both", (True, False): "min", (False, True): "max"}.get((low, high), "neither")


def _log_ticks(lo: float, hi: float) -> list[float]:
    """log10 positions of round values (1, 2, 5 times a power of ten) between 10**lo and 10**hi,
    thinned to at most seven; the ends when fewer than two fall inside."""
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [math.log10(m * 10.0 ** e) for e in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in mantissas]
        ticks = [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]
        if len(ticks) >= 3:
            break
    while len(ticks) > 7:
        ticks = ticks[::2]
    return ticks if len(ticks) >= 2 else [lo, hi]


def _colorbar(figure: mfigure.Figure, image, axes: list, label: str, length: float, extend: str = "neither",
              log: bool = False) -> None:
    colorbar = figure.colorbar(
        image, ax=axes, location="right", fraction=0.08, aspect=25, pad=0.03, extend=extend,
        extendfrac=0.04,
    )
    norm = image.norm
    lo, hi = float(norm.vmin), float(norm.vmax)
    if log:
        colorbar.set_ticks(_log_ticks(lo, hi))
        colorbar.ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: _format_value(10.0 ** v)))
        colorbar.ax.minorticks_off()
    elif isinstance(norm, mcolors.TwoSlopeNorm):
        # The two halves of the scale stretch differently, so ticks spaced evenly in value
        # would crowd one half: put the ends, the centre and the middle of each half.
        mid = float(norm.vcenter)
        colorbar.set_ticks([lo, (lo + mid) / 2, mid, (mid + hi) / 2, hi])
        colorbar.ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: _format_value(v)))
    else:
        colorbar.ax.yaxis.set_major_locator(mticker.MaxNLocator(nbins=6))
        colorbar.ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: _format_value(v)))
    if log:
        label = f"{label} (log scale)"
    chars = max(12, int(0.95 * length * 72 / (8.5 * 0.55)))
    colorbar.set_label(textwrap.fill(label, chars), fontsize=8.5, parse_math=False)
    colorbar.ax.tick_params(labelsize=7.5)
    colorbar.outline.set_linewidth(0.6)


def _format_value(v: float) -> str:
    """A value in a few characters: 3 significant digits, short exponents (1.2e3)."""
    text = f"{v:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def _isnull(values: np.ndarray) -> np.ndarray:
    """NaN / None cells of a presence array of any dtype (bool, float, object)."""
    if values.dtype == bool:
        return np.zeros(values.shape, dtype=bool)
    return np.asarray(xr.DataArray(values).isnull().values)


@hookimpl
def register_renderers(register):
    register(ComponentHeatmapRenderer())
