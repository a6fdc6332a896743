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
