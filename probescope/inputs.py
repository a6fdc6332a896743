"""Turning prompt strings into padded token batches, keeping each token's label.

Batches are padded on the right. In a causal model a token never attends to later
positions, so right padding leaves every real token's hidden states exactly as they are
in an unpadded run, and absolute positions (GPT-2) stay right. The attention mask marks
padding, and probes use it to keep padding out of every result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from probescope.errors import InputError
from probescope.tokens import clean_token


@dataclass(frozen=True)
class Prompt:
    """One input text as one model's tokenizer splits it."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]  # human-readable label of each token

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class Batch:
    """Prompts padded to one length, ready for a forward pass."""

    prompts: list[Prompt]
    input_ids: torch.Tensor  # (batch, token), long
    attention_mask: torch.Tensor  # (batch, token), long, 1 for real tokens

    @property
    def mask(self) -> torch.Tensor:
        """``(batch, token)`` bool, True for real tokens."""
        return self.attention_mask.bool()

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real tokens in each prompt, ``(batch,)``."""
        return self.attention_mask.sum(dim=1)


def token_label(tokenizer: Any, token_id: int) -> str:
    """How a token reads to a person: its decoded text, else its vocabulary entry with
    the tokenizer's markers cleaned (a byte token or part of a UTF-8 character as
    ``\\xe2`` escapes, see :func:`probescope.tokens.clean_token`)."""
    text = tokenizer.decode([token_id])
    if text == "" or "\ufffd" in text:
        text = clean_token(str(tokenizer.convert_ids_to_tokens(token_id)))
    return str(text)


def tokenize(tokenizer: Any, texts: Sequence[str], *, model_name: str = "model") -> list[Prompt]:
    """Tokenize each text on its own (special tokens as the tokenizer adds them).

    Lengths are not checked here: the runner checks every prompt against each model's
    longest input and reports all that are too long at once.

    :raises InputError: a text has no tokens at all.
    """
    prompts = []
    for index, text in enumerate(texts):
        ids = tuple(int(i) for i in tokenizer(text)["input_ids"])
        if not ids:
            raise InputError(f"model {model_name!r}: prompt {index} ({text!r}) has no tokens")
        prompts.append(Prompt(index, text, ids, tuple(token_label(tokenizer, i) for i in ids)))
    return prompts


def batches(
    prompts: Sequence[Prompt], batch_size: int, *, pad_id: int = 0, device: Any = "cpu"
) -> list[Batch]:
    """Group prompts in order into right-padded batches of at most ``batch_size``."""
    out = []
    for start in range(0, len(prompts), batch_size):
        group = list(prompts[start : start + batch_size])
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, prompt in enumerate(group):
            ids[row, : len(prompt)] = torch.tensor(prompt.token_ids)
            mask[row, : len(prompt)] = 1
        out.append(Batch(group, ids.to(device), mask.to(device)))
    return out


def pad_id_of(tokenizer: Any) -> int:
    """An id to fill padding with. Its value never matters: padding is masked out."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
