"""Tests of the ``component_heatmap`` renderer on synthetic ``component_norm`` datasets.

No model is needed: the datasets are built here following the probe's schema, NaN and
``present = False`` where a model family lacks a component.
"""

from __future__ import annotations

import numpy as np
import pluggy
import pydantic
import pytest
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm, to_rgb
from matplotlib.figure import Figure

from probescope.architectures.base import COMPONENTS
from probescope.errors import PluginError
from probescope.plugins import hookspecs
from probescope.renderers import component_heatmap
from probescope.renderers.component_heatmap import (
    blue_white_orange,
    ComponentHeatmapError,
    ComponentHeatmapParameters,
    ComponentHeatmapRenderer,
    component_label,
)
from probescope.results import combine

WEIGHT_NORM = "Frobenius norm of the weight"


def make_dataset(
    model: str | None = "gpt2",
    layers=(0, 1, 2, 3),
    components=COMPONENTS,
    absent=("mlp.gate",),
    values=None,
    statistic: str = "weight_norm",
    long_name: str | None = WEIGHT_NORM,
    seed: int = 0,
    present_by_layer: bool = False,
) -> xr.Dataset:
    """A component_norm dataset: positive values growing with depth; NaN and
    ``present = False`` for the ``absent`` components."""
    layers, components = list(layers), list(components)
    if values is None:
        rng = np.random.default_rng(seed)
        values = rng.gamma(4.0, 1.0, size=(len(layers), len(components)))
        values += 0.5 * np.asarray(layers, dtype=float)[:, None]
    values = np.array(values, dtype=float)
    present = np.array([c not in absent for c in components])
    values[:, ~present] = np.nan
    attrs = {"statistic": statistic}
    if long_name is not None:
        attrs["long_name"] = long_name
    if present_by_layer:
        present_coord = (("layer", "component"), np.tile(present, (len(layers), 1)))
    else:
        present_coord = ("component", present)
    ds_attrs = {"statistic": statistic, "num_layers": max(layers) + 1,
                "probe": "component_norm", "probe_version": "0.1.0"}
    if model is not None:
        ds_attrs["model"] = model
    return xr.Dataset(
        {"value": (("layer", "component"), values, attrs)},
        coords={
            "layer": np.array(layers, dtype=np.int64),
            "component": np.array(components, dtype=object),
            "present": present_coord,
        },
        attrs=ds_attrs,
    )


@pytest.fixture
def renderer() -> ComponentHeatmapRenderer:
    return ComponentHeatmapRenderer()


def render(renderer, datasets, **params) -> Figure:
    return renderer.render(datasets, renderer.Parameters(**params))


def panels(figure: Figure) -> list:
    """The heatmap axes (those holding an image), in drawing order."""
    return [ax for ax in figure.axes if ax.images]


def colorbar_axes(figure: Figure) -> list:
    """Every axes that is not a heatmap: the colour bars."""
    return [ax for ax in figure.axes if not ax.images]


def hatched(ax) -> list:
    return [p for p in ax.patches if p.get_hatch()]


def hatched_cells(ax) -> set[tuple[int, int]]:
    """(row, column) positions covered by the hatched boxes."""
    cells = set()
    for patch in hatched(ax):
        x, y = patch.get_xy()
        column = int(round(x + 0.5))
        first = int(round(y + 0.5))
        cells |= {(row, column) for row in range(first, first + int(round(patch.get_height())))}
    return cells


def tick_texts(labels) -> list[str]:
    return [" ".join(t.get_text().split()) for t in labels]


def draw(figure: Figure) -> FigureCanvasAgg:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas


# --------------------------------------------------------------------------------------
# The plugin and its parameters


def test_renderer_declares_itself():
    renderer = ComponentHeatmapRenderer()
    assert renderer.name == "component_heatmap"
    assert renderer.probe == "component_norm"
    assert renderer.description
    assert renderer.Parameters is ComponentHeatmapParameters
    assert renderer.check(renderer.Parameters(), prompts=[], probe_params=None, model=None) == []


def test_registers_through_the_hook():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(component_heatmap)
    registered = []
    manager.hook.register_renderers(register=registered.append)
    assert [type(r) for r in registered] == [ComponentHeatmapRenderer]


def test_parameter_defaults_and_validation():
    params = ComponentHeatmapParameters()
    assert params.center is None and params.vmin is None and params.vmax is None
    assert params.shared_scale is False and params.annotate is False and params.title is None
    assert ComponentHeatmapParameters(vmin=-1, center=0, vmax=2).center == 0
    with pytest.raises(pydantic.ValidationError, match="must be below vmax"):
        ComponentHeatmapParameters(vmin=1.0, vmax=1.0)
    with pytest.raises(pydantic.ValidationError, match="must be below vmax"):
        ComponentHeatmapParameters(vmin=2.0, vmax=1.0)
    with pytest.raises(pydantic.ValidationError, match=r"center \(3.0\) must be below vmax"):
        ComponentHeatmapParameters(center=3.0, vmax=2.0)
    with pytest.raises(pydantic.ValidationError, match=r"center \(0.0\) must be above vmin"):
        ComponentHeatmapParameters(center=0.0, vmin=0.0)
    with pytest.raises(pydantic.ValidationError, match="not a matplotlib colour map"):
        ComponentHeatmapParameters(cmap="NoSuchMap")
    with pytest.raises(pydantic.ValidationError, match="centre"):
        ComponentHeatmapParameters(centre=0.0)  # unknown keys are errors
    with pytest.raises(pydantic.ValidationError):
        ComponentHeatmapParameters(center=float("nan"))
    with pytest.raises(pydantic.ValidationError):
        ComponentHeatmapParameters(columns=0)


def test_component_labels():
    assert component_label("attn.q") == "attn. q"
    assert component_label("mlp.gate") == "mlp. gate"
    assert component_label("mlp.down", wrap=True) == "mlp.\ndown"


def test_colormap_runs_blue_white_orange():
    low, mid, high = blue_white_orange()(0.0), blue_white_orange()(0.5), blue_white_orange()(1.0)
    assert min(mid[:3]) > 0.95  # white at the centre
    assert low[2] > low[0] + 0.3  # blue: more blue than red
    assert high[0] > high[2] + 0.5 and high[0] > 0.8  # orange: red high, blue low
    assert high[0] > high[1] > high[2]


# --------------------------------------------------------------------------------------
# The figure


def test_layer_zero_at_the_bottom(renderer, tmp_path):
    # One component: layer 0 far below the median (blue), the top layer far above (orange).
    values = [[0.0], [5.0], [5.0], [10.0]]
    ds = make_dataset(components=["attn.q"], absent=(), values=values)
    figure = render(renderer, [ds], center=5.0)
    (ax,) = panels(figure)
    image = ax.images[0]
    assert image.origin == "lower"
    bottom, top = ax.get_ylim()
    assert bottom < top
    np.testing.assert_array_equal(image.get_array()[:, 0], [0.0, 5.0, 5.0, 10.0])

    # The tick labelled "0" sits below the tick labelled "3".
    ticks = dict(zip(tick_texts(ax.get_yticklabels()), ax.get_yticks()))
    assert ticks["0"] < ticks["3"]

    # And in the pixels: blue at the bottom of the panel, orange at its top.
    canvas = draw(figure)
    pixels = np.asarray(canvas.buffer_rgba())[..., :3] / 255.0
    box = ax.get_window_extent()
    height = pixels.shape[0]
    x = int((box.x0 + box.x1) / 2)
    bottom_rgb = pixels[height - int(box.y0 + 0.1 * box.height), x]
    top_rgb = pixels[height - int(box.y1 - 0.1 * box.height), x]
    assert bottom_rgb[2] > bottom_rgb[0] + 0.3, bottom_rgb  # blue
    assert top_rgb[0] > top_rgb[2] + 0.5, top_rgb  # orange

    path = tmp_path / "heatmap.png"
    figure.savefig(path)
    assert path.stat().st_size > 1000


def test_canonical_component_order(renderer):
    shuffled = ["mlp.down", "attn.v", "mlp.gate", "attn.q", "mlp.up", "attn.o", "attn.k"]
    ds = make_dataset(components=shuffled, absent=("mlp.gate",), layers=(2, 0, 1))
    figure = render(renderer, [ds])
    (ax,) = panels(figure)
    assert tick_texts(ax.get_xticklabels()) == [component_label(c) for c in COMPONENTS]
    # Each column holds its component's values, each row its layer's.
    image = ax.images[0].get_array()
    expected = ds["value"].sel(layer=[0, 1, 2], component=list(COMPONENTS)).values
    np.testing.assert_allclose(image.filled(np.nan), np.log10(expected))  # norms: log scale
    assert tick_texts(ax.get_yticklabels()) == ["0", "1", "2"]


def test_subset_of_layers_labelled_with_their_indices(renderer):
    figure = render(renderer, [make_dataset(layers=(0, 2, 5))])
    (ax,) = panels(figure)
    assert tick_texts(ax.get_yticklabels()) == ["0", "2", "5"]
    assert ax.images[0].get_array().shape == (3, 7)


def test_absent_components_are_hatched(renderer):
    ds = make_dataset(absent=("mlp.gate", "attn.k"))
    figure = render(renderer, [ds])
    (ax,) = panels(figure)
    columns = [COMPONENTS.index("attn.k"), COMPONENTS.index("mlp.gate")]
    assert hatched_cells(ax) == {(row, c) for row in range(4) for c in columns}
    assert all(p.get_hatch() == "//" for p in hatched(ax))
    # Absent cells get no colour: masked in the image, not zero.
    mask = np.ma.getmaskarray(ax.images[0].get_array())
    assert mask[:, columns].all() and not mask[:, [0, 2, 3, 4, 5]].any()
    # The legend explains the hatching.
    texts = [t.get_text() for legend in figure.legends for t in legend.get_texts()]
    assert any("absent" in t for t in texts)
    assert figure.legends[0].legend_handles[0].get_hatch() == "//"


def test_absence_per_layer(renderer):
    ds = make_dataset(absent=(), present_by_layer=True)
    present = ds["present"].values.copy()
    present[2:, COMPONENTS.index("attn.o")] = False
    ds = ds.assign_coords(present=(("layer", "component"), present))
    ds["value"] = ds["value"].where(ds["present"])
    (ax,) = panels(render(renderer, [ds]))
    assert hatched_cells(ax) == {(2, 3), (3, 3)}


def test_nothing_hatched_without_absent_components(renderer):
    figure = render(renderer, [make_dataset(absent=())])
    assert not hatched(panels(figure)[0])
    assert not figure.legends


def test_a_missing_value_is_not_absent(renderer):
    ds = make_dataset(absent=())
    ds["value"][1, 0] = np.nan  # present, but no value
    figure = render(renderer, [ds])
    (ax,) = panels(figure)
    assert not hatched(ax)
    assert np.ma.getmaskarray(ax.images[0].get_array())[1, 0]
    texts = [t.get_text() for legend in figure.legends for t in legend.get_texts()]
    assert any("no value" in t for t in texts)


LOG_WEIGHT_NORM = WEIGHT_NORM + " (log scale)"


def robust_limits(values, low=1.0, high=99.0):
    finite = np.asarray(values, dtype=float).ravel()
    finite = finite[np.isfinite(finite)]
    return tuple(np.percentile(np.log10(finite), [low, high]))  # percentiles of what is drawn


def test_default_norm_is_sequential_log_and_robust(renderer):
    ds = make_dataset(absent=("mlp.gate",))
    figure = render(renderer, [ds])
    (ax,) = panels(figure)
    norm = ax.images[0].norm
    assert not isinstance(norm, TwoSlopeNorm)  # no centre: a sequential map
    assert ax.images[0].cmap.name.startswith("viridis")
    assert (norm.vmin, norm.vmax) == pytest.approx(robust_limits(ds["value"].values))
    (bar,) = colorbar_axes(figure)
    assert " ".join(bar.get_ylabel().split()) == LOG_WEIGHT_NORM


def test_one_outlier_does_not_wash_out_the_rest(renderer):
    values = 10.0 + np.arange(70.0).reshape(10, 7)  # 10 .. 79
    values[3, 2] = 1e4
    ds = make_dataset(values=values, absent=(), layers=range(10))
    figure = render(renderer, [ds], scale="linear", percentiles=(2, 98))
    (ax,) = panels(figure)
    norm = ax.images[0].norm
    assert norm.vmax < 100  # the outlier is beyond the top, drawn in the end colour
    assert (norm.vmin, norm.vmax) == pytest.approx(tuple(np.percentile(values, [2, 98])))
    (bar,) = colorbar_axes(figure)
    assert ax.images[0].colorbar.extend == "both"
    # Spanning everything: no arrows, the outlier sets the top.
    (ax,) = panels(render(renderer, [ds], scale="linear", percentiles=(0, 100)))
    assert ax.images[0].norm.vmax == 1e4 and ax.images[0].colorbar.extend == "neither"


def test_log_scale_needs_positive_values(renderer):
    ds = make_dataset(values=np.linspace(0.0, 3.0, 28).reshape(4, 7), absent=())
    with pytest.raises(ComponentHeatmapError, match="positive values.*1 value"):
        render(renderer, [ds], scale="log")
    (ax,) = panels(render(renderer, [ds]))  # auto: linear, since a value is 0
    assert ax.images[0].norm.vmin == pytest.approx(np.percentile(ds["value"].values, 1))
    with pytest.raises(pydantic.ValidationError, match="positive on a log scale"):
        ComponentHeatmapParameters(scale="log", vmin=0.0)


def test_per_component_normalisation(renderer):
    # Columns of very different size, each growing over depth the same way.
    values = np.outer([1.0, 2.0, 4.0, 8.0], [1.0, 10.0, 100.0, 1000.0, 1.0, 1.0, 1.0])
    ds = make_dataset(values=values, absent=())
    figure = render(renderer, [ds], normalize="component")
    (ax,) = panels(figure)
    image = ax.images[0].get_array().filled(np.nan)
    expected = np.log10(values / np.median(values, axis=0))  # the same profile in every column
    np.testing.assert_allclose(image, expected, atol=1e-12)
    norm = ax.images[0].norm
    assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == pytest.approx(0.0)  # centred on 1
    (bar,) = colorbar_axes(figure)
    assert "median over layers" in bar.get_ylabel()


def test_given_center_and_limits(renderer):
    ds = make_dataset(values=np.linspace(1.0, 3.0, 28).reshape(4, 7), absent=())
    linear = dict(scale="linear", percentiles=(0, 100))
    (ax,) = panels(render(renderer, [ds], center=2.5, **linear))
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vcenter, norm.vmax) == pytest.approx((1.0, 2.5, 3.0))

    # A centre below every value: the empty blue half mirrors the orange one.
    (ax,) = panels(render(renderer, [ds], center=0.0, **linear))
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vcenter, norm.vmax) == pytest.approx((-3.0, 0.0, 3.0))

    (ax,) = panels(render(renderer, [ds], vmin=0.0, vmax=10.0, **linear))
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vmax) == (0.0, 10.0)

    # On a log scale the user's values are in data units.
    (ax,) = panels(render(renderer, [ds], center=2.0, vmin=1.0, vmax=4.0))
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vcenter, norm.vmax) == pytest.approx((0.0, np.log10(2.0), np.log10(4.0)))


def test_one_colour_bar_per_panel(renderer):
    datasets = [make_dataset("gpt2"), make_dataset("llama", absent=(), layers=range(6), seed=3)]
    figure = render(renderer, datasets)
    heatmaps = panels(figure)
    assert [ax.get_title() for ax in heatmaps] == ["gpt2", "llama"]
    bars = colorbar_axes(figure)
    assert len(bars) == 2
    assert [" ".join(ax.get_ylabel().split()) for ax in bars] == [LOG_WEIGHT_NORM, LOG_WEIGHT_NORM]
    assert all(ax.images[0].colorbar is not None for ax in heatmaps)
    # Each its own scale: its own robust limits.
    first, second = (ax.images[0].norm for ax in heatmaps)
    assert first is not second
    for ax, ds in zip(heatmaps, datasets):
        norm = ax.images[0].norm
        assert (norm.vmin, norm.vmax) == pytest.approx(robust_limits(ds["value"].values))


def test_shared_scale(renderer):
    datasets = [make_dataset("gpt2"), make_dataset("llama", absent=(), layers=range(6), seed=3)]
    figure = render(renderer, datasets, shared_scale=True, title="Weight norms")
    heatmaps = panels(figure)
    bars = colorbar_axes(figure)
    assert len(bars) == 1
    assert " ".join(bars[0].get_ylabel().split()) == LOG_WEIGHT_NORM
    norm = heatmaps[0].images[0].norm
    assert heatmaps[1].images[0].norm is norm
    everything = np.concatenate([ds["value"].values.ravel() for ds in datasets])
    assert (norm.vmin, norm.vmax) == pytest.approx(robust_limits(everything))
    assert figure.get_suptitle() == "Weight norms"


def test_shared_scale_refuses_different_statistics(renderer):
    a = make_dataset("a")
    b = make_dataset("b", statistic="grad_norm", long_name="norm of the loss gradient")
    with pytest.raises(ComponentHeatmapError, match="different ones.*'a'.*'b'"):
        render(renderer, [a, b], shared_scale=True)
    # Each on its own scale is fine, each colour bar with its own label.
    labels = [" ".join(ax.get_ylabel().split()) for ax in colorbar_axes(render(renderer, [a, b]))]
    assert labels == [LOG_WEIGHT_NORM, "norm of the loss gradient (log scale)"]


def test_label_falls_back_to_the_statistic(renderer):
    ds = make_dataset(statistic="relative_update", long_name=None)
    (bar,) = colorbar_axes(render(renderer, [ds]))
    assert " ".join(bar.get_ylabel().split()) == (
        "relative weight change ||W - W_ref|| / ||W_ref||"
    )
    ds = make_dataset(statistic="my_stat", long_name=None)
    (bar,) = colorbar_axes(render(renderer, [ds]))
    assert bar.get_ylabel() == "my stat"


def test_combined_along_model(renderer):
    gpt2 = make_dataset("gpt2", layers=range(4))
    llama = make_dataset("llama", layers=range(6), absent=(), seed=4)
    combined = combine([gpt2, llama])
    assert combined["present"].dims == ("model", "component")
    figure = renderer.render([combined], None)
    heatmaps = panels(figure)
    assert [ax.get_title() for ax in heatmaps] == ["gpt2", "llama"]
    # The layers combining padded onto gpt2 are not drawn; its gate is hatched, llama's not.
    assert heatmaps[0].images[0].get_array().shape == (4, 7)
    assert heatmaps[1].images[0].get_array().shape == (6, 7)
    gate = COMPONENTS.index("mlp.gate")
    assert hatched_cells(heatmaps[0]) == {(row, gate) for row in range(4)}
    assert not hatched(heatmaps[1])
    assert len(colorbar_axes(figure)) == 2


def test_many_models_form_a_grid(renderer):
    datasets = [make_dataset(f"m{i}", layers=range(3), seed=i) for i in range(6)]
    figure = render(renderer, datasets, columns=4)
    heatmaps = panels(figure)
    assert [ax.get_title() for ax in heatmaps] == [f"m{i}" for i in range(6)]
    rows = [ax.get_subplotspec().rowspan.start for ax in heatmaps]
    columns = [ax.get_subplotspec().colspan.start for ax in heatmaps]
    assert rows == [0, 0, 0, 0, 1, 1] and columns == [0, 1, 2, 3, 0, 1]
    assert [ax.get_ylabel() for ax in heatmaps] == ["layer", "", "", "", "layer", ""]


@pytest.mark.parametrize("n_layers", [48, 80])
def test_many_layers_get_few_ticks(renderer, n_layers):
    figure = render(renderer, [make_dataset(layers=range(n_layers))])
    draw(figure)
    (ax,) = panels(figure)
    shown = [t for t in tick_texts(ax.get_yticklabels()) if t]
    assert 3 <= len(shown) <= 12
    numbers = [int(t) for t in shown]
    assert numbers == sorted(numbers) and numbers[0] == 0
    step = numbers[1] - numbers[0]
    assert step in (5, 10, 20) and all(b - a == step for a, b in zip(numbers, numbers[1:]))


@pytest.mark.parametrize(
    "values",
    [
        np.full((4, 7), 2.0),  # every value the same
        np.where(np.eye(4, 7, dtype=bool), 3.0, np.nan),  # a few equal finite values
        np.where(np.arange(28).reshape(4, 7) == 5, 0.0, np.nan),  # a single zero
        np.full((4, 7), np.nan),  # nothing at all
        np.array([[1.0] * 7] * 3 + [[5.0] * 7]),  # the median is the minimum
        -np.array([[1.0] * 7] * 3 + [[5.0] * 7]),  # the median is the maximum
    ],
    ids=["constant", "equal", "single-zero", "all-nan", "median-min", "median-max"],
)
def test_degenerate_data(renderer, values):
    figure = render(renderer, [make_dataset(values=values, absent=())], annotate=True)
    draw(figure)
    norm = panels(figure)[0].images[0].norm
    assert norm.vmin < norm.vmax
    finite = values[np.isfinite(values)]
    center = float(np.median(finite)) if finite.size else 0.0
    figure = render(renderer, [make_dataset(values=values, absent=())], annotate=True, center=center,
                    scale="linear", percentiles=(0, 100))
    draw(figure)
    norm = panels(figure)[0].images[0].norm
    assert norm.vmin < norm.vcenter < norm.vmax
    if finite.size:
        assert norm.vcenter == pytest.approx(center)
        assert norm.vmin <= finite.min() and finite.max() <= norm.vmax


def test_all_absent_model(renderer):
    ds = make_dataset(absent=COMPONENTS)
    figure = render(renderer, [ds])
    draw(figure)
    assert len(hatched_cells(panels(figure)[0])) == 4 * 7


def test_annotations(renderer):
    ds = make_dataset(values=np.arange(28.0).reshape(4, 7) * 0.01234 + 100)
    (ax,) = panels(render(renderer, [ds], annotate=True))
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 4 * 6  # every finite cell; none in the absent gate column
    assert "100" in texts and "100.0" not in texts
    # Dark cells get white text, light ones black.
    colours = {to_rgb(t.get_color()) for t in ax.texts}
    assert colours == {(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)}


def test_annotations_left_out_when_cells_are_too_small(renderer):
    with pytest.warns(UserWarning, match="too small"):
        figure = render(renderer, [make_dataset(layers=range(80))], annotate=True, panel_height=3)
    assert not panels(figure)[0].texts
    # Panels grow taller to make room: 40 layers are written out.
    figure = render(renderer, [make_dataset(layers=range(40))], annotate=True)
    assert len(panels(figure)[0].texts) == 40 * 6


def test_netcdf_round_trip(renderer, tmp_path):
    path = tmp_path / "gpt2.nc"
    make_dataset().to_netcdf(path)
    with xr.open_dataset(path) as ds:
        figure = render(renderer, [ds])
    (ax,) = panels(figure)
    assert hatched_cells(ax) == {(row, 6) for row in range(4)}
    assert tick_texts(ax.get_xticklabels()) == [component_label(c) for c in COMPONENTS]
    figure.savefig(tmp_path / "gpt2.png")


def test_params_as_mapping_and_model_fallback(renderer):
    figure = renderer.render([make_dataset(model=None)], {"shared_scale": True})
    assert panels(figure)[0].get_title() == "model 1"


def test_no_global_figure_state(renderer):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    renderer.render([make_dataset()], None)
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------------------
# Errors


def test_errors_are_value_and_plugin_errors(renderer):
    with pytest.raises(ValueError, match="no datasets"):
        renderer.render([], None)
    with pytest.raises(PluginError, match="no datasets"):
        renderer.render([], None)


def test_not_a_dataset(renderer):
    with pytest.raises(ComponentHeatmapError, match="dataset 0 is a DataArray"):
        renderer.render([make_dataset()["value"]], None)


def test_dataset_without_value(renderer):
    other = make_dataset("gpt2").rename({"value": "norm"})
    with pytest.raises(
        ComponentHeatmapError, match=r"model 'gpt2'.*no 'value' variable \(it has: norm\)"
    ):
        renderer.render([other], None)


def test_wrong_dimensions(renderer):
    ds = make_dataset("gpt2").rename({"component": "site"})
    with pytest.raises(
        ComponentHeatmapError,
        match=r"model 'gpt2': .*'value' has dimensions \('layer', 'site'\), expected \('layer', 'component'\)",
    ):
        renderer.render([ds], None)
    ds = make_dataset("gpt2").expand_dims(prompt=2)
    with pytest.raises(ComponentHeatmapError, match="'value' has dimensions"):
        renderer.render([ds], None)


def test_unknown_component(renderer):
    ds = make_dataset("gpt2", components=["attn.q", "attn.qkv"], absent=())
    with pytest.raises(
        ComponentHeatmapError, match=r"model 'gpt2': 'component' holds unknown value\(s\) 'attn.qkv'; expected names from attn.q"
    ):
        renderer.render([ds], None)


def test_empty_dataset(renderer):
    ds = make_dataset("gpt2").isel(layer=slice(0, 0))
    with pytest.raises(ComponentHeatmapError, match="model 'gpt2'.*0 layer"):
        renderer.render([ds], None)
