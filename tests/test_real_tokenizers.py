"""Real tokenizers (GPT-2, Llama-2 SentencePiece, Llama-3), built offline from committed
fixtures, checked against llama.cpp's reference tokenizations; then what depends on
tokenization: which relation pairs are single tokens, the token coordinates of
token_similarity, and the token labels the renderers draw."""

from __future__ import annotations

import numpy as np
import pytest
import regex

import real_tokenizers as rt
from probescope.inputs import token_label
from probescope.probes.head_classifier.relations import builtin_relations, tokenize_relation

TOKENIZERS = {"gpt-2": rt.gpt2, "llama-spm": rt.llama2, "llama-bpe": rt.llama3}
#: GPT-2's pre-tokenizer pattern (tiktoken's r50k_base).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.mark.parametrize("name", TOKENIZERS)
def test_matches_llama_cpp_reference_tokenizations(name):
    tokenizer = TOKENIZERS[name]()
    cases = rt.references(name)
    assert len(cases) == 46
    wrong = [(text, ids, tokenizer.encode(text, add_special_tokens=False)) for text, ids in cases
             if tokenizer.encode(text, add_special_tokens=False) != ids]
    assert not wrong, wrong[:3]


def test_gpt2_from_whisper_ranks():
    tokenizer = rt.gpt2()
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer.encode(" Paris") == [6342]
    assert tokenizer.encode("Hello world") == [15496, 995]


def test_replayed_merges_rebuild_the_ranks():
    """Merging by the replayed merges, in order, makes every multi-byte token exactly at its rank."""
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    # "abc" could be ab+c or a+bc; BPE over the bytes merges "ab" (rank 3) before "bc" (4).
    assert rt.replay_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]
    with pytest.raises(ValueError, match="not one merge"):
        rt.replay_merges({b"a": 0, b"b": 1, b"ab": 3, b"aab": 2})


def _bpe(ranks: dict[bytes, int], piece: bytes) -> list[bytes]:
    """Plain BPE over bytes by ranks (tiktoken's definition), for counting independently."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
        pairs = [p for p in pairs if p[0] is not None]
        if not pairs:
            break
        _, i = min(pairs)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _single_token_ids(name: str):
    """``word -> id or None``: the one token a word is after a space, worked out without
    the tokenizer under test (its vocabulary and rules only)."""
    if name == "gpt-2":
        ranks = rt.gpt2_ranks()

        def one(word):
            pieces = regex.findall(GPT2_PATTERN, " " + word)
            if len(pieces) != 1:
                return None
            parts = _bpe(ranks, pieces[0].encode("utf-8"))
            return ranks[parts[0]] if len(parts) == 1 else None
        return one
    data = rt._vocab_file(name)
    vocab = {t: i for i, (t, kind) in enumerate(zip(data["tokens"], data["token_type"])) if kind == 1}
    if name == "llama-spm":
        return lambda word: vocab.get("▁" + word.replace(" ", "▁"))
    alphabet = rt.byte_level_alphabet()

    def one_llama3(word):
        pieces = regex.findall(rt.LLAMA3_PATTERN, " " + word)
        if len(pieces) != 1:
            return None
        return vocab.get("".join(alphabet[b] for b in pieces[0].encode("utf-8")))  # ignore_merges: whole piece
    return one_llama3


@pytest.mark.parametrize("name", TOKENIZERS)
def test_single_token_relation_pairs_counted_independently(name):
    tokenizer = TOKENIZERS[name]()
    one = _single_token_ids(name)
    cache: dict = {}
    counts = {}
    for relation in builtin_relations():
        expected = {(one(s), one(t)) for s, t in relation.pairs}
        expected = {p for p in expected if None not in p}
        pairs = tokenize_relation(tokenizer, relation, cache)
        got = set(zip(pairs.source.tolist(), pairs.target.tolist()))
        assert got == expected, (relation.name, sorted(got ^ expected)[:5])
        counts[relation.name] = len(got)
    # the coverage differs between tokenizers the way their vocabularies do
    assert counts["copying"] > 100 and counts["country_to_capital"] > 0
    if name == "llama-bpe":
        assert counts["year_to_next_year"] == 0  # Llama-3 splits numbers into 3-digit groups
    if name == "gpt-2":
        assert counts["year_to_next_year"] > 100  # GPT-2 has " 1999" as one token


PROMPT = "The llama 🦙 ate\tParis' hay."


@pytest.mark.parametrize("name", ["gpt-2", "llama-spm"])
def test_token_similarity_coordinates_and_labels_with_a_real_tokenizer(name, tmp_path):
    """token_similarity's token coordinates are the tokenizer's ids and readable labels;
    the grid's tick labels carry no Ġ, ▁ or <0x..> markers."""
    import probescope
    from probescope import demo
    from probescope.renderers.similarity_grid import SimilarityGridRenderer

    tokenizer = TOKENIZERS[name]()
    model = demo.build_llama(tokenizer, layers=1, width=16, heads=2, kv_heads=1, max_positions=64, seed=0)
    config = {"inputs": {"prompts": [PROMPT]},
              "probes": [{"use": "token_similarity", "layers": ["embed", 0]}],
              "output": {"dir": str(tmp_path)}}
    ds = probescope.run(config, models={"m": (model, tokenizer)}, write=False)["m"]["token_similarity"]

    ids = tokenizer(PROMPT)["input_ids"]
    n = len(ids)
    assert int(ds["n_tokens"][0]) == n
    assert ds["token_id"].values[0, :n].tolist() == ids
    texts = [str(t) for t in ds["token_text"].values[0, :n]]
    # Every label is the decoded token; a part of a UTF-8 character is its bytes escaped
    # (after a space, for GPT-2's "Ġ" + bytes); SentencePiece's lone "▁" is a space.
    for token_id, text in zip(ids, texts):
        decoded = tokenizer.decode([token_id])
        if "\ufffd" in decoded or decoded == "":
            assert text and regex.fullmatch(r" ?(\\x[0-9a-f]{2})*", text), text
        else:
            assert text == decoded
    escaped = "".join(regex.findall(r"\\x[0-9a-f]{2}", "".join(texts)))
    assert "".join(f"\\x{b:02x}" for b in "🦙".encode("utf-8")) in escaped  # the llama emoji's bytes
    rest = regex.sub(r"\\x[0-9a-f]{2}", "", "".join(texts))
    assert rest.replace(" ", "").replace("\t", "") == PROMPT.replace(" ", "").replace("\t", "").replace("🦙", "")

    figure = SimilarityGridRenderer().render([ds], {"layers": [0], "show_prompt": False})
    shown = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert len(shown) == n
    assert not any(mark in label for label in shown for mark in ("Ġ", "▁", "<0x"))
    assert "hay" in shown and ("\\t" in "".join(shown) or "\\x09" in shown)
