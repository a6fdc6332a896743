"""Tests of the ``head_category_map`` renderer on synthetic ``head_classifier`` datasets.

No model is needed: the datasets are built here following the probe's schema. Which
categories each head is in (``in_category``) is drawn at random, and the ``category`` flags
and ``n_categories`` are derived from it here, independently of the renderer.
"""

from __future__ import annotations

import numpy as np
import pluggy
import pydantic
import pytest
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from probescope.errors import PluginError
from probescope.plugins import hookspecs
from probescope.renderers import head_category_map
from probescope.renderers.head_category_map import (
    CATEGORY_COLORS,
    EXTRA_CATEGORY_COLORS,
    NO_DATA_LABEL,
    UNCLASSIFIED_COLOR,
    HeadCategoryMapError,
    HeadCategoryMapParameters,
    HeadCategoryMapRenderer,
    meaning_label,
    multi_category_colors,
)
from probescope.results import combine

BUILT_IN = ("algorithmic", "knowledge", "linguistic", "translation")
BUILT_IN_LABELS = [
    "Unclassified", "Algorithmic", "Knowledge", "Linguistic", "Translation",
    "2 categories", "3 categories", "4 categories",
]


def make_dataset(
    model: str | None = "gpt2",
    layers: int = 12,
    heads: int = 12,
    categories=BUILT_IN,
    seed: int = 0,
    p: float = 0.3,
) -> xr.Dataset:
    """A head_classifier dataset of ``layers`` x ``heads`` heads.

    Each head is in each category with probability ``p``; besides, so that every flag
    occurs, layer 0's heads 0, 1, 2, ... are in no category, the first, the first two ...
    and layer 1's heads 0, 1, ... in exactly the first, the second ... category.
    """
    categories = list(categories)
    n_cat = len(categories)
    rng = np.random.default_rng(seed)
    inside = rng.random((layers, heads, n_cat)) < p
    if layers >= 2:
        for k in range(min(heads, n_cat + 1)):
            inside[0, k] = np.arange(n_cat) < k
        for c in range(min(heads, n_cat)):
            inside[1, c] = np.arange(n_cat) == c

    count = inside.sum(axis=-1)
    # 0 unclassified; 1..C exactly that one category; C + n - 1 in n >= 2 categories.
    category = np.where(count == 0, 0, np.where(count == 1, inside.argmax(axis=-1) + 1, n_cat + count - 1))
    meanings = [
        "unclassified", *categories, *(f"{n}_categories" for n in range(2, n_cat + 1))
    ]

    relations = ["copying", "antonym", "country_to_capital"]
    relation_category = ["algorithmic", "linguistic", "knowledge"]
    score = rng.random((layers, heads, len(relations)))
    score[:, :, 2] = np.nan  # a relation not scored
    attrs = {"model": model, "threshold": 0.15, "probe": "head_classifier", "probe_version": "0.1.0"}
    if model is None:
        del attrs["model"]
    return xr.Dataset(
        {
            "relation_score": (("layer", "head", "relation"), score),
            "suppression_score": (("layer", "head", "relation"), rng.random(score.shape)),
            "category": (
                ("layer", "head"),
                category.astype(np.int8),
                {
                    "flag_values": np.arange(2 * n_cat, dtype=np.int8),
                    "flag_meanings": " ".join(meanings),
                    "long_name": "category of operation the head implements",
                },
            ),
            "in_category": (("layer", "head", "category_name"), inside),
            "n_categories": (("layer", "head"), count.astype(np.int64)),
        },
        coords={
            "layer": np.arange(layers, dtype=np.int64),
            "head": np.arange(heads, dtype=np.int64),
            "relation": np.array(relations, dtype=object),
            "relation_category": ("relation", np.array(relation_category, dtype=object)),
            "kept_pairs": ("relation", np.array([40, 35, 0], dtype=np.int64)),
            "category_name": np.array(categories, dtype=object),
        },
        attrs=attrs,
    )


def expected_colors(categories=BUILT_IN, overrides=None) -> dict[int, tuple]:
    """Flag value -> the RGBA colour its cells must have."""
    n_cat = len(categories)
    colors = {0: UNCLASSIFIED_COLOR}
    for i, name in enumerate(categories, start=1):
        colors[i] = CATEGORY_COLORS.get(name, EXTRA_CATEGORY_COLORS[max(0, i - 1 - len(BUILT_IN))])
    ramp = multi_category_colors(n_cat - 1)
    for n in range(2, n_cat + 1):
        colors[n_cat + n - 1] = ramp[n - 2]
    meanings = ["unclassified", *categories, *(f"{n}_categories" for n in range(2, n_cat + 1))]
    for meaning, color in (overrides or {}).items():
        colors[meanings.index(meaning)] = color
    return {flag: to_rgba(color) for flag, color in colors.items()}


@pytest.fixture
def renderer() -> HeadCategoryMapRenderer:
    return HeadCategoryMapRenderer()


def render(renderer, datasets, **params) -> Figure:
    return renderer.render(datasets, renderer.Parameters(**params))


def panels(figure: Figure) -> list:
    return [ax for ax in figure.axes if ax.images]


def drawn_colors(ax) -> np.ndarray:
    """(head, layer, 4) RGBA of every cell as the image colours it."""
    image = ax.images[0]
    return image.to_rgba(image.get_array())


def legend_labels(figure: Figure) -> list[str]:
    (legend,) = figure.legends
    return [t.get_text() for t in legend.get_texts()]


def draw(figure: Figure) -> np.ndarray:
    """The figure's pixels, RGB in [0, 1], row 0 at the top."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3] / 255.0


def pixel(pixels: np.ndarray, ax, layer: float, head: float) -> np.ndarray:
    """The pixel at the centre of cell (layer, head) of ``ax``."""
    x, y = ax.transData.transform((layer, head))
    return pixels[pixels.shape[0] - 1 - int(round(y)), int(round(x))]


def shown_ticks(ax, axis: str) -> list[int]:
    """The tick positions inside the axis limits (those drawn), as integers."""
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    low, high = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    inside = [t for t in ticks if low <= t <= high]
    assert all(float(t).is_integer() for t in inside), inside
    return [int(t) for t in inside]


# --------------------------------------------------------------------------------------
# The plugin and its parameters


def test_renderer_declares_itself():
    renderer = HeadCategoryMapRenderer()
    assert renderer.name == "head_category_map"
    assert renderer.probe == "head_classifier"
    assert renderer.description
    assert renderer.Parameters is HeadCategoryMapParameters


def test_registers_through_the_hook():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(head_category_map)
    registered = []
    manager.hook.register_renderers(register=registered.append)
    assert [type(r) for r in registered] == [HeadCategoryMapRenderer]
    assert registered[0].name == "head_category_map"
    assert registered[0].probe == "head_classifier"


def test_parameter_defaults_and_validation():
    params = HeadCategoryMapParameters()
    assert params.title is None and params.columns is None
    assert params.colors is None and params.panel_size is None
    assert HeadCategoryMapParameters(colors={"knowledge": (1, 0, 0)}).colors == {"knowledge": (1.0, 0.0, 0.0)}
    assert HeadCategoryMapParameters(panel_size=[3, 2]).panel_size == (3.0, 2.0)
    with pytest.raises(pydantic.ValidationError, match="columns"):
        HeadCategoryMapParameters(columns=0)
    with pytest.raises(pydantic.ValidationError, match="'bluish' is not a matplotlib colour"):
        HeadCategoryMapParameters(colors={"knowledge": "bluish"})
    with pytest.raises(pydantic.ValidationError, match="not a flag meaning"):
        HeadCategoryMapParameters(colors={"2 categories": "red"})
    with pytest.raises(pydantic.ValidationError, match="panel width -1.0 must be a positive"):
        HeadCategoryMapParameters(panel_size=(-1, 2))
    with pytest.raises(pydantic.ValidationError, match="panel height 0.0"):
        HeadCategoryMapParameters(panel_size=(2, 0))
    with pytest.raises(pydantic.ValidationError):
        HeadCategoryMapParameters(panel_size=(2, 3, 4))
    with pytest.raises(pydantic.ValidationError, match="colours"):
        HeadCategoryMapParameters(colours={"knowledge": "red"})  # unknown keys are errors


def test_colour_choices():
    colors = [to_rgba(c) for c in [UNCLASSIFIED_COLOR, *CATEGORY_COLORS.values(), *multi_category_colors(3)]]
    assert len(set(colors)) == 8  # all distinct
    assert set(CATEGORY_COLORS) == set(BUILT_IN)
    grey = to_rgba(UNCLASSIFIED_COLOR)
    assert grey[0] == grey[1] == grey[2] and 0.75 < grey[0] < 0.95
    # The multi-category ramp darkens with more categories.
    for count in (3, 4, 6):
        lightness = [sum(to_rgba(c)[:3]) for c in multi_category_colors(count)]
        assert lightness == sorted(lightness, reverse=True) and len(set(lightness)) == count


def test_meaning_labels():
    assert meaning_label("unclassified") == "Unclassified"
    assert meaning_label("knowledge") == "Knowledge"
    assert meaning_label("2_categories") == "2 categories"
    assert meaning_label("word_order") == "Word order"


# --------------------------------------------------------------------------------------
# The figure


def test_every_cell_has_its_flags_colour(renderer):
    ds = make_dataset(layers=12, heads=12)
    figure = render(renderer, [ds])
    (ax,) = panels(figure)
    image = ax.images[0]
    assert image.origin == "lower" and image.get_interpolation() == "nearest"
    flags = ds["category"].values  # (layer, head)
    assert set(np.unique(flags)) == set(range(8))  # every flag occurs
    np.testing.assert_array_equal(image.get_array(), flags.T)  # rows are heads
    colors = drawn_colors(ax)
    expected = expected_colors()
    for layer in range(12):
        for head in range(12):
            np.testing.assert_allclose(colors[head, layer], expected[flags[layer, head]])
    # Unclassified is grey; heads in 2, 3, 4 categories get the three multi colours.
    np.testing.assert_allclose(colors[0, 0], to_rgba(UNCLASSIFIED_COLOR))
    for n in (2, 3, 4):
        np.testing.assert_allclose(colors[n, 0], to_rgba(multi_category_colors(3)[n - 2]))
    for c, name in enumerate(BUILT_IN):
        np.testing.assert_allclose(colors[c, 1], to_rgba(CATEGORY_COLORS[name]))


def test_pixels_and_orientation(renderer):
    ds = make_dataset(layers=6, heads=5)
    figure = render(renderer, [ds])
    (ax,) = panels(figure)
    # Layer along x, head along y with head 0 at the bottom.
    assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "head"
    assert ax.get_xlim() == (-0.5, 5.5) and ax.get_ylim() == (-0.5, 4.5)
    pixels = draw(figure)
    expected = expected_colors()
    flags = ds["category"].values
    for layer in range(6):
        for head in range(5):
            np.testing.assert_allclose(
                pixel(pixels, ax, layer, head), expected[flags[layer, head]][:3], atol=2 / 255
            )
    # Head 0 of layer 0 (unclassified, grey) is below head 4 on the screen.
    low = ax.transData.transform((0, 0))[1]
    high = ax.transData.transform((0, 4))[1]
    assert low < high


def test_one_legend_for_the_figure(renderer):
    datasets = [make_dataset("gpt2"), make_dataset("phi-2", layers=16, heads=8, seed=1)]
    figure = render(renderer, datasets)
    assert all(ax.get_legend() is None for ax in figure.axes)
    assert legend_labels(figure) == BUILT_IN_LABELS
    (legend,) = figure.legends
    expected = expected_colors()
    for flag, handle in enumerate(legend.legend_handles):
        np.testing.assert_allclose(handle.get_facecolor(), expected[flag])
    # Below the panels: it covers no cell.
    draw(figure)
    box = legend.get_window_extent()
    assert all(box.y1 <= ax.get_window_extent().y0 for ax in panels(figure))


def test_legend_lists_meanings_no_head_has(renderer):
    ds = make_dataset(layers=1, heads=3, p=0.0)  # every head unclassified
    assert (ds["category"].values == 0).all()
    figure = render(renderer, [ds])
    assert legend_labels(figure) == BUILT_IN_LABELS


def test_panel_titles_and_grid(renderer):
    names = ["gpt2-xl", "phi-2", "pythia-12b", "llama-3.1-70b"]
    datasets = [make_dataset(n, layers=6 + 2 * i, heads=4 + i, seed=i) for i, n in enumerate(names)]
    figure = render(renderer, datasets, title="Head categories")
    axes = panels(figure)
    assert [ax.get_title() for ax in axes] == names
    assert [(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in axes] == [
        (0, 0), (0, 1), (1, 0), (1, 1)
    ]
    assert figure.get_suptitle() == "Head categories"
    # Each panel its own limits.
    for i, ax in enumerate(axes):
        assert ax.get_xlim() == (-0.5, 6 + 2 * i - 0.5)
        assert ax.get_ylim() == (-0.5, 4 + i - 0.5)
        assert ax.get_xlabel() == "layer"
    assert [ax.get_ylabel() for ax in axes] == ["head", "", "head", ""]

    three = panels(render(renderer, datasets[:3]))
    assert [ax.get_subplotspec().rowspan.start for ax in three] == [0, 0, 0]
    five = panels(render(renderer, datasets + [make_dataset("m5", layers=3, heads=5)]))
    assert [ax.get_subplotspec().colspan.start for ax in five] == [0, 1, 2, 0, 1]
    one_column = panels(render(renderer, datasets[:2], columns=1))
    assert [ax.get_subplotspec().rowspan.start for ax in one_column] == [0, 1]


@pytest.mark.parametrize("layers, heads", [(12, 12), (80, 64), (48, 40), (16, 25)])
def test_ticks(renderer, layers, heads):
    ds = make_dataset(layers=layers, heads=heads)
    (ax,) = panels(render(renderer, [ds]))
    for axis, size in (("x", layers), ("y", heads)):
        ticks = shown_ticks(ax, axis)
        assert ticks[0] == 0 and 3 <= len(ticks) <= 8, ticks
        step = ticks[1] - ticks[0]
        assert step in (1, 2, 5, 10, 20) and all(b - a == step for a, b in zip(ticks, ticks[1:]))
        assert ticks[-1] <= size - 1


def test_combined_datasets(renderer):
    small = make_dataset("small", layers=4, heads=6, seed=1)
    large = make_dataset("large", layers=6, heads=4, seed=2)
    combined = combine([small, large])
    assert combined["category"].dtype.kind == "f"  # padded with NaN
    # A head without a flag inside the small model's own grid.
    combined["category"].loc[dict(model="small", layer=2, head=3)] = np.nan
    figure = renderer.render([combined], None)
    axes = panels(figure)
    assert [ax.get_title() for ax in axes] == ["small", "large"]
    # Each model its own size: the padding combining added is not drawn.
    assert axes[0].get_xlim() == (-0.5, 3.5) and axes[0].get_ylim() == (-0.5, 5.5)
    assert axes[1].get_xlim() == (-0.5, 5.5) and axes[1].get_ylim() == (-0.5, 3.5)
    assert axes[0].images[0].get_array().shape == (6, 4)
    # The NaN cell is blank, not unclassified; the rest have their colours.
    expected = expected_colors()
    array = axes[0].images[0].get_array()
    assert np.ma.getmaskarray(array)[3, 2] and np.ma.getmaskarray(array).sum() == 1
    assert drawn_colors(axes[0])[3, 2][3] == 0  # transparent
    flags = small["category"].values
    colors = drawn_colors(axes[0])
    for layer in range(4):
        for head in range(6):
            if (layer, head) != (2, 3):
                np.testing.assert_allclose(colors[head, layer], expected[flags[layer, head]])
    pixels = draw(figure)
    np.testing.assert_allclose(pixel(pixels, axes[0], 2, 3), [1.0, 1.0, 1.0])
    assert legend_labels(figure) == BUILT_IN_LABELS + [NO_DATA_LABEL]


def test_float_flags_with_nan(renderer):
    ds = make_dataset(layers=3, heads=4)
    ds["category"] = ds["category"].astype(float).where(ds["layer"] != 1)
    (ax,) = panels(render(renderer, [ds]))
    mask = np.ma.getmaskarray(ax.images[0].get_array())
    assert mask[:, 1].all() and not mask[:, [0, 2]].any()
    assert ax.get_xlim() == (-0.5, 2.5)  # a single dataset keeps all its layers


def test_combined_with_different_categories_loses_the_flags(renderer):
    a = make_dataset("a", layers=3, heads=4)
    b = make_dataset("b", layers=3, heads=4, categories=(*BUILT_IN, "syntax"))
    with pytest.raises(HeadCategoryMapError, match="no flag_values or flag_meanings.*same categories"):
        renderer.render([combine([a, b])], None)


def test_user_categories(renderer):
    categories = (*BUILT_IN, "syntax")
    ds = make_dataset(layers=10, heads=8, categories=categories, p=0.45)
    assert ds["category"].attrs["flag_values"].tolist() == list(range(10))
    figure = render(renderer, [ds])
    (ax,) = panels(figure)
    assert legend_labels(figure) == BUILT_IN_LABELS[:5] + ["Syntax"] + [
        f"{n} categories" for n in (2, 3, 4, 5)
    ]
    expected = expected_colors(categories)
    assert expected[5] == to_rgba(EXTRA_CATEGORY_COLORS[0])
    multi = [expected[flag] for flag in range(6, 10)]
    assert len(set(multi)) == 4
    colors, flags = drawn_colors(ax), ds["category"].values
    for layer in range(10):
        for head in range(8):
            np.testing.assert_allclose(colors[head, layer], expected[flags[layer, head]])
    np.testing.assert_allclose(colors[5, 0], expected[9])  # layer 0, head 5: all five


def test_same_meaning_same_colour_across_panels(renderer):
    # A model with a user category beside one without: the shared meanings keep their
    # colours, the multi ramp spans every count any dataset defines.
    a = make_dataset("a", layers=3, heads=6)
    b = make_dataset("b", layers=3, heads=6, categories=("knowledge", "syntax"))
    figure = render(renderer, [a, b])
    first, second = panels(figure)
    assert legend_labels(figure) == BUILT_IN_LABELS[:5] + ["Syntax"] + BUILT_IN_LABELS[5:]
    np.testing.assert_allclose(drawn_colors(first)[1, 1], to_rgba(CATEGORY_COLORS["knowledge"]))
    np.testing.assert_allclose(drawn_colors(second)[0, 1], to_rgba(CATEGORY_COLORS["knowledge"]))
    np.testing.assert_allclose(drawn_colors(second)[1, 1], to_rgba(EXTRA_CATEGORY_COLORS[0]))
    np.testing.assert_allclose(drawn_colors(first)[2, 0], drawn_colors(second)[2, 0])  # 2 categories


def test_colour_overrides(renderer):
    overrides = {"knowledge": "red", "2_categories": "#000000", "unclassified": (0.5, 0.5, 1.0)}
    ds = make_dataset()
    figure = render(renderer, [ds], colors=overrides)
    (ax,) = panels(figure)
    expected = expected_colors(overrides=overrides)
    assert expected[2] == to_rgba("red")
    colors, flags = drawn_colors(ax), ds["category"].values
    for layer in range(12):
        for head in range(12):
            np.testing.assert_allclose(colors[head, layer], expected[flags[layer, head]])
    (legend,) = figure.legends
    np.testing.assert_allclose(legend.legend_handles[2].get_facecolor(), to_rgba("red"))
    np.testing.assert_allclose(legend.legend_handles[5].get_facecolor(), to_rgba("black"))


def test_colour_for_a_meaning_no_dataset_defines(renderer):
    with pytest.raises(HeadCategoryMapError, match=r"colors names 'syntax'.*unclassified, algorithmic"):
        render(renderer, [make_dataset(layers=2, heads=2)], colors={"syntax": "red"})


def test_panel_size(renderer):
    figure = render(renderer, [make_dataset(layers=4, heads=4)] * 2, panel_size=(4, 3))
    width, height = figure.get_size_inches()
    assert width > 8 and height > 3


def test_netcdf_round_trip(renderer, tmp_path):
    ds = make_dataset(layers=5, heads=6)
    path = tmp_path / "gpt2.nc"
    ds.to_netcdf(path)
    with xr.open_dataset(path) as loaded:
        figure = render(renderer, [loaded])
    (ax,) = panels(figure)
    colors, flags, expected = drawn_colors(ax), ds["category"].values, expected_colors()
    for layer in range(5):
        for head in range(6):
            np.testing.assert_allclose(colors[head, layer], expected[flags[layer, head]])
    figure.savefig(tmp_path / "gpt2.png")


def test_params_as_mapping_and_model_fallback(renderer):
    figure = renderer.render([make_dataset(model=None, layers=2, heads=2)], {"title": "t"})
    assert panels(figure)[0].get_title() == "model 1"


def test_no_global_figure_state(renderer):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    renderer.render([make_dataset(layers=2, heads=2)], None)
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------------------
# Errors


def test_no_datasets(renderer):
    with pytest.raises(HeadCategoryMapError, match="no datasets.*head_classifier"):
        renderer.render([], None)
    with pytest.raises(PluginError):
        renderer.render([], None)
    with pytest.raises(ValueError):
        renderer.render([], None)


def test_dataset_without_category(renderer):
    ds = make_dataset("gpt2", layers=2, heads=2).drop_vars("category")
    with pytest.raises(
        HeadCategoryMapError,
        match=r"model 'gpt2': the dataset has no 'category' variable.*head_classifier dataset\?",
    ):
        renderer.render([ds], None)


@pytest.mark.parametrize("missing", ["flag_values", "flag_meanings"])
def test_missing_flag_attributes(renderer, missing):
    ds = make_dataset("gpt2", layers=2, heads=2)
    del ds["category"].attrs[missing]
    with pytest.raises(HeadCategoryMapError, match=f"model 'gpt2': 'category' has no {missing} attribute.*CF flag"):
        renderer.render([ds], None)


def test_flag_lengths_differ(renderer):
    ds = make_dataset("gpt2", layers=2, heads=2)
    ds["category"].attrs["flag_meanings"] = "unclassified algorithmic knowledge"
    with pytest.raises(HeadCategoryMapError, match="8 flag_values but 3 flag_meanings"):
        renderer.render([ds], None)


def test_values_the_flags_do_not_define(renderer):
    ds = make_dataset("gpt2", layers=2, heads=2)
    ds["category"][0, 0] = 9
    with pytest.raises(HeadCategoryMapError, match=r"value\(s\) 9 that its flag_values"):
        renderer.render([ds], None)


def test_wrong_dimensions(renderer):
    ds = make_dataset("gpt2", layers=2, heads=2).rename({"head": "unit"})
    with pytest.raises(
        HeadCategoryMapError,
        match=r"model 'gpt2': .*'category' has dimensions \('layer', 'unit'\), expected \('layer', 'head'\)",
    ):
        renderer.render([ds], None)
    ds = make_dataset("gpt2", layers=2, heads=2)
    ds["category"] = ds["category"].expand_dims(prompt=2)
    with pytest.raises(HeadCategoryMapError, match="'category' has dimensions"):
        renderer.render([ds], None)


def test_scores_instead_of_categories(renderer):
    ds = make_dataset(layers=5, heads=4)
    score = ds["relation_score"].values
    for choice, expected in [
        ("copying", score[..., 0]),
        ("linguistic", score[..., 1]),  # the category's only relation
        ("max", np.nanmax(score, axis=-1)),  # the unscored relation (NaN) never wins
    ]:
        figure = render(renderer, [ds], scores=choice)
        (ax,) = [a for a in figure.axes if a.get_label() != "<colorbar>"]
        drawn = ax.images[0].get_array().filled(np.nan)
        np.testing.assert_allclose(drawn, expected.T)  # (head, layer): heads up the y axis
        assert ax.images[0].norm.vmin == 0.0 and ax.images[0].norm.vmax == 1.0
        assert figure.legends == []
        bars = [a for a in figure.axes if a.get_label() == "<colorbar>"]
        assert len(bars) == 1 and ("score" in bars[0].get_ylabel())
    with pytest.raises(HeadCategoryMapError, match="neither \"max\", a relation .*copying.* nor a category"):
        render(renderer, [ds], scores="no_such_relation")


def test_threshold_parameter_draws_the_heads_classified_again(renderer):
    from probescope.probes.head_classifier import reclassify

    ds = make_dataset(layers=4, heads=6, seed=3)
    default = drawn_colors(panels(render(renderer, [ds]))[0])
    strict = drawn_colors(panels(render(renderer, [ds], threshold=0.9))[0])
    expected_flags = reclassify(ds, 0.9).category.values  # (layer, head)
    colors = expected_colors()
    for layer in range(4):
        for head in range(6):
            np.testing.assert_allclose(strict[head, layer], colors[expected_flags[layer, head]])
    assert not np.allclose(default, strict)  # the parameter changed the figure
    with pytest.raises(Exception, match="threshold"):
        renderer.Parameters(threshold=1.5)
