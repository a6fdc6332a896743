"""Real tokenizers, built offline from the committed fixtures in ``tests/fixtures/tokenizers``.

- GPT-2 (byte-level BPE) from the r50k ranks that whisper ships: the merges are
  recovered by replaying BPE over the ranks, as tiktoken defines them.
- Llama-3 (byte-level BPE with its own pre-tokenizer regex) from the vocabulary and
  merges of llama.cpp's ``ggml-vocab-llama-bpe.gguf``.
- Llama-2 (SentencePiece BPE with byte fallback) from the pieces and scores of
  llama.cpp's ``ggml-vocab-llama-spm.gguf``: merges follow the scores, as transformers'
  SentencePiece converter derives them.

llama.cpp's reference tokenizations (``*.inp`` / ``*.out``) check them.
"""

from __future__ import annotations

import base64
import functools
import json
import lzma
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"

#: Llama-3's pre-tokenizer pattern (its tokenizer.json; llama.cpp's "llama-bpe").
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (``Ġ`` for a space): probescope's
    own table inverted; the tokenizers built with it are checked against llama.cpp's
    reference tokenizations, which a wrong table fails."""
    from probescope.tokens import BYTE_LEVEL

    return {byte: char for char, byte in BYTE_LEVEL.items()}


def replay_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges implied by token ranks: merging a token's bytes with every merge of
    lower rank must leave exactly two parts, and joining those is the token's merge."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
        if len(splits) > 1:  # only replaying BPE over the bytes tells which split it is
            splits = [_replay(token, rank, ranks)]
        if len(splits) != 1:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of lower-ranked tokens")
        merges.append(splits[0])
    return merges


def _replay(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """BPE over ``token``'s bytes with the merges ranked below ``rank``: the two parts
    left, or None when it does not end in two."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best, best_rank = i, r
        if best is None:
            return None
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _fast(tokenizer, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


@functools.lru_cache(maxsize=None)
def gpt2_ranks() -> dict[bytes, int]:
    text = lzma.decompress((FIXTURES / "gpt2.tiktoken.xz").read_bytes()).decode("ascii")
    ranks = {}
    for line in text.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def gpt2():
    """GPT-2's tokenizer (r50k_base) from whisper's ranks, ``<|endoftext|>`` = 50256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ranks = gpt2_ranks()
    alphabet = byte_level_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = len(ranks)
    merges = [(text(a), text(b)) for a, b in replay_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return _fast(tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def _vocab_file(name: str) -> dict:
    return json.loads(lzma.decompress((FIXTURES / f"{name}.json.xz").read_bytes()).decode("utf-8"))


@functools.lru_cache(maxsize=None)
def llama3():
    """Llama-3's tokenizer (128,256 tokens) from llama.cpp's vocabulary file."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    data = _vocab_file("llama-bpe")
    vocab = {token: i for i, token in enumerate(data["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in data["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(data["tokens"], data["token_type"]) if kind == 3]  # llama.cpp: 3 = control
    tok.add_special_tokens(control)
    bos, eos = data["tokens"][data["bos_token_id"]], data["tokens"][data["eos_token_id"]]
    return _fast(tok, bos_token=bos, eos_token=eos)


@functools.lru_cache(maxsize=None)
def llama2():
    """Llama-2's SentencePiece tokenizer (32,000 pieces, byte fallback) from llama.cpp's
    vocabulary file; like SentencePiece it puts ``▁`` before the text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    data = _vocab_file("llama-spm")
    pieces, scores, kinds = data["tokens"], data["scores"], data["token_type"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte. Merges come from the
    # normal pieces: every split of a piece into two pieces, by the piece's score.
    merges = []
    for piece, score, kind in zip(pieces, scores, kinds):
        if kind != 1:
            continue
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((left, right, score) for left, right in local)
    merges.sort(key=lambda m: -m[2])
    unk = pieces[data["unknown_token_id"]]
    tok = Tokenizer(models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True)
                            for i, kind in enumerate(kinds) if kind in (2, 3)])
    return _fast(tok, bos_token=pieces[data["bos_token_id"]], eos_token=pieces[data["eos_token_id"]],
                 unk_token=unk)


def references(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference tokenizations: ``(text, token ids)`` without special tokens."""
    marker = "\n__ggml_vocab_test__\n"  # ends every test text
    texts = (FIXTURES / f"{name}.inp").read_text(encoding="utf-8").split(marker)
    if texts[-1] != "":
        raise ValueError(f"{name}.inp does not end with the test marker")
    outs = (FIXTURES / f"{name}.out").read_text(encoding="utf-8").split("\n")[:-1]  # one line per test
    texts = texts[:-1]
    if len(texts) != len(outs):
        raise ValueError(f"{name}: {len(texts)} texts but {len(outs)} tokenizations")
    return [(text, [int(i) for i in out.split()]) for text, out in zip(texts, outs)]
