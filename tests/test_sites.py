"""The sites beyond the residual stream and the components (attention probabilities,
per-head outputs, MLP neurons, the stream between attention and MLP, rotary queries and
keys, the final stream and the logits), on every family of ``architecture_cases.py``,
against an independent reference, with padding in the batch.

The reference is a plain run of the unwrapped model under eager attention with
``output_attentions=True`` and PyTorch forward hooks on the raw modules the test's own
tables name; rotary queries and keys are checked by recomputing the attention
probabilities from them with a plain softmax. Only the code under test uses the adapters.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import pytest
import torch

import probescope
from architecture_cases import BY_ID, CASES, LAYERS, VOCAB, build, stored_to_out_in
from probescope import trace
from probescope.architectures.base import (
    attention, component, head_output, logits, mlp_hidden, resid_final, resid_mid, rotary_k, rotary_q,
)
from probescope.errors import SiteError
from probescope.inputs import Batch, Prompt
from probescope.models import find_adapter
from probescope.plugins.manager import load_registry
from probescope.probe import Read

CASE_IDS = [case.id for case in CASES]
ROTARY_IDS = [case.id for case in CASES if case.score_scale is not None]
CLOSE = dict(rtol=1e-5, atol=1e-5)
#: Batches: rows of 5, 3 and 1 real tokens, right-padded to 5; and one prompt of one token.
SHAPES = {"padded": (5, 3, 1), "one-token": (1,)}


@functools.lru_cache(maxsize=None)
def registry():
    return load_registry()


def make_batch(lengths: tuple[int, ...]) -> Batch:
    generator = torch.Generator().manual_seed(99)
    width = max(lengths)
    ids = torch.randint(2, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 1  # the pad id: its value never matters
    prompts = [Prompt(i, f"p{i}", tuple(ids[i, :n].tolist()), tuple(map(str, ids[i, :n].tolist())))
               for i, n in enumerate(lengths)]
    return Batch(prompts, ids, mask)


@dataclass
class Reference:
    attentions: list  # per layer (batch, head, query, key), from output_attentions
    o_input: list  # per layer: input of the output projection
    o_output: list
    down_input: list  # per layer: input of the MLP's down projection (batch, token, d_mlp)
    mid: list  # per layer: input of the module after the attention sublayer (None: parallel)
    block_in: list
    attn_out: list  # per layer: the attention module's first output
    q_out: list  # per layer: the raw query projection cut by the test's table (batch, token, h * hd)
    k_out: list
    lm_input: torch.Tensor
    logits: torch.Tensor


def _first(value):
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def reference(case_id: str, batch: Batch) -> Reference:
    """One run of the unwrapped model under eager attention, recorded with hooks."""
    case = BY_ID[case_id]
    model = build(case_id)
    blocks = model.get_submodule(case.blocks)
    parts = case.table(model.config)
    shape = batch.input_ids.shape
    seen: dict = {}
    handles = []

    def keep_input(key):
        def hook(module, args, kwargs):
            seen[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    def keep_output(key):
        def hook(module, args, out):
            seen[key] = _first(out).detach().clone()
        return hook

    def at(layer, path):
        return blocks[layer].get_submodule(path)

    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for layer in range(LAYERS):
            handles += [
                blocks[layer].register_forward_pre_hook(keep_input(("in", layer)), with_kwargs=True),
                at(layer, case.attn).register_forward_hook(keep_output(("attn", layer))),
                at(layer, parts["attn.o"].module).register_forward_pre_hook(keep_input(("o_in", layer)), with_kwargs=True),
                at(layer, parts["attn.o"].module).register_forward_hook(keep_output(("o_out", layer))),
                at(layer, parts["mlp.down"].module).register_forward_pre_hook(keep_input(("down", layer)), with_kwargs=True),
                at(layer, parts["attn.q"].module).register_forward_hook(keep_output(("q", layer))),
                at(layer, parts["attn.k"].module).register_forward_hook(keep_output(("k", layer))),
            ]
            if case.resid_mid is not None:
                handles.append(at(layer, case.resid_mid).register_forward_pre_hook(keep_input(("mid", layer)),
                                                                                   with_kwargs=True))
        handles.append(model.get_output_embeddings().register_forward_pre_hook(keep_input("lm"), with_kwargs=True))
        with torch.no_grad():
            out = model(batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(before)

    def tokens(t):  # OPT's MLP sees (tokens, width)
        return t.reshape(*shape, -1)

    return Reference(
        attentions=[a.detach() for a in out.attentions],
        o_input=[seen[("o_in", l)] for l in range(LAYERS)],
        o_output=[seen[("o_out", l)] for l in range(LAYERS)],
        down_input=[tokens(seen[("down", l)]) for l in range(LAYERS)],
        mid=[tokens(seen[("mid", l)]) if case.resid_mid else None for l in range(LAYERS)],
        block_in=[seen[("in", l)] for l in range(LAYERS)],
        attn_out=[seen[("attn", l)] for l in range(LAYERS)],
        q_out=[parts["attn.q"].cut(seen[("q", l)]) for l in range(LAYERS)],
        k_out=[parts["attn.k"].cut(seen[("k", l)]) for l in range(LAYERS)],
        lm_input=seen["lm"],
        logits=out.logits.detach(),
    )


def site_refs(case_id: str) -> dict:
    """Every new site the case's family has, and its components, by a key of the test's
    own: all read in one trace, so their order in it is tested too."""
    case = BY_ID[case_id]
    refs = {"resid_final": resid_final(), "logits": logits()}
    for layer in range(LAYERS):
        for name in case.table(build(case_id).config):
            refs[f"{name}@{layer}"] = component(name, layer)
        refs[f"attention@{layer}"] = attention(layer)
        refs[f"head_output@{layer}"] = head_output(layer)
        refs[f"mlp_hidden@{layer}"] = mlp_hidden(layer)
        if case.resid_mid is not None:
            refs[f"resid_mid@{layer}"] = resid_mid(layer)
        if case.score_scale is not None:
            refs[f"rotary_q@{layer}"] = rotary_q(layer)
            refs[f"rotary_k@{layer}"] = rotary_k(layer)
    return refs


def read_sites(case_id: str, batch: Batch, refs: dict, *, eager: bool = True):
    """Every site of ``refs`` read through probescope in one trace."""
    model = build(case_id)
    adapter = find_adapter(model.config, registry())
    blocks = adapter.blocks(model)
    keep = lambda hidden, batch: hidden.clone()  # noqa: E731
    reads = [("sites", Read(key, ref, keep)) for key, ref in refs.items()]
    steps = trace.plan_steps(reads, lambda ref: adapter.site(ref, blocks, model.config))
    switch = trace.attention_implementation(model, "eager") if eager else contextlib.nullcontext()
    with switch, trace.wrapped(model) as envoy:
        sink, failed = trace.run_batch(envoy, steps, batch)
    return dict(sink.get("sites", {})), dict(failed)


@functools.lru_cache(maxsize=None)
def observed(case_id: str, shape: str):
    batch = make_batch(SHAPES[shape])
    return batch, reference(case_id, batch), read_sites(case_id, batch, site_refs(case_id))


def real_rows(batch: Batch):
    """(row, number of real tokens) for every prompt of the batch."""
    return [(row, int(n)) for row, n in enumerate(batch.lengths)]


# -- every site against its reference ---------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_attention_probabilities_equal_eager_output_attentions(case_id, shape):
    batch, ref, (got, failed) = observed(case_id, shape)
    assert failed == {}
    n_heads = BY_ID[case_id].heads[0]
    for layer in range(LAYERS):
        probs = got[f"attention@{layer}"]
        width = batch.input_ids.shape[1]
        assert probs.shape == (len(batch.prompts), n_heads, width, width)
        for row, n in real_rows(batch):
            torch.testing.assert_close(probs[row, :, :n, :n], ref.attentions[layer][row, :, :n, :n], **CLOSE)
            assert (probs[row, :, :n, n:] == 0).all(), "padding keys carry probability 0"
            assert probs[row, :, n:, :].isnan().all(), "rows of padded queries are NaN"
            torch.testing.assert_close(probs[row, :, :n, :].sum(-1), torch.ones(n_heads, n))
        if shape == "one-token":
            assert (probs == 1).all()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_head_output_is_the_input_of_the_output_projection_by_head(case_id, shape):
    batch, ref, (got, _) = observed(case_id, shape)
    case = BY_ID[case_id]
    n_heads, _, hd = case.heads
    model = build(case_id)
    for layer in range(LAYERS):
        heads = got[f"head_output@{layer}"]
        assert heads.shape == (*batch.input_ids.shape, n_heads, hd)
        torch.testing.assert_close(heads.flatten(-2), ref.o_input[layer], **CLOSE)
        # each head through its own slice of W_O, summed, is what the projection writes
        o = model.get_submodule(f"{case.blocks}.{layer}.{case.table(model.config)['attn.o'].module}")
        w_o = stored_to_out_in(case, o.weight)  # (d, heads * hd)
        with torch.no_grad():
            total = sum(heads[..., h, :] @ w_o[:, h * hd:(h + 1) * hd].t() for h in range(n_heads))
            total = total + (0 if o.bias is None else o.bias)
        torch.testing.assert_close(total, ref.o_output[layer], **CLOSE)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_mlp_hidden_is_the_input_of_the_down_projection(case_id, shape):
    batch, ref, (got, _) = observed(case_id, shape)
    for layer in range(LAYERS):
        hidden = got[f"mlp_hidden@{layer}"]
        assert hidden.shape[:2] == batch.input_ids.shape  # OPT's (tokens, width) too
        torch.testing.assert_close(hidden, ref.down_input[layer], **CLOSE)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.resid_mid is not None])
def test_resid_mid_is_the_stream_between_attention_and_mlp(case_id, shape):
    batch, ref, (got, _) = observed(case_id, shape)
    for layer in range(LAYERS):
        mid = got[f"resid_mid@{layer}"]
        torch.testing.assert_close(mid, ref.mid[layer], **CLOSE)
        if case_id not in ("gemma2", "opt-350m-like"):  # plain pre-norm: block input + attention
            torch.testing.assert_close(mid, ref.block_in[layer] + ref.attn_out[layer], **CLOSE)


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.resid_mid is None])
def test_parallel_families_have_no_resid_mid(case_id):
    model = build(case_id)
    adapter = find_adapter(model.config, registry())
    with pytest.raises(SiteError, match=rf"architecture '{adapter.name}' has no site resid_mid\[0\]: .*parallel"):
        adapter.site(resid_mid(0), adapter.blocks(model), model.config)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_resid_final_and_logits_are_what_the_output_layer_reads_and_returns(case_id, shape):
    batch, ref, (got, _) = observed(case_id, shape)
    torch.testing.assert_close(got["resid_final"], ref.lm_input, **CLOSE)
    torch.testing.assert_close(got["logits"], ref.logits, **CLOSE)
    assert got["logits"].shape == (*batch.input_ids.shape, VOCAB)


def scores_softmax(case_id: str, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention probabilities from rotated queries (batch, token, head, hd) and keys
    (batch, token, kv_head, hd): scaled dot products, Gemma 2's soft cap, causal and
    padding mask, softmax."""
    case = BY_ID[case_id]
    n_heads, n_kv, _ = case.heads
    keys = k.repeat_interleave(n_heads // n_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), keys.double()) * case.score_scale(build(case_id).config)
    if case.score_softcap is not None:
        scores = case.score_softcap * torch.tanh(scores / case.score_softcap)
    width = q.shape[1]
    allowed = torch.ones(width, width).tril().bool()[None, None] & mask.bool()[:, None, None, :]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).float()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case_id", ROTARY_IDS)
def test_rotary_queries_and_keys_reproduce_the_attention(case_id, shape):
    batch, ref, (got, _) = observed(case_id, shape)
    n_heads, n_kv, hd = BY_ID[case_id].heads
    for layer in range(LAYERS):
        q, k = got[f"rotary_q@{layer}"], got[f"rotary_k@{layer}"]
        assert q.shape == (*batch.input_ids.shape, n_heads, hd)
        assert k.shape == (*batch.input_ids.shape, n_kv, hd)  # per key/value head, not repeated
        probs = scores_softmax(case_id, q, k, batch.attention_mask)
        for row, n in real_rows(batch):
            torch.testing.assert_close(probs[row, :, :n, :n], ref.attentions[layer][row, :, :n, :n], **CLOSE)
        # position 0 is rotated by angle 0: there the projections come through unchanged
        torch.testing.assert_close(got[f"attn.q@{layer}"], ref.q_out[layer], **CLOSE)  # read in the same trace
        torch.testing.assert_close(q[:, 0], ref.q_out[layer][:, 0].unflatten(-1, (n_heads, hd)), **CLOSE)
        torch.testing.assert_close(k[:, 0], ref.k_out[layer][:, 0].unflatten(-1, (n_kv, hd)), **CLOSE)
        if batch.input_ids.shape[1] > 1:  # and later positions are visibly rotated
            unrotated = ref.q_out[layer][0, 1:].unflatten(-1, (n_heads, hd))
            assert not torch.allclose(q[0, 1:], unrotated, atol=1e-3)


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.score_scale is None])
def test_families_without_rotary_say_so(case_id):
    model = build(case_id)
    adapter = find_adapter(model.config, registry())
    for ref in (rotary_q(1), rotary_k(1)):
        with pytest.raises(SiteError, match=rf"architecture '{adapter.name}' has no site {ref.kind}\[1\]: "
                                            r"no rotary position embedding: learned absolute positions"):
            adapter.site(ref, adapter.blocks(model), model.config)


# -- the eager switch -------------------------------------------------------------------------


def test_without_eager_attention_the_probe_gets_an_error_not_none():
    """Under SDPA the attention module returns None for the probabilities: the read
    fails with the reason instead of handing None (or zeros) to the reduction."""
    assert build("llama").config._attn_implementation == "sdpa"
    got, failed = read_sites("llama", make_batch((3, 2)), {"a": attention(0)}, eager=False)
    assert got == {}
    assert isinstance(failed["sites"], SiteError)
    assert "returned no probabilities" in str(failed["sites"]) and "eager" in str(failed["sites"])


def test_the_switch_restores_the_previous_implementation_even_on_error():
    model = build("llama")
    with pytest.raises(RuntimeError):
        with trace.attention_implementation(model, "eager"):
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


class AttentionProbe(probescope.Probe):
    """Reads block 0's attention and keeps what it read, whole (for the tests only)."""

    name = "attention_keeper"

    def reads(self, params, model):  # rotary keys too: their operation is instrumented, then removed
        return [Read("a", attention(0), lambda probs, batch: probs.clone()),
                Read("k", rotary_k(0), lambda k, batch: k.sum())]

    def build(self, params, run):
        import xarray as xr

        self.seen = run.reductions  # key -> one tensor per batch
        return xr.Dataset()


class Plugin:
    def __init__(self, probe):
        self.probe = probe

    @probescope.hookimpl
    def register_probes(self, register):
        register(self.probe)


def test_a_run_reading_attention_switches_a_passed_in_model_to_eager_and_back(llama, tokenizer):
    prompts = ["the cat sat on the mat", "a dog"]
    assert llama.config._attn_implementation == "sdpa"
    probe = AttentionProbe()
    config = {"inputs": {"prompts": prompts}, "probes": [{"use": "attention_keeper"}]}
    probescope.run(config, models={"m": (llama, tokenizer)}, write=False, plugins=[("local", Plugin(probe))])
    assert llama.config._attn_implementation == "sdpa"  # given back as it came
    assert not any("forward" in m.__dict__ for m in llama.modules())  # nnsight's controllers removed
    [probs] = probe.seen["a"]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    for row, ids in enumerate(encoded):
        llama.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                want = llama(torch.tensor([ids]), output_attentions=True).attentions[0][0]
        finally:
            llama.set_attn_implementation("sdpa")
        n = len(ids)
        torch.testing.assert_close(probs[row, :, :n, :n], want, **CLOSE)  # padding changes nothing real
        assert probs[row, :, n:].isnan().all() and (probs[row, :, :n, n:] == 0).all()


def test_a_site_the_family_lacks_is_a_config_error_before_weights_load(model_dirs, monkeypatch):
    """rotary_q on GPT-2: the problem names the probe entry, the family, the site and the
    reason, and no weights are read."""
    from probescope import models

    def no_weights(entry):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(models, "load_weights", no_weights)

    class RotaryProbe(AttentionProbe):
        name = "rotary_reader"

        def reads(self, params, model):
            return [Read("q", rotary_q(0), lambda q, batch: q.sum()), Read("q1", rotary_q(0), lambda q, b: q.sum()),
                    Read("m", component("mlp.gate", 1), lambda h, b: h.sum())]

    config = {"models": [{"name": "g", "path": str(model_dirs["gpt2"])}],
              "inputs": {"prompts": ["a b"]}, "probes": [{"use": "rotary_reader"}]}
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(config, write=False, plugins=[("local", Plugin(RotaryProbe()))])
    messages = [(p.location, p.message) for p in info.value.problems]
    assert messages == [
        ("probes[0]", "model 'g': architecture 'gpt2' has no site rotary_q[0]: no rotary position embedding: "
                      "learned absolute positions (`wpe`) are added to the embeddings"),
        ("probes[0]", "model 'g': architecture 'gpt2' has no site mlp.gate[1]: it has no component 'mlp.gate'; "
                      "it has attn.q, attn.k, attn.v, attn.o, mlp.up, mlp.down"),
    ]


def test_every_adapter_places_or_refuses_every_site_by_name():
    """Each built-in adapter places each new site on its test model, or raises a
    SiteError naming the family and the site."""
    for case in CASES:
        model = build(case.id)
        adapter = find_adapter(model.config, registry())
        blocks = adapter.blocks(model)
        for ref in [attention(0), head_output(0), mlp_hidden(0), resid_mid(0), rotary_q(0), rotary_k(0),
                    resid_final(), logits()]:
            try:
                site = adapter.site(ref, blocks, model.config)
            except SiteError as exc:
                assert str(exc).startswith(f"architecture '{adapter.name}' has no site {ref}: ")
                continue
            assert site.module == "" or model.get_submodule(site.module) is not None
        with pytest.raises(SiteError, match=rf"has no site attention\[{LAYERS}\]: layer {LAYERS} is out of range"):
            adapter.site(attention(LAYERS), blocks, model.config)


def test_a_base_model_has_no_logits_and_that_probe_fails_alone(llama, tokenizer):
    """A bare LlamaModel (no output layer): the logits reader fails with the reason, a
    probe reading resid_final on the same pass still gets the final norm's output."""
    base = llama.model

    class Reader(AttentionProbe):
        def __init__(self, name, site):
            self.name, self.site = name, site

        def reads(self, params, model):
            return [Read("x", self.site, lambda x, batch: x.clone())]

    final, logit_reader = Reader("final_reader", resid_final()), Reader("logit_reader", logits())

    class Both:
        @probescope.hookimpl
        def register_probes(self, register):
            register(final)
            register(logit_reader)

    config = {"inputs": {"prompts": ["a b c"]}, "probes": [{"use": "final_reader"}, {"use": "logit_reader"}]}
    with pytest.raises(probescope.RunFailed) as info:
        probescope.run(config, models={"m": (base, tokenizer)}, write=False, plugins=[("local", Both())])
    [failure] = info.value.failures
    assert failure.name == "logit_reader" and "without logits: it has no output layer" in failure.error
    ids = torch.tensor([tokenizer("a b c")["input_ids"]])
    with torch.no_grad():
        want = base(ids).last_hidden_state  # LlamaModel's last hidden state is after the final norm
    torch.testing.assert_close(final.seen["x"][0], want, **CLOSE)
