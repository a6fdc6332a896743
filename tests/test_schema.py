"""Dataset schemas as code: every built-in probe's output fits its declared schema, a
saved and combined one still fits what renderers need, the checks catch what they claim
to, and docs/datasets.md is generated from the schemas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import probescope
from probescope import DatasetSchema, Variable
from probescope import datasets_page
from probescope.results import save

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the cat sat on the mat", "a dog"]


@pytest.fixture(scope="module")
def built(gpt2, tokenizer, tmp_path_factory):
    """One dataset of every built-in probe (every statistic of component_norm that needs
    no reference), from a tiny GPT-2 with padding in the batch."""
    probes = [
        {"use": "token_similarity", "layers": ["embed", 0, "last"]},
        {"use": "token_similarity", "name": "by_distance", "layers": ["embed", 0], "form": "by_distance"},
        {"use": "component_norm", "name": "activation"},
        {"use": "component_norm", "name": "weights", "statistic": "weight_norm"},
        {"use": "component_norm", "name": "gradients", "statistic": "grad_norm"},
        {"use": "head_classifier", "builtin_relations": True, "min_pairs": 1},
    ]
    config = {"inputs": {"prompts": PROMPTS, "batch_size": 2}, "probes": probes,
              "output": {"dir": str(tmp_path_factory.mktemp("out"))}}
    with pytest.warns(probescope.ProbescopeWarning):  # some relations keep too few single-token pairs
        return probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False)["m"]


def schema_of(name: str) -> DatasetSchema:
    return datasets_page.builtin_schemas()[name]


def schema_of_dataset(ds: xr.Dataset) -> DatasetSchema:
    """The schema the probe says its parameters give (``Probe.schema_for``)."""
    from probescope.plugins.manager import load_registry
    from probescope.results import parameters

    probe = load_registry().get("probe", ds.attrs["probe"])
    return probe.schema_for(probe.Parameters(**parameters(ds)))


@pytest.mark.parametrize("entry", ["token_similarity", "by_distance", "activation", "weights", "gradients",
                                   "head_classifier"])
def test_build_output_fits_its_schema_exactly(built, entry):
    ds = built[entry]
    schema = schema_of_dataset(ds)
    assert schema.problems(ds, strict=True) == []
    others = [s for s in datasets_page.builtin_schemas().values() if s is not schema and s.probe == schema.probe]
    assert all(other.problems(ds, strict=True) for other in others)  # one probe's forms are told apart


def test_saved_and_combined_datasets_fit_what_renderers_need(built, tmp_path):
    for entry, ds in built.items():
        schema = schema_of_dataset(ds)
        path = tmp_path / f"{entry}.nc"
        save(ds, path)
        again = probescope.load(path)
        assert schema.problems(again) == [], entry
        both = probescope.combine({"a": again, "b": again})
        for k in range(2):
            assert schema.problems(both.isel(model=k)) == [], entry


def test_every_builtin_probe_declares_a_schema():
    names = set(datasets_page.builtin_schemas())
    assert names == {"token_similarity", "token_similarity.by_distance", "component_norm", "head_classifier"}


SMALL = DatasetSchema(
    probe="toy",
    dims={"layer": "blocks", "head": "heads"},
    coords={"layer": Variable(("layer",), "int64", "block"), "name": Variable(("head",), "str", "", values=("a", "b"))},
    variables={"score": Variable(("layer", "head"), "float64", "a score"),
               "kind": Variable(("layer", "head"), "int8", "flags", flags=True)},
    attrs={"threshold": "cut-off"},
)


def toy() -> xr.Dataset:
    return xr.Dataset(
        {"score": (("layer", "head"), np.zeros((2, 2))),
         "kind": (("layer", "head"), np.zeros((2, 2), np.int8), {"flag_values": np.array([0, 1], np.int8),
                                                                 "flag_meanings": "no yes"})},
        coords={"layer": np.array([0, 1]), "name": ("head", np.array(["a", "b"], dtype=object))},
        attrs={"threshold": 0.5},
    )


def test_a_fitting_dataset_has_no_problems():
    assert SMALL.problems(toy(), strict=True) == []


@pytest.mark.parametrize("change, strict, expected", [
    (lambda ds: ds.drop_vars("score"), False, "no 'score' variable"),
    (lambda ds: ds.assign(score=ds.score.astype(np.float32)), True, "'score' holds float32 data, expected float64"),
    (lambda ds: ds.assign(score=ds.score.astype(str)), False, "'score' holds <U32 data, expected float64"),
    (lambda ds: ds.assign(score=ds.score.T), True, "'score' has dimensions ('head', 'layer')"),
    (lambda ds: ds.assign(kind=ds.kind.assign_attrs(flag_meanings="no")), True, "2 flag_values but 1 flag_meanings"),
    (lambda ds: ds.assign(kind=ds.kind.drop_attrs()), True, "'kind' has no flag_values attribute"),
    (lambda ds: ds.assign_coords(name=("head", ["a", "c"])), False, "'name' holds unknown value(s) 'c'"),
    (lambda ds: ds.assign_coords(layer=[1, 1]), False, "'layer' lists 1 more than once"),
    (lambda ds: ds.assign_coords(layer=[0.0, 1.0]), False, "'layer' holds float64 data, expected int64"),
    (lambda ds: ds.assign(extra=ds.score), True, "undeclared variable 'extra'"),
    (lambda ds: ds.drop_attrs(), True, "no 'threshold' attribute"),
    (lambda ds: ds.isel(layer=[]), False, "0 layer(s)"),
])
def test_each_kind_of_mistake_is_named(change, strict, expected):
    problems = SMALL.problems(change(toy()), strict=strict)
    assert any(expected in p for p in problems), problems


def test_a_renderer_check_names_every_problem_and_the_probe():
    ds = toy().drop_vars("score").assign_coords(name=("head", ["a", "z"]))
    with pytest.raises(probescope.RendererError) as info:
        probescope.check_dataset(ds, SMALL, model="m", renderer="toy_map")
    message = str(info.value)
    assert "model 'm'" in message and "no 'score' variable" in message and "'z'" in message
    assert "toy_map draws the toy probe's datasets" in message


def test_datasets_page_is_generated_from_the_schemas():
    page = (ROOT / "docs" / "datasets.md").read_text()
    assert datasets_page.sections(page) == ["token_similarity", "token_similarity.by_distance", "component_norm",
                                            "head_classifier"]
    assert page == datasets_page.update_page(page), (
        "docs/datasets.md is out of date: run `python -m probescope.datasets_page docs/datasets.md`")


def test_the_page_check_sees_a_stale_section():
    page = "intro\n<!-- schema: toy -->\nstale\n<!-- /schema -->\nmore prose\n"
    fresh = datasets_page.update_page(page, {"toy": SMALL})
    assert fresh != page and "| `score` | variable |" in fresh and fresh.endswith("more prose\n")
    assert datasets_page.update_page(fresh, {"toy": SMALL}) == fresh
