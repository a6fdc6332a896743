"""Runs whose probes read only weights stream them from the checkpoint and never load
the model; their datasets equal those of the same probes on the model in memory."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import probescope
from probescope import models as models_mod
from probescope.architectures.streamed import StreamedModel
from tests.conftest import PROMPTS
from tests.test_head_classifier import build_llama, relation_file, word_tokenizer


def no_load(*args, **kwargs):
    raise AssertionError("a weights-only run must not load the model")


@pytest.fixture(scope="module")
def words():
    return word_tokenizer()


@pytest.fixture(scope="module")
def sharded_llama(words, tmp_path_factory):
    """The head classifier's planted grouped-query Llama, saved in several shards."""
    model = build_llama(words)
    folder = tmp_path_factory.mktemp("sharded") / "llama"
    model.save_pretrained(folder, max_shard_size="30KB")
    words.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return model, folder


def run_both(model, tokenizer, folder, probes, monkeypatch, **entry):
    """The probes on the model in memory, then on its folder with loading forbidden."""
    in_memory = probescope.run({"models": [], "probes": probes}, models={"m": (model, tokenizer)}, write=False)
    monkeypatch.setattr(models_mod, "load_weights", no_load)
    streamed = probescope.run({"models": [{"name": "m", "path": str(folder), **entry}], "probes": probes},
                              write=False)
    return in_memory["m"], streamed["m"]


def test_head_classifier_streams_and_scores_identically(sharded_llama, words, tmp_path, monkeypatch):
    model, folder = sharded_llama
    probes = [{"use": "head_classifier", "builtin_relations": False, "relation_files": [str(relation_file(tmp_path))],
               "min_pairs": 5, "precision": "float64"}]
    want, got = run_both(model, words, folder, probes, monkeypatch)
    want, got = want["head_classifier"], got["head_classifier"]
    assert np.isfinite(got.relation_score.values).any() and got.in_category.values.any()  # something to compare
    xr.testing.assert_identical(got.drop_attrs(), want.drop_attrs())
    assert got.attrs["dtype"] == "float32"  # dtype auto: the checkpoint's


def test_weight_norm_streams_and_equals_the_loaded_model(sharded_llama, words, monkeypatch):
    model, folder = sharded_llama
    probes = [{"use": "component_norm", "statistic": "weight_norm"},
              {"name": "spectral", "use": "component_norm", "statistic": "weight_norm", "norm": "spectral"}]
    want, got = run_both(model, words, folder, probes, monkeypatch)
    for name in ("component_norm", "spectral"):
        xr.testing.assert_identical(got[name].drop_attrs(), want[name].drop_attrs())


def test_a_probe_that_reads_activations_loads_the_model(model_dirs, monkeypatch):
    def no_stream(*args, **kwargs):
        raise AssertionError("a run that reads activations must load the model")

    monkeypatch.setattr(StreamedModel, "of", no_stream)
    config = {"models": [{"name": "m", "path": str(model_dirs["llama"])}],
              "inputs": {"prompts": PROMPTS},
              "probes": [{"use": "component_norm", "statistic": "weight_norm"},
                         {"name": "act", "use": "component_norm", "statistic": "activation_norm"}]}
    result = probescope.run(config, write=False)["m"]
    assert np.isfinite(result["act"].value.values).all()


def test_relative_update_streams_its_reference(tmp_path, monkeypatch, words):
    import torch

    base = build_llama(words)
    tuned = build_llama(words)
    with torch.no_grad():
        tuned.model.layers[1].self_attn.v_proj.weight.mul_(1.5)
    base.save_pretrained(tmp_path / "base", max_shard_size="30KB")
    tuned.save_pretrained(tmp_path / "tuned")
    words.save_pretrained(tmp_path / "tuned")
    monkeypatch.setattr(models_mod, "load_weights", no_load)
    config = {"models": [{"name": "m", "path": str(tmp_path / "tuned")}],
              "probes": [{"use": "component_norm", "statistic": "relative_update",
                          "reference": {"path": str(tmp_path / "base")}}]}
    values = probescope.run(config, write=False)["m"]["component_norm"].value
    assert values.sel(layer=1, component="attn.v").item() == pytest.approx(0.5, rel=1e-6)
    others = values.where(~((values.layer == 1) & (values.component == "attn.v")))
    assert np.nanmax(np.abs(others.values)) == 0.0


def test_default_dtype_is_the_checkpoints(tmp_path, words):
    import torch

    model = build_llama(words).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", max_shard_size="30KB")
    words.save_pretrained(tmp_path / "bf16")
    entry = {"name": "m", "path": str(tmp_path / "bf16")}  # no dtype: "auto"
    streamed = probescope.run({"models": [entry], "probes": [{"use": "component_norm", "statistic": "weight_norm"}]},
                              write=False)["m"]["component_norm"]
    loaded = probescope.run({"models": [entry], "inputs": {"prompts": ["a b c"]},
                             "probes": [{"use": "component_norm", "statistic": "activation_norm"}]},
                            write=False)["m"]["component_norm"]
    assert streamed.attrs["dtype"] == loaded.attrs["dtype"] == "bfloat16"
    weight = model.model.layers[2].self_attn.o_proj.weight.double()
    assert streamed.value.sel(layer=2, component="attn.o").item() == pytest.approx(weight.norm().item(), rel=1e-12)
    assert np.isfinite(loaded.value.values).sum() == 3 * 7
