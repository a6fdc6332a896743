"""The plugin contract: built-ins come through the entry-point group like anyone's;
conflicts and broken plugins are reported by name."""

from __future__ import annotations

import importlib.metadata

import pytest

from probescope.cli import main
from probescope.errors import PluginConflictError, PluginError
from probescope.plugins.manager import load_registry

BUILTINS = {
    "probe": {"token_similarity"},
    "renderer": {"similarity_grid"},
    "architecture": {"gpt2", "llama"},
}

EXTRA_PROBE = '''
import xarray as xr
import probescope
from probescope import Probe

class Extra(Probe):
    name = "extra"
    description = "a third-party probe"
    def build(self, params, run):
        return xr.Dataset({"n_prompts": ((), len(run.prompts))})

@probescope.hookimpl
def register_probes(register):
    register(Extra())
'''


def test_builtins_are_registered_through_the_entry_point_group():
    declared = {ep.name: ep for ep in importlib.metadata.entry_points(group="probescope")}
    registry = load_registry()
    for kind, names in BUILTINS.items():
        for name in names:
            entry = registry.entries[kind][name]
            assert entry.origin.package == "probescope"
            assert entry.origin.plugin in declared  # came from the group, not a side door
            assert declared[entry.origin.plugin].dist.metadata["Name"] == "probescope"


def test_third_party_plugin_is_found_and_listed(install_plugin, capsys):
    install_plugin("acme-probes", {"extra": EXTRA_PROBE}, version="2.3")
    registry = load_registry()
    entry = registry.entries["probe"]["extra"]
    assert (entry.origin.package, entry.origin.version) == ("acme-probes", "2.3")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "extra" in out and "acme-probes 2.3" in out
    assert "token_similarity" in out and "probescope 0.1.0" in out


def test_two_plugins_claiming_one_name_is_an_error_naming_both(install_plugin):
    clash = EXTRA_PROBE.replace('name = "extra"', 'name = "token_similarity"')
    install_plugin("clash-probes", {"clash": clash})
    with pytest.raises(PluginConflictError) as info:
        load_registry()
    message = str(info.value)
    assert "token_similarity" in message
    assert "'token_similarity' (probescope" in message and "'clash' (clash-probes" in message


def test_plugin_that_fails_to_import_does_not_stop_the_others(install_plugin, capsys):
    install_plugin("broken-probes", {"broken": "raise ImportError('needs a library that is missing')"})
    install_plugin("acme-probes", {"extra": EXTRA_PROBE})
    registry = load_registry()
    assert [(f.plugin, f.package) for f in registry.failures] == [("broken", "broken-probes")]
    assert "needs a library that is missing" in registry.failures[0].error
    assert {"extra", "token_similarity"} <= set(registry.names("probe"))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "failed to load" in out and "broken (broken-probes)" in out and "needs a library" in out


def test_plugin_whose_registration_raises_is_reported(install_plugin):
    install_plugin("bad-register", {"bad": (
        "import probescope\n"
        "@probescope.hookimpl\n"
        "def register_probes(register):\n"
        "    raise RuntimeError('cannot register today')\n")})
    registry = load_registry()
    assert any(f.plugin == "bad" and "cannot register today" in f.error for f in registry.failures)
    assert "token_similarity" in registry.names("probe")


def test_lifecycle_hooks_see_every_dataset_and_the_end_of_the_run(gpt2, tokenizer):
    import probescope

    seen = []

    class Recorder:
        @probescope.hookimpl
        def dataset_produced(self, dataset, model, probe):
            seen.append(("dataset", model, probe, dataset.attrs["probe"]))

        @probescope.hookimpl
        def run_finished(self, results, failures):
            seen.append(("finished", sorted(results), list(failures)))

    probescope.run(
        {"inputs": {"prompts": ["a b c"]}, "probes": [{"use": "token_similarity", "layers": [0]}]},
        models={"m": (gpt2, tokenizer)}, write=False, plugins=[("recorder", Recorder())],
    )
    assert seen == [("dataset", "m", "token_similarity", "token_similarity"), ("finished", ["m"], [])]


def test_an_entry_point_named_like_a_builtin_loads_too(install_plugin):
    """A third party's entry point called ``gpt2`` (the built-in adapter's name) is not
    skipped: its probe registers beside every built-in."""
    install_plugin("acme-probes", {"gpt2": EXTRA_PROBE})
    registry = load_registry()
    assert registry.failures == []
    extra = registry.entries["probe"]["extra"]
    assert (extra.origin.plugin, extra.origin.package) == ("gpt2", "acme-probes")
    builtin = registry.entries["architecture"]["gpt2"]
    assert (builtin.origin.plugin, builtin.origin.package) == ("gpt2", "probescope")


def test_two_third_party_plugins_of_one_entry_name_both_load(install_plugin):
    install_plugin("acme-probes", {"extra": EXTRA_PROBE})
    install_plugin("other-probes", {"extra": EXTRA_PROBE.replace('name = "extra"', 'name = "other"')})
    registry = load_registry()
    assert {"extra", "other"} <= set(registry.names("probe"))
    assert registry.entries["probe"]["other"].origin.package == "other-probes"


def test_two_plugins_registering_one_probe_name_under_one_entry_name_is_the_error_naming_both(install_plugin):
    install_plugin("acme-probes", {"extra": EXTRA_PROBE})
    install_plugin("other-probes", {"extra": EXTRA_PROBE})
    with pytest.raises(PluginConflictError) as info:
        load_registry()
    message = str(info.value)
    assert "probe 'extra' is registered twice" in message
    assert "acme-probes 1.0" in message and "other-probes 1.0" in message


def test_a_run_asking_for_a_broken_plugins_probe_names_the_failure(install_plugin, write_config, model_dirs, capsys):
    install_plugin("broken-probes", {"broken": "raise ImportError('needs a library that is missing')"},
                   version="0.3")
    registry = load_registry()
    with pytest.raises(PluginError) as info:
        registry.get("probe", "broken")
    message = str(info.value)
    assert message.startswith("unknown probe 'broken'; plugin 'broken' (broken-probes 0.3) failed to load: "
                              "ImportError: needs a library that is missing")
    assert "available: " in message and "token_similarity" in message
    # Any unknown name lists every plugin that failed, since any of them might have provided it.
    with pytest.raises(PluginError, match=r"unknown probe 'x'; plugin 'broken' \(broken-probes 0.3\) failed to load"):
        registry.get("probe", "x")
    # And the configuration's error says the same, at the entry's key.
    path = write_config(f'[[models]]\nname = "m"\npath = "{model_dirs["gpt2"]}"\n[inputs]\nprompts = ["a b"]\n'
                        '[[probes]]\nuse = "broken"\n')
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "probes[0].use: unknown probe 'broken'; plugin 'broken' (broken-probes 0.3) failed to load: ImportError" in err


def test_a_run_with_no_broken_plugin_says_only_unknown(install_plugin):
    with pytest.raises(PluginError) as info:
        load_registry().get("probe", "nonesuch")
    assert "failed to load" not in str(info.value) and "unknown probe 'nonesuch'; available:" in str(info.value)
