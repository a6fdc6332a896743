"""On a GPU: every site of every family, every probe, a model split across the GPU, the
CPU and disk, streamed weights-only runs and vision-language models give on CUDA what
they give on the CPU.

The rest of the suite runs on the CPU, where CI runs; these tests need a CUDA device and
are skipped without one. On a GPU machine:

    python -m pytest -m gpu tests/test_gpu.py

``PROBESCOPE_TEST_DEVICE`` names another device (``cuda:1``); set to ``cpu`` it runs the
same comparisons on the CPU (the GPU/CPU/disk split is then skipped), which checks the
tests themselves where no GPU is.

Tolerances: a GPU adds and multiplies in another order than the CPU (float32, TF32 off,
torch's default), so values agree to rounding, not bit for bit; head scores, which are
ranks, must agree exactly on the planted model, whose relations are far from ties.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from architecture_cases import BY_ID, CASES, build
from probescope import api, trace
from probescope import models as models_mod
from probescope.config import ModelEntry
from probescope.inputs import Batch
from probescope.models import find_adapter
from probescope.probe import Read
from test_head_classifier import LLAMA_PLAN, check_planted, relation_file
from test_offload import planted, run_config  # noqa: F401 (planted: a fixture, used by name)
from test_sites import observed, registry, site_refs

DEVICE = os.environ.get("PROBESCOPE_TEST_DEVICE", "cuda")
ON_GPU = torch.device(DEVICE).type == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA device (see the module docstring)"),
]

#: float32 on two devices: rounding apart (the models' weights are N(0, 0.25^2), so
#: logits run to tens)
CLOSE = dict(rtol=1e-4, atol=1e-4)


def on(batch: Batch, device: str) -> Batch:
    return Batch(batch.prompts, batch.input_ids.to(device), batch.attention_mask.to(device), batch.extras)


def read_every_site(model: torch.nn.Module, case_id: str, batch: Batch) -> tuple[dict, dict]:
    """Every site of the case through probescope, in one trace, on the model's device."""
    adapter = find_adapter(model.config, registry())
    keep = lambda hidden, batch: hidden.clone()  # noqa: E731
    steps = trace.plan_steps([("sites", Read(k, r, keep)) for k, r in site_refs(case_id).items()],
                             lambda ref: adapter.site(ref, adapter.blocks(model), model.config))
    with trace.attention_implementation(model, "eager"), trace.wrapped(model) as envoy:
        sink, failed = trace.run_batch(envoy, steps, batch)
    return dict(sink.get("sites", {})), dict(failed)


def assert_sites_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    problems = []
    for key in want:
        g = got[key].detach().cpu()
        try:
            torch.testing.assert_close(g, want[key], **CLOSE, equal_nan=True)
        except AssertionError as error:
            problems.append(f"{key}: {str(error).splitlines()[0]}")
    assert not problems, "\n".join(problems)


# -- every site, on every family -----------------------------------------------------------------


@pytest.mark.parametrize("case_id", [case.id for case in CASES])
def test_every_site_on_the_gpu_equals_the_cpu(case_id):
    batch, _, (whole, whole_failed) = observed(case_id, "padded")
    model = copy.deepcopy(build(case_id)).to(DEVICE)
    got, failed = read_every_site(model, case_id, on(batch, DEVICE))
    assert failed == whole_failed == {}
    assert all(t.device.type == torch.device(DEVICE).type for t in got.values())  # read where it ran
    assert_sites_equal(got, whole)


def placement_table(model: torch.nn.Module, blocks: str, places: list) -> dict:
    """A device_map table: block ``i`` on ``places[i]``, every module outside the block
    list (embeddings, final norm, a tied or untied output layer) on GPU 0.

    Written out rather than left to ``device_map = "auto"``: on models this small,
    accelerate's room for the largest module decides everything (the GPU run of
    2026-11-30 put a whole model on disk, another whole on the GPU)."""
    table, path = {}, ""
    for part in blocks.split("."):
        parent = model.get_submodule(path) if path else model
        for name, _ in parent.named_children():
            if name != part:
                table[f"{path}.{name}" if path else name] = 0
        path = f"{path}.{part}" if path else part
    for i, place in enumerate(places):
        table[f"{blocks}.{i}"] = place
    return table


SPLITS = {"gpu+cpu": [0, "cpu"], "cpu+disk, rest on the gpu": ["cpu", "disk"]}


@pytest.mark.skipif(not ON_GPU, reason="places modules on a GPU")
@pytest.mark.parametrize("case_id", ["gpt2", "llama", "opt-350m-like"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_every_site_of_a_model_split_across_the_gpu_cpu_and_disk_equals_the_cpu(case_id, split, tmp_path):
    model = build(case_id)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    table = placement_table(model, BY_ID[case_id].blocks, SPLITS[split])
    entry = ModelEntry(name="m", path=str(tmp_path / "model"), dtype="float32", device_map=table,
                       offload_folder=str(tmp_path / "offload"))
    dispatched = models_mod.load_weights(entry)
    assert set(map(str, dispatched.hf_device_map.values())) == {"0", *map(str, SPLITS[split])}
    batch, _, (whole, _) = observed(case_id, "padded")
    got, failed = read_every_site(dispatched, case_id, on(batch, "cuda:0"))
    assert failed == {}
    assert_sites_equal(got, whole)


# -- whole runs ------------------------------------------------------------------------------------


def assert_runs_agree(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for probe in want:
        for name, values in want[probe].data_vars.items():
            if probe == "head_classifier" and name.endswith("score"):
                np.testing.assert_array_equal(got[probe][name].values, values.values, err_msg=f"{probe}.{name}")
            else:
                np.testing.assert_allclose(got[probe][name].values, values.values, rtol=1e-4, atol=1e-5,
                                           equal_nan=True, err_msg=f"{probe}.{name}")


@pytest.mark.parametrize("placement", ["device", "gpu+cpu+disk"])
def test_every_probe_on_the_gpu_equals_the_cpu_run(planted, tmp_path, placement):
    model, words, folder = planted
    if placement != "device" and not ON_GPU:
        pytest.skip("places modules on a GPU")
    relations = relation_file(tmp_path)
    how = {"device": DEVICE} if placement == "device" else \
        {"device_map": placement_table(model, "model.layers", [0, "cpu", "disk"]), "offload_folder": str(tmp_path / "off")}
    cpu = api.run(run_config(folder, relations), write=False)["m"]
    gpu = api.run(run_config(folder, relations, **how), write=False)["m"]
    assert_runs_agree(gpu, cpu)
    check_planted(gpu["head_classifier"], LLAMA_PLAN)


def test_a_weights_only_run_streams_onto_the_gpu(planted, tmp_path, monkeypatch):
    """head_classifier and weight norms alone: the layout streams the shards onto the
    device (the model is never built) and scores what the CPU scores."""
    from probescope.architectures import streamed

    _, _, folder = planted
    relations = relation_file(tmp_path)
    config = lambda **where: {  # noqa: E731
        "models": [{"name": "m", "path": str(folder), **where}],
        "probes": [{"use": "component_norm", "statistic": "weight_norm"},
                   {"use": "head_classifier", "builtin_relations": False, "relation_files": [str(relations)],
                    "min_pairs": 5}]}
    devices = []
    original = streamed.StreamedLayout.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        devices.append(self.device)

    monkeypatch.setattr(streamed.StreamedLayout, "__init__", spy)
    cpu = api.run(config(), write=False)["m"]
    gpu = api.run(config(device=DEVICE), write=False)["m"]
    assert [d.type for d in devices] == ["cpu", torch.device(DEVICE).type]
    assert_runs_agree(gpu, cpu)
    check_planted(gpu["head_classifier"], LLAMA_PLAN)


def test_length_sorted_batches_on_the_gpu_come_back_in_the_users_order(planted, tmp_path):
    _, _, folder = planted
    prompts = ["walk walked", "France Paris Japan Tokyo dog chien cat chat", "house", "water eau bread"]
    config = lambda **where: {  # noqa: E731
        "models": [{"name": "m", "path": str(folder), **where}],
        "inputs": {"prompts": prompts, "batch_size": 2},
        "probes": [{"use": "token_similarity"}, {"use": "token_similarity", "name": "summary", "form": "by_distance"},
                   {"use": "component_norm", "statistic": "activation_norm"}]}
    cpu = api.run(config(), write=False)["m"]
    gpu = api.run(config(device=DEVICE), write=False)["m"]
    assert_runs_agree(gpu, cpu)
    assert __import__("json").loads(gpu["token_similarity"].attrs["prompts"]) == prompts


def test_a_vision_language_model_on_the_gpu_equals_the_cpu(tmp_path):
    """LLaVA: image features scattered into the text embeddings on the device. (The tiny
    Qwen2-VL folder's processor did not load under the GPU machine's transformers 5.17,
    which asks for a video processor config; under the pinned 5.23 it loads.)"""
    import vlm_models

    for name in ("llava",):
        vlm = vlm_models.BUILDERS[name]()
        folder = tmp_path / name
        vlm.save(folder)
        vlm_models.picture(40, 24, seed=1).save(tmp_path / "tall.png")
        config = lambda **where: {  # noqa: E731, B023
            "models": [{"name": name, "path": str(folder), **where}],
            "inputs": {"prompts": ["Provide a caption:", "The cat sat on the mat."],
                       "images": [str(tmp_path / "tall.png"), ""], "batch_size": 2},
            "probes": [{"use": "token_similarity"}, {"use": "component_norm"}]}
        cpu = api.run(config(), write=False)[name]
        gpu = api.run(config(device=DEVICE), write=False)[name]
        assert_runs_agree(gpu, cpu)
