"""The head classifier against models whose heads are built to implement known relations.

A word-level tokenizer holds the words of four small relations (one per built-in
category) plus thousands of filler words. Chosen heads get value and output weights set
by hand so that ``x W_V^h W_O^h`` equals the target's unembedding direction for every
source ``x`` of their relations (``x`` being the embedding, or block 0's MLP output for
later layers, computed here from the model's own modules); every other head keeps its
random weights. The classifier must find exactly the planted heads, in the planned
categories, with score 1.0 for the planted relations.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from probescope import api
from probescope.errors import ConfigError
from probescope.probes.head_classifier import RelationCoverageWarning
from probescope.probes.head_classifier.relation_scores import PairSet, reference_scores, relation_scores
from probescope.probes.head_classifier.relations import read_relation_file, tokenize_relation

# (name, category, pairs): 8 pairs each, no word shared between relations.
RELATIONS = [
    ("t_copy", "algorithmic", [(w, w) for w in
                               ["house", "river", "green", "table", "music", "stone", "paper", "light"]]),
    ("t_capital", "knowledge", [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"),
                                ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Cuba", "Havana")]),
    ("t_past", "linguistic", [("walk", "walked"), ("go", "went"), ("eat", "ate"), ("run", "ran"),
                              ("see", "saw"), ("jump", "jumped"), ("write", "wrote"), ("sing", "sang")]),
    ("t_french", "translation", [("dog", "chien"), ("cat", "chat"), ("water", "eau"), ("bread", "pain"),
                                 ("sun", "soleil"), ("moon", "lune"), ("tree", "arbre"), ("book", "livre")]),
]
BY_NAME = {name: (category, pairs) for name, category, pairs in RELATIONS}
FILLERS = 3000
WIDTH, LAYERS, HEADS, HEAD_DIM = 128, 3, 4, 32

#: (layer, head) -> relations it implements (a negative sign: suppression).
GPT2_PLAN = {
    (0, 1): ["t_copy"],
    (0, 3): ["t_copy", "t_capital", "t_past", "t_french"],  # 4 categories, 32 pairs = head_dim
    (1, 0): ["t_copy", "t_capital"],
    (1, 2): ["t_capital"],
    (1, 3): ["-t_capital"],
    (2, 0): ["t_past"],
    (2, 1): ["t_copy", "t_past", "t_french"],
    (2, 3): ["t_french"],
}
CATEGORIES = ["algorithmic", "knowledge", "linguistic", "translation"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "a"] + list(dict.fromkeys(w for _, _, pairs in RELATIONS for pair in pairs for w in pair))
    words += [f"filler{i}" for i in range(FILLERS)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]", eos_token="[UNK]")


def relation_file(tmp_path, relations=RELATIONS):
    path = tmp_path / "relations.json"
    path.write_text(json.dumps([{"name": n, "category": c, "description": f"test {n}", "pairs": p}
                                for n, c, p in relations]))
    return path


def plant(model, tokenizer, plan, *, embed, unembed, mlp0, set_head):
    """Give each planned head value/output weights that send every source of its
    relations to its target's unembedding direction (negated for suppression)."""
    E, U = embed(model), unembed(model)  # (vocab, d), (d, vocab)
    ids = tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        for (layer, head), names in plan.items():
            sources, targets = [], []
            for name in names:
                sign = -1.0 if name.startswith("-") else 1.0
                for s, t in BY_NAME[name.lstrip("-")][1]:
                    sources.append(ids(s))
                    targets.append(sign * U[:, ids(t)])
            x = E[torch.tensor(sources)].double()
            if layer > 0:
                x = mlp0(model, x.float()).double()
            T = torch.stack(targets).double()
            M = torch.linalg.pinv(x) @ T  # x @ M == T exactly (len(sources) <= head_dim < width)
            u, s, vh = torch.linalg.svd(M)
            W_V = (u[:, :HEAD_DIM] * s[:HEAD_DIM]).float()  # (d, head_dim)
            W_O = vh[:HEAD_DIM].float()  # (head_dim, d)
            set_head(model, layer, head, W_V, W_O)


def build_gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                       n_positions=32, bos_token_id=0, eos_token_id=0)).eval()

    def set_head(model, layer, head, W_V, W_O):  # Conv1D stores (in, out); v is c_attn's last third
        block = model.transformer.h[layer]
        cols = slice(2 * WIDTH + head * HEAD_DIM, 2 * WIDTH + (head + 1) * HEAD_DIM)
        block.attn.c_attn.weight[:, cols] = W_V
        block.attn.c_proj.weight[head * HEAD_DIM:(head + 1) * HEAD_DIM, :] = W_O

    plant(model, tokenizer, GPT2_PLAN,
          embed=lambda m: m.transformer.wte.weight, unembed=lambda m: m.lm_head.weight.t(),
          mlp0=lambda m, x: m.transformer.h[0].mlp(m.transformer.h[0].ln_2(x)), set_head=set_head)
    return model


#: Grouped-query model: 4 query heads on 2 key/value heads (heads 0, 1 read value head 0).
LLAMA_PLAN = {(1, 1): ["t_capital"], (2, 2): ["t_past", "t_french"], (0, 0): ["t_copy"]}


def build_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()

    def set_head(model, layer, head, W_V, W_O):  # nn.Linear stores (out, in)
        attn = model.model.layers[layer].self_attn
        kv = head // (HEADS // 2)
        attn.v_proj.weight[kv * HEAD_DIM:(kv + 1) * HEAD_DIM, :] = W_V.t()
        attn.o_proj.weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = W_O.t()

    block0 = model.model.layers[0]
    plant(model, tokenizer, LLAMA_PLAN,
          embed=lambda m: m.model.embed_tokens.weight, unembed=lambda m: m.lm_head.weight.t(),
          mlp0=lambda m, x: block0.mlp(block0.post_attention_layernorm(x)), set_head=set_head)
    return model


@pytest.fixture(scope="module")
def words():
    return word_tokenizer()


@pytest.fixture(scope="module")
def planted_gpt2(words):
    return build_gpt2(words)


@pytest.fixture(scope="module")
def planted_llama(words):
    return build_llama(words)


def classify(model, tokenizer, tmp_path, **params):
    config = {
        "models": [],
        "probes": [{"use": "head_classifier", "builtin_relations": False,
                    "relation_files": [str(relation_file(tmp_path))], "min_pairs": 5, **params}],
    }
    return api.run(config, models={"m": (model, tokenizer)}, write=False)["m"]["head_classifier"]


def expected_membership(plan, classify_by="relation"):
    member = np.zeros((LAYERS, HEADS, len(CATEGORIES)), dtype=bool)
    for (layer, head), names in plan.items():
        for name in names:
            suppression = name.startswith("-")
            if classify_by == "either" or (classify_by == "suppression") == suppression:
                member[layer, head, CATEGORIES.index(BY_NAME[name.lstrip("-")][0])] = True
    return member


def check_planted(ds, plan):
    assert list(ds.relation.values) == [n for n, _, _ in RELATIONS]
    assert list(ds.relation_category.values) == CATEGORIES
    assert ds.kept_pairs.values.tolist() == [8, 8, 8, 8]
    assert list(ds.category_name.values) == CATEGORIES
    planted = np.zeros((LAYERS, HEADS, len(RELATIONS)), dtype=bool)
    planted_suppression = np.zeros_like(planted)
    for (layer, head), names in plan.items():
        for name in names:
            target = planted_suppression if name.startswith("-") else planted
            target[layer, head, [n for n, _, _ in RELATIONS].index(name.lstrip("-"))] = True
    score, supp = ds.relation_score.values, ds.suppression_score.values
    np.testing.assert_array_equal(score[planted], 1.0)
    np.testing.assert_array_equal(supp[planted_suppression], 1.0)
    assert score[~planted].max() < 0.15, "an unplanted head scores high"
    assert supp[~planted_suppression].max() < 0.15
    np.testing.assert_array_equal(ds.in_category.values, expected_membership(plan))


def test_finds_exactly_the_planted_heads_and_their_categories(planted_gpt2, words, tmp_path):
    ds = classify(planted_gpt2, words, tmp_path)
    check_planted(ds, GPT2_PLAN)
    meanings = ds.category.attrs["flag_meanings"].split()
    assert meanings == ["unclassified", *CATEGORIES, "2_categories", "3_categories", "4_categories"]
    np.testing.assert_array_equal(ds.category.attrs["flag_values"], np.arange(8))
    flags = ds.category.values
    assert flags[0, 1] == meanings.index("algorithmic")
    assert flags[1, 2] == meanings.index("knowledge")
    assert flags[2, 0] == meanings.index("linguistic")
    assert flags[2, 3] == meanings.index("translation")
    assert flags[1, 0] == meanings.index("2_categories")
    assert flags[2, 1] == meanings.index("3_categories")
    assert flags[0, 3] == meanings.index("4_categories")
    assert flags[1, 3] == 0  # a suppression head is unclassified by relation scores
    unplanted = [(layer, h) for layer in range(LAYERS) for h in range(HEADS) if (layer, h) not in GPT2_PLAN]
    assert all(flags[layer, h] == 0 for layer, h in unplanted)
    np.testing.assert_array_equal(ds.n_categories.values, expected_membership(GPT2_PLAN).sum(-1))
    assert ds.k.values.tolist() == [10, 10, 10, 10]  # MAPS's default for a small vocabulary
    assert ds.attrs["threshold"] == 0.15 and ds.attrs["through_first_mlp"] == 1


def test_grouped_query_heads_share_their_value_weights(planted_llama, words, tmp_path):
    ds = classify(planted_llama, words, tmp_path)
    check_planted(ds, LLAMA_PLAN)
    assert ds.category.values[2, 2] == 5  # "2_categories"


@pytest.mark.parametrize("classify_by", ["suppression", "either"])
def test_classify_by_suppression(planted_gpt2, words, tmp_path, classify_by):
    ds = classify(planted_gpt2, words, tmp_path, classify_by=classify_by)
    np.testing.assert_array_equal(ds.in_category.values, expected_membership(GPT2_PLAN, classify_by))


def test_through_first_mlp_matters(planted_gpt2, words, tmp_path):
    ds = classify(planted_gpt2, words, tmp_path, through_first_mlp=False)
    # Layer-0 heads read raw embeddings either way; later planted heads were built for MLP outputs.
    assert ds.relation_score.sel(layer=0, head=1, relation="t_copy") == 1.0
    assert ds.relation_score.sel(layer=1, head=2, relation="t_capital") < 0.5
    assert ds.attrs["through_first_mlp"] == 0


def test_threshold_and_k_are_parameters(planted_gpt2, words, tmp_path):
    ds = classify(planted_gpt2, words, tmp_path, k=1, threshold=1.0)
    check_planted(ds, GPT2_PLAN)  # planted targets rank first, so k = 1 still finds them
    assert ds.k.values.tolist() == [1, 1, 1, 1]


def test_relation_with_too_few_pairs_is_nan_and_named_in_a_warning(planted_gpt2, words, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = classify(planted_gpt2, words, tmp_path, min_pairs=9)
    messages = [str(w.message) for w in caught if issubclass(w.category, RelationCoverageWarning)]
    assert len(messages) == 4
    assert "model 'm': relation 't_capital' kept 8 of 8 pairs as single tokens, fewer than min_pairs = 9" in messages[1]
    assert np.isnan(ds.relation_score.values).all() and np.isnan(ds.suppression_score.values).all()
    assert not ds.in_category.values.any()
    assert ds.attrs["unscored_relations"] == "t_copy t_capital t_past t_french"


def test_pairs_that_are_not_single_tokens_are_dropped_and_counted(words, tmp_path):
    relations = [("mixed", "knowledge", [("France", "Paris"), ("Atlantis", "Poseidonia"), ("Japan", "Tokyo"),
                                         ("France", "Paris")])]
    pairs = tokenize_relation(words, read_relation_file(relation_file(tmp_path, relations))[0])
    assert (pairs.kept, pairs.total) == (2, 4)  # unknown words dropped, the repeated pair counted once
    assert words.convert_ids_to_tokens(pairs.source.tolist()) == ["France", "Japan"]


def test_reads_weights_only_and_never_traces(planted_gpt2, words, tmp_path, monkeypatch):
    from probescope import trace

    def no_trace(*args, **kwargs):
        raise AssertionError("the head classifier must not trace the model")

    monkeypatch.setattr(trace, "run_batch", no_trace)
    monkeypatch.setattr(trace, "wrapped", no_trace)
    classify(planted_gpt2, words, tmp_path)  # no [inputs] section either


# -- the fast path against the plain reference loop --------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fast_scores_equal_the_reference_loop_in_float64(family, tokenizer, gpt2, llama, planted_gpt2, words):
    from probescope.architectures.layout import ModelLayout
    from probescope.models import find_adapter
    from probescope.plugins.manager import load_registry

    registry = load_registry()
    cases = [(planted_gpt2, len(words)), (gpt2 if family == "gpt2" else llama, len(tokenizer))]
    for model, vocabulary in cases:
        adapter = find_adapter(model.config, registry)
        layout = ModelLayout(model, adapter, adapter.blocks(model))
        g = torch.Generator().manual_seed(7)
        relations = []
        for size, k in ((40, 10), (25, 1), (60, 25), (15, 3)):
            source = torch.randint(0, vocabulary, (size,), generator=g)
            target = source.clone() if k == 1 else torch.randint(0, vocabulary, (size,), generator=g)
            relations.append((source, target, k))
        want = reference_scores(layout, relations)
        for first, largest in ((512, 8192), (16, 64)):  # one chunk, and many small ones
            got = relation_scores(layout, PairSet.of(relations), dtype=torch.float64, first_chunk=first,
                                  max_chunk=largest, budget_bytes=1 << 18)  # 256 kB: heads in groups
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        assert np.nanmax(want[0]) > 0  # some hits, so equality means something


# -- parameters and relation files ---------------------------------------------------------------------


def config_for(model_dir, **params):
    return {"models": [{"name": "tiny", "path": str(model_dir)}], "probes": [{"use": "head_classifier", **params}]}


@pytest.mark.parametrize("content, suffix, message", [
    ("relation,category,source\nr,knowledge,a\n", ".csv", "missing column(s) target"),
    ("", ".csv", "is empty"),
    ("relation,category,source,target\n", ".csv", "has a header but no pairs"),
    ("relation,category,source,target\nr,knowledge,France,Paris\nr,linguistic,Japan,Tokyo\n", ".csv",
     "has category 'linguistic' here but 'knowledge' on line 2"),
    ("relation,category,source,target\nr,knowledge,France,\n", ".csv", "line 2: target: expected a non-empty string"),
    ('[{"name": "r", "category": "knowledge", "pairs": []}]', ".json", "relation 'r' has no pairs"),
    ('{"name": "r", "pairs": [["a", "b"]]}', ".json", "missing key(s) category"),
    ('[{"name": "r", "category": "knowledge", "pairs": [["a", "b"]]},'
     ' {"name": "r", "category": "linguistic", "pairs": [["c", "d"]]}]', ".json", "relation name 'r' is used twice"),
    ('{"name": "copying", "category": "mine", "pairs": [["a", "b"]]}', ".json", "relation name 'copying' is used twice"),
    ('{"name": "r", "category": "two words", "pairs": [["a", "b"]]}', ".json", "must be one word"),
    ('{"name": "r", "category": "unclassified", "pairs": [["a", "b"]]}', ".json", "is reserved"),
    ('{"name": "r", "category": "k", "pairs": [["a"]]}', ".json", "expected [source, target]"),
    ("{not json", ".json", "not valid JSON"),
    ("name\tcategory\n", ".tsv", "must end in .csv or .json"),
])
def test_bad_relation_files_are_config_errors_naming_the_file(model_dirs, tmp_path, content, suffix, message):
    path = tmp_path / f"mine{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        api.run(config_for(model_dirs["gpt2"], relation_files=[str(path)]), write=False)
    text = str(caught.value)
    assert "probes[0]" in text and str(path) in text and message in text, text


def test_missing_file_unknown_relation_and_no_relations(model_dirs, tmp_path):
    cases = [
        (dict(relation_files=[str(tmp_path / "nope.csv")]), "no such file"),
        (dict(relations=["copying", "telepathy"]), "unknown relation(s) 'telepathy'"),
        (dict(builtin_relations=False), "no relations"),
        (dict(threshold=0), "greater than 0"),
        (dict(classify_by="neither"), "'relation', 'suppression' or 'either'"),
        (dict(layers=[5]), "layer 5 is out of range"),
    ]
    for params, message in cases:
        with pytest.raises(ConfigError, match="probes\\[0\\]") as caught:
            api.run(config_for(model_dirs["gpt2"], **params), write=False)
        assert message in str(caught.value), (params, str(caught.value))


def test_user_categories_extend_the_flags(planted_gpt2, words, tmp_path):
    mine = [("t_capital", "geography", BY_NAME["t_capital"][1])] + [r for r in RELATIONS if r[0] != "t_capital"]
    path = tmp_path / "mine.csv"
    path.write_text("relation,category,source,target,description\n" + "".join(
        f"{n},{c},{s},{t},test\n" for n, c, p in mine for s, t in p))
    config = {"models": [], "probes": [{"use": "head_classifier", "builtin_relations": False, "min_pairs": 5,
                                        "relation_files": [str(path)]}]}
    ds = api.run(config, models={"m": (planted_gpt2, words)}, write=False)["m"]["head_classifier"]
    assert list(ds.category_name.values) == CATEGORIES + ["geography"]
    meanings = ds.category.attrs["flag_meanings"].split()
    assert meanings == ["unclassified", *CATEGORIES, "geography", "2_categories", "3_categories", "4_categories",
                        "5_categories"]
    assert ds.category.values[1, 2] == meanings.index("geography")
    assert not ds.in_category.sel(category_name="knowledge").values.any()


def test_builtin_relations_on_a_saved_model_and_the_saved_dataset(model_dirs, tmp_path):
    """The shipped relations through the command-line path: the demo tokenizer knows few of
    their words, so most are skipped with warnings; the result saves and loads back."""
    import xarray as xr

    config = tmp_path / "heads.toml"
    config.write_text(f'[[models]]\nname = "tiny"\npath = "{model_dirs["gpt2"]}"\n\n[[probes]]\n'
                      f'use = "head_classifier"\nmin_pairs = 1\n\n[[renderers]]\nuse = "head_category_map"\n'
                      f'output = "heads.png"\n\n[output]\ndir = "out"\n')
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        datasets = api.run(config)
    ds = datasets["tiny"]["head_classifier"]
    assert len(ds.relation) == 20 and set(ds.relation_category.values) == set(CATEGORIES)
    assert (tmp_path / "out" / "heads.png").is_file()
    saved = xr.open_dataset(tmp_path / "out" / "tiny" / "head_classifier.nc")
    xr.testing.assert_identical(saved.load(), ds)


def test_adapters_without_head_weights_or_mlp_are_config_problems():
    from types import SimpleNamespace

    from probescope.architectures.base import BlockListAdapter
    from probescope.architectures.gpt2 import GPT2Adapter
    from probescope.probes.head_classifier import HeadClassifier, HeadClassifierParameters

    class NoMLP(GPT2Adapter):
        mlp_path = None

    probe, params = HeadClassifier(), HeadClassifierParameters()
    config = SimpleNamespace(n_embd=32, n_head=4, num_hidden_layers=3)
    info = lambda adapter: SimpleNamespace(num_layers=3, adapter=adapter, config=config)  # noqa: E731
    [problem] = probe.check(params, info(BlockListAdapter("h")))
    assert "names no attn.v or attn.o weights" in problem.message
    [problem] = probe.check(params, info(NoMLP()))
    assert problem.location == "through_first_mlp" and "set through_first_mlp = false" in problem.message
    assert probe.check(params.model_copy(update={"through_first_mlp": False}), info(NoMLP())) == []
    assert probe.check(params, info(GPT2Adapter())) == []


def test_command_line_prints_unscored_relations_as_warning_lines(model_dirs, tmp_path):
    import os
    import subprocess
    import sys

    config = tmp_path / "heads.toml"
    config.write_text(f'[[models]]\nname = "tiny"\npath = "{model_dirs["gpt2"]}"\n\n'
                      '[[probes]]\nuse = "head_classifier"\nrelations = ["country_to_capital"]\n')
    done = subprocess.run([sys.executable, "-m", "probescope.cli", "run", str(config)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "warning: model 'tiny': relation 'country_to_capital' kept " in done.stderr
    assert "RelationCoverageWarning" not in done.stderr and "runner.py" not in done.stderr


# -- heads that do not separate the target from the rest of the vocabulary ----------------------------


def degenerate_heads(family, tokenizer):
    """A random model of ``family`` with two degenerate heads: (1, 1) has ``W_O = 0`` (a
    pruned head), (2, 2) writes only along a direction in which every token's unembedding
    is the same, so its logits are equal for every token (and not zero)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                           n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
        unembedding = model.lm_head.weight  # tied to wte

        def set_W_O(layer, head, W_O):  # Conv1D: (in, out)
            model.transformer.h[layer].attn.c_proj.weight[head * HEAD_DIM:(head + 1) * HEAD_DIM, :] = W_O
    else:  # grouped-query: 4 query heads on 2 key/value heads
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=32,
            bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
        unembedding = model.lm_head.weight

        def set_W_O(layer, head, W_O):  # nn.Linear: (out, in)
            model.model.layers[layer].self_attn.o_proj.weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = W_O.t()
    with torch.no_grad():
        unembedding[:, 0] = 0.5  # every token agrees along dimension 0
        set_W_O(1, 1, torch.zeros(HEAD_DIM, WIDTH))
        constant = torch.zeros(HEAD_DIM, WIDTH)
        constant[:, 0] = torch.randn(HEAD_DIM)  # output (x W_V . c) e_0: the same logit for every token
        set_W_O(2, 2, constant)
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_zero_and_constant_heads_do_not_score(family, precision, words, tmp_path):
    model = degenerate_heads(family, words)
    ds = classify(model, words, tmp_path, precision=precision, threshold=0.01)
    for layer, head in ((1, 1), (2, 2)):
        for score in ("relation_score", "suppression_score"):
            values = ds[score].sel(layer=layer, head=head).values
            np.testing.assert_array_equal(values, 0.0, err_msg=f"{score} of degenerate head ({layer}, {head})")
        assert ds.category.sel(layer=layer, head=head) == 0
        assert not ds.in_category.sel(layer=layer, head=head).any()
    # the direct definition agrees: no other token may tie with the target
    from probescope.architectures.layout import ModelLayout
    from probescope.models import find_adapter
    from probescope.plugins.manager import load_registry

    adapter = find_adapter(model.config, load_registry())
    layout = ModelLayout(model, adapter, adapter.blocks(model))
    ids = words.convert_tokens_to_ids
    relations = [(torch.tensor([ids(s) for s, _ in p]), torch.tensor([ids(t) for _, t in p]), 10)
                 for _, _, p in RELATIONS]
    want = reference_scores(layout, relations)
    got = relation_scores(layout, PairSet.of(relations), dtype=torch.float64)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert (want[0][[1, 2], [1, 2]] == 0).all() and (want[1][[1, 2], [1, 2]] == 0).all()


# -- classifying again from stored scores ---------------------------------------------------------


@pytest.mark.parametrize("threshold, classify_by", [(1.0, "relation"), (0.15, "suppression"), (0.5, "either"),
                                                    (0.01, "relation")])
def test_reclassify_equals_running_again_with_the_new_parameters(planted_gpt2, words, tmp_path, threshold,
                                                                 classify_by):
    from probescope.probes.head_classifier import reclassify

    first = classify(planted_gpt2, words, tmp_path)
    again = classify(planted_gpt2, words, tmp_path, threshold=threshold, classify_by=classify_by)
    redone = reclassify(first, threshold, classify_by)
    for name in ("category", "in_category", "n_categories"):
        xr_equal = redone[name].equals(again[name]) and redone[name].dtype == again[name].dtype
        assert xr_equal, name
    assert redone.category.attrs["flag_meanings"] == again.category.attrs["flag_meanings"]
    np.testing.assert_array_equal(redone.category.attrs["flag_values"], again.category.attrs["flag_values"])
    assert (redone.attrs["threshold"], redone.attrs["classify_by"]) == (threshold, classify_by)
    assert (first.attrs["threshold"], first.attrs["classify_by"]) == (0.15, "relation")  # the input is unchanged
    if threshold == 0.01:  # a low threshold must change something, or this test shows nothing
        assert (redone.category.values != first.category.values).any()


def test_reclassify_keeps_combining_padding_and_checks_its_arguments(planted_gpt2, planted_llama, words, tmp_path):
    from probescope.probes.head_classifier import reclassify
    from probescope.results import combine

    small = classify(planted_gpt2, words, tmp_path, layers=[0, 1])
    large = classify(planted_llama, words, tmp_path, layers=[0, 1])
    large.attrs["parameters"] = small.attrs["parameters"] = "{}"
    large = large.isel(layer=[0, 1])
    small = small.isel(head=[0, 1, 2])  # a model with fewer heads
    both = combine({"small": small, "large": large})
    redone = reclassify(both, 0.01)
    assert np.isnan(redone.category.sel(model="small", head=3).values).all()  # padding stays padding
    assert not np.isnan(redone.category.sel(model="large").values).any()
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        reclassify(small, 0.0)
    with pytest.raises(ValueError, match="classify_by must be"):
        reclassify(small, classify_by="both")


# -- the scoring's working set -----------------------------------------------------------------------


def peak_allocated_bytes(step) -> tuple[int, object]:
    """The most bytes torch's CPU allocator held at once during ``step()`` beyond what it
    held before (from the profiler's allocation records), and what ``step`` returned."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, out


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("precision", [torch.float32, torch.float64])
def test_scoring_allocates_at_most_its_budget_and_scores_the_same(precision, kv_heads):
    """Everything relation_scores allocates (sources through block 0's MLP, W_U's
    conversions, per-head values, logits) stays within budget_bytes on a model in memory
    (whose weights it does not allocate), with and without grouped-query heads, and the
    scores do not depend on the budget."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from probescope.architectures.layout import ModelLayout
    from probescope.models import find_adapter
    from probescope.plugins.manager import load_registry

    torch.manual_seed(0)
    vocabulary = 2100
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocabulary, hidden_size=32, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                                         tie_word_embeddings=False)).eval()
    adapter = find_adapter(model.config, load_registry())
    layout = ModelLayout(model, adapter, adapter.blocks(model))
    g = torch.Generator().manual_seed(1)
    relations = [(torch.randint(0, vocabulary, (100,), generator=g), torch.randint(0, vocabulary, (100,), generator=g), k)
                 for k in (10, 25)]
    relations.append((relations[0][0][:60], relations[0][0][:60], 1))  # copying, sources shared
    pairs = PairSet.of(relations)
    budget = 1 << 18
    # what the old scoring converted at once: all of W_U in the arithmetic's dtype
    assert 32 * vocabulary * precision.itemsize >= budget
    peak, got = peak_allocated_bytes(lambda: relation_scores(layout, pairs, dtype=precision, budget_bytes=budget,
                                                             first_chunk=8))  # chunks as narrow as the budget wants
    assert budget // 4 < peak <= budget  # within the budget, and using it
    want = relation_scores(layout, pairs, dtype=precision)  # the default budget, 256 MB: one chunk of heads
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert np.nanmax(want[1]) > 0
