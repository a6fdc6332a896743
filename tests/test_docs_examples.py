"""Every code and TOML example in README.md and docs/ runs (or is marked ``no-run``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probescope
from conftest import PROMPTS
from docs_examples import blocks, documented_plugins


@pytest.mark.parametrize("where,code", blocks("python"), ids=[w for w, _ in blocks("python")])
def test_python_example_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "docs_example"})


@pytest.mark.parametrize("where,code", blocks("bash", runnable_only=False), ids=[w for w, _ in blocks("bash", runnable_only=False)])
def test_shell_examples_name_real_commands(where, code):
    """Shell examples are not run (they install packages and download models), but every
    probescope command in them must parse with the real argument parser."""
    import shlex

    from probescope.cli import build_parser

    for line in code.splitlines():
        line = line.split("#")[0].strip()
        for part in line.split("&&"):
            words = shlex.split(part)
            if words and words[0].endswith("probescope") and len(words) > 1:
                words = [w.replace("*", "x") for w in words[1:]]
                build_parser().parse_args(words)


def test_documented_probe_and_renderer_work(gpt2, tokenizer, tmp_path):
    """docs/plugins.md's probe against forward hooks, and its renderer's figure."""
    plugins = documented_plugins()
    config = {"inputs": {"prompts": PROMPTS[:1]}, "probes": [{"use": "mean_norm"}]}
    ds = probescope.run(config, models={"tiny": (gpt2, tokenizer)}, write=False, plugins=plugins)["tiny"]["mean_norm"]
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for block in gpt2.transformer.h]
    try:
        with torch.no_grad():
            gpt2(tokenizer(PROMPTS[0], return_tensors="pt").input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    expected = [float(h[0].norm(dim=-1).mean()) for h in outputs]
    assert np.allclose(ds.mean_norm.values, expected, rtol=1e-5)
    figure = probescope.render([ds], "layer_line", tmp_path / "norms.png", plugins=plugins)
    assert np.allclose(figure.axes[0].get_lines()[0].get_ydata(), expected, rtol=1e-5)
    assert (tmp_path / "norms.png").stat().st_size > 5000
