"""Many prompts: batches built from length-sorted prompts (less padding), every dataset
still in the user's prompt order with each prompt's values as when it runs alone, and
reductions that accumulate as they go (one running total per key, nothing per batch
kept), equal to plain forward hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import probescope
from test_component_norm import hooked_mean_norms
from probescope import inputs as inputs_mod
from probescope import runner as runner_mod
from probescope import trace as trace_mod
from probescope.inputs import Prompt

# Lengths shuffled on purpose: long, one token, short, longest, ... so that sorted
# batches differ from the user's order and every batch but the last mixes lengths.
WORDS = "the cat sat on the mat and looked at the bird in the hand while the fox ran".split()
LENGTHS = [9, 1, 4, 17, 2, 12, 6, 1, 15, 3]
BATCH = 3


def shuffled_prompts(tokenizer) -> list[str]:
    """Prompts of ``LENGTHS`` words; each word of WORDS is one token of the demo tokenizer."""
    texts = [" ".join(WORDS[:n]) for n in LENGTHS]
    assert [len(tokenizer(t)["input_ids"]) for t in texts] == [
        len(tokenizer(" ".join(WORDS[:n]))["input_ids"]) for n in LENGTHS]
    return texts


def fake_prompts(lengths) -> list[Prompt]:
    return [Prompt(i, f"p{i}", tuple(range(1, n + 1)), tuple("t" * n)) for i, n in enumerate(lengths)]


def padding(batches) -> int:
    return sum(int((~b.mask).sum()) for b in batches)


def test_sorted_batches_hold_prompts_of_about_one_length_longest_first():
    prompts = fake_prompts(LENGTHS)
    plain = inputs_mod.batches(prompts, BATCH)
    ordered = inputs_mod.batches(prompts, BATCH, sort=True)
    assert [[p.index for p in b.prompts] for b in plain] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [[len(p) for p in b.prompts] for b in ordered] == [[17, 15, 12], [9, 6, 4], [3, 2, 1], [1]]
    # prompts of one length keep their order (1 before 7)
    assert [p.index for b in ordered for p in b.prompts] == [3, 8, 5, 0, 6, 2, 9, 4, 1, 7]
    assert padding(ordered) == (2 + 5) + (3 + 5) + (1 + 2) == 18
    assert padding(plain) == (0 + 8 + 5) + (0 + 15 + 5) + (9 + 14 + 0) == 56
    for batch in ordered:
        for row, prompt in enumerate(batch.prompts):
            n = len(prompt)
            assert batch.input_ids[row, :n].tolist() == list(prompt.token_ids)
            assert batch.mask[row].tolist() == [True] * n + [False] * (batch.input_ids.shape[1] - n)


def alone_similarity(model, tokenizer, text: str) -> np.ndarray:
    """(layer: embed + every block, token, token) cosine similarity from
    output_hidden_states on the prompt alone (no padding), NaN above the diagonal."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    # hidden_states[-1] is after the final norm: the last block's own output is hooked
    out = {}
    handle = model.transformer.h[-1].register_forward_hook(
        lambda m, a, o: out.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    layers = [s[0] for s in states[:-1]] + [out["last"][0]]
    sims = []
    for h in layers:
        unit = torch.nn.functional.normalize(h.double(), dim=-1)
        s = (unit @ unit.T).numpy()
        s[np.triu_indices(len(s), 1)] = np.nan
        sims.append(s)
    return np.stack(sims)


def test_datasets_come_back_in_the_users_order_with_each_prompts_values_as_alone(gpt2, tokenizer, monkeypatch):
    texts = shuffled_prompts(tokenizer)
    made = []
    real = inputs_mod.batches
    monkeypatch.setattr(inputs_mod, "batches", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    config = {"inputs": {"prompts": texts, "batch_size": BATCH},
              "probes": [{"use": "token_similarity", "layers": ["embed", 0, 1, 2]}, {"use": "component_norm"}]}
    ds = probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False)["m"]["token_similarity"]
    # the run batched by length: not the user's order
    assert [p.index for b in made[0] for p in b.prompts] == [3, 8, 5, 0, 6, 2, 9, 4, 1, 7]
    assert list(ds.prompt.values) == list(range(len(texts)))
    assert list(ds.prompt_text.values) == texts
    assert list(ds.n_tokens.values) == [len(tokenizer(t)["input_ids"]) for t in texts]
    for p, text in enumerate(texts):
        want = alone_similarity(gpt2, tokenizer, text)
        n = want.shape[-1]
        from probescope.probes.token_similarity import prompt_matrix

        got = prompt_matrix(ds, p).values  # this prompt's own pairs, wherever its batch ran
        np.testing.assert_allclose(got, want, atol=2e-5)
        assert int(ds.n_pairs[p]) == n * (n + 1) // 2  # no pair of padding is stored
        assert list(ds.token_text.isel(prompt=p).values[:n]) == [tokenizer.decode([i]) for i in tokenizer(text)["input_ids"]]


def test_sorted_and_unsorted_runs_give_the_same_datasets(gpt2, tokenizer, monkeypatch):
    texts = shuffled_prompts(tokenizer)
    config = {"inputs": {"prompts": texts, "batch_size": BATCH},
              "probes": [{"use": "token_similarity"}, {"use": "component_norm"}]}
    sorted_run = probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False)["m"]
    monkeypatch.setattr(runner_mod, "_any_prompt_order", lambda tasks, info: False)
    plain_run = probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False)["m"]
    xr.testing.assert_allclose(sorted_run["token_similarity"], plain_run["token_similarity"], atol=2e-5)
    xr.testing.assert_allclose(sorted_run["component_norm"], plain_run["component_norm"], rtol=1e-6)
    for probe in ("token_similarity", "component_norm"):
        attrs = [{k: v for k, v in run[probe].attrs.items() if k != "created"} for run in (sorted_run, plain_run)]
        assert attrs[0] == attrs[1]


@pytest.mark.parametrize("batch_size", [1, BATCH, 16])
def test_activation_norm_accumulates_one_total_per_key_equal_to_forward_hooks(gpt2, tokenizer, monkeypatch, batch_size):
    texts = shuffled_prompts(tokenizer)
    seen = {}
    from probescope.probes.component_norm import ComponentNorm

    real_build = ComponentNorm.build
    monkeypatch.setattr(ComponentNorm, "build",
                        lambda self, params, run: seen.update(run.reductions) or real_build(self, params, run))
    config = {"inputs": {"prompts": texts, "batch_size": batch_size}, "probes": [{"use": "component_norm"}]}
    ds = probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False)["m"]["component_norm"]
    # one running (sum, count) per (layer, component), whatever the number of batches
    assert len(seen) == 3 * 6 and all(len(parts) == 1 and parts[0].shape == (2,) for parts in seen.values())
    expected = hooked_mean_norms(gpt2, "gpt2", tokenizer, texts)  # each prompt alone, no padding
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert ds.attrs["tokens"] == tokens
    for (layer, name), value in expected.items():
        assert ds.value.sel(layer=layer, component=name).item() == pytest.approx(value, rel=1e-6)
    assert all(int(parts[0][1]) == tokens for parts in seen.values())


def test_accumulated_totals_equal_the_per_batch_sums_they_replace():
    parts = [torch.tensor([1.5, 2.0], dtype=torch.float64), torch.tensor([0.25, 3.0], dtype=torch.float64),
             torch.tensor([1e-9, 1.0], dtype=torch.float64)]
    totals: dict = {}
    with torch.inference_mode():  # reductions are made and folded inside the traced pass
        for part in parts:
            result = part.clone()
            trace_mod.fold(totals, "acc", result)
        assert result.tolist() == parts[-1].tolist()  # a result is never written to
        with pytest.raises(ValueError, match=r"the reduction of 'acc' accumulates over batches, but returned "
                                             r"shape \(3,\) after \(2,\)"):
            trace_mod.fold(totals, "acc", torch.zeros(3))
    gathered = trace_mod.gather([{"kept": p} for p in parts], totals)
    assert gathered["acc"][0].tolist() == torch.stack(parts).sum(0).tolist() and len(gathered["acc"]) == 1
    assert [t.tolist() for t in gathered["kept"]] == [p.tolist() for p in parts]
    gathered["acc"][0] += 1  # a plain tensor the probe may change
    view = torch.arange(4.0)
    trace_mod.fold(totals, "view", view[:2])
    trace_mod.fold(totals, "view", view[:2])
    assert view.tolist() == [0.0, 1.0, 2.0, 3.0]  # the first result was copied, not added to


class InOrder(probescope.Probe):
    """A third-party probe written before sorting: batch rows taken as prompts in order."""

    name = "in_order"

    def reads(self, params, model):
        return [probescope.Read("n", probescope.resid(0), lambda h, batch: batch.mask.sum(dim=1))]

    def build(self, params, run):
        return xr.Dataset({"n_tokens": ("prompt", torch.cat(run.reductions["n"]).numpy())})


class Shapeshifter(probescope.Probe):
    """Accumulates a reduction whose shape follows the batch: an error, its own."""

    name = "shapeshifter"

    def reads(self, params, model):
        return [probescope.Read("x", probescope.resid(0), lambda h, batch: batch.mask.sum(dim=1), accumulate=True)]

    def build(self, params, run):
        return xr.Dataset()


class Plugin:
    @probescope.hookimpl
    def register_probes(self, register):
        register(InOrder())
        register(Shapeshifter())


def test_a_probe_that_does_not_say_any_order_gets_its_prompts_in_order(gpt2, tokenizer):
    texts = shuffled_prompts(tokenizer)
    config = {"inputs": {"prompts": texts, "batch_size": BATCH},
              "probes": [{"use": "in_order"}, {"use": "token_similarity", "layers": [0]}]}
    out = probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False, plugins=[("p", Plugin())])["m"]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert out["in_order"].n_tokens.values.tolist() == lengths
    assert out["token_similarity"].n_tokens.values.tolist() == lengths


def test_an_accumulating_reduction_that_changes_shape_fails_alone(gpt2, tokenizer):
    texts = shuffled_prompts(tokenizer)[:4]  # batches of 3 and 1 prompts
    config = {"inputs": {"prompts": texts, "batch_size": BATCH},
              "probes": [{"use": "shapeshifter"}, {"use": "component_norm", "layers": [0]}]}
    with pytest.raises(probescope.RunFailed) as failed:
        probescope.run(config, models={"m": (gpt2, tokenizer)}, write=False, plugins=[("p", Plugin())])
    assert [f.name for f in failed.value.failures] == ["shapeshifter"]
    assert "accumulates over batches, but returned shape (1,) after (3,)" in failed.value.failures[0].error
    assert set(failed.value.datasets["m"]) == {"component_norm"}
