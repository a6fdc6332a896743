"""Models loaded with ``device_map`` and offloaded in part to disk (accelerate), as a model
larger than one device is: every activation site, every probe and the weights layout
give what the same model gives loaded whole, and plain forward hooks agree.

There is no GPU here, so the tiny models are forced to offload with a small
``max_memory`` for the CPU (or a device_map table sending blocks to "disk"): their
offloaded weights sit on the meta device between uses, as on a real multi-device run.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from architecture_cases import BY_ID, CASES, LAYERS, build
from probescope import api, trace
from probescope import models as models_mod
from probescope.config import ModelEntry
from probescope.errors import ConfigError, RunFailed
from probescope.models import find_adapter
from probescope.offload import OffloadedLayout, is_dispatched
from probescope.probe import Read
from test_head_classifier import LLAMA_PLAN, build_llama as planted_llama_model, check_planted, relation_file
from test_head_classifier import word_tokenizer
from test_sites import SHAPES, make_batch, observed, reference, registry, site_refs

#: In the default run: a tied Conv1D family, a grouped-query rotary one, and OPT-350m's
#: projections in and out of the residual stream; every family and shape with -m slow.
QUICK = {("gpt2", "padded"), ("llama", "padded"), ("opt-350m-like", "one-token")}
MATRIX = [pytest.param(case.id, shape, marks=() if (case.id, shape) in QUICK else pytest.mark.slow)
          for case in CASES for shape in SHAPES]
EXACT = dict(rtol=0, atol=0, equal_nan=True)
CLOSE = dict(rtol=1e-5, atol=1e-5)


def offloaded_entry(folder, tmp_path, **placement) -> ModelEntry:
    return ModelEntry(name="m", path=str(folder), dtype="float32", offload_folder=str(tmp_path / "offload"),
                      **placement)


def cpu_budget(model: torch.nn.Module) -> int:
    """70% of the bytes of a model's parameters: a CPU budget that sends its last modules
    to disk (accelerate also keeps room for the largest module it brings in; with half,
    some families go to disk whole)."""
    return int(0.7 * sum(p.numel() * p.element_size() for p in model.parameters()))


def assert_offloaded(model: torch.nn.Module) -> None:
    """The model really is split: some modules in memory, some on disk with meta weights."""
    assert is_dispatched(model)
    places = set(model.hf_device_map.values())
    assert "disk" in places and places - {"disk"}, model.hf_device_map
    assert any(p.device.type == "meta" for p in model.parameters())


@pytest.fixture(scope="module")
def dispatched(tmp_path_factory):
    """``dispatched(case_id)``: the case's model saved, then loaded by probescope with
    device_map = "auto" and 70% of its size allowed on the CPU (the rest on disk)."""
    cache = {}

    def load(case_id: str) -> torch.nn.Module:
        if case_id not in cache:
            root = tmp_path_factory.mktemp(case_id)
            model = build(case_id)
            model.save_pretrained(root / "model", safe_serialization=True)
            entry = offloaded_entry(root / "model", root, device_map="auto", max_memory={"cpu": cpu_budget(model)})
            cache[case_id] = models_mod.load_weights(entry)
        return cache[case_id]

    return load


# -- every site, on every family ---------------------------------------------------------------


@pytest.mark.parametrize("case_id, shape", MATRIX)
def test_every_site_of_an_offloaded_model_equals_the_whole_model_and_plain_hooks(case_id, shape, dispatched):
    model = dispatched(case_id)
    assert_offloaded(model)
    batch, _, (whole, whole_failed) = observed(case_id, shape)
    refs = site_refs(case_id)
    adapter = find_adapter(model.config, registry())
    keep = lambda hidden, batch: hidden.clone()  # noqa: E731
    steps = trace.plan_steps([("sites", Read(k, r, keep)) for k, r in refs.items()],
                             lambda ref: adapter.site(ref, adapter.blocks(model), model.config))
    with trace.attention_implementation(model, "eager"), trace.wrapped(model) as envoy:
        sink, failed = trace.run_batch(envoy, steps, batch)
    assert failed == whole_failed == {}
    got = dict(sink["sites"])
    assert got.keys() == whole.keys() == refs.keys()
    for key in refs:
        # bit-for-bit on most sites; a weight read back from disk may sit differently in
        # memory, which can change the last bit of a matrix product (GPT-2's tied logits)
        torch.testing.assert_close(got[key], whole[key], **CLOSE, equal_nan=True, msg=lambda m: f"{key}: {m}")
    # and against plain forward hooks on the unwrapped model loaded whole
    ref = reference(case_id, batch)
    torch.testing.assert_close(got["logits"], ref.logits, **CLOSE)
    torch.testing.assert_close(got["resid_final"], ref.lm_input, **CLOSE)
    for layer in range(LAYERS):
        torch.testing.assert_close(got[f"head_output@{layer}"].flatten(-2), ref.o_input[layer], **CLOSE)
        torch.testing.assert_close(got[f"mlp_hidden@{layer}"], ref.down_input[layer], **CLOSE)
        for row, n in enumerate(batch.lengths.tolist()):
            torch.testing.assert_close(got[f"attention@{layer}"][row, :, :n, :n],
                                       ref.attentions[layer][row, :, :n, :n], **CLOSE)


def test_a_dispatched_model_comes_back_as_it_was(dispatched):
    """nnsight's controller forward goes again; accelerate's hooks (which bring the
    offloaded weights in) stay and still work."""
    model = dispatched("llama")
    hooked = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    batch = make_batch((5, 3))
    with torch.no_grad():
        before = model(batch.input_ids, attention_mask=batch.attention_mask).logits
    adapter = find_adapter(model.config, registry())
    steps = trace.plan_steps([("s", Read("k", site_refs("llama")["logits"], lambda h, b: h.sum()))],
                             lambda ref: adapter.site(ref, adapter.blocks(model), model.config))
    with trace.wrapped(model) as envoy:
        trace.run_batch(envoy, steps, batch)
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == hooked
    with torch.no_grad():
        torch.testing.assert_close(model(batch.input_ids, attention_mask=batch.attention_mask).logits, before,
                                   **EXACT)


# -- the weights layout ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A Llama whose heads implement known relations (test_head_classifier's), its word
    tokenizer, and its saved folder."""
    words = word_tokenizer()
    model = planted_llama_model(words)
    folder = tmp_path_factory.mktemp("planted") / "llama"
    model.save_pretrained(folder, safe_serialization=True)
    words.save_pretrained(folder)
    return model, words, folder


#: layers 1 and 2 and the output layer on disk, the rest in memory
TABLE = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


def test_the_layout_reads_offloaded_weights_from_the_offload_store(planted, tmp_path):
    model, words, folder = planted
    entry = offloaded_entry(folder, tmp_path, device_map=TABLE)
    info = models_mod.inspect(entry, registry())
    loaded = models_mod.load(entry, info, words)
    assert_offloaded(loaded.model)
    assert loaded.model.model.layers[1].self_attn.v_proj.weight.device.type == "meta"
    assert loaded.device == torch.device("cpu")
    offloaded, whole = loaded.layout, models_mod.from_objects("w", model, words, registry()).layout
    assert isinstance(offloaded, OffloadedLayout)
    for layer in range(3):
        got, want = offloaded.heads(layer), whole.heads(layer)
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), **EXACT)
        for name in ("attn.q", "mlp.up", "mlp.down", "mlp.gate"):
            torch.testing.assert_close(offloaded.weight(layer, name), whole.weight(layer, name), **EXACT)
    torch.testing.assert_close(offloaded.embedding().weight, whole.embedding().weight, **EXACT)
    got_u, want_u = offloaded.unembedding(), whole.unembedding()
    torch.testing.assert_close(got_u.weight, want_u.weight, **EXACT)
    assert got_u.tied == want_u.tied is False
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in (0, 2):  # block 2's MLP runs through its hooks from disk
            torch.testing.assert_close(offloaded.mlp_output(layer, x), whole.mlp_output(layer, x), **EXACT)
        torch.testing.assert_close(offloaded.final_norm()(x), whole.final_norm()(x), **EXACT)


# -- whole runs --------------------------------------------------------------------------------

PROMPTS = ["France Paris Japan Tokyo", "walk walked", "house", "dog chien cat chat water eau bread"]


def run_config(folder, relations, **placement):
    return {
        "models": [{"name": "m", "path": str(folder), "dtype": "float32", **placement}],
        "inputs": {"prompts": PROMPTS, "batch_size": 3},
        "probes": [
            {"use": "token_similarity", "layers": [0, 1, 2]},
            {"use": "component_norm", "name": "activation"},
            {"use": "component_norm", "name": "weights", "statistic": "weight_norm"},
            {"use": "head_classifier", "builtin_relations": False, "relation_files": [str(relations)],
             "min_pairs": 5},
        ],
    }


@pytest.mark.parametrize("placement", ["table", "auto"])
def test_every_probe_on_an_offloaded_model_equals_the_model_loaded_whole(planted, tmp_path, placement):
    model, words, folder = planted
    relations = relation_file(tmp_path)
    how = {"device_map": TABLE} if placement == "table" else \
        {"device_map": "auto", "max_memory": {"cpu": f"{cpu_budget(model) / 2**20:.3f}MiB"}}
    whole = api.run(run_config(folder, relations), write=False)["m"]
    split = api.run(run_config(folder, relations, offload_folder=str(tmp_path / "off"), **how), write=False)["m"]
    assert split.keys() == whole.keys() == {"token_similarity", "activation", "weights", "head_classifier"}
    for probe in whole:
        for name, values in whole[probe].data_vars.items():
            np.testing.assert_array_equal(split[probe][name].values, values.values, err_msg=f"{probe}.{name}")
    check_planted(split["head_classifier"], LLAMA_PLAN)  # the planted heads found from offloaded weights
    # activation_norm against plain forward hooks: mean L2 norm of o_proj's output over real tokens
    batch = words(PROMPTS, return_tensors="pt", padding=True)
    norms = []
    handle = model.model.layers[2].self_attn.o_proj.register_forward_hook(
        lambda m, a, out: norms.append(out.norm(dim=-1)[batch.attention_mask.bool()]))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    want = float(torch.cat(norms).mean())
    got = float(split["activation"].value.sel(layer=2, component="attn.o"))
    assert got == pytest.approx(want, rel=1e-5)


def test_grad_norm_on_an_offloaded_model_says_why_it_cannot(planted, tmp_path):
    _, _, folder = planted
    config = {"models": [{"name": "m", "path": str(folder), "device_map": TABLE,
                          "offload_folder": str(tmp_path / "off")}],
              "inputs": {"prompts": PROMPTS}, "probes": [{"use": "component_norm", "statistic": "grad_norm"}]}
    with pytest.raises(RunFailed, match="grad_norm differentiates the weights in memory.*device_map.*offloaded"):
        api.run(config, write=False)


# -- configuration -------------------------------------------------------------------------------


def test_placement_mistakes_are_named_all_at_once_and_exit_2(planted, tmp_path, capsys):
    from probescope.cli import main

    _, _, folder = planted
    (tmp_path / "afile").write_text("")
    config = tmp_path / "probes.toml"
    config.write_text(f"""
[[models]]
name = "a"
path = "{folder}"
device_map = "everywhere"

[[models]]
name = "b"
path = "{folder}"
device_map = {{ "model.layers.0" = "gpu", "lm_head" = -1 }}
max_memory = {{ cpu = "lots", tpu = "1GB" }}

[[models]]
name = "c"
path = "{folder}"
max_memory = {{ cpu = "1GB" }}
offload_folder = "off"

[[models]]
name = "d"
path = "{folder}"
device = "cpu"
device_map = "auto"

[[models]]
name = "g"
path = "{folder}"
device_map = "auto"
offload_folder = "afile"

[[models]]
name = "e"
path = "{folder}"
device_map = {{ "model.layerz" = "cpu", "lm_head" = "cpu" }}

[[models]]
name = "f"
path = "{folder}"
device_map = {{ "" = "cuda:3" }}

[inputs]
prompts = ["house"]

[[probes]]
use = "token_similarity"
""")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    expected = [
        "models[0].device_map: 'everywhere' is not a device map; expected one of 'auto'",
        "models[1].device_map: 'model.layers.0': 'gpu' is not a device; 'lm_head': -1 is not a GPU index",
        "models[1].max_memory: 'cpu' = 'lots' is not a size",
        "key 'tpu' is not a device",
        "models[2]: max_memory and offload_folder only apply with device_map",
        "models[3]: give device ('cpu') or device_map ('auto'), not both",
        "models[4].offload_folder: ",
        "is a file; give a folder",
        "models[5].device_map: device_map names module(s) the model does not have: 'model.layerz'",
        "models[6].device_map: device 'cuda:3' asked for, but CUDA is not available",
    ]
    for words in expected:
        assert words in err, f"{words!r} not in:\n{err}"
    assert not (tmp_path / "results").exists()


def test_device_map_without_accelerate_names_the_extra(planted, monkeypatch):
    _, _, folder = planted
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now raises ImportError
    config = {"models": [{"name": "m", "path": str(folder), "device_map": "auto"}],
              "inputs": {"prompts": PROMPTS}, "probes": [{"use": "token_similarity"}]}
    with pytest.raises(ConfigError) as caught:
        api.run(config, write=False)
    assert [p.location for p in caught.value.problems] == ["models[0].device_map"]
    assert "pip install 'probescope[offload]'" in caught.value.problems[0].message
