"""token_similarity's ``form = "by_distance"`` keeps ONE running total per layer for the
whole run, however the batches' longest prompts rise and fall (``Read(last_dim_grows=True)``:
:func:`probescope.trace.fold` zero-pads the shorter of the total and a batch's result),
locally and through the simulated remote path; and that total equals a computation done
independently, batch by batch, from ``output_hidden_states`` on a separate copy of the
model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import probescope
from probescope import runner as runner_mod
from probescope import trace as trace_mod
from probescope.probes.token_similarity import TokenSimilarity

# One token each for the demo tokenizer (the first without a leading space, the rest with one).
WORDS = "at the mat sat on the mat and is in a mat of the sat to a on".split()
# In batches of two, in this order, the longest prompt goes 3, 12 (longer), 4 (shorter;
# a one-token prompt padded to 4), 17 (longer): the total must grow, stay, and grow.
LENGTHS = [3, 2, 12, 5, 4, 1, 17, 9]
BATCH = 2
LAYERS = ["embed", 0, 1]  # hidden_states[0], [1], [2] of the 3-block model


def texts(tokenizer) -> list[str]:
    out = [" ".join(WORDS[:n]) for n in LENGTHS]
    assert [len(tokenizer(t)["input_ids"]) for t in out] == LENGTHS  # one token a word
    return out


def reference_totals(model, tokenizer, prompts, batch_size, layers=(0, 1, 2)):
    """``{hidden_states index: {distance: [sum, sum of squares, count]}}`` of the cosine
    similarities of every pair j <= i of real tokens: each batch right-padded and run
    with its attention mask through the plain model (output_hidden_states), its pairs
    added up per distance, then the batches' totals added together."""
    pad = tokenizer.eos_token_id
    total: dict[int, dict[int, np.ndarray]] = {h: {} for h in layers}
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer(p)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        with torch.no_grad():
            states = model(input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        batch: dict[int, dict[int, np.ndarray]] = {h: {} for h in layers}  # this batch's own totals
        for h in layers:
            for row, n in enumerate(len(r) for r in ids):
                x = states[h][row, :n].double()
                sims = torch.nn.functional.cosine_similarity(x.unsqueeze(1), x.unsqueeze(0), dim=-1).numpy()
                for i in range(n):
                    for j in range(i + 1):
                        batch[h].setdefault(i - j, np.zeros(3))
                        batch[h][i - j] += [sims[i, j], sims[i, j] ** 2, 1.0]
        for h in layers:
            for d, values in batch[h].items():
                total[h][d] = total[h].get(d, np.zeros(3)) + values
    return total


def run_by_distance(model, tokenizer, prompts, monkeypatch, *, sort=True, seen=None, models=None, entry=None):
    """The by_distance dataset; ``seen`` gets each layer's ``run.reductions``; with
    ``sort=False`` the batches keep the prompts' order (else longest first)."""
    if not sort:
        monkeypatch.setattr(runner_mod, "_any_prompt_order", lambda tasks, info: False)
    if seen is not None:
        build = TokenSimilarity.build
        monkeypatch.setattr(TokenSimilarity, "build",
                            lambda self, params, run: seen.update(run.reductions) or build(self, params, run))
    config = {"inputs": {"prompts": prompts, "batch_size": BATCH},
              "probes": [{"use": "token_similarity", "layers": LAYERS, "form": "by_distance"}]}
    if entry is not None:
        config["models"] = [entry]
    out = probescope.run(config, models=models if entry is None else None, write=False)
    return next(iter(out.values()))["token_similarity"]


@pytest.mark.parametrize("sort", [False, True], ids=["prompt-order", "longest-first"])
def test_one_running_total_per_layer_equals_batch_by_batch_hidden_states(gpt2, tokenizer, monkeypatch, sort):
    prompts = texts(tokenizer)
    bare = copy.deepcopy(gpt2)
    seen: dict = {}
    ds = run_by_distance(gpt2, tokenizer, prompts, monkeypatch, sort=sort, seen=seen, models={"m": (gpt2, tokenizer)})
    # one total per layer, as long as the longest prompt: nothing kept per batch
    assert set(seen) == {-1, 0, 1}
    assert all(len(parts) == 1 and tuple(parts[0].shape) == (3, 2, max(LENGTHS)) for parts in seen.values())
    assert all(not parts[0][:, 1].any() for parts in seen.values())  # causal: no negative distance

    want = reference_totals(bare, tokenizer, prompts, BATCH)
    distances = sorted(want[0])
    assert list(ds.distance.values) == distances == list(range(max(LENGTHS)))
    counts = [sum(max(n - d, 0) for n in LENGTHS) for d in distances]  # padding never counts
    assert list(ds.n_pairs.values) == counts == [int(want[0][d][2]) for d in distances]
    for li, h in enumerate((0, 1, 2)):
        sums = np.array([want[h][d] for d in distances])
        mean = sums[:, 0] / sums[:, 2]
        std = np.sqrt(np.maximum(sums[:, 1] / sums[:, 2] - mean**2, 0.0))
        np.testing.assert_allclose(ds.similarity.isel(layer=li).values, mean, atol=1e-5)
        np.testing.assert_allclose(ds.similarity_std.isel(layer=li).values, std, atol=1e-4)


def test_the_running_total_equals_the_sum_of_independent_batch_totals(gpt2, tokenizer, monkeypatch):
    """The total itself, not only the dataset: its sums and counts per distance are the
    reference's, column d being distance d whatever batch first reached it."""
    prompts = texts(tokenizer)
    bare = copy.deepcopy(gpt2)
    seen: dict = {}
    run_by_distance(gpt2, tokenizer, prompts, monkeypatch, sort=False, seen=seen, models={"m": (gpt2, tokenizer)})
    want = reference_totals(bare, tokenizer, prompts, BATCH)
    for layer, h in ((-1, 0), (0, 1), (1, 2)):
        (total,) = seen[layer]
        expected = np.array([want[h][d] for d in range(max(LENGTHS))]).T  # (3, distance)
        np.testing.assert_allclose(total[:, 0].numpy(), expected, atol=1e-4)


def test_a_remote_pass_folds_into_one_total_equal_to_the_local_run(model_dirs, tokenizer, monkeypatch):
    """The remote path folds each pass's results after it comes back, by the same rule."""
    prompts = texts(tokenizer)
    entry = {"name": "m", "path": str(model_dirs["gpt2"]), "dtype": "float32"}
    local = run_by_distance(None, tokenizer, prompts, monkeypatch, sort=False, entry=entry)
    seen: dict = {}
    remote = run_by_distance(None, tokenizer, prompts, monkeypatch, sort=False, seen=seen,
                             entry={**entry, "remote": "local"})
    assert all(len(parts) == 1 and tuple(parts[0].shape) == (3, 2, max(LENGTHS)) for parts in seen.values())
    np.testing.assert_array_equal(remote.n_pairs.values, local.n_pairs.values)
    np.testing.assert_allclose(remote.similarity.values, local.similarity.values, rtol=0, atol=1e-12)


def test_fold_pads_the_shorter_of_total_and_result_when_the_last_dimension_grows():
    parts = [torch.arange(8.0, dtype=torch.float64).reshape(2, 4), torch.ones(2, 6, dtype=torch.float64),
             torch.full((2, 2), 0.5, dtype=torch.float64), torch.ones(2, 6, dtype=torch.float64)]
    totals: dict = {}
    with torch.inference_mode():
        for part in parts:
            trace_mod.fold(totals, "d", part.clone(), last_dim_grows=True)
    expected = sum(torch.nn.functional.pad(p, (0, 6 - p.shape[-1])) for p in parts)
    assert totals["d"].dtype == torch.float64 and totals["d"].tolist() == expected.tolist()
    # only the last dimension may change
    with pytest.raises(ValueError, match=r"the reduction of 'd' accumulates over batches with a last dimension "
                                         r"that may grow, but returned shape \(3, 2\) after \(2, 6\); every "
                                         r"dimension but the last must stay the same"):
        trace_mod.fold(totals, "d", torch.zeros(3, 2, dtype=torch.float64), last_dim_grows=True)
    # without the option the shape stays strict, and the error says what to do
    with pytest.raises(ValueError, match=r"returned shape \(2, 2\) after \(2, 6\).*last_dim_grows=True"):
        trace_mod.fold(totals, "d", torch.zeros(2, 2, dtype=torch.float64))
    # a first result in float32 keeps the total in float32 when it grows
    small: dict = {}
    trace_mod.fold(small, "f", torch.ones(1, dtype=torch.float32), last_dim_grows=True)
    trace_mod.fold(small, "f", torch.ones(3, dtype=torch.float64), last_dim_grows=True)
    assert small["f"].dtype == torch.float32 and small["f"].tolist() == [2.0, 1.0, 1.0]


def test_last_dim_grows_needs_accumulate():
    with pytest.raises(ValueError, match="last_dim_grows=True pads a running total, so it needs accumulate=True"):
        probescope.Read("x", probescope.resid(0), lambda h, b: h, last_dim_grows=True)
    read = probescope.Read("x", probescope.resid(0), lambda h, b: h, accumulate=True, last_dim_grows=True)
    assert read.last_dim_grows and read.accumulate
