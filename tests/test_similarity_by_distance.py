"""The ``similarity_by_distance`` renderer draws token_similarity's ``form = "by_distance"``
summary: every line is the dataset's mean at each distance, nothing more and nothing less."""

from __future__ import annotations

import numpy as np
import pytest

import probescope
from probescope.renderers.similarity_by_distance import SimilarityByDistanceError, SimilarityByDistanceRenderer
from probescope.renderers.similarity_grid import SimilarityGridError, SimilarityGridRenderer

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The cat sat on the mat.", "a"]


def summary(model, tokenizer, form="by_distance", layers=("embed", 0, -1), metric="cosine"):
    cfg = {"inputs": {"prompts": PROMPTS, "batch_size": 2},
           "probes": [{"use": "token_similarity", "layers": list(layers), "form": form, "metric": metric}]}
    return probescope.run(cfg, models={"m": (model, tokenizer)}, write=False)["m"]["token_similarity"]


@pytest.fixture(scope="module")
def ds(gpt2, tokenizer):
    return summary(gpt2, tokenizer)


def lines(figure):
    """(label, x, y) of every line drawn in the figure's first panel (not the zero line)."""
    ax = figure.axes[0]
    return [(line.get_label(), line.get_xdata(), line.get_ydata()) for line in ax.get_lines()
            if not line.get_label().startswith("_")]


def test_lines_are_the_means_with_enough_pairs(ds):
    min_pairs = 3
    figure = SimilarityByDistanceRenderer().render(ds, {"min_pairs": min_pairs})
    drawn = lines(figure)
    assert [label for label, _, _ in drawn] == ["embedding", "layer 0", "layer 2"]
    keep = (ds.n_pairs.values >= min_pairs) & (ds.distance.values >= 1)
    assert 0 < keep.sum() < ds.sizes["distance"] - 1  # the rule really cuts the far end
    for (label, x, y), layer in zip(drawn, ds.layer.values):
        np.testing.assert_array_equal(x, ds.distance.values[keep])
        np.testing.assert_allclose(y, ds.similarity.sel(layer=layer).values[keep])
    assert figure.axes[0].get_ylabel() == "mean cosine similarity"


def test_show_self_layers_and_max_distance(ds):
    figure = SimilarityByDistanceRenderer().render(ds, {"show_self": True, "layers": ["last"], "min_pairs": 1,
                                                        "max_distance": 4})
    (label, x, y), = lines(figure)
    assert label == "layer 2" and list(x) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(y, ds.similarity.sel(layer=2, distance=slice(0, 4)).values)
    np.testing.assert_allclose(y[0], 1.0, atol=1e-6)


def test_combined_models_get_one_panel_each(ds, llama, tokenizer):
    other = summary(llama, tokenizer)
    both = probescope.combine({"gpt2": ds, "llama": other})
    figure = SimilarityByDistanceRenderer().render(both, {"min_pairs": 1})
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles == ["gpt2", "llama"]
    (_, _, y), *_ = [(l.get_label(), l.get_xdata(), l.get_ydata()) for l in figure.axes[1].get_lines()
                     if not l.get_label().startswith("_")]
    np.testing.assert_allclose(y, other.similarity.sel(layer=-1).values[1:])


def test_errors_name_the_other_renderer(ds, gpt2, tokenizer):
    full = summary(gpt2, tokenizer, form="full", layers=[0])
    with pytest.raises(SimilarityByDistanceError, match="full form.*similarity_grid"):
        SimilarityByDistanceRenderer().render(full, {})
    with pytest.raises(SimilarityGridError, match='form = "by_distance".*similarity_by_distance'):
        SimilarityGridRenderer().render(ds, {})
    with pytest.raises(SimilarityByDistanceError, match="no layer 7"):
        SimilarityByDistanceRenderer().render(ds, {"layers": [7]})
    with pytest.raises(SimilarityByDistanceError, match="min_pairs is 1000"):
        SimilarityByDistanceRenderer().render(ds, {"min_pairs": 1000})


def test_config_pairs_each_renderer_with_its_form(gpt2, tokenizer, tmp_path):
    def config(form, renderer):
        return {"inputs": {"prompts": PROMPTS},
                "probes": [{"use": "token_similarity", "layers": [0], "form": form}],
                "renderers": [{"use": renderer, "output": "fig.png"}], "output": {"dir": str(tmp_path)}}

    with pytest.raises(probescope.ConfigError, match=r'renderers\[0\]\.probe.*similarity_by_distance'):
        probescope.run(config("by_distance", "similarity_grid"), models={"m": (gpt2, tokenizer)})
    with pytest.raises(probescope.ConfigError, match=r'renderers\[0\]\.probe.*form = "by_distance"'):
        probescope.run(config("full", "similarity_by_distance"), models={"m": (gpt2, tokenizer)})
    probescope.run(config("by_distance", "similarity_by_distance"), models={"m": (gpt2, tokenizer)})
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_many_layers_get_a_colour_bar(gpt2, tokenizer, tmp_path):
    deep = probescope.demo.build_gpt2(tokenizer, n_layer=14, n_embd=16, n_head=2, seed=3)
    ds = summary(deep, tokenizer, layers=["embed", *range(14)])
    figure = SimilarityByDistanceRenderer().render(ds, {"min_pairs": 1})
    assert len(lines(figure)) == 15 and figure.legends == []
    bar = colour_bar(figure)
    assert bar.ax.get_ylabel() == "layer\n(grey dashed line: embedding)"
    assert bar_matches_lines(figure, bar, blocks=14) == 14  # every block's line, in the bar's colour
    without = SimilarityByDistanceRenderer().render(ds.sel(layer=list(range(14))), {"min_pairs": 1})
    bar = colour_bar(without)
    assert bar.ax.get_ylabel() == "layer"  # no embedding drawn: the bar says nothing of one
    assert bar_matches_lines(without, bar, blocks=14) == 14
    assert bar.mappable.norm.vmin == 0 and bar.mappable.norm.vmax == 13  # blocks only, no -1
    other = summary(probescope.demo.build_gpt2(tokenizer, n_layer=13, n_embd=16, n_head=2, seed=4), tokenizer,
                    layers=list(range(13)))
    both = SimilarityByDistanceRenderer().render([ds.sel(layer=list(range(14))), other], {"min_pairs": 1})
    assert colour_bar(both).ax.get_ylabel() == "relative depth (1: last block)"
    both = SimilarityByDistanceRenderer().render([ds, other], {"min_pairs": 1})
    assert colour_bar(both).ax.get_ylabel() == "relative depth (1: last block)\n(grey dashed line: embedding)"


def colour_bar(figure):
    (bar,) = [ax._colorbar for ax in figure.axes if getattr(ax, "_colorbar", None) is not None]
    return bar


def bar_matches_lines(figure, bar, blocks):
    """How many block lines of the first panel have the colour the bar gives their layer."""
    from matplotlib.colors import to_rgba

    matched = 0
    for label, _, _ in lines(figure):
        if label.startswith("layer "):
            line = next(l for l in figure.axes[0].get_lines() if l.get_label() == label)
            want = bar.mappable.to_rgba(int(label.split()[1]))
            np.testing.assert_allclose(to_rgba(line.get_color()), want, atol=0.02, err_msg=label)
            matched += 1
    return matched
