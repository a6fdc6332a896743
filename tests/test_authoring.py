"""What a plugin or configuration author uses: ``probescope new``, ``plugins NAME``,
``schema``, ``check``, and plugins registered in-process.

The scaffold test takes a new user's path for real: generate a probe and a renderer,
install both the way pip does (offline, no dependencies), run the packages' own tests,
and run them from a TOML config with the command line, down to the figure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import probescope
from conftest import PROMPTS, basic_config, toml_list
from probescope.cli import main
from probescope.config_schema import config_schema
from probescope.plugins.manager import load_registry

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(site))
    env.pop("PYTEST_ADDOPTS", None)
    return env


def test_scaffolded_probe_and_renderer_install_pass_their_tests_and_run(tmp_path, model_dirs):
    assert main(["new", "probe", "mean_norm", "-o", str(tmp_path)]) == 0
    assert main(["new", "renderer", "layer_line", "--probe", "mean_norm", "-o", str(tmp_path)]) == 0
    probe_pkg, renderer_pkg = tmp_path / "probescope-mean-norm", tmp_path / "probescope-layer-line"
    assert 'mean_norm = "probescope_mean_norm.plugin"' in (probe_pkg / "pyproject.toml").read_text()
    site = tmp_path / "site"
    subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(probe_pkg), str(renderer_pkg)], check=True, env=_env(site),
                   capture_output=True)
    # the packages' own tests
    tests = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe_pkg / "tests"),
                            str(renderer_pkg / "tests")], env=_env(site), capture_output=True, text=True,
                           cwd=tmp_path)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "2 passed" in tests.stdout
    # found through the entry point, with its parameters
    shown = subprocess.run([PYTHON, "-m", "probescope.cli", "plugins", "mean_norm"], env=_env(site),
                           capture_output=True, text=True, check=True).stdout
    assert "probe mean_norm 0.1.0  (from probescope-mean-norm 0.1.0" in shown
    assert "layers: list of integer = none" in shown
    # a TOML config uses both beside the built-ins
    config = tmp_path / "probes.toml"
    config.write_text(f"""
[[models]]
name = "gpt2"
path = "{model_dirs['gpt2']}"

[inputs]
prompts = {toml_list(PROMPTS)}

[[probes]]
use = "mean_norm"

[[probes]]
use = "token_similarity"
layers = [0]

[[renderers]]
use = "layer_line"
output = "norms.png"
title = "residual norm"

[output]
dir = "out"
""")
    run = subprocess.run([PYTHON, "-m", "probescope.cli", "run", str(config)], env=_env(site),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "norms.png").stat().st_size > 5000
    ds = probescope.load(tmp_path / "out" / "gpt2" / "mean_norm.nc")
    assert ds.attrs["probe"] == "mean_norm" and list(ds.layer.values) == [0, 1, 2]


def test_new_refuses_a_bad_name_or_an_existing_folder(tmp_path, capsys):
    assert main(["new", "probe", "Bad-Name", "-o", str(tmp_path)]) == 2
    assert "'Bad-Name' is not a plugin name" in capsys.readouterr().err
    assert main(["new", "probe", "ok", "-o", str(tmp_path)]) == 0
    assert main(["new", "probe", "ok", "-o", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_plugins_name_prints_parameters_from_the_schema(capsys):
    assert main(["plugins", "token_similarity"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("probe token_similarity 0.1.0  (from probescope")
    assert 'metric: "cosine" | "centred_cosine" = "cosine"' in out
    assert "    layers: list of integer or \"last\" | \"embed\" = none" in out
    assert "block indices (negative count from the end)" in out  # the field's description
    assert main(["plugins", "component_heatmap"]) == 0
    out = capsys.readouterr().out
    assert "draws: component_norm datasets" in out and "columns: integer (>= 1) = 4" in out
    assert main(["plugins", "nope"]) == 1
    assert "no probe, renderer or architecture named 'nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The JSON Schema


def toml_examples() -> list[tuple[str, str]]:
    """``(where, text)`` for every TOML file in the repository (not pyproject.toml) and
    every fenced ``toml`` block in README.md and docs/."""
    found = []
    for path in sorted(ROOT.rglob("*.toml")):
        relative = path.relative_to(ROOT)
        if relative.parts[0].startswith(".") or relative.name == "pyproject.toml" or "egg-info" in str(relative):
            continue
        found.append((str(relative), path.read_text()))
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for k, block in enumerate(re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)):
            if block.startswith("#") and block.splitlines()[0].endswith("pyproject.toml"):
                continue  # a package's pyproject.toml, not a configuration (checked below)
            found.append((f"{page.relative_to(ROOT)} block {k}", block))
    from probescope import demo

    found.append(("probescope demo --tiny config", demo.demo_config()))
    return found


def test_pyproject_examples_declare_the_entry_point():
    from probescope.config import tomllib

    blocks = [b for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
              for b in re.findall(r"```toml\n(.*?)```", page.read_text(), re.S)
              if b.startswith("#") and b.splitlines()[0].endswith("pyproject.toml")]
    assert blocks
    for block in blocks:
        assert "probescope" in tomllib.loads(block)["project"]["entry-points"]


@pytest.fixture(scope="module")
def validator():
    from docs_examples import documented_plugins

    schema = config_schema(load_registry(documented_plugins()))  # docs/plugins.md's config uses them
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("where,text", toml_examples(), ids=[w for w, _ in toml_examples()])
def test_the_schema_validates_every_example_config(validator, where, text):
    from probescope.config import tomllib

    errors = [e.message for e in validator.iter_errors(tomllib.loads(text))]
    assert errors == [], f"{where}: {errors}"


def test_there_are_examples_to_validate():
    assert len(toml_examples()) >= 8


@pytest.mark.parametrize("mistake,expect", [
    ({"probes": [{"use": "token_similarity", "metrc": "cosine"}]}, "metrc"),
    ({"probes": [{"use": "token_similarity", "metric": "dot"}]}, "dot"),
    ({"probes": [{"use": "no_such_probe"}]}, "no_such_probe"),
    ({"renderers": [{"use": "similarity_grid", "output": "a.png", "prompt": -1}]}, "-1"),
    ({"models": [{"name": "a", "hub": "gpt2", "dtype": "float8"}]}, "float8"),
    ({"inputz": {}}, "inputz"),
])
def test_the_schema_rejects_mistakes(validator, mistake, expect):
    errors = " ".join(e.message for e in validator.iter_errors(mistake))
    assert expect in errors


def test_schema_command_includes_a_third_party_probe(install_plugin, capsys):
    install_plugin("probescope-extra", {"extra": """
from pydantic import Field
import probescope

class P(probescope.Parameters):
    depth: int = Field(default=2, ge=1, description="how deep")

class Extra(probescope.Probe):
    name = "extra_probe"
    Parameters = P

@probescope.hookimpl
def register_probes(register):
    register(Extra())
"""})
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors({"probes": [{"use": "extra_probe", "depth": 3}]}))
    assert list(validator.iter_errors({"probes": [{"use": "extra_probe", "depth": 0}]}))
    assert main(["plugins", "extra_probe"]) == 0
    assert "depth: integer (>= 1) = 2\n        how deep" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# check


def test_check_validates_both_stages_without_weights(model_dirs, write_config, monkeypatch, capsys):
    from probescope import models as models_mod

    def refuse(*args, **kwargs):
        raise AssertionError("check loaded weights")

    monkeypatch.setattr(models_mod, "load", refuse)
    good = write_config(basic_config(model_dirs["gpt2"]))
    assert main(["check", str(good)]) == 0
    assert "valid: 1 model(s), probes token_similarity, 1 figure(s)" in capsys.readouterr().out
    assert not (good.parent / "out").exists()
    bad = write_config(basic_config(model_dirs["gpt2"], layers="[0, 7]").replace("batch_size = 2", "batch_size = 0"),
                       name="bad.toml")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: inputs.batch_size:" in err  # stage one
    assert f"{bad}: probes[0].layers[1]: model 'tiny': layer 7 is out of range" in err  # stage two


# --------------------------------------------------------------------------------------
# In-process plugins


def test_in_process_renderer_with_render(gpt2, tokenizer, tmp_path):
    from types import SimpleNamespace

    from matplotlib.figure import Figure

    class Count(probescope.Renderer):
        name = "count_tokens"
        probe = "token_similarity"

        def render(self, datasets, params):
            figure = Figure()
            figure.add_subplot().bar(range(len(datasets)), [ds.sizes["token"] for ds in datasets])
            return figure

    plugin = SimpleNamespace(register_renderers=probescope.hookimpl(lambda register: register(Count())))
    ds = probescope.run({"inputs": {"prompts": PROMPTS}, "probes": [{"use": "token_similarity", "layers": [0]}]},
                        models={"tiny": (gpt2, tokenizer)}, write=False)["tiny"]["token_similarity"]
    figure = probescope.render([ds], "count_tokens", tmp_path / "count.png", plugins=[("count", plugin)])
    assert [p.get_height() for p in figure.axes[0].patches] == [ds.sizes["token"]]
    assert (tmp_path / "count.png").is_file()
    with pytest.raises(probescope.ProbescopeError, match="unknown renderer 'count_tokens'"):
        probescope.render([ds], "count_tokens")
