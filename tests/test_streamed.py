"""The streamed layout against the loaded one, on every family of architecture_cases.

Each case's tiny model is saved with ``save_pretrained`` in shards (an index file and
several safetensors files) and read back by :class:`StreamedLayout`, which never builds
the model; every layout method must give exactly what :class:`ModelLayout` gives on the
model in memory, whose own correctness ``test_architectures.py`` checks against hooks.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from safetensors.torch import save_file

from architecture_cases import CASES, LAYERS, VOCAB, WIDTH, build
from probescope.architectures.base import COMPONENTS
from probescope.architectures.layout import ModelLayout
from probescope.architectures.streamed import StreamedLayout
from probescope.checkpoint import INDEX, Checkpoint
from probescope.errors import ModelLoadError, SiteError
from probescope.models import find_adapter
from probescope.plugins.manager import load_registry

CASE_IDS = [case.id for case in CASES]


@functools.lru_cache(maxsize=None)
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case id -> folder holding the case's model saved in shards of about 20 kB."""
    root = tmp_path_factory.mktemp("checkpoints")

    @functools.lru_cache(maxsize=None)
    def folder(case_id: str):
        path = root / case_id
        build(case_id).save_pretrained(path, max_shard_size="20KB")
        return path

    return folder


def layouts(case_id: str, folder, **kwargs) -> tuple[ModelLayout, StreamedLayout]:
    model = build(case_id)
    adapter = find_adapter(model.config, registry())
    loaded = ModelLayout(model, adapter, adapter.blocks(model))
    return loaded, StreamedLayout(Checkpoint.local(folder), model.config, adapter, **kwargs)


def same(a, b) -> None:
    if a is None or b is None:
        assert a is None and b is None
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_every_method_equals_the_loaded_layout(case_id, saved):
    folder = saved(case_id)
    assert (folder / INDEX).is_file() and len(list(folder.glob("*.safetensors"))) > 2  # really sharded
    loaded, streamed = layouts(case_id, folder)
    assert streamed.num_layers == loaded.num_layers == LAYERS
    assert streamed.parallel == loaded.parallel
    assert streamed.components == loaded.components
    assert streamed.attention_shape == loaded.attention_shape
    assert all(p.device.type == "meta" for p in streamed.model.parameters())  # never built
    torch.manual_seed(0)
    x = torch.randn(3, WIDTH)
    with torch.no_grad():
        for layer in range(LAYERS):
            for name in COMPONENTS:
                same(streamed.weight(layer, name), loaded.weight(layer, name))
                same(streamed.bias(layer, name), loaded.bias(layer, name))
                if name in loaded.components:
                    stored = loaded.module(layer, name).weight
                    same(streamed.oriented(layer, name, 2 * stored), loaded.oriented(layer, name, 2 * stored))
            want, got = loaded.heads(layer), streamed.heads(layer)
            for field in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "kv_head"):
                same(getattr(got, field), getattr(want, field))
            assert got.shape == want.shape
            same(streamed.mlp_output(layer, x), loaded.mlp_output(layer, x))

        emb, want_emb = streamed.embedding(), loaded.embedding()
        same(emb.weight, want_emb.weight)
        same(emb.project, want_emb.project)
        assert emb.scale == want_emb.scale
        ids = torch.tensor([[0, 5, VOCAB - 1]])
        same(emb(ids), want_emb(ids))

        unemb, want_unemb = streamed.unembedding(), loaded.unembedding()
        for field in ("weight", "bias", "project"):
            same(getattr(unemb, field), getattr(want_unemb, field))
        assert (unemb.tied, unemb.softcap) == (want_unemb.tied, want_unemb.softcap)
        same(unemb.matrix(), want_unemb.matrix())
        same(unemb(x), want_unemb(x))

        norm, want_norm = streamed.final_norm(), loaded.final_norm()
        assert (norm is None) == (want_norm is None)
        if norm is not None:
            same(norm(x), want_norm(x))
    with pytest.raises(SiteError, match="out of range"):
        streamed.heads(LAYERS)


@pytest.mark.parametrize("case_id", ["gpt2", "gpt_neox-parallel", "phi3"])
def test_one_block_is_held_at_a_time(case_id, saved):
    _, streamed = layouts(case_id, saved(case_id))
    reads = []
    read = streamed.checkpoint.read
    streamed.checkpoint.read = lambda key: reads.append(key) or read(key)
    streamed.heads(0)
    first = len(reads)
    streamed.heads(0)  # held: nothing read again
    assert len(reads) == first
    streamed.heads(1)
    held_layer, held = streamed._layer
    assert held_layer == 1 and all(f"{streamed.blocks}.1." in streamed_name(streamed, k) for k in held)
    streamed.embedding(), streamed.embedding()
    assert sum(".0." not in k and ".1." not in k for k in reads) == 1  # the embedding, read once


def streamed_name(streamed: StreamedLayout, stored: str) -> str:
    return next(name for name, s in streamed.names.items() if s == stored)


def test_tied_output_layer_is_the_embedding_tensor(saved):
    _, streamed = layouts("gpt2", saved("gpt2"))
    assert "lm_head.weight" not in streamed.checkpoint  # saved once, as the embedding
    assert streamed.unembedding().weight is streamed.embedding().weight


def test_single_file_bfloat16_kept_or_converted(tmp_path):
    model = build("llama")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)  # build() is cached: leave it float32
    assert not (tmp_path / INDEX).exists()
    adapter = find_adapter(model.config, registry())
    kept = StreamedLayout(Checkpoint.local(tmp_path), model.config, adapter)
    assert kept.stored_dtype() == torch.bfloat16
    assert kept.weight(1, "attn.v").dtype == torch.bfloat16
    converted = StreamedLayout(Checkpoint.local(tmp_path), model.config, adapter, dtype=torch.float32)
    want = ModelLayout(model, adapter, adapter.blocks(model)).weight(1, "attn.v").to(torch.bfloat16).float()
    assert torch.equal(converted.weight(1, "attn.v"), want)


def test_checkpoint_without_the_base_model_prefix(tmp_path):
    # The original GPT-2 hub checkpoint was saved from GPT2Model: "h.0.attn.c_attn.weight".
    model = build("gpt2-untied")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    adapter = find_adapter(model.config, registry())
    streamed = StreamedLayout(Checkpoint.local(tmp_path), model.config, adapter)
    same(streamed.weight(1, "attn.q"), ModelLayout(model, adapter, "transformer.h").weight(1, "attn.q"))


def test_missing_checkpoint_and_missing_tensor_are_named(tmp_path, saved):
    with pytest.raises(ModelLoadError, match="no safetensors checkpoint"):
        Checkpoint.local(tmp_path)
    folder = saved("llama")
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"]["model.layers.1.self_attn.v_proj.weight"]
    (tmp_path / INDEX).write_text(json.dumps(index))
    for shard in folder.glob("*.safetensors"):
        (tmp_path / shard.name).symlink_to(shard)
    _, streamed = layouts("llama", tmp_path)
    streamed.weight(1, "attn.q")
    with pytest.raises(ModelLoadError, match="model.layers.1.self_attn.v_proj.weight"):
        streamed.weight(1, "attn.v")


def test_truncated_shard_is_an_error(tmp_path):
    build("llama").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    checkpoint = Checkpoint.local(tmp_path)
    last = max(checkpoint.keys(), key=lambda k: checkpoint.entry(k)["data_offsets"][1])
    with pytest.raises(ModelLoadError, match="ends inside tensor"):
        checkpoint.read(last)


def fake_hub(monkeypatch, folder, fetched: list):
    """hf_hub_download served from a local folder, recording which files were asked for."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def download(repo, name, revision=None):
        assert (repo, revision) == ("org/tiny", "abc")
        if not (folder / name).is_file():
            raise EntryNotFoundError(f"{name} is not in {repo}")
        fetched.append(name)
        return str(folder / name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def test_hub_checkpoint_downloads_only_the_shards_it_reads(saved, monkeypatch):
    folder = saved("llama")
    fetched: list = []
    fake_hub(monkeypatch, folder, fetched)
    checkpoint = Checkpoint.hub("org/tiny", "abc")
    assert fetched == [INDEX]  # nothing else until a tensor is read
    key = "model.layers.1.self_attn.v_proj.weight"
    weight = checkpoint.read(key)
    assert fetched == [INDEX, checkpoint.weight_map[key]]
    assert torch.equal(weight, build("llama").model.layers[1].self_attn.v_proj.weight)
    assert len(set(checkpoint.weight_map.values())) > 2  # the others were never fetched


def test_hub_checkpoint_of_one_file(tmp_path, monkeypatch):
    build("gptj").save_pretrained(tmp_path)
    fetched: list = []
    fake_hub(monkeypatch, tmp_path, fetched)
    checkpoint = Checkpoint.hub("org/tiny", "abc")
    assert fetched == ["model.safetensors"]
    assert torch.equal(checkpoint.read("lm_head.weight"), build("gptj").lm_head.weight)
