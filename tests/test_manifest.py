"""The manifest beside a run's datasets, and ``probescope run --resume``."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json

import pytest

import probescope
from conftest import PROMPTS, basic_config
from probescope import models as models_mod
from probescope.cli import main


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_records_config_prompts_versions_weights_and_files(model_dirs, write_config):
    path = write_config(basic_config(model_dirs["gpt2"], layers="[0, -1]"))
    assert main(["run", str(path)]) == 0
    out = path.parent / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"] == PROMPTS
    assert manifest["probescope_version"] == probescope.__version__
    for library in ("torch", "transformers", "nnsight", "xarray", "numpy"):
        assert manifest["libraries"][library] == importlib.metadata.version(library)
    config = manifest["config"]
    assert config["models"][0]["path"] == str(model_dirs["gpt2"]) and config["models"][0]["dtype"] == "auto"
    from probescope.plugins.manager import load_registry

    defaults = load_registry().get("probe", "token_similarity").Parameters(layers=[0, -1]).model_dump(mode="json")
    assert defaults["metric"] == "cosine"
    assert config["probes"] == [{"name": "token_similarity", "use": "token_similarity", "version": "0.1.0",
                                 "parameters": defaults}]  # every default filled in
    assert config["inputs"] == {"prompts": PROMPTS, "batch_size": 2}
    assert config["renderers"][0]["output"] == str(out / "similarity.png")
    weights = manifest["models"]["tiny"]["weights_sha256"]
    assert weights == {"model.safetensors": sha256(model_dirs["gpt2"] / "model.safetensors")}
    assert manifest["files"] == ["similarity.png", "tiny/token_similarity.nc"]
    assert manifest["failures"] == [] and manifest["resumed"] == []


def test_activation_datasets_record_their_prompts(model_dirs, write_config):
    path = write_config(basic_config(model_dirs["gpt2"], renderer=False))
    assert main(["run", str(path)]) == 0
    ds = probescope.load(path.parent / "out" / "tiny" / "token_similarity.nc")
    assert json.loads(ds.attrs["prompts"]) == PROMPTS


def test_resume_skips_datasets_on_disk_for_an_unchanged_config(model_dirs, write_config, monkeypatch, capsys):
    path = write_config(basic_config(model_dirs["gpt2"]))
    assert main(["run", str(path)]) == 0
    out = path.parent / "out"
    saved = out / "tiny" / "token_similarity.nc"
    before = saved.read_bytes()

    real_load = models_mod.load
    loaded = []
    monkeypatch.setattr(models_mod, "load", lambda *a, **k: loaded.append(a[0].name) or real_load(*a, **k))
    assert main(["run", "--resume", str(path)]) == 0
    assert loaded == []  # every dataset was on disk: the model was not even loaded
    assert saved.read_bytes() == before and (out / "similarity.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"] == ["tiny/token_similarity.nc"]
    assert "tiny/token_similarity.nc" in manifest["files"]

    # a changed parameter is a changed config: that dataset is computed again
    path.write_text(path.read_text().replace("layers = [0, -1]", 'layers = [0, -1]\nmetric = "centred_cosine"'))
    assert main(["run", "--resume", str(path)]) == 0
    assert loaded == ["tiny"]
    assert probescope.load(saved).attrs["metric"] == "centred_cosine"
    # without --resume everything is computed again
    assert main(["run", str(path)]) == 0
    assert loaded == ["tiny", "tiny"]


def test_resume_after_an_interrupted_run_computes_only_what_is_missing(model_dirs, write_config, monkeypatch, capsys):
    text = basic_config(model_dirs["gpt2"], renderer=False)
    text += f'\n[[models]]\nname = "second"\npath = "{model_dirs["llama"]}"\n'
    path = write_config(text)
    real_load = models_mod.load

    def interrupt_second(entry, *args, **kwargs):
        if entry.name == "second":
            raise KeyboardInterrupt
        return real_load(entry, *args, **kwargs)

    monkeypatch.setattr(models_mod, "load", interrupt_second)
    assert main(["run", str(path)]) == 130
    assert "not finished: model 'second' (token_similarity)" in capsys.readouterr().err
    out = path.parent / "out"
    assert json.loads((out / "manifest.json").read_text())["files"] == ["tiny/token_similarity.nc"]

    loaded = []
    monkeypatch.setattr(models_mod, "load", lambda entry, *a, **k: loaded.append(entry.name) or real_load(entry, *a, **k))
    assert main(["run", "--resume", str(path)]) == 0
    assert loaded == ["second"]
    assert json.loads((out / "manifest.json").read_text())["files"] == [
        "second/token_similarity.nc", "tiny/token_similarity.nc"]


def test_resume_recomputes_when_the_weights_changed(model_dirs, write_config, tmp_path, tokenizer):
    from probescope import demo

    folder = demo.save_model(demo.build_gpt2(tokenizer, n_layer=2, n_embd=16, n_head=2, seed=5), tokenizer,
                             tmp_path / "model")
    path = write_config(basic_config(folder, layers="[0]", renderer=False))
    assert main(["run", str(path)]) == 0
    demo.save_model(demo.build_gpt2(tokenizer, n_layer=2, n_embd=16, n_head=2, seed=6), tokenizer, folder)
    assert main(["run", "--resume", str(path)]) == 0
    manifest = json.loads((path.parent / "out" / "manifest.json").read_text())
    assert manifest["resumed"] == []
    assert manifest["models"]["tiny"]["weights_sha256"]["model.safetensors"] == sha256(folder / "model.safetensors")


def test_a_model_given_in_memory_is_identified_by_its_parameters(gpt2, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {"inputs": {"prompts": PROMPTS}, "probes": [{"use": "token_similarity", "layers": [0]}]}
    probescope.run(config, models={"mem": (gpt2, tokenizer)})
    manifest = json.loads((tmp_path / "results" / "manifest.json").read_text())
    from probescope.manifest import parameters_hash

    assert manifest["models"]["mem"]["parameters_sha256"] == parameters_hash(gpt2)
    assert len(parameters_hash(gpt2)) == 64
