"""Every code and TOML example in README.md and docs/ runs (or is marked ``no-run``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probescope
from conftest import PROMPTS
from docs_examples import ROOT, blocks, documented_plugins, page_sections, run_session, session_pages, single_blocks


@pytest.mark.parametrize("where,code", single_blocks("python"), ids=[w for w, _ in single_blocks("python")])
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
    """docs/plugins.md's probe against forward hooks (prompts of different lengths in
    batches of one: every real token weighs the same, not every batch), and its
    renderer's figure."""
    plugins = documented_plugins()
    config = {"inputs": {"prompts": PROMPTS, "batch_size": 1}, "probes": [{"use": "mean_norm"}]}
    ds = probescope.run(config, models={"tiny": (gpt2, tokenizer)}, write=False, plugins=plugins)["tiny"]["mean_norm"]
    per_block: list[list[torch.Tensor]] = [[] for _ in gpt2.transformer.h]
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: per_block[i].append(out[0] if isinstance(out, tuple) else out))
             for i, block in enumerate(gpt2.transformer.h)]
    try:
        with torch.no_grad():
            for prompt in PROMPTS:
                gpt2(tokenizer(prompt, return_tensors="pt").input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert len({len(tokenizer(p).input_ids) for p in PROMPTS}) > 1
    expected = [float(torch.cat([h[0].norm(dim=-1) for h in outs]).mean()) for outs in per_block]
    assert np.allclose(ds.mean_norm.values, expected, rtol=1e-5)
    figure = probescope.render([ds], "layer_line", tmp_path / "norms.png", plugins=plugins)
    assert np.allclose(figure.axes[0].get_lines()[0].get_ydata(), expected, rtol=1e-5)
    assert (tmp_path / "norms.png").stat().st_size > 5000


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    """What ``probescope demo --tiny`` builds before it runs: ``probescope-demo/models/``."""
    from probescope import demo

    folder = tmp_path_factory.mktemp("demo")
    demo.write_demo(folder / "probescope-demo", log=lambda *_: None)
    return folder / "probescope-demo"


def _session_folder(page, tmp_path, demo_models):
    if page.name == "getting-started.md":  # the page starts from `probescope demo --tiny`
        (tmp_path / "probescope-demo").symlink_to(demo_models, target_is_directory=True)
    return tmp_path


@pytest.mark.parametrize("page", session_pages(), ids=lambda p: p.name)
def test_pages_run_as_a_reader_follows_them(page, tmp_path, demo_models):
    run_session(page, _session_folder(page, tmp_path, demo_models))


def test_getting_started_shows_what_check_prints(tmp_path, demo_models, capsys, monkeypatch):
    """The page's example of mistakes is what ``probescope check`` prints for them."""
    from probescope.cli import main

    page = ROOT / "docs" / "getting-started.md"
    config = next(code for _, code in blocks("toml", page) if code.startswith("# probes.toml"))
    shown = next(code for _, code in blocks("text", page) if code.startswith("error: probes.toml"))
    bad = config.replace('layers = ["embed", 0, -1]', 'layers = ["embed", 0, 7]').replace("prompt = 1", "prompt = 2")
    assert bad.count("7]") == 1 and "prompt = 2" in bad
    folder = _session_folder(page, tmp_path, demo_models)
    (folder / "probes.toml").write_text(bad)
    monkeypatch.chdir(folder)
    assert main(["check", "probes.toml"]) == 2
    assert capsys.readouterr().err == shown


@pytest.fixture(scope="module")
def example_results(model_dirs, tmp_path_factory):
    """Every built-in probe's dataset where docs/datasets.md's examples read them
    (``results/gpt2/...``, and ``results/llama/component_norm.nc`` to combine with)."""
    import warnings

    from probescope import datasets_page

    folder = tmp_path_factory.mktemp("datasets_page")
    config = {
        "models": [{"name": datasets_page.EXAMPLE_MODEL, "path": str(model_dirs["gpt2"])},
                   {"name": "llama", "path": str(model_dirs["llama"])}],
        "inputs": {"prompts": PROMPTS, "batch_size": 2},
        "probes": [{"use": "token_similarity", "layers": ["embed", 0, "last"], "models": ["gpt2"]},
                   {"use": "token_similarity", "name": datasets_page.example_entry("token_similarity.by_distance"),
                    "form": "by_distance", "models": ["gpt2"]},
                   {"use": "component_norm"},
                   {"use": "head_classifier", "builtin_relations": True, "min_pairs": 1, "models": ["gpt2"]}],
        "output": {"dir": str(folder / datasets_page.EXAMPLE_RESULTS)},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probescope.ProbescopeWarning)  # relations with few single-token pairs
        probescope.run(config)
    return folder


def test_datasets_page_examples_run_on_real_results(example_results, monkeypatch):
    """Each section's Python blocks run in order, in one namespace: the generated block
    that opens the section's dataset first, then the examples that use it."""
    monkeypatch.chdir(example_results)
    ran = {}
    for heading, code in page_sections(ROOT / "docs" / "datasets.md"):
        namespace: dict = {"__name__": "docs_example"}
        for where, block in code:
            exec(compile(block, where, "exec"), namespace)
        ran[heading] = namespace
    assert {"`token_similarity`", "`component_norm`", "`head_classifier`"} <= {h for h, ns in ran.items() if "ds" in ns}
    both = ran["`component_norm`"]["both"]
    assert both.value.sel(model="gpt2", component="mlp.gate").isnull().all()
    assert both.value.sel(model="llama", component="mlp.gate").notnull().all()
