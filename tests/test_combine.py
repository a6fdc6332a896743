"""combine: only datasets of one probe and one set of parameters join; coordinates keep
their type, with documented fill values where a model lacks an entry."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import probescope
from conftest import PROMPTS
from probescope.errors import CombineError
from probescope.results import COORDINATE_FILL, combine


def run(models, probes):
    return probescope.run({"inputs": {"prompts": PROMPTS}, "probes": probes}, models=models, write=False)


@pytest.fixture(scope="module")
def shallow_and_deep(gpt2, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    deeper = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=5, n_embd=32, n_head=4)).eval()
    out = run({"shallow": (gpt2, tokenizer), "deep": (deeper, tokenizer)},
              [{"use": "token_similarity", "layers": ["embed", 0, 1, 2]}, {"use": "component_norm"},
               {"use": "token_similarity", "name": "centred", "metric": "centred_cosine",
                "layers": ["embed", 0, 1, 2]}])
    deep_all = run({"deep": (deeper, tokenizer)}, [{"use": "token_similarity"}])["deep"]["token_similarity"]
    return out, deep_all


def test_datasets_of_different_probes_are_refused(shallow_and_deep):
    out, _ = shallow_and_deep
    with pytest.raises(CombineError, match=r"different probes \('shallow': token_similarity, 'deep': component_norm\)"):
        combine({"shallow": out["shallow"]["token_similarity"], "deep": out["deep"]["component_norm"]})


def test_datasets_made_with_different_parameters_are_refused(shallow_and_deep):
    out, _ = shallow_and_deep
    with pytest.raises(CombineError) as info:
        combine({"a": out["shallow"]["token_similarity"], "b": out["deep"]["centred"]})
    assert "metric: 'cosine' for 'a', 'centred_cosine' for 'b'" in str(info.value)


def test_integer_and_string_coordinates_keep_their_type(shallow_and_deep, tmp_path):
    out, deep_all = shallow_and_deep
    shallow = out["shallow"]["token_similarity"]
    # a tokenizer that splits the prompts into fewer tokens: the last position is missing
    last_position = deep_all.sizes["token"] - 1
    fewer = deep_all.isel(token=slice(0, -1))
    fewer = fewer.isel(pair=np.flatnonzero(fewer.pair_token.values < last_position))
    fewer.attrs.update(parameters=shallow.attrs["parameters"], model="fewer")
    both = combine({"shallow": shallow, "fewer": fewer})
    assert both.token_id.dtype == np.int64 and both.layer.dtype == np.int64
    last = both.sizes["token"] - 1
    np.testing.assert_array_equal(both.token_id.sel(model="fewer").isel(token=last).values, COORDINATE_FILL["i"])
    np.testing.assert_array_equal(both.token_id.sel(model="shallow").values, shallow.token_id.values)
    # layers 3 and 4 exist in the deep model only: its labels there, "" for the shallow one
    labels = both.layer_label.sel(model="shallow").values.tolist()
    assert labels == ["embed", "0", "1", "2", "", ""]
    assert np.isnan(both.similarity.sel(model="shallow", layer=[3, 4]).values).all()  # data: NaN
    # and so they stay through a file
    probescope.results.save(both, tmp_path / "both.nc")
    back = probescope.load(tmp_path / "both.nc")
    assert back.token_id.dtype == np.int64
    assert "nan" not in np.asarray(back.layer_label.values).ravel().tolist()
    xr.testing.assert_identical(back.drop_attrs(), both.drop_attrs())


def test_layers_align_by_index_and_every_attribute_survives(shallow_and_deep):
    out, deep_all = shallow_and_deep
    shallow = out["shallow"]["token_similarity"]
    deep = deep_all.copy()
    deep.attrs["parameters"] = shallow.attrs["parameters"]
    both = combine({"shallow": shallow, "deep": deep})
    assert list(both.layer.values) == [-1, 0, 1, 2, 3, 4]
    assert list(both.model_num_layers.values) == [3, 5]
    assert both.attrs["metric"] == "cosine" and both.attrs["probe"] == "token_similarity"
    label = both.layer_label.transpose("model", "layer").values  # labels differ, so one row per model
    assert label[0].tolist() == ["embed", "0", "1", "2", "", ""]  # "" where a model lacks the layer
    assert label[1].tolist() == ["", "0", "1", "2", "3", "4"]  # the deep run did not read "embed"


def test_nothing_or_twice_the_same_name(shallow_and_deep):
    out, _ = shallow_and_deep
    with pytest.raises(CombineError, match="nothing to combine"):
        combine([])
    ds = out["shallow"]["token_similarity"]
    with pytest.raises(CombineError, match="same model name"):
        combine([ds, ds])
