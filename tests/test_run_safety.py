"""Runs that never lose work: a dataset that cannot be saved fails alone, files get the
permissions the umask gives, an interrupted run says what it finished and leaves nothing
half-written, failures keep their tracebacks, and only probescope's progress is shown."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import xarray as xr

import probescope
from conftest import basic_config
from probescope import results
from probescope.cli import main

PLUGIN = '''
import numpy as np
import xarray as xr
import probescope
from probescope import Probe, Read, resid

class Unsavable(Probe):
    """Its dataset has a dict attribute, which NetCDF cannot store."""
    name = "unsavable"
    def reads(self, params, model):
        return [Read("x", resid(0), lambda hidden, batch: hidden.sum())]
    def build(self, params, run):
        return xr.Dataset({"x": ("layer", np.zeros(2))}, attrs={"cfg": {"a": 1}})

class Interrupts(Probe):
    """Stands for the user pressing Ctrl-C while this probe builds its dataset."""
    name = "interrupts"
    def reads(self, params, model):
        return [Read("x", resid(0), lambda hidden, batch: hidden.sum())]
    def build(self, params, run):
        raise KeyboardInterrupt

class Explodes(Probe):
    name = "explodes"
    def reads(self, params, model):
        return [Read("x", resid(0), lambda hidden, batch: hidden.sum())]
    def build(self, params, run):
        return helper_that_fails()

def helper_that_fails():
    raise ValueError("deep inside the plugin")

@probescope.hookimpl
def register_probes(register):
    register(Unsavable())
    register(Interrupts())
    register(Explodes())
'''


def with_probes(text: str, *names: str) -> str:
    return text + "".join(f'\n[[probes]]\nuse = "{name}"\n' for name in names)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def plugin(install_plugin):
    install_plugin("safety", {"safety": PLUGIN})


# -- a dataset that cannot be saved ----------------------------------------------------------


def test_a_dataset_that_cannot_be_saved_fails_alone(model_dirs, write_config, plugin, capsys):
    path = write_config(with_probes(basic_config(model_dirs["gpt2"]), "unsavable"))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error: model 'tiny': probe 'unsavable' failed: DatasetSaveError: cannot be saved as NetCDF" in err
    assert "Traceback" not in err
    out = path.parent / "out"
    assert (out / "tiny" / "token_similarity.nc").is_file() and (out / "similarity.png").is_file()
    assert sorted(p.name for p in (out / "tiny").iterdir()) == ["token_similarity.nc"]  # nothing half-written


def test_a_model_whose_only_dataset_cannot_be_saved_leaves_no_empty_folder(model_dirs, write_config, plugin, capsys):
    path = write_config(f'[[models]]\nname = "tiny"\npath = "{model_dirs["gpt2"]}"\n\n[inputs]\nprompts = ["a b"]\n\n'
                        '[[probes]]\nuse = "unsavable"\n\n[output]\ndir = "out"\n')
    assert main(["run", str(path)]) == 1
    assert not (path.parent / "out").exists(), files_under(path.parent / "out")


def test_save_raises_a_probescope_error_and_leaves_nothing(tmp_path):
    ds = xr.Dataset({"x": ("a", [1.0])}, attrs={"cfg": {"a": 1}})
    with pytest.raises(probescope.ProbescopeError, match="cannot be saved as NetCDF"):
        results.save(ds, tmp_path / "new" / "deeper" / "x.nc")
    assert files_under(tmp_path) == set()


# -- permissions -------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_respect_the_umask(umask, model_dirs, write_config):
    path = write_config(basic_config(model_dirs["gpt2"]))
    old = os.umask(umask)
    try:
        assert main(["run", str(path)]) == 0
    finally:
        os.umask(old)
    out = path.parent / "out"
    written = [out / "tiny" / "token_similarity.nc", out / "similarity.png", out / "manifest.json"]
    for file in written:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, (file, oct(file.stat().st_mode))


# -- failures keep their tracebacks -------------------------------------------------------------


def test_debug_prints_the_plugins_traceback(model_dirs, write_config, plugin, capsys):
    path = write_config(with_probes(basic_config(model_dirs["gpt2"], renderer=False), "explodes"))
    assert main(["run", str(path)]) == 1
    plain = capsys.readouterr().err
    assert "probe 'explodes' failed: ValueError: deep inside the plugin" in plain and "Traceback" not in plain
    assert main(["--debug", "run", str(path)]) == 1
    debug = capsys.readouterr().err
    assert "Traceback (most recent call last)" in debug
    assert "in helper_that_fails" in debug and 'raise ValueError("deep inside the plugin")' in debug


def test_run_failed_keeps_the_cause(gpt2, tokenizer, plugin):
    config = {"inputs": {"prompts": ["a b c"]}, "probes": [{"use": "token_similarity"}, {"use": "explodes"}]}
    with pytest.raises(probescope.RunFailed) as info:
        probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and str(cause) == "deep inside the plugin"
    assert info.value.errors == [cause]
    assert "token_similarity" in info.value.datasets["m"]


# -- Ctrl-C ------------------------------------------------------------------------------------


def test_ctrl_c_says_what_was_finished_in_one_line_and_exits_130(model_dirs, write_config, plugin, capsys):
    text = basic_config(model_dirs["gpt2"])
    text += f'\n[[models]]\nname = "second"\npath = "{model_dirs["llama"]}"\n'
    path = write_config(with_probes(text, "interrupts"))
    assert main(["run", str(path)]) == 130
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines == ["interrupted: 1 file(s) written; not finished: model 'tiny' (interrupts), "
                     "model 'second' (token_similarity, interrupts), similarity.png"], captured.err
    out = path.parent / "out"
    assert files_under(out) == {"tiny", "tiny/token_similarity.nc", "manifest.json"}
    assert probescope.load(out / "tiny" / "token_similarity.nc").similarity.size > 0  # complete, readable


def test_ctrl_c_while_a_file_is_written_leaves_no_partial_file(model_dirs, write_config, monkeypatch, capsys):
    path = write_config(basic_config(model_dirs["gpt2"], renderer=False))

    def interrupted_write(self, target, *args, **kwargs):
        Path(target).write_bytes(b"CDF\x01 half of a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", interrupted_write)
    assert main(["run", str(path)]) == 130
    err = capsys.readouterr().err
    assert err == "interrupted: nothing written; not finished: model 'tiny' (token_similarity)\n"
    assert not (path.parent / "out").exists()


# -- only probescope's progress ---------------------------------------------------------------


def test_transformers_progress_bars_are_hidden_unless_asked(model_dirs, write_config, capsys):
    path = write_config(basic_config(model_dirs["gpt2"], renderer=False))
    assert main(["run", str(path)]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert main(["--library-progress", "run", str(path)]) == 0
    assert "Loading weights" in capsys.readouterr().err  # the bar the option brings back
