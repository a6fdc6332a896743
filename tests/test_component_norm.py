"""component_norm against independent computations: plain forward hooks on the raw
modules, weights read directly from the parameters, gradients from a plain backward
pass of the model's own loss."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import probescope
from probescope import demo, trace
from probescope.errors import ConfigError
from tests.conftest import PROMPTS

# Each canonical component of the two fixture families: the raw module in a block, and
# the columns of its output (and of the (in, out) Conv1D weight for GPT-2) that are it.
D = 32
GPT2_PARTS = {
    "attn.q": ("attn.c_attn", slice(0, D)),
    "attn.k": ("attn.c_attn", slice(D, 2 * D)),
    "attn.v": ("attn.c_attn", slice(2 * D, 3 * D)),
    "attn.o": ("attn.c_proj", slice(None)),
    "mlp.up": ("mlp.c_fc", slice(None)),
    "mlp.down": ("mlp.c_proj", slice(None)),
}
LLAMA_PARTS = {
    "attn.q": ("self_attn.q_proj", slice(None)),
    "attn.k": ("self_attn.k_proj", slice(None)),
    "attn.v": ("self_attn.v_proj", slice(None)),
    "attn.o": ("self_attn.o_proj", slice(None)),
    "mlp.up": ("mlp.up_proj", slice(None)),
    "mlp.down": ("mlp.down_proj", slice(None)),
    "mlp.gate": ("mlp.gate_proj", slice(None)),
}
FAMILIES = {"gpt2": ("transformer.h", GPT2_PARTS), "llama": ("model.layers", LLAMA_PARTS)}


def config(*probes, batch_size=2):
    return {"inputs": {"prompts": PROMPTS, "batch_size": batch_size}, "probes": list(probes)}


def raw_weight(model, family, layer, name):
    """(out, in) weight read straight off the parameter."""
    blocks, parts = FAMILIES[family]
    path, cols = parts[name]
    module = model.get_submodule(f"{blocks}.{layer}.{path}")
    if family == "gpt2":  # Conv1D stores (in, out)
        return module.weight[:, cols].t()
    return module.weight[cols]


def hooked_mean_norms(model, family, tokenizer, prompts=PROMPTS):
    """Mean L2 norm of each component's output over every real token, from forward hooks
    on prompts run one at a time (no padding at all)."""
    blocks, parts = FAMILIES[family]
    sums, count = {}, 0
    handles = []
    for layer in range(3):
        for name, (path, cols) in parts.items():
            def hook(module, args, output, key=(layer, name), cols=cols):
                sums[key] = sums.get(key, 0.0) + output[..., cols].norm(dim=-1).sum().item()
            handles.append(model.get_submodule(f"{blocks}.{layer}.{path}").register_forward_hook(hook))
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([tokenizer(prompt)["input_ids"]])
                model(ids)
                count += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
    return {key: total / count for key, total in sums.items()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_norm_matches_forward_hooks(family, tokenizer, request):
    model = request.getfixturevalue(family)
    # Padding is involved: the two prompts have different lengths and share a batch.
    ds = probescope.run(config({"use": "component_norm"}), models={"m": (model, tokenizer)}, write=False)["m"]["component_norm"]
    expected = hooked_mean_norms(model, family, tokenizer)
    assert list(ds.component.values) == list(probescope.COMPONENTS)
    for (layer, name), value in expected.items():
        assert ds.value.sel(layer=layer, component=name).item() == pytest.approx(value, rel=1e-5)
    assert ds.attrs["statistic"] == "activation_norm"
    assert ds.attrs["tokens"] == sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    if family == "gpt2":  # GPT-2 has no gate: NaN, never zero, and marked absent
        assert np.isnan(ds.value.sel(component="mlp.gate")).all()
        assert not ds.present.sel(component="mlp.gate") and ds.module.sel(component="mlp.gate") == ""
        assert ds.module.sel(component="attn.k").item() == "attn.c_attn[k]"
    else:
        assert np.isfinite(ds.value).all() and ds.present.all()


def test_divide_by_sqrt_width_and_subsets(llama, tokenizer):
    probe = {"use": "component_norm", "components": ["mlp.up", "attn.k"], "layers": [-1, 0],
             "divide_by_sqrt_width": True}
    ds = probescope.run(config(probe), models={"m": (llama, tokenizer)}, write=False)["m"]["component_norm"]
    expected = hooked_mean_norms(llama, "llama", tokenizer)
    assert list(ds.layer.values) == [0, 2]
    assert list(ds.component.values) == ["attn.k", "mlp.up"]  # canonical order
    widths = {"attn.k": 16, "mlp.up": 64}  # 2 key/value heads of 8; intermediate 2 x 32
    assert dict(zip(ds.component.values, ds.width.values)) == widths
    for layer in (0, 2):
        for name, width in widths.items():
            assert ds.value.sel(layer=layer, component=name).item() == pytest.approx(
                expected[(layer, name)] / width**0.5, rel=1e-5)
    assert ds.value.attrs["long_name"].endswith("/ sqrt(width)")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("norm", ["frobenius", "spectral"])
def test_weight_norm_matches_the_parameters(family, norm, tokenizer, request):
    model = request.getfixturevalue(family)
    probe = {"use": "component_norm", "statistic": "weight_norm", "norm": norm}
    ds = probescope.run(config(probe), models={"m": (model, tokenizer)}, write=False)["m"]["component_norm"]
    order = "fro" if norm == "frobenius" else 2
    for layer in range(3):
        for name in FAMILIES[family][1]:
            expected = torch.linalg.matrix_norm(raw_weight(model, family, layer, name).double(), ord=order).item()
            assert ds.value.sel(layer=layer, component=name).item() == pytest.approx(expected, rel=1e-9)
    assert ds.attrs["norm"] == norm


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tokenizer):
    """A GPT-2 folder and a copy whose layer-1 value slice of c_attn grew by 10% and whose
    layer-2 MLP down projection moved by a random matrix of known norm."""
    root = tmp_path_factory.mktemp("finetune")
    base = demo.build_gpt2(tokenizer, n_layer=3, n_embd=32, n_head=4, seed=5)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.transformer.h[1].attn.c_attn.weight[:, 2 * D:] *= 1.1
        delta = torch.randn_like(tuned.transformer.h[2].mlp.c_proj.weight) * 0.01
        tuned.transformer.h[2].mlp.c_proj.weight += delta
    expected_down = (delta.norm() / base.transformer.h[2].mlp.c_proj.weight.norm()).item()
    return demo.save_model(base, tokenizer, root / "base"), demo.save_model(tuned, tokenizer, root / "tuned"), expected_down


def relative_update_config(model, reference) -> str:
    """A TOML run of relative_update on the model folder against a reference path."""
    return f"""
[[models]]
name = "tuned"
path = "{model}"

[inputs]
prompts = ["The cat sat"]

[[probes]]
use = "component_norm"
statistic = "relative_update"
reference = {{ path = "{reference}" }}

[output]
dir = "out"
"""


def test_relative_update_against_a_reference_folder(finetuned, tmp_path, write_config):
    base, tuned, expected_down = finetuned
    path = write_config(relative_update_config(tuned, base))
    ds = probescope.run(path)["tuned"]["component_norm"]
    values = ds.value
    assert values.sel(layer=1, component="attn.v").item() == pytest.approx(0.1, rel=1e-5)
    assert values.sel(layer=2, component="mlp.down").item() == pytest.approx(expected_down, rel=1e-5)
    changed = {(1, "attn.v"), (2, "mlp.down")}
    for layer in range(3):
        for name in GPT2_PARTS:
            if (layer, name) not in changed:
                assert values.sel(layer=layer, component=name).item() == 0.0
    assert np.isnan(values.sel(component="mlp.gate")).all()
    assert ds.attrs["reference"] == str(base)
    # Saved and read back with plain xarray, attrs intact.
    saved = probescope.load(path.parent / "out" / "tuned" / "component_norm.nc")
    assert saved.attrs["statistic"] == "relative_update" and saved.attrs["norm"] == "frobenius"
    np.testing.assert_array_equal(saved.value.values, ds.value.values)


def test_relative_update_reference_path_is_relative_to_the_config(finetuned, tmp_path, write_config):
    base, tuned, _ = finetuned
    import shutil

    shutil.copytree(base, tmp_path / "ckpt" / "base")
    path = write_config(relative_update_config(tuned, "ckpt/base"))
    ds = probescope.run(path, write=False)["tuned"]["component_norm"]
    assert ds.value.sel(layer=1, component="attn.v").item() == pytest.approx(0.1, rel=1e-5)


def test_relative_update_refuses_another_architecture(finetuned, model_dirs, tmp_path, write_config):
    _, tuned, _ = finetuned
    path = write_config(relative_update_config(tuned, model_dirs["llama"]))
    with pytest.raises(ConfigError) as err:
        probescope.run(path)
    message = str(err.value)
    assert "probes[0].reference" in message and "'llama' model" in message and "'gpt2'" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("probe, location, words", [
    ({"statistic": "relative_update"}, "probes[0]", ["needs reference"]),
    ({"statistic": "weight_norm", "reference": {"path": "."}}, "probes[0].reference", ["no model folder"]),
    ({"statistic": "relative_update", "reference": {"path": "nowhere"}}, "probes[0].reference", ["no model folder", "nowhere"]),
    ({"statistic": "relative_update", "reference": {"path": "a", "hub": "b"}}, "probes[0].reference", ["exactly one of path"]),
    ({"statistic": "relative_update", "reference": {"hub": "org/not-cached"}}, "probes[0].reference",
     ["cannot read the config", "org/not-cached"]),
    ({"statistic": "grad_norm", "divide_by_sqrt_width": True}, "probes[0]", ["applies to activation_norm"]),
    ({"components": ["attn.q", "mlp.gates"]}, "probes[0].components[1]", ["mlp.gate"]),
    ({"components": ["attn.q", "attn.q"]}, "probes[0].components", ["more than once: attn.q"]),
    ({"layers": [0, 3]}, "probes[0].layers[1]", ["out of range", "-3..2"]),
    ({"statistic": "mean"}, "probes[0].statistic", ["activation_norm"]),
    ({"norm": "nuclear"}, "probes[0].norm", ["spectral"]),
])
def test_bad_parameters_are_named(probe, location, words, model_dirs, tmp_path):
    cfg = config({"use": "component_norm", **probe})
    cfg["models"] = [{"name": "tiny", "path": str(model_dirs["gpt2"])}]
    with pytest.raises(ConfigError) as err:
        probescope.run(cfg, write=False)
    lines = [line for line in str(err.value).splitlines() if location + ":" in line]
    assert lines, str(err.value)
    for word in words:
        assert any(word in line for line in lines), (word, str(err.value))


def test_grad_norm_matches_a_plain_backward_pass(gpt2, tokenizer):
    probe = {"use": "component_norm", "statistic": "grad_norm"}
    ds = probescope.run(config(probe), models={"m": (gpt2, tokenizer)}, write=False)["m"]["component_norm"]

    # Independent: the model's own loss per prompt, weighted to a mean over every
    # predicted token of both prompts, on a copy of the model.
    model = copy.deepcopy(gpt2)
    model.zero_grad()
    lengths = [len(tokenizer(p)["input_ids"]) - 1 for p in PROMPTS]
    for prompt, n in zip(PROMPTS, lengths):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        (model(ids, labels=ids).loss * n / sum(lengths)).backward()
    for layer in range(3):
        for name in GPT2_PARTS:
            path, cols = GPT2_PARTS[name]
            grad = model.get_submodule(f"transformer.h.{layer}.{path}").weight.grad[:, cols]
            assert ds.value.sel(layer=layer, component=name).item() == pytest.approx(grad.norm().item(), rel=1e-4)
    assert ds.attrs["tokens"] == sum(lengths)
    # The model handed in keeps no gradients.
    assert all(p.grad is None for p in gpt2.parameters())


def test_activation_statistics_share_the_single_trace(gpt2, tokenizer, monkeypatch):
    """token_similarity and component_norm on one model: one traced pass per batch."""
    calls = []
    original = trace.run_batch

    def counting(envoy, steps, batch, *rest):
        calls.append(sorted({owner for step in steps for owner, _, _ in step.reads}))
        return original(envoy, steps, batch, *rest)

    monkeypatch.setattr(trace, "run_batch", counting)
    out = probescope.run(config({"use": "component_norm"}, {"use": "token_similarity"}, batch_size=1),
                         models={"m": (gpt2, tokenizer)}, write=False)["m"]
    assert calls == [["component_norm", "token_similarity"]] * len(PROMPTS)
    assert set(out) == {"component_norm", "token_similarity"}


def test_generic_adapter_has_no_components(tokenizer, tmp_path, write_config):
    from transformers import BloomConfig, BloomForCausalLM

    folder = demo.save_model(BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4)),
                             tokenizer, tmp_path / "bloom")
    cfg = config({"use": "component_norm"})
    cfg["models"] = [{"name": "b", "path": str(folder), "blocks": "transformer.h"}]
    with pytest.raises(ConfigError) as err:
        probescope.run(cfg, write=False)
    assert "probes[0]: model 'b': architecture 'generic' has no component sites" in str(err.value)


def test_two_families_combine_and_draw(gpt2, llama, tokenizer, tmp_path):
    """GPT-2 (no gate) and Llama side by side: one dataset along `model`, one figure."""
    from matplotlib.figure import Figure

    out = probescope.run(config({"use": "component_norm", "statistic": "weight_norm"}),
                         models={"gpt2": (gpt2, tokenizer), "llama": (llama, tokenizer)}, write=False)
    both = probescope.combine({name: out[name]["component_norm"] for name in ("gpt2", "llama")})
    gate = both.value.sel(component="mlp.gate")
    assert np.isnan(gate.sel(model="gpt2")).all() and np.isfinite(gate.sel(model="llama")).all()
    figure = probescope.render([both], "component_heatmap", tmp_path / "both.png", shared_scale=True)
    assert isinstance(figure, Figure)
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == ["gpt2", "llama"]
    assert (tmp_path / "both.png").stat().st_size > 0


@pytest.mark.parametrize("statistic, needs_prompts", [("weight_norm", False), ("activation_norm", True),
                                                      ("grad_norm", True)])
def test_inputs_are_required_only_by_statistics_that_run_the_model(model_dirs, statistic, needs_prompts):
    config = {"models": [{"name": "tiny", "path": str(model_dirs["gpt2"])}],
              "probes": [{"use": "component_norm", "statistic": statistic}]}
    if needs_prompts:
        with pytest.raises(ConfigError, match=r"inputs: required section is missing; it holds prompts = \[\.\.\.\] "
                                              r"or prompts_file, which 'component_norm' needs"):
            probescope.run(config, write=False)
    else:
        ds = probescope.run(config, write=False)["tiny"]["component_norm"]
        assert np.isfinite(ds.value.sel(component="attn.q").values).all()
