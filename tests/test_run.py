"""End to end: config file to saved datasets to figures, through the CLI and the API."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import probescope
from probescope.cli import main
from conftest import PROMPTS, basic_config

FAILING_PROBES = '''
import probescope
from probescope import Probe, Read, resid

class FailsInTrace(Probe):
    name = "fails_in_trace"
    def reads(self, params, model):
        def reduce(hidden, batch):
            raise ValueError("reduction exploded")
        return [Read("x", resid(0), reduce)]
    def build(self, params, run):
        raise AssertionError("never reached")

class FailsInBuild(Probe):
    name = "fails_in_build"
    def reads(self, params, model):
        return [Read("x", resid(1), lambda hidden, batch: hidden.sum())]
    def build(self, params, run):
        raise RuntimeError("build exploded")

@probescope.hookimpl
def register_probes(register):
    register(FailsInTrace())
    register(FailsInBuild())
'''


def test_run_writes_datasets_and_figure_that_reload_identically(model_dirs, write_config, capsys):
    path = write_config(basic_config(model_dirs["gpt2"], layers='["embed", 0, -1]'))
    assert main(["run", str(path)]) == 0
    out_dir = path.parent / "out"
    saved = out_dir / "tiny" / "token_similarity.nc"
    figure = out_dir / "similarity.png"
    assert saved.is_file() and figure.is_file() and figure.stat().st_size > 10_000
    assert f"wrote {saved}" in capsys.readouterr().out
    assert not list(out_dir.rglob("*.tmp"))  # atomic writes leave no temporaries

    returned = probescope.run(path, write=False)["tiny"]["token_similarity"]
    reread = probescope.load(saved)
    plain = xr.open_dataset(saved)  # no probescope needed to read results
    for other in (reread, plain):
        xr.testing.assert_identical(
            returned.drop_attrs(deep=False), other.drop_attrs(deep=False))
        assert {k: v for k, v in returned.attrs.items() if k != "created"} == \
               {k: v for k, v in other.attrs.items() if k != "created"}
    plain.close()
    attrs = reread.attrs
    assert attrs["model"] == "tiny" and attrs["model_id"] == str(model_dirs["gpt2"])
    assert attrs["architecture"] == "gpt2" and attrs["dtype"] == "float32"
    assert attrs["probe"] == "token_similarity" and attrs["probescope_version"] == probescope.__version__
    assert probescope.results.parameters(reread) == {"layers": ["embed", 0, -1], "metric": "cosine",
                                                       "centre_without_first_token": False, "form": "full"}


def test_api_returns_exactly_what_it_saves(model_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "models": [{"name": "tiny", "path": str(model_dirs["llama"])}],
        "inputs": {"prompts": PROMPTS},
        "probes": [{"use": "token_similarity", "layers": [1]}],
        "output": {"dir": "results"},
    }
    returned = probescope.run(config)["tiny"]["token_similarity"]
    xr.testing.assert_identical(returned, probescope.load(tmp_path / "results" / "tiny" / "token_similarity.nc"))


def test_failing_probe_leaves_the_other_probes_results(model_dirs, write_config, install_plugin, capsys):
    install_plugin("failing", {"failing": FAILING_PROBES})
    text = basic_config(model_dirs["gpt2"], renderer=True) + """
[[probes]]
use = "fails_in_trace"

[[probes]]
use = "fails_in_build"
"""
    path = write_config(text)
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "'fails_in_trace' failed: ValueError: reduction exploded" in err
    assert "'fails_in_build' failed: RuntimeError: build exploded" in err
    out_dir = path.parent / "out"
    assert (out_dir / "tiny" / "token_similarity.nc").is_file()
    assert (out_dir / "similarity.png").is_file()
    assert sorted(p.name for p in (out_dir / "tiny").iterdir()) == ["token_similarity.nc"]


def test_render_again_from_saved_files_without_a_model(model_dirs, write_config, tmp_path):
    path = write_config(basic_config(model_dirs["gpt2"], renderer=False))
    assert main(["run", str(path)]) == 0
    second = write_config(basic_config(model_dirs["llama"], renderer=False).replace('"tiny"', '"llama"').replace(
        'dir = "out"', 'dir = "out2"'), name="second.toml")
    assert main(["run", str(second)]) == 0
    files = [str(path.parent / "out" / "tiny" / "token_similarity.nc"),
             str(path.parent / "out2" / "llama" / "token_similarity.nc")]
    for suffix in ("svg", "pdf"):
        target = tmp_path / f"again.{suffix}"
        assert main(["render", *files, "--renderer", "similarity_grid", "-o", str(target), "--set", "prompt=1"]) == 0
        assert target.stat().st_size > 1000
    assert main(["render", *files, "-r", "similarity_grid", "-o", str(tmp_path / "bad.jpg")]) == 2
    assert main(["render", *files, "-r", "nope", "-o", str(tmp_path / "x.png")]) == 1
    assert not (tmp_path / "bad.jpg").exists() and not (tmp_path / "x.png").exists()


def test_weights_load_from_safetensors_only_unless_allowed(tokenizer, tmp_path, write_config, capsys):
    import torch

    from probescope import demo

    folder = tmp_path / "pickled"
    model = demo.build_gpt2(tokenizer, n_layer=2, n_embd=16, n_head=2)
    demo.save_model(model, tokenizer, folder)
    for weights in folder.glob("*.safetensors"):  # keep only a pickled checkpoint
        weights.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert not list(folder.glob("*.safetensors"))
    path = write_config(basic_config(folder, layers="[0]", renderer=False))
    assert main(["run", str(path)]) == 2  # a configuration mistake, found before anything loads
    err = capsys.readouterr().err
    assert "models[0].path: folder" in err and "holds only pickled weights (pytorch_model.bin)" in err
    assert "use_safetensors = false" in err
    assert not (path.parent / "out").exists()
    allowed = write_config(basic_config(folder, layers="[0]", renderer=False).replace(
        'path = "', 'use_safetensors = false\npath = "'), name="allowed.toml")
    assert main(["run", str(allowed)]) == 0


def test_unsupported_architecture_needs_the_block_list(tokenizer, tmp_path, write_config, capsys):
    """A family without an adapter works for residual-stream probes once its block list is named."""
    from transformers import BloomConfig, BloomForCausalLM

    from probescope import demo

    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4)
    folder = demo.save_model(BloomForCausalLM(config), tokenizer, tmp_path / "bloom")
    path = write_config(basic_config(folder, layers="[0, 1]", renderer=False))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'bloom'" in err and "supported: gemma" in err and 'blocks = "model.layers"' in err
    named = write_config(basic_config(folder, layers="[0, 1]", renderer=False).replace(
        'path = "', 'blocks = "transformer.h"\npath = "'), name="named.toml")
    assert main(["run", str(named)]) == 0
    ds = probescope.load(named.parent / "out" / "tiny" / "token_similarity.nc")
    assert ds.attrs["architecture"] == "generic"
    from probescope.probes.token_similarity import prompt_matrix

    assert np.isfinite(prompt_matrix(ds, 0).isel(layer=1, token=3, context_token=slice(0, 4))).all()


def test_demo_runs_offline(tmp_path, capsys):
    assert main(["demo", "--tiny", "-o", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    results = tmp_path / "demo" / "results"
    for name in ("small", "medium"):
        assert (results / name / "token_similarity.nc").is_file()
        assert (results / name / "component_norm.nc").is_file()
    for figure in ("token_similarity.png", "component_norm.png"):
        assert (results / figure).is_file()
        assert str(results / figure) in out
    small = probescope.load(results / "small" / "token_similarity.nc")
    medium = probescope.load(results / "medium" / "token_similarity.nc")
    # two sizes, as promised: the last block of each ("-1" in the demo config) differs
    assert small.layer.values[-1] < medium.layer.values[-1]


def test_combine_models_of_different_depth(gpt2, llama, tokenizer):
    """Several models' datasets line up along `model`; a layer one model lacks is NaN."""
    from transformers import GPT2Config, GPT2LMHeadModel

    deeper = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=5, n_embd=32, n_head=4)).eval()
    config = {"inputs": {"prompts": PROMPTS}, "probes": [{"use": "token_similarity"}]}
    results = probescope.run(config, models={"shallow": (gpt2, tokenizer), "deep": (deeper, tokenizer)}, write=False)
    shallow, deep = results["shallow"]["token_similarity"], results["deep"]["token_similarity"]
    both = probescope.combine({"shallow": shallow, "deep": deep})
    assert list(both.model.values) == ["shallow", "deep"]
    assert list(both.model_num_layers.values) == [3, 5] and list(both.layer.values) == [0, 1, 2, 3, 4]
    xr.testing.assert_equal(both.similarity.sel(model="deep", drop=True), deep.similarity)
    np.testing.assert_array_equal(both.similarity.sel(model="shallow", layer=[0, 1, 2]).values, shallow.similarity.values)
    assert np.isnan(both.similarity.sel(model="shallow", layer=[3, 4]).values).all()


def test_api_failure_keeps_the_other_datasets(gpt2, tokenizer):
    class Broken(probescope.Probe):
        name = "broken"

        def build(self, params, run):
            raise KeyError("no such thing")

    class Plugin:
        @probescope.hookimpl
        def register_probes(self, register):
            register(Broken())

    config = {"inputs": {"prompts": PROMPTS}, "probes": [{"use": "token_similarity", "layers": [0]}, {"use": "broken"}]}
    with pytest.raises(probescope.RunFailed) as info:
        probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False, plugins=[("local", Plugin())])
    assert info.value.failures == [probescope.Failure("m", "probe", "broken", "KeyError: 'no such thing'")]
    assert str(info.value.failures[0]) == "model 'm': probe 'broken' failed: KeyError: 'no such thing'"
    assert list(info.value.datasets["m"]) == ["token_similarity"]


def test_a_probe_asking_for_a_component_the_family_lacks_is_a_config_error(gpt2, tokenizer):
    """GPT-2 has no gated MLP: a third-party probe reading mlp.gate is rejected at
    validation, naming the probe entry, the family and the site, before anything runs."""
    import xarray as xr

    class GateReader(probescope.Probe):
        name = "gate_reader"

        def reads(self, params, model):
            return [probescope.Read("gate", probescope.component("mlp.gate", 0), lambda h, b: h.sum())]

        def build(self, params, run):
            return xr.Dataset()

    class Plugin:
        @probescope.hookimpl
        def register_probes(self, register):
            register(GateReader())

    config = {"inputs": {"prompts": PROMPTS},
              "probes": [{"use": "gate_reader"}, {"use": "component_norm", "components": ["attn.v"]}]}
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False, plugins=[("local", Plugin())])
    [problem] = info.value.problems
    assert problem.location == "probes[0]"
    assert "architecture 'gpt2' has no site mlp.gate[0]" in problem.message
    assert "no component 'mlp.gate'" in problem.message


def test_a_model_passed_in_comes_back_unwrapped(tokenizer):
    """nnsight leaves a controller `forward` on every module it wraps; probescope removes
    it, and hands back the training flag the model came with."""
    import torch

    from probescope import demo

    model = demo.build_gpt2(tokenizer, n_layer=2, n_embd=16, n_head=2, seed=3)
    ids = torch.tensor([tokenizer("a b c")["input_ids"]])
    with torch.no_grad():
        expected = model(ids).logits
    own_forward = model.transformer.h[1].forward  # a user's instance-level forward survives too
    model.transformer.h[1].forward = own_forward
    model.train()  # training mode is the user's choice; it must survive the run
    before = {name: dict(module.__dict__) for name, module in model.named_modules()}
    probescope.run({"inputs": {"prompts": ["a b c"]}, "probes": [{"use": "token_similarity"}]},
                   models={"m": (model, tokenizer)}, write=False)
    for name, module in model.named_modules():
        assert module.__dict__.keys() == before[name].keys(), name
        for key, value in before[name].items():
            assert module.__dict__[key] is value, (name, key)
    assert "forward" not in model.transformer.h[0].__dict__
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
