"""The example plugin packages under examples/, installed as a user would (pip, offline,
no dependencies) and run from a TOML config beside the built-ins; their values are
checked against plain PyTorch (eager attention, ``output_attentions=True``, one prompt at
a time, no padding) and their figures are drawn."""

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
prompts = {toml_list(RUN_PROMPTS)}
batch_size = 2

[[probes]]
use = "attention_scores"

[[probes]]
use = "token_similarity"
layers = [0]

[[renderers]]
use = "attention_map"
output = "attention.png"

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
        expected = reference_scores(model_dirs[model], RUN_PROMPTS)
        for score, values in expected.items():
            assert np.allclose(ds[score].values, values, rtol=1e-4, atol=1e-6), (model, score)
        assert np.isfinite(ds.induction.values).all() and (ds.induction.values > 0).all()
    for figure in ("attention.png", "similarity.png"):
        assert (tmp_path / "out" / figure).stat().st_size > 10_000
