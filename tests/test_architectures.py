"""Every built-in architecture adapter against independent computations.

The expectations come from ``architecture_cases.py``: the test's own table, per family,
of which raw module holds each canonical component and how to cut it out of a fused
module, written from the transformers sources. Activations are taken with plain PyTorch
forward hooks on an unwrapped run of the same model; weights are read straight off the
modules. Only the code under test (adapters, ``trace``, ``ModelLayout``) uses the
adapters' own helpers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from architecture_cases import BY_ID, CASES, INNER, LAYERS, MAX_POSITIONS, VOCAB, WIDTH, build, stored_to_out_in
from probescope import trace
from probescope.architectures.base import COMPONENTS, component, embed, resid
from probescope.architectures.layout import ModelLayout
from probescope.errors import SiteError
from probescope.inputs import Batch, Prompt
from probescope.models import find_adapter
from probescope.plugins.manager import load_registry
from probescope.probe import Read

CASE_IDS = [case.id for case in CASES]
FUSED_IDS = [case.id for case in CASES if case.fused]
BATCH, TOKENS = 2, 5
EXACT = dict(rtol=0.0, atol=0.0)  # the same computation on the same machine
CLOSE = dict(rtol=1e-5, atol=1e-5)


def first(value):
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


@functools.lru_cache(maxsize=None)
def registry():
    return load_registry()


def adapter_of(case_id: str):
    return find_adapter(build(case_id).config, registry())


def layout_of(case_id: str) -> ModelLayout:
    model = build(case_id)
    adapter = adapter_of(case_id)
    return ModelLayout(model, adapter, adapter.blocks(model))


@dataclass
class Hooked:
    """One plain forward pass, recorded with forward hooks on the raw modules."""

    ids: torch.Tensor
    inputs: dict  # (layer, module path in block) -> the module's input
    outputs: dict  # (layer, module path in block) -> the module's output
    block_in: list
    block_out: list
    logits: torch.Tensor


def hooked_run(case_id: str, ids: torch.Tensor) -> Hooked:
    case = BY_ID[case_id]
    model = build(case_id)
    blocks = model.get_submodule(case.blocks)
    paths = sorted({part.module for part in case.table(model.config).values()})
    inputs, outputs, calls = {}, {}, {}
    block_in: dict[int, torch.Tensor] = {}
    block_out: dict[int, torch.Tensor] = {}
    handles = []

    def on_module(key):
        def hook(module, args, out):
            calls[key] = calls.get(key, 0) + 1
            inputs[key] = args[0].detach().clone()
            outputs[key] = out.detach().clone()
        return hook

    def on_block_in(layer):
        def hook(module, args, kwargs):
            block_in[layer] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    def on_block_out(layer):
        def hook(module, args, out):
            block_out[layer] = first(out).detach().clone()
        return hook

    try:
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(on_block_in(layer), with_kwargs=True))
            handles.append(block.register_forward_hook(on_block_out(layer)))
            for path in paths:
                handles.append(block.get_submodule(path).register_forward_hook(on_module((layer, path))))
        with torch.no_grad():
            logits = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    assert set(calls.values()) == {1}, f"a hooked module ran more than once: {calls}"
    return Hooked(ids, inputs, outputs, [block_in[i] for i in range(LAYERS)],
                  [block_out[i] for i in range(LAYERS)], logits)


def input_ids(case_id: str, tokens: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(2, VOCAB, (BATCH, tokens), generator=generator)


@functools.lru_cache(maxsize=None)
def observed(case_id: str):
    """The hooked reference run on a batch of 2 x 5 tokens, and every component of
    every layer plus the residual stream read through probescope in one trace."""
    case = BY_ID[case_id]
    model = build(case_id)
    ids = input_ids(case_id, TOKENS)
    reference = hooked_run(case_id, ids)

    adapter = adapter_of(case_id)
    blocks = adapter.blocks(model)
    keep = lambda hidden, batch: hidden.clone()  # noqa: E731
    reads = [("arch", Read("embed", embed(), keep))]
    for layer in range(LAYERS):
        reads.append(("arch", Read(f"resid@{layer}", resid(layer), keep)))
        for name in case.table(model.config):
            reads.append(("arch", Read(f"{name}@{layer}", component(name, layer), keep)))
    prompts = [Prompt(i, f"prompt {i}", tuple(row.tolist()), tuple(str(t) for t in row.tolist()))
               for i, row in enumerate(ids)]
    batch = Batch(prompts, ids, torch.ones_like(ids))
    steps = trace.plan_steps(reads, lambda ref: adapter.site(ref, blocks, model.config))
    with trace.wrapped(model) as envoy:
        sink, failed = trace.run_batch(envoy, steps, batch)
    return reference, dict(sink.get("arch", {})), dict(failed)


@functools.lru_cache(maxsize=None)
def one_token(case_id: str) -> Hooked:
    """A hooked run on one token per row: attention is exactly 1 on that token."""
    return hooked_run(case_id, input_ids(case_id, 1))


def table(case_id: str):
    return BY_ID[case_id].table(build(case_id).config)


def raw_module(case_id: str, layer: int, path: str) -> torch.nn.Module:
    return build(case_id).get_submodule(f"{BY_ID[case_id].blocks}.{layer}.{path}")


def expected_weight(case_id: str, layer: int, name: str) -> torch.Tensor:
    """The component's (out, in) weight, cut out of the raw parameter by the test's table."""
    part = table(case_id)[name]
    raw = stored_to_out_in(BY_ID[case_id], raw_module(case_id, layer, part.module).weight)
    return part.cut(raw.t()).t()


def expected_bias(case_id: str, layer: int, name: str) -> torch.Tensor | None:
    part = table(case_id)[name]
    bias = raw_module(case_id, layer, part.module).bias
    return None if bias is None else part.cut(bias)


# -- 1. the adapter ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_adapter_by_model_type_and_its_components(case_id):
    case = BY_ID[case_id]
    model = build(case_id)
    adapter = adapter_of(case_id)
    assert adapter.name == case.adapter
    assert adapter.blocks(model) == case.blocks
    assert adapter.num_layers(model.config) == LAYERS
    assert adapter.hidden_size(model.config) == WIDTH
    assert adapter.max_positions(model.config) == MAX_POSITIONS
    expected = table(case_id)
    assert set(adapter.components(model.config)) == set(expected)
    assert set(ModelLayout(model, adapter, case.blocks).components) == set(expected)
    for layer in range(LAYERS):
        for name in COMPONENTS:
            ref = component(name, layer)
            if name in expected:
                site = adapter.site(ref, case.blocks, model.config)
                assert (site.module, site.port) == (f"{case.blocks}.{layer}.{expected[name].module}", "output")
            else:  # absent, never faked
                with pytest.raises(SiteError, match=name):
                    adapter.site(ref, case.blocks, model.config)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_base_model_without_lm_head(case_id):
    """The bare base model (GPT2Model, LlamaModel, OPTModel...) works too, minus the output layer."""
    case = BY_ID[case_id]
    model = build(case_id)
    base = model.base_model
    path = case.blocks.removeprefix(model.base_model_prefix + ".")
    adapter = adapter_of(case_id)
    assert adapter.blocks(base) == path
    layout = ModelLayout(base, adapter, path)
    want_norm = None if case.final_norm is None else model.get_submodule(case.final_norm)
    assert layout.final_norm() is want_norm
    assert layout.embedding().weight is model.get_submodule(case.embed).weight
    torch.testing.assert_close(layout.weight(LAYERS - 1, "attn.v"), expected_weight(case_id, LAYERS - 1, "attn.v"))
    with pytest.raises(SiteError, match="output layer"):
        layout.unembedding()


def test_cases_exercise_what_they_claim():
    """The tiny models really have the features the cases are meant to cover."""
    qwen = build("qwen2").model.layers[0].self_attn
    assert all(getattr(qwen, m).bias is not None for m in ("q_proj", "k_proj", "v_proj"))
    assert qwen.o_proj.bias is None
    gemma = build("gemma").config
    assert (gemma.num_key_value_heads, gemma.head_dim) == (1, 16) and gemma.head_dim != WIDTH // gemma.num_attention_heads
    for case_id in ("llama", "mistral", "qwen2", "gemma2", "phi3"):
        config = build(case_id).config
        assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2), case_id
    opt350 = build("opt-350m-like").model.decoder
    assert opt350.project_in is not None and opt350.project_out is not None and opt350.final_layer_norm is None
    assert build("opt").model.decoder.project_in is None
    assert build("gpt_neox-parallel").config.use_parallel_residual is True
    assert build("gpt_neox-sequential").config.use_parallel_residual is False
    assert {BY_ID[c].tied for c in ("gpt2", "gpt2-untied")} == {True, False}


def test_families_without_a_gate():
    without = {case.id for case in CASES if "mlp.gate" not in case.table(build(case.id).config)}
    assert without == {"gpt2", "gpt2-untied", "gpt_neox-parallel", "gpt_neox-sequential", "phi", "gptj",
                       "opt", "opt-350m-like"}


# -- 2. one trace reads every site, in execution order ------------------------------------------


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_one_trace_reads_every_site_as_hooks_see_it(case_id):
    reference, traced, failed = observed(case_id)
    assert failed == {}
    torch.testing.assert_close(traced["embed"], reference.block_in[0], **EXACT)
    for layer in range(LAYERS):
        torch.testing.assert_close(traced[f"resid@{layer}"], reference.block_out[layer], **EXACT)
        for name, part in table(case_id).items():
            want = part.cut(reference.outputs[(layer, part.module)]).reshape(BATCH, TOKENS, -1)
            got = traced[f"{name}@{layer}"]
            assert got.shape == want.shape, f"{name}[{layer}]"  # (batch, token, width), OPT's fc1/fc2 too
            torch.testing.assert_close(got, want, **EXACT, msg=lambda m: f"{name}[{layer}]: {m}")


def test_opt_mlp_reads_come_back_batch_token_width():
    reference, traced, _ = observed("opt")
    assert reference.outputs[(0, "fc1")].dim() == 2  # the module itself sees (tokens, width)
    assert traced["mlp.up@0"].shape == (BATCH, TOKENS, INNER)
    assert traced["mlp.down@0"].shape == (BATCH, TOKENS, WIDTH)


# -- 3. weights by component ---------------------------------------------------------------------


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_weight_and_bias_match_raw_parameters_and_module_outputs(case_id):
    layout = layout_of(case_id)
    reference, _, _ = observed(case_id)
    parts = table(case_id)
    for layer in range(LAYERS):
        for name in COMPONENTS:
            if name not in parts:
                assert layout.weight(layer, name) is None
                assert layout.bias(layer, name) is None
                assert layout.module(layer, name) is None
                continue
            part = parts[name]
            weight, bias = layout.weight(layer, name), layout.bias(layer, name)
            torch.testing.assert_close(weight, expected_weight(case_id, layer, name), **EXACT)
            want_bias = expected_bias(case_id, layer, name)
            if want_bias is None:
                assert bias is None, f"{name}[{layer}] has no bias"
            else:
                torch.testing.assert_close(bias, want_bias, **EXACT)
            # the same cut applies to anything shaped like the weight (a gradient, say)
            stored = raw_module(case_id, layer, part.module).weight
            torch.testing.assert_close(layout.oriented(layer, name, 2 * stored), 2 * weight, **EXACT)
            # and the cut weight reproduces the component's output from the module's input
            x = reference.inputs[(layer, part.module)]
            with torch.no_grad():
                out = F.linear(x, weight, bias)
            torch.testing.assert_close(out, part.cut(reference.outputs[(layer, part.module)]), **CLOSE,
                                       msg=lambda m: f"{name}[{layer}]: {m}")


# -- 4. per-head weights -------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_heads_reproduce_attention_on_one_token(case_id):
    case = BY_ID[case_id]
    n_heads, n_kv, hd = case.heads
    group = n_heads // n_kv
    d = build(case_id).config.hidden_size
    layout = layout_of(case_id)
    run = one_token(case_id)
    parts = table(case_id)
    q, k, v, o = (parts[c] for c in ("attn.q", "attn.k", "attn.v", "attn.o"))
    for layer in range(LAYERS):
        w = layout.heads(layer)
        assert (w.shape.n_heads, w.shape.n_kv_heads, w.shape.head_dim) == case.heads
        assert w.W_Q.shape == w.W_K.shape == w.W_V.shape == (n_heads, d, hd)
        assert w.W_O.shape == (n_heads, hd, d)
        assert w.kv_head.tolist() == [h // group for h in range(n_heads)]
        for b, part in ((w.b_Q, q), (w.b_K, k), (w.b_V, v)):
            assert (b is None) == (raw_module(case_id, layer, part.module).bias is None)
        assert (w.b_O is None) == (raw_module(case_id, layer, o.module).bias is None)

        x = run.inputs[(layer, v.module)]  # (batch, 1, d): the attention's normed input
        torch.testing.assert_close(run.inputs[(layer, q.module)], x, **EXACT)
        outs = {c: parts[c].cut(run.outputs[(layer, parts[c].module)]) for c in ("attn.q", "attn.k", "attn.v")}
        raw = {c: expected_weight(case_id, layer, c) for c in ("attn.q", "attn.k", "attn.v")}
        raw_o = stored_to_out_in(case, raw_module(case_id, layer, o.module).weight)  # (d, heads * hd)

        def bias_of(b, h):
            return 0.0 if b is None else b[h]

        total = 0.0
        with torch.no_grad():
            for h in range(n_heads):
                kv = h // group
                own = slice(h * hd, (h + 1) * hd)
                shared = slice(kv * hd, (kv + 1) * hd)
                torch.testing.assert_close(x @ w.W_Q[h] + bias_of(w.b_Q, h), outs["attn.q"][..., own], **CLOSE)
                torch.testing.assert_close(x @ w.W_K[h] + bias_of(w.b_K, h), outs["attn.k"][..., shared], **CLOSE)
                torch.testing.assert_close(x @ w.W_V[h] + bias_of(w.b_V, h), outs["attn.v"][..., shared], **CLOSE)
                torch.testing.assert_close(w.W_Q[h], raw["attn.q"][own].t(), **EXACT)
                torch.testing.assert_close(w.W_K[h], raw["attn.k"][shared].t(), **EXACT)
                torch.testing.assert_close(w.W_V[h], raw["attn.v"][shared].t(), **EXACT)
                torch.testing.assert_close(w.W_O[h], raw_o[:, own].t(), **EXACT)
                total = total + (x @ w.W_V[h] + bias_of(w.b_V, h)) @ w.W_O[h]
            if w.b_O is not None:
                total = total + w.b_O
        torch.testing.assert_close(total, run.outputs[(layer, o.module)], **CLOSE)


# -- 5. the ends of the residual stream -------------------------------------------------------------


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_embedding_is_the_input_of_block_zero(case_id):
    case = BY_ID[case_id]
    model = build(case_id)
    reference, _, _ = observed(case_id)
    emb = layout_of(case_id).embedding()
    assert emb.weight is model.get_submodule(case.embed).weight
    assert emb.scale == pytest.approx(case.embed_scale)
    want = reference.block_in[0]
    if case.positions is not None:  # learned absolute positions are not the token's own
        want = want - case.positions(model, TOKENS)
    with torch.no_grad():
        got = emb(reference.ids)
    torch.testing.assert_close(got, want, **CLOSE)
    # and directly from the parameters
    direct = model.get_submodule(case.embed).weight[reference.ids] * case.embed_scale
    if case.project_in is not None:
        direct = direct @ model.get_submodule(case.project_in).weight.t()
    torch.testing.assert_close(got, direct, **CLOSE)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_unembedding_of_final_norm_gives_the_logits(case_id):
    case = BY_ID[case_id]
    model = build(case_id)
    layout = layout_of(case_id)
    reference, _, _ = observed(case_id)
    lm_head = getattr(model, "embed_out", None) or model.get_submodule(case.lm_head)
    embedding = model.get_submodule(case.embed)
    assert (lm_head.weight is embedding.weight) == case.tied  # the fixture is what it claims

    norm = layout.final_norm()
    if case.final_norm is None:
        assert norm is None
    else:
        assert norm is model.get_submodule(case.final_norm)
    unemb = layout.unembedding()
    assert unemb.tied is case.tied
    assert unemb.weight is lm_head.weight
    assert unemb.bias is lm_head.bias
    assert unemb.softcap == case.softcap
    if case.project_out is None:
        assert unemb.project is None
    else:
        torch.testing.assert_close(unemb.project, model.get_submodule(case.project_out).weight, **EXACT)

    with torch.no_grad():
        x = reference.block_out[-1]
        if norm is not None:
            x = norm(x)
        torch.testing.assert_close(unemb(x), reference.logits, **CLOSE)
        pre = x @ unemb.matrix()
        if lm_head.bias is not None:
            pre = pre + lm_head.bias
        if case.softcap is None:
            torch.testing.assert_close(pre, reference.logits, **CLOSE)
        else:  # Gemma 2: logits = cap * tanh(logits / cap)
            torch.testing.assert_close(case.softcap * torch.tanh(pre / case.softcap), reference.logits, **CLOSE)
            assert not torch.allclose(pre, reference.logits, atol=1e-3)  # the cap visibly matters here


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_parallel_blocks(case_id):
    assert layout_of(case_id).parallel is BY_ID[case_id].parallel


# -- 6. fused modules ------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", FUSED_IDS)
def test_fused_components_stack_back_into_the_raw_parameter(case_id):
    case = BY_ID[case_id]
    layout = layout_of(case_id)
    for layer in range(LAYERS):
        for fused in case.fused:
            module = raw_module(case_id, layer, fused.module)
            weight = fused.combine([layout.weight(layer, name) for name in fused.components])
            torch.testing.assert_close(weight, stored_to_out_in(case, module.weight), **EXACT)
            if module.bias is not None:
                bias = fused.combine([layout.bias(layer, name) for name in fused.components])
                torch.testing.assert_close(bias, module.bias, **EXACT)


# -- 7. a block's MLP on its own (MAPS's extended embedding) ----------------------------------------

#: The attention module of a block, per family (from the transformers sources).
ATTENTION = {"gpt2": "attn", "gpt_neox": "attention", "gptj": "attn", "opt": "self_attn"}


def block_without_attention(case_id: str, ids: torch.Tensor):
    """Block 0's input and output on a run where its attention writes nothing: a hook
    replaces the attention module's output with zeros."""
    case = BY_ID[case_id]
    model = build(case_id)
    block = model.get_submodule(f"{case.blocks}.0")
    attention = block.get_submodule(ATTENTION.get(case.adapter, "self_attn"))
    seen = {}

    def zero(module, args, out):
        return (torch.zeros_like(out[0]),) + tuple(out[1:])

    def pre(module, args, kwargs):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def post(module, args, out):
        seen["out"] = first(out).detach().clone()

    handles = [attention.register_forward_hook(zero), block.register_forward_pre_hook(pre, with_kwargs=True),
               block.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return block, seen["in"], seen["out"]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_mlp_output_is_what_the_mlp_adds_to_the_stream(case_id):
    block, x, y = block_without_attention(case_id, input_ids(case_id, 3))
    layout = layout_of(case_id)
    with torch.no_grad():
        if case_id == "opt-350m-like":  # post-norm: y = LN_ffn(h + mlp(h)), h = LN_attn(x)
            h = block.self_attn_layer_norm(x)
            torch.testing.assert_close(block.final_layer_norm(h + layout.mlp_output(0, h)), y, **CLOSE)
        else:
            added = layout.mlp_output(0, x)
            torch.testing.assert_close(x + added, y, **CLOSE)
            assert added.abs().max() > 0.1  # the MLP visibly writes something
    with pytest.raises(SiteError, match="out of range"):
        layout.mlp_output(LAYERS, x)
