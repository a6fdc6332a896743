"""Tests of the ``similarity_grid`` renderer on synthetic ``token_similarity`` datasets.

No model is needed: the datasets are built here following the probe's schema, with NaN
above the diagonal and over padding positions.
"""

from __future__ import annotations

import re

import numpy as np
import pluggy
import pydantic
import pytest
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from probescope.errors import PluginError
from probescope.plugins import hookspecs
from probescope.renderers import similarity_grid
from probescope.renderers.similarity_grid import (
    SimilarityGridError,
    SimilarityGridParameters,
    SimilarityGridRenderer,
)

PROMPTS = ("The cat sat on the mat.", "Hello world")


def words(text: str) -> list[str]:
    """A word-level 'tokenizer': each word with its leading space."""
    return re.findall(r"\s?\S+", text)


def label_texts(text: str) -> list[str]:
    """The tick labels of :func:`words`: surrounding spaces trimmed."""
    return [w.strip() for w in words(text)]


def pieces(text: str) -> list[str]:
    """A finer 'tokenizer' (another model's vocabulary): pieces of at most 3 letters."""
    return re.findall(r"\s?[A-Za-z]{1,3}|\s?[^\sA-Za-z]", text)


def make_dataset(
    model: str | None = "small",
    layers: tuple[int, ...] = (-1, 0, 1, 2, 3),
    prompts: tuple[str, ...] = PROMPTS,
    tokenize=words,
    metric: str = "cosine",
    seed: int = 0,
) -> xr.Dataset:
    """A token_similarity dataset: cosine similarities of random hidden states that grow
    more alike with depth; NaN above the diagonal and on padding."""
    rng = np.random.default_rng(seed)
    tokens = [tokenize(p) for p in prompts]
    width = max(len(t) for t in tokens)
    depth = max(layers) + 2
    sim = np.full((len(prompts), len(layers), width, width), np.nan)
    for p, toks in enumerate(tokens):
        n = len(toks)
        base = rng.normal(size=(n, 16))
        common = rng.normal(size=16)
        for li, layer in enumerate(layers):
            share = (layer + 1.5) / depth
            hidden = (1 - share) * base + share * common + 0.1 * rng.normal(size=(n, 16))
            unit = hidden / np.linalg.norm(hidden, axis=1, keepdims=True)
            cos = unit @ unit.T
            cos[np.triu_indices(n, 1)] = np.nan
            sim[p, li, :n, :n] = cos
    token_text = np.array(
        [[t[i] if i < len(t) else "" for i in range(width)] for t in tokens], dtype=object
    )
    token_id = np.array([[i if i < len(t) else -1 for i in range(width)] for t in tokens])
    attrs = {"metric": metric, "probe": "token_similarity", "probe_version": "0.1.0"}
    if model is not None:
        attrs["model"] = model
    return xr.Dataset(
        {"similarity": (("prompt", "layer", "token", "context_token"), sim)},
        coords={
            "prompt": np.arange(len(prompts)),
            "prompt_text": ("prompt", np.array(prompts, dtype=object)),
            "layer": np.array(layers),
            "layer_label": (
                "layer",
                np.array(["embed" if v == -1 else str(v) for v in layers], dtype=object),
            ),
            "token": np.arange(width),
            "context_token": np.arange(width),
            "token_text": (("prompt", "token"), token_text),
            "token_id": (("prompt", "token"), token_id),
            "context_token_text": (("prompt", "context_token"), token_text.copy()),
            "n_tokens": ("prompt", np.array([len(t) for t in tokens])),
        },
        attrs=attrs,
    )


@pytest.fixture
def renderer() -> SimilarityGridRenderer:
    return SimilarityGridRenderer()


@pytest.fixture
def two_models() -> list[xr.Dataset]:
    """Two models sharing layers, with different tokenizers (different token counts)."""
    return [
        make_dataset("small", seed=1),
        make_dataset("large", tokenize=pieces, seed=2),
    ]


def panels(figure: Figure) -> list:
    """The heatmap axes (those holding an image), in drawing order (row by row)."""
    return [ax for ax in figure.axes if ax.images]


def colorbars(figure: Figure) -> list:
    return [im.colorbar for ax in figure.axes for im in ax.images if im.colorbar is not None]


def draw(figure: Figure):
    """Draw the figure for real (a bare Figure's canvas draws nothing); its renderer."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def render(renderer, datasets, **params) -> Figure:
    return renderer.render(datasets, renderer.Parameters(**params))


# --------------------------------------------------------------------------------------
# The plugin


def test_renderer_declares_itself():
    renderer = SimilarityGridRenderer()
    assert renderer.name == "similarity_grid"
    assert renderer.probe == "token_similarity"
    assert renderer.description
    assert renderer.Parameters is SimilarityGridParameters


def test_registers_through_the_hook():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(similarity_grid)
    registered = []
    manager.hook.register_renderers(register=registered.append)
    assert [type(r) for r in registered] == [SimilarityGridRenderer]


def test_parameter_defaults_and_validation():
    params = SimilarityGridParameters()
    assert params.prompt == 0 and params.layers is None and params.cmap == "RdBu_r"
    assert SimilarityGridParameters(layers=[1, "embed", "last"]).layers == (1, "embed", "last")
    with pytest.raises(pydantic.ValidationError, match="layerz"):
        SimilarityGridParameters(layerz=[1])  # unknown keys are errors
    with pytest.raises(pydantic.ValidationError, match="not a matplotlib colour map"):
        SimilarityGridParameters(cmap="NoSuchMap")
    with pytest.raises(pydantic.ValidationError, match="must be below vmax"):
        SimilarityGridParameters(vmin=1.0, vmax=0.5)
    with pytest.raises(pydantic.ValidationError, match="listed more than once"):
        SimilarityGridParameters(layers=[-1, "last"])  # both name the last block
    with pytest.raises(pydantic.ValidationError, match="give at least one"):
        SimilarityGridParameters(layers=[])
    with pytest.raises(pydantic.ValidationError):
        SimilarityGridParameters(prompt=-1)


# --------------------------------------------------------------------------------------
# The figure


def test_two_models_four_layers(renderer, two_models):
    figure = render(renderer, two_models, layers=[0, 1, 2, 3])
    assert isinstance(figure, Figure)

    heatmaps = panels(figure)
    assert len(heatmaps) == 2 * 4

    # Column titles on the top row only, since both models share the layers.
    assert [ax.get_title() for ax in heatmaps[:4]] == ["Layer 0", "Layer 1", "Layer 2", "Layer 3"]
    assert [ax.get_title() for ax in heatmaps[4:]] == [""] * 4

    # Row labels: the model names, on the first panel of each row.
    assert heatmaps[0].get_ylabel() == "small"
    assert heatmaps[4].get_ylabel() == "large"

    # Exactly one colour bar, labelled with the metric; it is the only non-heatmap axes.
    bars = colorbars(figure)
    assert len(bars) == 1
    assert bars[0].ax.get_ylabel() == "cosine similarity"
    assert [ax for ax in figure.axes if not ax.images] == [bars[0].ax]

    # One shared colour scale, symmetric about 0, set by the pairs of distinct tokens
    # after the first: neither the diagonal's 1 nor the first token sets it.
    limits = {im.get_clim() for ax in heatmaps for im in ax.images}
    assert len(limits) == 1
    off = []
    for ax in heatmaps:
        data = ax.images[0].get_array().filled(np.nan)
        below = np.tril(np.ones(data.shape, dtype=bool), k=-1)
        below[:, 0] = False
        off.append(data[below])
    top = np.nanmax(np.abs(np.concatenate(off)))
    low, high = limits.pop()
    assert (low, high) == pytest.approx((-top, top))
    assert high < 1.0
    assert colorbars(figure)[0].extend in ("max", "both")  # the diagonal's 1 lies beyond
    assert all(ax.images[0].norm is heatmaps[0].images[0].norm for ax in heatmaps)

    # The prompt's text is shown beside the grid.
    texts = [t.get_text() for sub in figure.subfigs for t in sub.texts]
    assert "Prompt 0" in texts
    assert any("The cat sat on the mat." in t for t in texts)


@pytest.mark.parametrize(
    "models, layers",
    [(("small", "large"), [0, 1, 2, 3]), (("solo",), [2])],
    ids=["2x4", "1x1"],
)
def test_layout_is_clean(renderer, models, layers, recwarn):
    datasets = [
        make_dataset(m, tokenize=pieces if i else words, seed=i) for i, m in enumerate(models)
    ]
    figure = render(renderer, datasets, layers=layers, title="Token similarity")
    renderer_ = draw(figure)
    assert not [w for w in recwarn if "layout" in str(w.message).lower()]

    page = figure.bbox
    boxes = [ax.get_tightbbox(renderer_) for ax in panels(figure)]
    boxes.append(colorbars(figure)[0].ax.get_tightbbox(renderer_))
    for box in boxes:  # nothing cut off
        assert box.x0 >= page.x0 - 1 and box.y0 >= page.y0 - 1
        assert box.x1 <= page.x1 + 1 and box.y1 <= page.y1 + 1
    for i, a in enumerate(boxes):  # no panel's labels run into another's
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b) or _overlap_area(a, b) < 4, (a, b)
    for ax in panels(figure):  # square panels
        bbox = ax.get_window_extent(renderer_)
        assert bbox.width == pytest.approx(bbox.height, rel=0.02)


def _overlap_area(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0) * max(h, 0)


def test_panel_image_is_the_dataset_slice(renderer, two_models):
    figure = render(renderer, two_models, layers=[0, 1, 2, 3])
    ax = panels(figure)[4 + 2]  # model "large", layer 2
    large = two_models[1]
    n = int(large["n_tokens"].sel(prompt=0))
    expected = large["similarity"].sel(prompt=0, layer=2).values[:n, :n]

    image = ax.images[0].get_array()
    assert image.shape == (n, n)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    np.testing.assert_array_equal(np.ma.getmaskarray(image), upper)
    np.testing.assert_allclose(image.data[~upper], expected[~upper])


def test_padding_is_never_drawn(renderer, two_models):
    # Prompt 1 is shorter than prompt 0: its positions beyond n_tokens are padding.
    figure = render(renderer, two_models, prompt=1, layers=[3])
    for ax, ds in zip(panels(figure), two_models):
        n = int(ds["n_tokens"].sel(prompt=1))
        assert n < ds.sizes["token"]
        image = ax.images[0].get_array()
        assert image.shape == (n, n)
        assert not np.isnan(image.compressed()).any()
        assert ax.get_xlim() == (-0.5, n - 0.5)
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == [str(t).strip() for t in ds["token_text"].sel(prompt=1).values[:n]]
        assert "" not in labels


def test_one_model_one_layer(renderer):
    figure = render(renderer, [make_dataset("solo")], layers=[2], title="One panel")
    heatmaps = panels(figure)
    assert len(heatmaps) == 1
    assert heatmaps[0].get_title() == "Layer 2"
    assert heatmaps[0].get_ylabel() == "solo"
    assert len(colorbars(figure)) == 1
    assert figure._suptitle.get_text() == "One panel"


def test_token_labels_on_both_axes(renderer):
    figure = render(renderer, [make_dataset()], layers=[0, 1])
    first, second = panels(figure)
    tokens = label_texts(PROMPTS[0])
    assert [t.get_text() for t in first.get_yticklabels()] == tokens
    assert [t.get_text() for t in first.get_xticklabels()] == tokens
    assert [t.get_text() for t in second.get_xticklabels()] == tokens
    # Within a row the tokens are the same: only the first panel labels the y axis.
    assert not any(t.get_visible() and t.get_text() for t in second.get_yticklabels())


def test_awkward_tokens_are_escaped(renderer):
    def odd(text):
        return ["$x$", " ", "\n", "a\tb", "averyveryverylongtoken", "é"]

    figure = render(renderer, [make_dataset(tokenize=odd, prompts=("anything",))])
    labels = [t.get_text() for t in panels(figure)[0].get_xticklabels()]
    assert labels == ["$x$", "␣", "\\n", "a\\tb", "averyveryve…", "é"]
    draw(figure)  # "$x$" must not be parsed as mathtext


def test_token_labels_hidden_beyond_the_limit(renderer, two_models):
    figure = render(renderer, two_models, layers=[0], max_token_labels=6)
    small, large = panels(figure)
    assert int(two_models[0]["n_tokens"][0]) == 6
    assert int(two_models[1]["n_tokens"][0]) == 7
    # "small" has 6 tokens: labelled; "large" has 7: token positions instead.
    assert [t.get_text() for t in small.get_xticklabels()] == label_texts(PROMPTS[0])
    draw(figure)
    for labels in (large.get_xticklabels(), large.get_yticklabels()):
        shown = [t.get_text() for t in labels if t.get_text()]
        assert shown and all(re.fullmatch(r"[−-]?\d+", text) for text in shown)


def test_default_layers_shared(renderer, two_models):
    figure = renderer.render(two_models, None)
    heatmaps = panels(figure)
    assert len(heatmaps) == 2 * 5
    assert [ax.get_title() for ax in heatmaps[:5]] == [
        "Embedding", "Layer 0", "Layer 1", "Layer 2", "Layer 3"
    ]


def test_default_layers_capped_evenly(renderer):
    figure = render(renderer, [make_dataset(layers=tuple(range(-1, 24)))], max_columns=4)
    titles = [ax.get_title() for ax in panels(figure)]
    assert titles == ["Embedding", "Layer 7", "Layer 15", "Layer 23"]


def test_models_with_different_layers(renderer):
    shallow = make_dataset("shallow", layers=(-1, 0, 1))
    deep = make_dataset("deep", layers=(-1, 0, 1, 2, 3, 4, 5), tokenize=pieces)
    figure = renderer.render([shallow, deep], {})
    heatmaps = panels(figure)
    assert len(heatmaps) == 3 + 7
    # Each row its own layers, so every panel carries its title.
    assert [ax.get_title() for ax in heatmaps] == [
        "Embedding", "Layer 0", "Layer 1",
        "Embedding", "Layer 0", "Layer 1", "Layer 2", "Layer 3", "Layer 4", "Layer 5",
    ]
    # "last" picks each model's own last block.
    figure = render(renderer, [shallow, deep], layers=["embed", "last"])
    assert [ax.get_title() for ax in panels(figure)] == [
        "Embedding", "Layer 1", "Embedding", "Layer 5"
    ]


def test_explicit_colour_limits_and_map(renderer, two_models):
    figure = render(renderer, two_models, layers=[0, 3], vmin=-1.0, vmax=1.0, cmap="Blues")
    for ax in panels(figure):
        assert ax.images[0].get_clim() == (-1.0, 1.0)
        assert ax.images[0].get_cmap().name.startswith("Blues")


def test_hidden_diagonal(renderer):
    figure = render(renderer, [make_dataset()], layers=[1], show_diagonal=False)
    image = panels(figure)[0].images[0].get_array()
    n = image.shape[0]
    assert np.ma.getmaskarray(image)[np.diag_indices(n)].all()
    assert image.max() < 1.0


def test_centred_metric_label(renderer):
    figure = renderer.render([make_dataset(metric="centred_cosine")], None)
    assert colorbars(figure)[0].ax.get_ylabel() == "centred cosine similarity"


def test_model_name_fallback_and_params_as_mapping(renderer):
    figure = renderer.render([make_dataset(model=None)], {"layers": [0]})
    assert panels(figure)[0].get_ylabel() == "model 1"


def test_without_prompt_panel(renderer):
    figure = render(renderer, [make_dataset()], show_prompt=False)
    assert not figure.subfigs
    assert len(colorbars(figure)) == 1


def test_combined_along_model(renderer):
    small = make_dataset("small", layers=(-1, 0, 1, 2, 3))
    tiny = make_dataset("tiny", layers=(-1, 0, 1), seed=5)
    combined = xr.concat([small, tiny], dim="model", join="outer", combine_attrs="drop_conflicts")
    combined = combined.assign_coords(model=["small", "tiny"])
    figure = renderer.render([combined], None)
    heatmaps = panels(figure)
    assert len(heatmaps) == 5 + 3  # the layers "tiny" lacks (all NaN) are dropped
    assert [heatmaps[0].get_ylabel(), heatmaps[5].get_ylabel()] == ["small", "tiny"]


def test_netcdf_round_trip(renderer, tmp_path):
    path = tmp_path / "small.nc"
    make_dataset().to_netcdf(path)
    with xr.open_dataset(path) as ds:
        figure = render(renderer, [ds], layers=[0, 3])
    assert len(panels(figure)) == 2
    assert [t.get_text() for t in panels(figure)[0].get_xticklabels()] == label_texts(PROMPTS[0])


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_saves(renderer, two_models, tmp_path, suffix):
    figure = render(renderer, two_models, layers=[0, 1, 2, 3], title="Similarity")
    path = tmp_path / f"grid{suffix}"
    figure.savefig(path)
    assert path.stat().st_size > 1000


def test_no_global_figure_state(renderer, two_models):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    renderer.render(two_models, None)
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------------------
# Errors


def test_prompt_out_of_range(renderer, two_models):
    with pytest.raises(SimilarityGridError, match=r"prompt 5 is out of range .*'small'.*0 to 1"):
        render(renderer, two_models, prompt=5)


def test_missing_layer_names_model_and_its_layers(renderer):
    shallow = make_dataset("shallow", layers=(-1, 0, 1))
    deep = make_dataset("deep", layers=(-1, 0, 1, 2, 3, 4, 5))
    with pytest.raises(SimilarityGridError) as raised:
        render(renderer, [deep, shallow], layers=[0, 4])
    message = str(raised.value)
    assert "'shallow'" in message and "no layer 4" in message
    assert "embed, 0, 1" in message
    with pytest.raises(SimilarityGridError, match="no layer 'embed'"):
        render(renderer, [make_dataset(layers=(0, 1))], layers=["embed"])


def test_errors_are_value_and_plugin_errors(renderer):
    with pytest.raises(ValueError, match="no datasets"):
        renderer.render([], None)
    with pytest.raises(PluginError, match="no datasets"):
        renderer.render([], None)


def test_dataset_without_similarity(renderer):
    other = make_dataset().rename({"similarity": "norm"})
    with pytest.raises(SimilarityGridError, match=r"no 'similarity' variable \(it has: norm\)"):
        renderer.render([other], None)


def test_mixed_metrics_are_refused(renderer):
    with pytest.raises(SimilarityGridError, match="different similarity metrics"):
        renderer.render([make_dataset("a"), make_dataset("b", metric="centred_cosine")], None)


def test_different_prompts_are_refused(renderer):
    a = make_dataset("a")
    b = make_dataset("b", prompts=("Something else entirely", "Hello world"))
    with pytest.raises(SimilarityGridError, match="disagree on the text of prompt 0"):
        renderer.render([a, b], None)


def test_limit_outside_the_data(renderer):
    with pytest.raises(SimilarityGridError, match=r"vmin \(1.5\) is not below"):
        render(renderer, [make_dataset()], vmin=1.5)


def test_negative_layers_count_from_each_models_end(renderer):
    """As in the probe's `layers`: -1 is each model's last block, never the embedding."""
    shallow = make_dataset("shallow", layers=(-1, 0, 1))
    deep = make_dataset("deep", layers=(-1, 0, 1, 2, 3, 4, 5))
    deep.attrs["num_layers"] = 6
    shallow.attrs["num_layers"] = 2
    figure = render(renderer, [deep, shallow], layers=["embed", -1, -2])
    titles = [ax.get_title() for ax in panels(figure)]
    assert titles == ["Embedding", "Layer 5", "Layer 4", "Embedding", "Layer 1", "Layer 0"]
    shallow.attrs["num_layers"] = 12  # the dataset holds only some of the model's blocks
    with pytest.raises(SimilarityGridError, match="no layer -1"):
        render(renderer, [shallow], layers=[-1])


def test_pdf_embeds_truetype_fonts_and_svg_keeps_text(renderer, tmp_path):
    from probescope.runner import save_figure

    figure = render(renderer, [make_dataset()], layers=[0])
    pdf = save_figure(figure, tmp_path / "grid.pdf").read_bytes()
    assert b"/FontFile2" in pdf  # Type 42: the TrueType font program embedded
    assert b"/Subtype /CIDFontType2" in pdf or b"/Subtype /TrueType" in pdf
    assert b"/Subtype /Type3" not in pdf
    svg = save_figure(figure, tmp_path / "grid.svg").read_text()
    assert "<text" in svg and "Layer 0" in svg


def test_pair_layout_and_old_dense_files_draw_alike(renderer, two_models, tmp_path):
    """Files written before the pair layout (dense, padded) still draw, pixel for pixel
    as the same values stored as pairs; the conversion keeps every real pair, once."""
    from probescope.probes.token_similarity import as_pairs, prompt_matrix

    pairs = [as_pairs(ds) for ds in two_models]
    for dense, ragged in zip(two_models, pairs):
        assert ragged["similarity"].dims == ("layer", "pair") and "context_token" not in ragged.dims
        lengths = dense.n_tokens.values
        assert list(ragged.n_pairs.values) == [n * (n + 1) // 2 for n in lengths]
        assert ragged.sizes["pair"] == sum(n * (n + 1) // 2 for n in lengths)
        for p, n in enumerate(lengths):
            np.testing.assert_array_equal(prompt_matrix(ragged, p).values,
                                          dense.similarity.isel(prompt=p).values[:, :n, :n])
            np.testing.assert_array_equal(prompt_matrix(dense, p).values, prompt_matrix(ragged, p).values)
    pairs[1].to_netcdf(tmp_path / "large.nc")
    with xr.open_dataset(tmp_path / "large.nc") as reread:
        drawings = [render(renderer, given, prompt=1, layers=[0, 3]) for given in
                    (two_models, pairs, [two_models[0], reread])]
        images = [[ax.images[0].get_array() for ax in panels(figure)] for figure in drawings]
    for other in images[1:]:
        for a, b in zip(images[0], other):
            np.testing.assert_array_equal(np.ma.getmaskarray(a), np.ma.getmaskarray(b))
            np.testing.assert_array_equal(a.filled(0), b.filled(0))


def test_combined_pair_layouts_of_different_tokenizers_draw_as_each_alone(renderer, two_models):
    """Combining aligns the pair lists by index (the shorter one filled with -1 labels and
    NaN): each model still draws exactly its own pairs."""
    import probescope
    from probescope.probes.token_similarity import as_pairs

    small, large = (as_pairs(ds).assign_attrs(parameters="{}") for ds in two_models)
    assert small.sizes["pair"] != large.sizes["pair"]
    both = probescope.combine({"small": small, "large": large})
    assert both.pair_prompt.dims == ("model", "pair") and both.pair_prompt.dtype == np.int32
    combined = render(renderer, both, prompt=1, layers=[0, 3])
    alone = render(renderer, [small, large], prompt=1, layers=[0, 3])
    for a, b in zip(panels(combined), panels(alone)):
        np.testing.assert_array_equal(a.images[0].get_array().filled(0), b.images[0].get_array().filled(0))
