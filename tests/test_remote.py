"""Remote execution: a model entry's trace plan travels as an nnsight request, with
probescope's reduction code shipped by value, and only the reductions come back.

There is no network here, so ``remote = "local"`` runs the request through nnsight's
local simulation of NDIF (made strict: probescope and its client-only dependencies
cannot be imported while the request is deserialised and run, as on a server that does
not have them), and its results are compared with the same run done locally.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probescope import api, trace
from probescope import remote as remote_mod
from probescope.architectures.base import component, head_output, logits, mlp_hidden, resid, rotary_k, rotary_q
from probescope.errors import ConfigError, RunFailed
from probescope.models import find_adapter
from probescope.probe import Read
from test_sites import make_batch, registry

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The cat sat on the mat.", "Hi"]


def config(folder, **entry):
    return {
        "models": [{"name": "m", "path": str(folder), "dtype": "float32", **entry}],
        "inputs": {"prompts": PROMPTS, "batch_size": 2},
        "probes": [
            {"use": "token_similarity", "layers": [0, 1, 2]},
            {"use": "component_norm", "name": "activation"},
            {"use": "component_norm", "name": "weights", "statistic": "weight_norm"},
        ],
    }


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_simulated_remote_run_equals_the_local_run(model_dirs, family):
    local = api.run(config(model_dirs[family]), write=False)["m"]
    remote = api.run(config(model_dirs[family], remote="local"), write=False)["m"]
    assert remote.keys() == local.keys() == {"token_similarity", "activation", "weights"}
    for probe in local:
        for name, values in local[probe].data_vars.items():
            np.testing.assert_array_equal(remote[probe][name].values, values.values, err_msg=f"{probe}.{name}")
    assert np.isfinite(remote["activation"].value.values).sum() > 0


def sites_through(model, tokenizer, refs, batch, backend_mode):
    """Every site of ``refs`` read in one pass: locally, or through the strict local
    simulation of NDIF with probescope's code registered."""
    adapter = find_adapter(model.config, registry())
    blocks = adapter.blocks(model)
    keep = lambda hidden, batch: hidden.float().clone()  # noqa: E731
    steps = trace.plan_steps([("s", Read(k, r, keep)) for k, r in refs.items()],
                             lambda ref: adapter.site(ref, blocks, model.config))
    if not backend_mode:
        with trace.wrapped(model) as envoy:
            return trace.run_batch(envoy, steps, batch)
    shipped = remote_mod.register(steps)
    loaded = type("Loaded", (), {"tokenizer": tokenizer, "entry": None, "remote": "local"})()
    with trace.wrapped(model, remote_mod.wrapper(loaded)) as envoy:
        return trace.run_batch(envoy, steps, batch, remote_mod.backend(envoy, "local", shipped))


def test_sites_read_remotely_equal_local_reads_and_hooks(tokenizer):
    """The residual stream, components, per-head outputs, MLP neurons, rotary queries
    and keys (instrumented where the model runs) and the logits, on a fresh model."""
    from probescope import demo

    model = demo.build_llama(tokenizer, layers=3, width=32, heads=4, kv_heads=2, seed=5)
    refs = {"resid@1": resid(1), "q@0": component("attn.q", 0), "heads@2": head_output(2),
            "mlp@1": mlp_hidden(1), "rq@1": rotary_q(1), "rk@1": rotary_k(1), "o@1": component("attn.o", 1),
            "logits": logits()}
    batch = make_batch((5, 3, 1))
    remote, remote_failed = sites_through(model, tokenizer, refs, batch, "local")
    local, local_failed = sites_through(model, tokenizer, refs, batch, None)
    assert remote_failed == local_failed == {}
    assert remote["s"].keys() == local["s"].keys() == refs.keys()
    for key in refs:
        torch.testing.assert_close(remote["s"][key], local["s"][key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    with torch.no_grad():
        out = model(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    torch.testing.assert_close(remote["s"]["logits"], out.logits)
    torch.testing.assert_close(remote["s"]["resid@1"], out.hidden_states[2])


def test_reduction_code_that_is_not_shipped_fails_as_on_the_server(model_dirs, monkeypatch):
    """Without nnsight.register the request names probescope's functions by reference,
    and a server without probescope cannot load it: the simulation says so too."""
    from cloudpickle import cloudpickle

    monkeypatch.setattr(remote_mod, "register", lambda steps: [])
    monkeypatch.setattr(cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())  # forget earlier tests' registrations
    with pytest.raises(RunFailed) as caught:
        api.run(config(model_dirs["llama"], remote="local"), write=False)
    assert "No module named 'probescope" in str(caught.value)
    assert "on the server" in str(caught.value)


def test_remote_mistakes_are_named_at_once(model_dirs, monkeypatch, tmp_path, capsys):
    from nnsight import CONFIG

    from probescope.cli import main

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    folder = model_dirs["llama"]
    path = tmp_path / "probes.toml"
    path.write_text(f"""
[[models]]
name = "a"
path = "{folder}"
remote = true

[[models]]
name = "b"
path = "{folder}"
remote = "local"
device = "cpu"

[[models]]
name = "c"
hub = "EleutherAI/pythia-70m"
remote = true

[[models]]
name = "d"
path = "{folder}"
remote = "yes"

[inputs]
prompts = ["Hi there"]

[[probes]]
use = "token_similarity"
""")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    for words in [
        "models[0]: remote = true runs the model NDIF hosts, named by its hub id: give hub, not path",
        "models[1]: remote = 'local' runs the model where NDIF places it: leave out device",
        "models[2].remote: remote = true needs an NDIF API key",
        "models[3].remote: ",
    ]:
        assert words in err, f"{words!r} not in:\n{err}"


def test_a_probe_reading_attention_cannot_run_remotely(model_dirs, tmp_path):
    from probescope.plugins.manager import load_registry  # noqa: F401

    text = config(model_dirs["llama"], remote="local")
    text["probes"] = [{"use": "token_similarity"}]
    plugin = attention_plugin()
    text["probes"].append({"use": "attention_reader"})
    with pytest.raises(ConfigError) as caught:
        api.run(text, write=False, plugins=[("attention_reader", plugin)])
    messages = [f"{p.location}: {p.message}" for p in caught.value.problems]
    assert len(messages) == 1 and messages[0].startswith("probes[1]: model 'm': reads attention probabilities")


def attention_plugin():
    """A plugin probe reading attention probabilities (the shipped probes read none)."""
    import types

    import xarray as xr

    import probescope
    from probescope.architectures.base import attention

    class AttentionReader(probescope.Probe):
        name = "attention_reader"
        description = "mean attention"

        class Parameters(probescope.Parameters):
            pass

        def sites(self, params, model):
            return [attention(0)]

        def reads(self, params, model):
            return [probescope.Read("a", attention(0), lambda h, b: h.nansum())]

        def build(self, params, run):
            return xr.Dataset({"a": float(sum(run.reductions["a"]))})

    module = types.ModuleType("attention_reader")

    @probescope.hookimpl
    def register_probes(register):
        register(AttentionReader())

    module.register_probes = register_probes
    return module


def test_grad_norm_does_not_run_on_a_remote_model(model_dirs):
    text = config(model_dirs["llama"], remote="local")
    text["probes"] = [{"use": "component_norm", "statistic": "grad_norm"}]
    with pytest.raises(RunFailed, match="grad_norm runs a backward pass .* runs remotely"):
        api.run(text, write=False)


def test_remote_true_runs_the_plan_through_the_remote_backend_and_a_server_stand_in(model_dirs, monkeypatch):
    """``remote = true`` with only the network replaced: no weights load here; nnsight's
    RemoteBackend names the model by its hub id and serialises the request (probescope's
    code by value); a stand-in for the server deserialises it with probescope, xarray,
    matplotlib, pluggy and netCDF4 unimportable, runs it against a model with weights and
    sends back what the block saved. The datasets equal a local run's."""
    import sys

    from nnsight import CONFIG
    from nnsight.intervention.backends.remote import RemoteBackend
    from nnsight.modeling import huggingface
    from nnsight.modeling.transformers import TransformersModel
    from nnsight.schema.request import RequestModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import probescope.architectures.streamed as streamed
    from probescope import models as models_mod
    from probescope.checkpoint import Checkpoint

    folder = str(model_dirs["llama"])  # given as the "hub id": from_pretrained reads a folder too
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key")
    monkeypatch.setitem(huggingface._ID_CACHE, folder, "org/tiny-llama")  # the key's hub lookup, offline
    monkeypatch.setattr(streamed, "checkpoint_of", lambda entry: Checkpoint.local(folder))  # the layout's shards
    server = TransformersModel(AutoModelForCausalLM.from_pretrained(folder), task="text-generation",
                               tokenizer=AutoTokenizer.from_pretrained(folder))
    keys = []

    def serve(self, request, tracer):  # RemoteBackend.request: what NDIF does with the payload
        import linecache

        keys.append(self.model_key)
        blob = self._serialize(tracer)
        # deserialising registers the block's source under its file's name (trace.py): a
        # server is another process; here it is put back, as nnsight's simulation does
        filename = tracer.info.frame.f_code.co_filename
        line_entry = linecache.cache.get(filename)
        stand_in = remote_mod.strict_local_simulation(server, [])  # for its module hiding
        stand_in.kept_out, stand_in.finder = {}, remote_mod._Refuse(remote_mod.CLIENT_ONLY)
        hidden = stand_in._hide_local_modules()
        try:
            restored = RequestModel.deserialize(blob, server._remoteable_persistent_objects(), compress=self.compress)
            stand_in._restore(hidden)
            hidden = None
            restored.execute(restored.info.code)  # probescope still unimportable while it runs
            saved = restored.info.frame.f_locals
            return {"sink": saved["sink"], "failed": saved["failed"]}
        finally:
            sys.meta_path.remove(stand_in.finder)
            if hidden is not None:
                stand_in._restore(hidden)
            sys.modules.update(stand_in.kept_out)
            if line_entry is not None:
                linecache.cache[filename] = line_entry
            else:
                linecache.cache.pop(filename, None)

    monkeypatch.setattr(RemoteBackend, "request", serve)
    local = api.run(config(model_dirs["llama"]), write=False)["m"]
    monkeypatch.setattr(models_mod, "load_weights", lambda *a, **k: pytest.fail("weights loaded for remote = true"))
    cfg = config(model_dirs["llama"], remote=True)
    cfg["models"] = [{"name": "m", "hub": folder, "remote": True}]
    remote = api.run(cfg, write=False)["m"]
    assert keys and keys[0].startswith("nnsight.modeling.transformers.TransformersModel:")
    assert '"repo_id": "org/tiny-llama"' in keys[0] and '"task": "text-generation"' in keys[0]
    assert remote.keys() == local.keys()
    for probe in local:
        for name, values in local[probe].data_vars.items():
            np.testing.assert_array_equal(remote[probe][name].values, values.values, err_msg=f"{probe}.{name}")
