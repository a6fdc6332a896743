"""token_similarity against an independent computation: ``output_hidden_states`` and plain
PyTorch forward hooks on a separate, unwrapped copy of the model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import xarray as xr

import probescope
from conftest import PROMPTS
from probescope.probes.token_similarity import prompt_matrix


def reference_hidden(model, tokenizer, prompt):
    """Residual stream of one unpadded prompt: embedding output and every block output.

    ``hidden_states[i]`` is the input of block i; the last entry has the final norm
    applied, so the last block's own output is taken with a forward hook instead.
    """
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    captured = {}
    handle = blocks[-1].register_forward_hook(
        lambda mod, args, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    states = [h[0] for h in out.hidden_states[:-1]] + [captured["last"][0]]
    return states  # states[0] = embedding output, states[l + 1] = after block l


def reference_similarity(h, metric="cosine"):
    h = h.double()
    if metric == "centred_cosine":
        h = h - h.mean(dim=0, keepdim=True)
    n = h.shape[0]
    sims = torch.full((n, n), float("nan"), dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1):
            sims[i, j] = torch.nn.functional.cosine_similarity(h[i], h[j], dim=0)
    return sims.numpy()


def config(layers, metric="cosine"):
    return {
        "inputs": {"prompts": PROMPTS, "batch_size": 2},
        "probes": [{"use": "token_similarity", "layers": layers, "metric": metric}],
    }


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("metric", ["cosine", "centred_cosine"])
def test_matches_hidden_states(family, metric, request, tokenizer):
    model = request.getfixturevalue(family)
    bare = copy.deepcopy(model)  # probescope wraps `model`; the reference runs on a bare copy
    layers = ["embed", 0, 1, -1]
    result = probescope.run(config(layers, metric), models={family: (model, tokenizer)}, write=False)
    ds = result[family]["token_similarity"]

    assert list(ds.layer.values) == [-1, 0, 1, 2]  # -1 is the embedding output; -1 in config is block 2
    assert list(ds.layer_label.values) == ["embed", "0", "1", "2"]
    assert ds.similarity.dims == ("layer", "pair")
    assert ds.attrs["metric"] == metric and ds.attrs["architecture"] == family

    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert lengths[0] != lengths[1]  # the batch really is padded
    assert list(ds.n_tokens.values) == lengths
    # one entry per real pair j <= i, nothing for padding: the size follows the prompts
    assert list(ds.n_pairs.values) == [n * (n + 1) // 2 for n in lengths]
    assert ds.sizes["pair"] == sum(n * (n + 1) // 2 for n in lengths)
    assert np.isfinite(ds.similarity.values).all()
    for p, prompt in enumerate(PROMPTS):
        states = reference_hidden(bare, tokenizer, prompt)
        n = lengths[p]
        mine = ds.pair_prompt.values == p
        i, j = ds.pair_token.values[mine], ds.pair_context_token.values[mine]
        assert (j <= i).all() and (i < n).all() and len(set(zip(i, j))) == n * (n + 1) // 2
        for li, layer in enumerate(ds.layer.values):
            expected = reference_similarity(states[layer + 1], metric)
            np.testing.assert_allclose(ds.similarity.values[li, mine], expected[i, j], atol=1e-5)
            # and as one prompt's matrix: NaN above the diagonal
            got = prompt_matrix(ds, p).isel(layer=li).values
            np.testing.assert_allclose(got, expected, atol=1e-5, equal_nan=True)
        ids = tokenizer(prompt)["input_ids"]
        assert list(ds.token_id.values[p, :n]) == ids
        assert (ds.token_id.values[p, n:] == -1).all()
        assert list(ds.token_text.values[p, :n]) == [tokenizer.decode([i]) for i in ids]


def test_default_layers_are_every_block(gpt2, tokenizer):
    ds = probescope.run({"inputs": {"prompts": PROMPTS[:1]}, "probes": [{"use": "token_similarity"}]},
                        models={"m": (gpt2, tokenizer)}, write=False)["m"]["token_similarity"]
    assert list(ds.layer.values) == list(range(gpt2.config.n_layer))


def test_batch_size_does_not_change_results(gpt2, tokenizer):
    """Padding never enters a result: one prompt per batch equals both in one batch."""
    runs = []
    for batch_size in (1, 2):
        cfg = config(["embed", 0, 2])
        cfg["inputs"]["batch_size"] = batch_size
        runs.append(probescope.run(cfg, models={"m": (gpt2, tokenizer)}, write=False)["m"]["token_similarity"])
    np.testing.assert_allclose(runs[0].similarity.values, runs[1].similarity.values, atol=1e-6, equal_nan=True)


def test_batches_in_any_order_give_the_same_dataset(gpt2, tokenizer, monkeypatch):
    """Batches may hold prompts in any order (length-sorted, say): every pair lands in
    its own prompt's place, in the user's order."""
    from probescope import inputs

    cfg = config(["embed", 1])
    cfg["inputs"]["prompts"] = SKEWED
    cfg["inputs"]["batch_size"] = 2
    plain = probescope.run(cfg, models={"m": (gpt2, tokenizer)}, write=False)["m"]["token_similarity"]
    batches = inputs.batches
    monkeypatch.setattr(inputs, "batches", lambda prompts, size, **kw: batches(prompts[::-1], size, **kw)[::-1])
    shuffled = probescope.run(cfg, models={"m": (gpt2, tokenizer)}, write=False)["m"]["token_similarity"]
    xr.testing.assert_identical(plain.drop_attrs(), shuffled.drop_attrs())
    shuffled_summary = by_distance(gpt2, tokenizer, layers=["embed", 1], batch_size=2)
    np.testing.assert_allclose(shuffled_summary.similarity.values,
                               by_distance_of_full(plain).similarity.values, atol=1e-6)


def by_distance_of_full(ds):
    """The by_distance summary computed from a full dataset's pairs, with plain xarray."""
    distance = (ds.pair_token - ds.pair_context_token).rename("distance")
    return xr.Dataset({"similarity": ds.similarity.groupby(distance).mean()})


def test_skewed_prompts_store_only_their_pairs(gpt2, tokenizer, tmp_path):
    """One long prompt among short ones: the dataset holds each prompt's own pairs, not
    every prompt padded to the longest, in memory and on disk."""
    prompts = ["a", "The cat", " ".join(["the cat sat on the mat"] * 12)]
    cfg = {"inputs": {"prompts": prompts, "batch_size": 3}, "probes": [{"use": "token_similarity", "layers": [0, 1]}],
           "output": {"dir": str(tmp_path)}}
    ds = probescope.run(cfg, models={"m": (gpt2, tokenizer)})["m"]["token_similarity"]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    assert lengths[0] == 1 and lengths[2] > 60
    assert ds.similarity.shape == (2, pairs)
    dense = len(prompts) * 2 * max(lengths) ** 2 * 4
    saved = tmp_path / "m" / "token_similarity.nc"
    on_disk = saved.stat().st_size
    assert on_disk < 0.5 * dense
    reread = probescope.load(saved)
    xr.testing.assert_identical(reread.drop_attrs(), ds.drop_attrs())
    # the one-token prompt: its only pair, itself
    assert list(reread.n_pairs.values) == [n * (n + 1) // 2 for n in lengths]
    np.testing.assert_allclose(prompt_matrix(reread, 0).values, [[[1.0]], [[1.0]]], atol=1e-6)


def test_diagonal_is_one_and_upper_triangle_nan(llama, tokenizer):
    ds = probescope.run(config([0]), models={"m": (llama, tokenizer)}, write=False)["m"]["token_similarity"]
    sim = prompt_matrix(ds, 0).isel(layer=0).values
    n = int(ds.n_tokens[0])
    assert sim.shape == (n, n)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)
    assert np.isnan(sim[np.triu_indices(n, k=1)]).all()


def test_centre_without_first_token_matches_plain_computation():
    import torch

    from probescope.probes.token_similarity import similarity_matrix

    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, dtype=torch.float64)
    h[:, 0] *= 1000.0  # a massive first token
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    got = similarity_matrix(h, mask, "centred_cosine", centre_without_first_token=True)
    for b, n in enumerate([5, 3]):
        x = h[b, :n] - h[b, 1:n].mean(0)
        u = x / x.norm(dim=-1, keepdim=True)
        expected = (u @ u.T).tril()
        assert torch.allclose(torch.nan_to_num(got[b, :n, :n]).tril(), expected)
    plain = similarity_matrix(h, mask, "centred_cosine")
    # With the first token in the mean, every later token points away from it: all alike.
    assert plain[0, 2:, 1].min() > 0.99 and got[0, 2:, 1].max() < 0.9
    one = similarity_matrix(h[:, :1], mask[:, :1], "centred_cosine", centre_without_first_token=True)
    assert one.shape == (2, 1, 1)  # a one-token prompt keeps its only token in the mean


# --------------------------------------------------------------------------------------
# form = "by_distance": the mean per layer and token distance, over every pair of every prompt

SKEWED = PROMPTS + ["Hi", "one two three four five six seven eight nine ten eleven twelve thirteen"]


def reference_by_distance(model, tokenizer, prompts, layers, metric="cosine"):
    """Mean, standard deviation and count of the plain pairwise similarities at each
    distance i - j >= 0, pooled over every prompt (unpadded, one at a time)."""
    pooled: dict[int, dict[int, list[float]]] = {layer: {} for layer in layers}
    for prompt in prompts:
        states = reference_hidden(model, tokenizer, prompt)
        for layer in layers:
            sims = reference_similarity(states[layer + 1], metric)
            n = sims.shape[0]
            for i in range(n):
                for j in range(i + 1):
                    pooled[layer].setdefault(i - j, []).append(sims[i, j])
    distances = sorted(pooled[layers[0]])
    mean = np.array([[np.mean(pooled[layer][d]) for d in distances] for layer in layers])
    std = np.array([[np.std(pooled[layer][d]) for d in distances] for layer in layers])
    counts = [len(pooled[layers[0]][d]) for d in distances]
    return distances, mean, std, counts


def by_distance(model, tokenizer, prompts=SKEWED, layers=("embed", 0, -1), metric="cosine", batch_size=3, **extra):
    cfg = {"inputs": {"prompts": list(prompts), "batch_size": batch_size},
           "probes": [{"use": "token_similarity", "layers": list(layers), "metric": metric, "form": "by_distance",
                       **extra}]}
    return probescope.run(cfg, models={"m": (model, tokenizer)}, write=False)["m"]["token_similarity"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("metric", ["cosine", "centred_cosine"])
def test_by_distance_matches_plain_pairwise_means(family, metric, request, tokenizer):
    model = request.getfixturevalue(family)
    bare = copy.deepcopy(model)
    ds = by_distance(model, tokenizer, metric=metric)
    lengths = [len(tokenizer(p)["input_ids"]) for p in SKEWED]
    assert len(set(lengths)) == len(SKEWED) and min(lengths) <= 2  # padded batches, a very short prompt

    distances, mean, std, counts = reference_by_distance(bare, tokenizer, SKEWED, [-1, 0, 2], metric)
    assert ds.similarity.dims == ("layer", "distance") and list(ds.layer.values) == [-1, 0, 2]
    assert list(ds.distance.values) == distances == list(range(max(lengths)))
    # every real pair counted once, padding never: sum over prompts of n - d
    assert list(ds.n_pairs.values) == counts == [sum(max(n - d, 0) for n in lengths) for d in distances]
    np.testing.assert_allclose(ds.similarity.values, mean, atol=1e-5)
    np.testing.assert_allclose(ds.similarity_std.values, std, atol=1e-5)
    assert ds.attrs["form"] == "by_distance" and ds.attrs["n_prompts"] == len(SKEWED)
    assert ds.attrs["metric"] == metric


def test_by_distance_does_not_depend_on_batching(gpt2, tokenizer):
    one = by_distance(gpt2, tokenizer, batch_size=1)
    every = by_distance(gpt2, tokenizer, batch_size=len(SKEWED))
    np.testing.assert_allclose(one.similarity.values, every.similarity.values, atol=1e-6)
    assert (one.n_pairs.values == every.n_pairs.values).all()


def test_by_distance_of_one_token_prompts_is_the_diagonal(gpt2, tokenizer):
    ds = by_distance(gpt2, tokenizer, prompts=["The", "a"], layers=[0])
    assert list(ds.distance.values) == [0] and list(ds.n_pairs.values) == [2]
    np.testing.assert_allclose(ds.similarity.values, [[1.0]], atol=1e-6)
    np.testing.assert_allclose(ds.similarity_std.values, [[0.0]], atol=1e-6)


def test_by_distance_of_constant_hidden_states(tokenizer):
    """Identical token embeddings and no position embedding (Llama): every hidden state
    is the same, so cosine is 1 at every distance and centred cosine 0 (every centred
    vector is zero, and a zero vector's cosine is 0, not NaN)."""
    model = probescope.demo.build_llama(tokenizer, layers=1, width=16, heads=2, kv_heads=1, seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = 1.0
    plain = by_distance(model, tokenizer, prompts=PROMPTS, layers=["embed"])
    np.testing.assert_allclose(plain.similarity.values, 1.0, atol=1e-6)
    centred = by_distance(model, tokenizer, prompts=PROMPTS, layers=["embed"], metric="centred_cosine")
    np.testing.assert_allclose(centred.similarity.values, 0.0, atol=1e-6)


def test_pooled_summaries_equal_one_run_over_every_prompt(gpt2, tokenizer):
    from probescope.probes.token_similarity import pool_by_distance

    whole = by_distance(gpt2, tokenizer)
    parts = [by_distance(gpt2, tokenizer, prompts=SKEWED[:2]), by_distance(gpt2, tokenizer, prompts=SKEWED[2:])]
    assert parts[0].sizes["distance"] != parts[1].sizes["distance"]  # aligned by distance, not position
    pooled = pool_by_distance(parts)
    assert list(pooled.distance.values) == list(whole.distance.values)
    assert list(pooled.n_pairs.values) == list(whole.n_pairs.values)
    np.testing.assert_allclose(pooled.similarity.values, whole.similarity.values, atol=1e-9)
    np.testing.assert_allclose(pooled.similarity_std.values, whole.similarity_std.values, atol=1e-7)
    assert pooled.attrs["n_prompts"] == len(SKEWED)
    with pytest.raises(ValueError, match="same layers"):
        pool_by_distance([whole, by_distance(gpt2, tokenizer, layers=[0])])
