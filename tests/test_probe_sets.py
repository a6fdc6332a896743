"""Declarative probe sets: ``include`` with per-entry overrides, the same probe under two
names, ``models = [...]`` on a probe entry, and ``${VARIABLE}`` expansion.

Each run is compared with the same configuration written out inline, so what an include
or override does is checked against what the user would otherwise have written by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import probescope
from conftest import PROMPTS, toml_list
from probescope.cli import main

HEADS_SET = """
[[probes]]
use = "token_similarity"
name = "plain"
layers = [0, -1]

[[probes]]
use = "token_similarity"
name = "centred"
metric = "centred_cosine"
layers = [0]
"""


def header(model_dirs, *names: str, out: str = "out") -> str:
    text = "".join(f'[[models]]\nname = "{n}"\npath = "{model_dirs[n]}"\n\n' for n in names)
    return text + f'[inputs]\nprompts = {toml_list(PROMPTS)}\nbatch_size = 2\n\n[output]\ndir = "{out}"\n'


def test_included_set_with_override_equals_the_same_entries_inline(model_dirs, tmp_path, capsys):
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "heads.toml").write_text(HEADS_SET)
    included = tmp_path / "included.toml"
    included.write_text('include = [{ path = "sets/heads.toml", override = { centred = { layers = [1, 2] } } }]\n'
                        + header(model_dirs, "gpt2", "llama", out="a"))
    inline = tmp_path / "inline.toml"
    inline.write_text(header(model_dirs, "gpt2", "llama", out="b")
                      + HEADS_SET.replace("layers = [0]", "layers = [1, 2]"))
    assert main(["run", str(included)]) == 0
    assert main(["run", str(inline)]) == 0
    for model in ("gpt2", "llama"):
        for entry in ("plain", "centred"):
            a = xr.open_dataset(tmp_path / "a" / model / f"{entry}.nc")
            b = xr.open_dataset(tmp_path / "b" / model / f"{entry}.nc")
            xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
        centred = xr.open_dataset(tmp_path / "a" / model / "centred.nc")
        plain = xr.open_dataset(tmp_path / "a" / model / "plain.nc")
        assert list(centred.layer.values) == [1, 2]  # the override, not the set's [0]
        assert list(plain.layer.values) == [0, 2]
        # the same probe under two names, with different parameters, gives different results
        assert not np.allclose(plain.similarity.sel(layer=2).fillna(0), centred.similarity.sel(layer=2).fillna(0))


def test_a_probe_entry_runs_only_on_the_models_it_names(model_dirs, tokenizer, tmp_path):
    """A residual-only model (no adapter, blocks named) next to a full one: the component
    probe, limited to the full model, does not fail the residual-only one."""
    from transformers import BloomConfig, BloomForCausalLM

    from probescope import demo

    bloom = demo.save_model(BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2,
                                                         n_head=4)), tokenizer, tmp_path / "bloom")
    config = {
        "models": [{"name": "llama", "path": str(model_dirs["llama"])},
                   {"name": "bloom", "path": str(bloom), "blocks": "transformer.h"}],
        "inputs": {"prompts": PROMPTS},
        "probes": [{"use": "token_similarity", "layers": [0]},
                   {"use": "component_norm", "models": ["llama"]}],
        "output": {"dir": str(tmp_path / "out")},
    }
    results = probescope.run(config)
    assert set(results["llama"]) == {"token_similarity", "component_norm"}
    assert set(results["bloom"]) == {"token_similarity"}
    # without the restriction the config is invalid: the residual-only model has no components
    del config["probes"][1]["models"]
    with pytest.raises(probescope.ConfigError) as invalid:
        probescope.run(config, write=False)
    assert [(p.location, "'bloom'" in p.message) for p in invalid.value.problems] == [("probes[1]", True)]


def test_unknown_model_in_an_entry_is_an_error(model_dirs, write_config, capsys):
    path = write_config(header(model_dirs, "gpt2") + '[[probes]]\nuse = "token_similarity"\nmodels = ["gpt2", "pythia"]\n')
    assert main(["run", str(path)]) == 2
    assert f"{path}: probes[0].models[1]: no model named 'pythia'; models: gpt2" in capsys.readouterr().err


def test_environment_variables_expand_and_unknown_ones_are_all_reported(model_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROBESCOPE_TEST_MODELS", str(model_dirs["gpt2"].parent))
    monkeypatch.delenv("PROBESCOPE_NOT_SET", raising=False)
    monkeypatch.delenv("PROBESCOPE_NOT_SET_EITHER", raising=False)
    (tmp_path / "set.toml").write_text('[[probes]]\nuse = "token_similarity"\nname = "${PROBESCOPE_NOT_SET_EITHER}"\n')
    good = tmp_path / "good.toml"
    good.write_text(header(model_dirs, "gpt2").replace(str(model_dirs["gpt2"]), "${PROBESCOPE_TEST_MODELS}/gpt2")
                    + '[[probes]]\nuse = "token_similarity"\nlayers = [0]\n')
    assert main(["run", str(good)]) == 0
    assert (tmp_path / "out" / "gpt2" / "token_similarity.nc").is_file()
    bad = tmp_path / "bad.toml"
    bad.write_text('include = ["set.toml"]\n' + header(model_dirs, "gpt2").replace('dir = "out"', 'dir = "${PROBESCOPE_NOT_SET}/out"')
                   + '[[probes]]\nuse = "token_similarity"\n')
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: output.dir: environment variable 'PROBESCOPE_NOT_SET' is not set" in err
    assert f"{bad}: set.toml: probes[0].name: environment variable 'PROBESCOPE_NOT_SET_EITHER' is not set" in err
    assert not (tmp_path / "${PROBESCOPE_NOT_SET}").exists()


def test_escaped_dollar_is_kept(model_dirs, monkeypatch):
    from probescope.config_files import expand_variables

    problems = []
    assert expand_variables({"a": ["x ${HOME_X} $${HOME_X}"]}, [], problems, {"HOME_X": "/h"}) == {"a": ["x /h ${HOME_X}"]}
    assert problems == []
    expand_variables({"a": "${not a name}"}, [], problems, {})
    assert [p.location for p in problems] == ["a"] and "not a variable name" in problems[0].message


def test_include_mistakes_name_the_file_and_key_all_at_once(model_dirs, tmp_path, capsys):
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "heads.toml").write_text(HEADS_SET.replace("layers = [0]", "layers = [0, 9]") + "\n[inputs]\nprompts = ['x']\n")
    (sets / "loop.toml").write_text('include = ["loop.toml"]\n')
    path = tmp_path / "probes.toml"
    path.write_text('include = ["sets/heads.toml", "sets/missing.toml", "sets/loop.toml", '
                    '{ path = "sets/heads.toml", override = { nope = { layers = [0] } } }, 3]\n'
                    + header(model_dirs, "gpt2"))
    before = {p.name for p in tmp_path.iterdir()}
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.splitlines()[1:]]
    expected = [
        f"{path}: sets/heads.toml: unknown key 'inputs'; an included file holds include, probes, renderers",
        f"{path}: include[1]: sets/missing.toml: no such file",
        f"{path}: sets/loop.toml: include[0]: sets/loop.toml includes itself (through loop.toml)",
        f"{path}: include[3].override.nope: sets/heads.toml has no entry named 'nope'; its entries: plain, centred",
        f"{path}: include[4]: expected a file name or {{ path = ..., override = ... }}, got 3",
        # stage two, against the model: located in the included file
        f"{path}: sets/heads.toml: probes[1].layers[1]: model 'gpt2': layer 9 is out of range",
    ]
    for line in expected:
        assert any(l.startswith(line) for l in lines), f"{line!r} not in:\n{err}"
    assert {p.name for p in tmp_path.iterdir()} == before
