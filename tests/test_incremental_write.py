"""token_similarity's full form written as batches finish: its pairs spill to disk during
the pass (``Read(spill=True)``), the dataset's similarity is computed region by region
from them (``probescope.lazy_variable``), and the file is written slab by slab; the
file is what writing the whole dataset held in memory gives."""

from __future__ import annotations

import copy
import gc
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import probescope
from probescope import parts, results, spill, trace
from test_token_similarity import reference_hidden, reference_similarity

# a one-token prompt, padding in every batch, and lengths out of order (so that sorting
# by length reorders them: batches hold prompts 4, 2 / 5, 1 / ...)
PROMPTS = [
    "a",
    "The cat sat on the mat.",
    "When Mary and John went to the store, John gave a drink to",
    "b c",
    " ".join(["the cat sat on the mat"] * 9),
    "Paris is the capital of France and Rome",
    "it",
]
LAYERS = ["embed", 0, 2]


def cfg(out: Path | None = None, batch_size: int = 2, layers=LAYERS, prompts=PROMPTS) -> dict:
    c = {"inputs": {"prompts": prompts, "batch_size": batch_size},
         "probes": [{"use": "token_similarity", "layers": layers}]}
    if out is not None:
        c["output"] = {"dir": str(out)}
    return c


def test_written_file_equals_hidden_states_and_the_in_memory_dataset(gpt2, tokenizer, tmp_path, monkeypatch):
    from probescope import inputs

    bare = copy.deepcopy(gpt2)
    orders = []
    batches = inputs.batches
    monkeypatch.setattr(inputs, "batches", lambda *a, **kw: orders.append(kw.get("sort")) or batches(*a, **kw))
    probescope.run(cfg(tmp_path / "out"), models={"m": (gpt2, tokenizer)})
    assert orders == [True]  # prompts ran sorted by length, several to a batch
    saved = tmp_path / "out" / "m" / "token_similarity.nc"
    ds = xr.open_dataset(saved)  # plain xarray, as users open it

    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert lengths[0] == 1 and sorted(lengths, reverse=True) != lengths
    assert list(ds.n_pairs.values) == [n * (n + 1) // 2 for n in lengths]
    layer_index = {"embed": 0, 0: 1, 2: 3}  # hidden-state index of each layer read
    for p, prompt in enumerate(PROMPTS):
        states = reference_hidden(bare, tokenizer, prompt)
        mine = ds.pair_prompt.values == p
        i, j = ds.pair_token.values[mine], ds.pair_context_token.values[mine]
        for li, layer in enumerate(LAYERS):
            expected = reference_similarity(states[layer_index[layer]])
            np.testing.assert_allclose(ds.similarity.values[li, mine], expected[i, j], atol=1e-5)

    # the same dataset held in memory and written by xarray in one piece: the same file
    held = probescope.run(cfg(), models={"m": (gpt2, tokenizer)}, write=False)["m"]["token_similarity"]
    assert not results.is_lazy(held)
    held.to_netcdf(tmp_path / "held.nc")
    with xr.open_dataset(tmp_path / "held.nc") as whole:
        xr.testing.assert_identical(ds.drop_attrs(), whole.drop_attrs())
        assert ds.similarity.encoding["chunksizes"] == whole.similarity.encoding["chunksizes"]
        assert ds.similarity.encoding["zlib"] and ds.similarity.encoding["coordinates"] == \
            whole.similarity.encoding["coordinates"]
    assert set(ds.attrs) == set(held.attrs)
    ds.close()
    # nothing else left beside the result: the spilled batches are gone
    assert sorted(p.name for p in (tmp_path / "out" / "m").iterdir()) == ["token_similarity.nc"]
    assert not list((tmp_path / "out").glob(".probescope-spill.*"))


def test_slabs_cover_the_variable_in_whole_chunks(gpt2, tokenizer, tmp_path, monkeypatch):
    """Tiny slabs (one chunk each, chunks of 4,096 pairs): written in many parts, the
    file holds the same values, and each chunk is written once."""
    prompts = [" ".join(["the cat sat on the mat"] * k) for k in (1, 17, 3, 9, 17, 12)]
    monkeypatch.setattr(parts, "SLAB_BYTES", 1)
    written = []
    read = parts._Computed.read
    monkeypatch.setattr(parts._Computed, "read", lambda self, region: written.append(region) or read(self, region))
    probescope.run(cfg(tmp_path, prompts=prompts), models={"m": (gpt2, tokenizer)})
    slabs = [(r[1].start, r[1].stop) for r in written if len(r) == 2]  # the similarities
    assert all(r[0] == slice(0, len(LAYERS)) for r in written if len(r) == 2)  # every layer in each slab
    labels = [(r[0].start, r[0].stop) for r in written if len(r) == 1]  # pair_prompt, _token, _context_token
    held = probescope.run(cfg(prompts=prompts), models={"m": (gpt2, tokenizer)}, write=False)["m"]["token_similarity"]
    with xr.open_dataset(tmp_path / "m" / "token_similarity.nc") as ds:
        total = ds.sizes["pair"]
        chunk = ds.similarity.encoding["chunksizes"][1]
        xr.testing.assert_identical(ds.similarity.drop_attrs(), held.similarity.drop_attrs())
    assert total > 2 * chunk
    assert slabs == [(a, min(a + chunk, total)) for a in range(0, total, chunk)]
    assert labels == slabs * 3


def test_what_grows_with_the_pairs_is_computed_when_written(gpt2, tokenizer, tmp_path):
    """The dataset a run builds holds no similarity and no pair label: only the ``pair``
    index itself (xarray keeps an index in memory) has the pair dimension in memory."""
    seen = {}

    class Look:
        @probescope.hookimpl
        def dataset_produced(self, dataset, model, probe):
            seen["lazy"] = sorted(name for name, v in dataset.variables.items() if parts.computed(v) is not None)
            seen["held"] = sorted(name for name, v in dataset.variables.items()
                                  if "pair" in v.dims and parts.computed(v) is None)

    probescope.run(cfg(tmp_path), models={"m": (gpt2, tokenizer)}, plugins=[("look", Look())])
    assert seen == {"lazy": ["pair_context_token", "pair_prompt", "pair_token", "similarity"], "held": ["pair"]}


def test_a_returned_dataset_is_read_from_the_saved_file(gpt2, tokenizer, tmp_path):
    """With write (the default), the run returns the full form opened from its file,
    values read when used, instead of holding them."""
    out = probescope.run(cfg(tmp_path), models={"m": (gpt2, tokenizer)})["m"]["token_similarity"]
    assert out.similarity.encoding["source"] == str(tmp_path / "m" / "token_similarity.nc")
    held = probescope.run(cfg(), models={"m": (gpt2, tokenizer)}, write=False)["m"]["token_similarity"]
    xr.testing.assert_identical(out.drop_attrs(), held.drop_attrs())


@pytest.mark.parametrize("when", ["pass", "write"])
def test_an_interrupted_run_leaves_no_file(gpt2, tokenizer, tmp_path, monkeypatch, when):
    """Ctrl-C in the middle of the pass (the third batch spilled) or of writing the file
    (after its first slab): no file under the result's name, no spilled batches, no
    folder made for them."""
    from probescope.errors import Interrupted

    calls = []
    if when == "pass":
        append = spill.SpillStore.append

        def interrupting(self, owner, key, tensor):
            calls.append(key)
            if len(calls) == 3 * len(LAYERS):
                raise KeyboardInterrupt
            return append(self, owner, key, tensor)

        monkeypatch.setattr(spill.SpillStore, "append", interrupting)
    else:
        monkeypatch.setattr(parts, "SLAB_BYTES", 1)
        read = parts._Computed.read

        def interrupting(self, region):
            calls.append(region)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return read(self, region)

        monkeypatch.setattr(parts._Computed, "read", interrupting)
    prompts = [" ".join(["the cat sat on the mat"] * k) for k in (1, 17, 3, 9, 17, 12)]
    with pytest.raises(Interrupted):
        probescope.run(cfg(tmp_path / "out", prompts=prompts), models={"m": (gpt2, tokenizer)})
    assert len(calls) >= 2
    assert not (tmp_path / "out").exists()


def test_a_probe_failing_while_written_loses_no_other_result(gpt2, tokenizer, tmp_path, monkeypatch):
    """The similarity is computed while it is written: an error there fails that probe
    alone, leaves no file of it, and the other probes' files are written."""
    from probescope.errors import RunFailed

    monkeypatch.setattr(parts, "SLAB_BYTES", 1)
    read = parts._Computed.read
    calls = []

    def failing(self, region):
        calls.append(region)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return read(self, region)

    monkeypatch.setattr(parts._Computed, "read", failing)
    c = cfg(tmp_path, prompts=[" ".join(["the cat sat on the mat"] * k) for k in (1, 17, 3, 9, 17, 12)])
    c["probes"].append({"use": "component_norm", "name": "norms", "statistic": "activation_norm",
                        "components": ["attn.q"]})
    with pytest.raises(RunFailed) as caught:
        probescope.run(c, models={"m": (gpt2, tokenizer)})
    assert [f.name for f in caught.value.failures] == ["token_similarity"]
    assert "disk on fire" in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["norms.nc"]
    assert not list(tmp_path.glob(".probescope-spill.*"))
    assert "token_similarity" not in caught.value.datasets["m"]


def test_nothing_written_returns_the_dataset_in_memory(gpt2, tokenizer, tmp_path, monkeypatch):
    """write=False: the batches spill to the system's temporary folder, the dataset
    comes back loaded, and the folder is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ds = probescope.run(cfg(), models={"m": (gpt2, tokenizer)}, write=False)["m"]["token_similarity"]
    assert isinstance(ds.similarity.variable._data, np.ndarray)
    assert np.isfinite(ds.similarity.values).all()
    assert list(tmp_path.iterdir()) == []


def _held_bytes() -> int:
    """Bytes of every tensor alive in the process that is not a model parameter."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not issubclass(type(obj), torch.nn.Parameter):
            try:
                storage = obj.untyped_storage()
            except Exception:
                continue
            if storage.data_ptr() not in seen and storage.device.type != "meta":
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def test_memory_held_does_not_grow_with_batches(gpt2, tokenizer, tmp_path, monkeypatch):
    """After each batch, what the run still holds is what it held after the first: the
    batch's pairs went to disk. (Keeping every batch's pairs until the build, as the
    full form did, grows by about a batch's pairs each batch.)"""
    prompts = [" ".join(["the cat sat on the mat"] * 5)] * 16  # equal batches
    held = []
    monkeypatch.setattr(trace, "release_freed_memory", lambda: (gc.collect(), held.append(_held_bytes())))
    probescope.run(cfg(tmp_path, prompts=prompts, layers=["embed", 0, 1, 2]), models={"m": (gpt2, tokenizer)})
    n = len(tokenizer(prompts[0])["input_ids"])
    per_batch = 2 * n * (n + 1) // 2 * 4 * 4  # two prompts' pairs, four layers, float32
    assert len(held) == 8
    growth = held[-1] - held[0]
    assert growth < per_batch / 2, (held, per_batch)


def test_spilled_results_read_back_as_written(tmp_path):
    """What spills comes back value for value, dtype and shape included (bfloat16,
    scalars, empty tensors)."""
    store = spill.SpillStore(tmp_path)
    tensors = [torch.randn(3, 5), torch.arange(7), torch.randn(4).to(torch.bfloat16), torch.tensor(2.5),
               torch.zeros(0, 3)]
    for k, t in enumerate(tensors):
        store.append("p", k, t)
        store.append("p", k, t * 2)
    back = store.reductions("p")
    for k, t in enumerate(tensors):
        assert len(back[k]) == 2
        for got, want in zip(back[k], (t, t * 2)):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want)
    store.drop("p")
    assert store.reductions("p") == {}
    store.close()
    assert not store.folder.exists()


def test_a_lazy_variable_computes_only_the_regions_asked_for():
    asked = []

    def read(region):
        asked.append(region)
        rows, cols = region
        return np.add.outer(np.arange(rows.start, rows.stop) * 100.0, np.arange(cols.start, cols.stop))

    var = probescope.lazy_variable(("a", "b"), (3, 50), np.float64, read, {"units": "1"}, parted="b")
    ds = xr.Dataset({"v": var})
    np.testing.assert_array_equal(ds.v.isel(a=1, b=slice(10, 13)).values, [110, 111, 112])
    assert asked == [(slice(1, 2), slice(10, 13))]
    np.testing.assert_array_equal(ds.v.isel(b=slice(None, None, -7)).values[2, :2], [249, 242])
    assert results.is_lazy(ds)
    whole = results.loaded(ds)
    assert not results.is_lazy(whole)
    np.testing.assert_array_equal(whole.v.values, np.add.outer(np.arange(3) * 100.0, np.arange(50)))
