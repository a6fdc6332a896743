"""Planning with weights: a third-party logit lens, written from the public API alone,
unembeds inside the traced pass and ships only top-k token ids out of it; the ids equal
plain PyTorch's (forward hooks on the blocks, the model's own final norm and output
layer), padding included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import probescope

PROMPTS = ["the cat sat on the mat and the dog", "a b"]
K = 3


class LogitLens(probescope.Probe):
    name = "logit_lens"
    description = "top-k next-token ids of every block's residual stream, unembedded in the pass"

    def reads(self, params, model):
        layout = model.layout  # weights: reads() runs after the model loaded
        norm = layout.final_norm()
        unembed = layout.unembedding()
        W_U, bias = unembed.matrix(), unembed.bias

        def top_ids(hidden, batch):
            logits = norm(hidden) @ W_U.to(hidden.dtype)
            if bias is not None:
                logits = logits + bias
            ids = logits.topk(K, dim=-1).indices
            return ids.masked_fill(~batch.mask.unsqueeze(-1), -1)  # (batch, token, k)

        return [probescope.Read(("top", layer), probescope.resid(layer), top_ids)
                for layer in range(model.num_layers)]

    def build(self, params, run):
        layers = list(range(run.model.num_layers))
        width = max(len(p) for p in run.prompts)
        ids = np.full((len(run.prompts), len(layers), width, K), -1, dtype=np.int64)
        for layer in layers:
            row = 0
            for part in run.reductions[("top", layer)]:
                ids[row:row + part.shape[0], layer, :part.shape[1]] = part.numpy()
                row += part.shape[0]
        return xr.Dataset({"top_id": (("prompt", "layer", "token", "rank"), ids)},
                          coords={"layer": layers})


class Plugin:
    @probescope.hookimpl
    def register_probes(self, register):
        register(LogitLens())


def reference(model, tokenizer, prompts):
    """Top-k ids per prompt and block from forward hooks, the final norm and lm_head."""
    blocks = model.transformer.h
    outs = {}
    hooks = [block.register_forward_hook(lambda m, i, o, l=l: outs.__setitem__(l, o[0] if isinstance(o, tuple) else o))
             for l, block in enumerate(blocks)]
    result = []
    try:
        with torch.no_grad():
            for text in prompts:
                ids = torch.tensor([tokenizer(text)["input_ids"]])
                model(ids)
                per_layer = [model.lm_head(model.transformer.ln_f(outs[l])).topk(K, dim=-1).indices[0]
                             for l in range(len(blocks))]
                result.append(torch.stack(per_layer).numpy())  # (layer, token, k)
    finally:
        for hook in hooks:
            hook.remove()
    return result


def test_a_logit_lens_unembeds_inside_the_pass(gpt2, tokenizer):
    config = {"inputs": {"prompts": PROMPTS, "batch_size": 2}, "probes": [{"use": "logit_lens"}]}
    ds = probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False,
                        plugins=[("lens", Plugin())])["m"]["logit_lens"]
    for p, want in enumerate(reference(gpt2, tokenizer, PROMPTS)):
        n = want.shape[1]
        got = ds.top_id.isel(prompt=p).values
        np.testing.assert_array_equal(got[:, :n], want)
        assert (got[:, n:] == -1).all()  # padding: nothing leaves the pass for it


def test_reads_gets_the_loaded_model_and_check_does_not(gpt2, tokenizer):
    seen = {}

    class Spy(LogitLens):
        name = "spy"

        def check(self, params, model):
            seen["check"] = type(model).__name__
            return []

        def reads(self, params, model):
            seen["reads"] = type(model).__name__
            return super().reads(params, model)

    class SpyPlugin:
        @probescope.hookimpl
        def register_probes(self, register):
            register(Spy())

    probescope.run({"inputs": {"prompts": PROMPTS}, "probes": [{"use": "spy"}]},
                   models={"m": (gpt2, tokenizer)}, write=False, plugins=[("spy", SpyPlugin())])
    assert seen == {"check": "ModelInfo", "reads": "LoadedModel"}


def test_a_probe_repeating_a_read_key_fails_alone(gpt2, tokenizer):
    class Twice(probescope.Probe):
        name = "twice"

        def reads(self, params, model):
            read = probescope.Read((0, "x"), probescope.resid(0), lambda h, b: h.sum())
            return [read, read]

        def build(self, params, run):
            return xr.Dataset()

    class TwicePlugin:
        @probescope.hookimpl
        def register_probes(self, register):
            register(Twice())

    config = {"inputs": {"prompts": PROMPTS}, "probes": [{"use": "twice"}, {"use": "token_similarity", "layers": [0]}]}
    with pytest.raises(probescope.RunFailed) as info:
        probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False, plugins=[("twice", TwicePlugin())])
    [failure] = info.value.failures
    assert isinstance(failure, probescope.Failure) and failure.name == "twice"
    assert "(0, 'x')" in failure.error and "more than one read" in failure.error
    assert list(info.value.datasets["m"]) == ["token_similarity"]
