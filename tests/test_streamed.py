"""The streamed layout against the loaded one, on every family of architecture_cases.

Each case's tiny model is saved with ``save_pretrained`` in shards (an index file and
several safetensors files) and read back by :class:`StreamedLayout`, which never builds
the model; every layout method must give exactly what :class:`ModelLayout` gives on the
model in memory, whose own correctness ``test_architectures.py`` checks against hooks.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json

import pytest
import torch
from safetensors.torch import save_file

import vlm_models
from architecture_cases import CASES, LAYERS, VOCAB, WIDTH, build
from probescope.architectures.base import COMPONENTS
from probescope.architectures.layout import ModelLayout
from probescope.architectures.streamed import StreamedLayout
from probescope.checkpoint import INDEX, Checkpoint
from probescope.errors import ModelLoadError, SiteError
from probescope.models import find_adapter, find_blocks
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


def assert_same_layout(streamed: StreamedLayout, loaded: ModelLayout, layers: int, width: int, vocab: int) -> None:
    """Every method of the streamed layout gives exactly what the loaded one gives."""
    assert streamed.blocks == loaded.blocks
    assert streamed.num_layers == loaded.num_layers == layers
    assert streamed.parallel == loaded.parallel
    assert streamed.components == loaded.components
    assert streamed.attention_shape == loaded.attention_shape
    assert all(p.device.type == "meta" for p in streamed.model.parameters())  # never built
    torch.manual_seed(0)
    x = torch.randn(3, width)
    with torch.no_grad():
        for layer in range(layers):
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
        ids = torch.tensor([[0, 5, vocab - 1]])
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
        streamed.heads(layers)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_every_method_equals_the_loaded_layout(case_id, saved):
    folder = saved(case_id)
    assert (folder / INDEX).is_file() and len(list(folder.glob("*.safetensors"))) > 2  # really sharded
    loaded, streamed = layouts(case_id, folder)
    assert_same_layout(streamed, loaded, LAYERS, WIDTH, VOCAB)


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages under ``tensors`` (views of one tensor count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if isinstance(t, torch.Tensor)}
    return sum(storages.values())


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_heads_hold_no_more_than_the_weights_they_split(case_id, saved):
    """``heads()``, in memory and streamed, holds no more bytes than the attention
    weights and biases it splits (views of them where the layout gives views): grouped-
    query key/value weights once per key/value head, as stored, not repeated per query
    head; ``W_K``/``W_V`` make the repeats only when a probe reads them."""
    for layout in layouts(case_id, saved(case_id)):
        for layer in range(LAYERS):
            w = layout.heads(layer)
            held = held_bytes(getattr(w, f.name) for f in dataclasses.fields(w) if f.name != "kv_head")
            split = held_bytes([layout.weight(layer, c) for c in ("attn.q", "attn.k", "attn.v", "attn.o")]
                               + [layout.bias(layer, c) for c in ("attn.q", "attn.k", "attn.v", "attn.o")])
            assert held <= split, f"{case_id} ({type(layout).__name__}): heads({layer}) holds {held} bytes, " \
                                  f"the weights it splits {split}"
            assert w.W_K_kv.shape[0] == w.W_V_kv.shape[0] == w.shape.n_kv_heads
            same(w.W_K, w.W_K_kv[w.kv_head])
            same(w.W_V, w.W_V_kv[w.kv_head])


def recorded_reads(streamed: StreamedLayout) -> list[str]:
    """The stored names the layout's checkpoint reads from now on, in order."""
    reads: list[str] = []
    read = streamed.checkpoint.read
    streamed.checkpoint.read = lambda key: reads.append(key) or read(key)
    return reads


#: Where the vision tower and projector of each tiny vision-language family are stored.
VISION_PARTS = ("vision_tower.", "vision_model.", "visual.", "multi_modal_projector.", "connector.")


@pytest.mark.parametrize("names", ["saved", "current"])
@pytest.mark.parametrize("family", list(vlm_models.BUILDERS))
def test_vision_language_checkpoint_streams_its_text_decoder(family, names, tmp_path):
    """A multimodal checkpoint, with the names ``save_pretrained`` writes (each family's
    own: ``language_model.model.layers.N``, ``model.text_model.layers.N``, Qwen2-VL's
    ``model.layers.N``) or with the model's current ones (``model.language_model.layers.N``),
    gives the text decoder's weights, equal to the loaded model's and to its raw tensors;
    the vision tower is never read."""
    vlm = vlm_models.BUILDERS[family](seed=3)
    model = vlm.model
    if names == "saved":
        model.save_pretrained(tmp_path, max_shard_size="20KB")
        assert len(list(tmp_path.glob("*.safetensors"))) > 2
    else:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp_path / "model.safetensors")
    text = model.config.get_text_config()
    adapter = find_adapter(text, registry())
    streamed = StreamedLayout(Checkpoint.local(tmp_path), model.config, adapter)
    reads = recorded_reads(streamed)
    loaded = ModelLayout(model, adapter, find_blocks(model, adapter))
    assert_same_layout(streamed, loaded, vlm_models.LAYERS, vlm_models.WIDTH, text.vocab_size)
    decoder = model.get_decoder()
    for layer in range(vlm_models.LAYERS):  # the decoder's raw tensors, not through any layout
        attention = decoder.layers[layer].self_attn
        same(streamed.weight(layer, "attn.q"), attention.q_proj.weight)
        same(streamed.weight(layer, "attn.o"), attention.o_proj.weight)
        same(streamed.weight(layer, "mlp.down"), decoder.layers[layer].mlp.down_proj.weight)
    same(streamed.embedding().weight, decoder.embed_tokens.weight)
    same(streamed.unembedding().weight, model.get_output_embeddings().weight)
    assert reads and not [key for key in reads if any(part in key for part in VISION_PARTS)]


@pytest.mark.parametrize("case_id", ["gpt2", "gpt_neox-parallel", "phi3"])
def test_one_block_is_held_at_a_time(case_id, saved):
    _, streamed = layouts(case_id, saved(case_id))
    reads = recorded_reads(streamed)
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
