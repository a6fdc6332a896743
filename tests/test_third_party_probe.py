"""A third party's probe, written here from the public API alone (``import probescope``,
nothing else of probescope's): attention entropy per (layer, head) and an induction score
per (layer, head), read from the ``attention(layer)`` site inside the shared pass. Both
equal plain PyTorch: ``output_attentions=True`` under eager attention, one prompt at a
time, no padding, reduced with loops in NumPy. Run on GPT-2 (fused attention) and Llama
(grouped-query attention), with padding in the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import probescope

# A sentence, and a random-looking token run repeated (where induction heads would fire),
# of different lengths: the batch is padded.
PROMPTS = ["the cat sat on the mat and the dog sat on the rug",
           "red green blue seven red green blue seven",
           "one"]


def entropy_sums(probs: torch.Tensor, batch: probescope.Batch) -> torch.Tensor:
    """``(2, head)``: summed entropy of every real query's attention row, and the count."""
    real = batch.mask[:, None, :]  # (batch, 1, query); padded query rows are NaN
    entropy = torch.special.entr(probs.double()).sum(-1)  # 0 log 0 = 0
    total = torch.where(real, entropy, 0.0).sum(dim=(0, 2))
    count = real.expand_as(entropy).sum(dim=(0, 2)).double()
    return torch.stack([total, count])


def induction_sums(probs: torch.Tensor, batch: probescope.Batch) -> torch.Tensor:
    """``(2, head)``: summed attention from each real query to the token after the latest
    earlier occurrence of the query's token, and the number of such queries."""
    ids, mask = batch.input_ids, batch.mask
    n = ids.shape[1]
    position = torch.arange(n, device=ids.device)
    earlier = (ids[:, :, None] == ids[:, None, :]) & (position[None, None, :] < position[None, :, None])
    earlier &= mask[:, :, None] & mask[:, None, :]
    has = earlier.any(-1)  # (batch, query)
    latest = torch.where(earlier, position, -1).amax(-1)  # (batch, query)
    target = (latest + 1).clamp(max=n - 1)
    picked = probs.double().gather(-1, target[:, None, :, None].expand(-1, probs.shape[1], -1, 1))[..., 0]
    total = torch.where(has[:, None, :], picked, 0.0).sum(dim=(0, 2))
    count = has[:, None, :].expand_as(picked).sum(dim=(0, 2)).double()
    return torch.stack([total, count])


class AttentionStats(probescope.Probe):
    name = "attention_stats"
    description = "mean attention entropy and induction score of every head"

    def reads(self, params, model):
        return [read for layer in range(model.num_layers) for read in (
            probescope.Read(("entropy", layer), probescope.attention(layer), entropy_sums),
            probescope.Read(("induction", layer), probescope.attention(layer), induction_sums))]

    def build(self, params, run):
        layers = list(range(run.model.num_layers))

        def mean(kind):
            sums = [torch.stack(run.reductions[(kind, layer)]).sum(0) for layer in layers]  # (2, head) each
            return np.stack([(s[0] / s[1]).numpy() for s in sums])  # (layer, head); NaN where count is 0

        return xr.Dataset({"entropy": (("layer", "head"), mean("entropy")),
                           "induction": (("layer", "head"), mean("induction"))},
                          coords={"layer": layers})


class Plugin:
    @probescope.hookimpl
    def register_probes(self, register):
        register(AttentionStats())


def reference(model, tokenizer):
    """Entropy and induction score per (layer, head) from eager ``output_attentions``,
    one prompt at a time, reduced with plain loops."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            runs = [(ids, model(torch.tensor([ids]), output_attentions=True).attentions)
                    for ids in (tokenizer(text)["input_ids"] for text in PROMPTS)]
    finally:
        model.set_attn_implementation(before)
    layers, heads = len(runs[0][1]), runs[0][1][0].shape[1]
    entropy = np.zeros((layers, heads))
    induction = np.zeros((layers, heads))
    queries = sum(len(ids) for ids, _ in runs)
    for layer in range(layers):
        for head in range(heads):
            e_total, i_total, i_count = 0.0, 0.0, 0
            for ids, attentions in runs:
                probs = attentions[layer][0, head].double().numpy()
                for q in range(len(ids)):
                    row = probs[q]
                    e_total += -sum(p * np.log(p) for p in row if p > 0)
                    previous = [j for j in range(q) if ids[j] == ids[q]]
                    if previous:
                        i_total += row[previous[-1] + 1]
                        i_count += 1
            entropy[layer, head] = e_total / queries
            induction[layer, head] = i_total / i_count if i_count else np.nan
    return entropy, induction


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_third_party_attention_probe_equals_plain_pytorch(family, request, tokenizer):
    model = request.getfixturevalue(family)
    config = {"inputs": {"prompts": PROMPTS, "batch_size": 3}, "probes": [{"use": "attention_stats"}]}
    ds = probescope.run(config, models={"m": (model, tokenizer)}, write=False,
                        plugins=[("attention_stats", Plugin())])["m"]["attention_stats"]
    entropy, induction = reference(model, tokenizer)
    assert np.isfinite(ds.entropy.values).all() and np.isfinite(induction).all()
    np.testing.assert_allclose(ds.entropy.values, entropy, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.induction.values, induction, rtol=1e-5, atol=1e-6)
    assert entropy.max() > 0.1 and induction.max() > 0  # random weights: neither is trivially zero


def test_the_probe_imports_nothing_private():
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [m for m in modules if m.startswith("probescope.")]
