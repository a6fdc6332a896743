"""The renderer kit's checks of a renderer's choices (a prompt, layers), made before any
model loads, and the built-in renderers that use them."""

from __future__ import annotations

from types import SimpleNamespace

from probescope import layer_choice_problems, prompt_problems
from probescope.probes.token_similarity import TokenSimilarityParameters
from probescope.renderers.similarity_by_distance import SimilarityByDistanceRenderer
from probescope.renderers.similarity_grid import SimilarityGridRenderer

DEPTH = SimpleNamespace(num_layers=4)


def _said(problems):
    return {problem.location: problem.message for problem in problems}


def test_prompt_problems_name_the_range():
    assert prompt_problems(0, ["a", "b"]) == [] and prompt_problems(1, ["a", "b"]) == []
    assert _said(prompt_problems(2, ["a", "b"])) == {"prompt": "prompt 2 is out of range: the run has 2 prompts (0 to 1)"}
    assert list(_said(prompt_problems(-1, ["a"], key="prompts[3]"))) == ["prompts[3]"]


def test_layer_choice_problems_report_each_layer_missing_or_unread():
    assert layer_choice_problems(None, 4) == [] and layer_choice_problems([0, -1, "last", "embed"], 4) == []
    said = _said(layer_choice_problems([0, 7, 2, "last"], 4, read=[0, 3]))
    assert set(said) == {"layers[1]", "layers[2]"}  # 7 is beyond the depth; 2 is not read; "last" is 3
    assert "7" in said["layers[1]"]
    assert said["layers[2]"] == "layer 2 is not among the layers the probe reads (0, 3)"


def test_similarity_renderers_check_their_layers_against_the_probe():
    by_distance = SimilarityByDistanceRenderer()
    probe = TokenSimilarityParameters(layers=[0, 1], form="by_distance")
    params = by_distance.parameters({"layers": [1, 3, 9]})
    said = _said(by_distance.check(params, prompts=["a"], probe_params=probe, model=DEPTH))
    assert set(said) == {"layers[1]", "layers[2]"}
    assert "not among the layers the probe reads" in said["layers[1]"]

    grid = SimilarityGridRenderer()
    full = TokenSimilarityParameters(layers=[0, 1])
    said = _said(grid.check(grid.parameters({"prompt": 1, "layers": [3]}), prompts=["a"], probe_params=full, model=DEPTH))
    assert set(said) == {"prompt", "layers[0]"}
