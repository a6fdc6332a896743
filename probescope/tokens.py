"""How a token reads to a person: tokenizers' markers and raw bytes made readable.

Tokenizers write tokens in their own alphabets: GPT-2 and Llama-3 map every byte to a
printable character (``Ġ`` is a space, ``Ċ`` a newline), SentencePiece writes a space as
``▁`` and a byte it has no piece for as ``<0xE2>``. A token that is only part of a UTF-8
character has no text of its own. These helpers give labels for datasets and figures.
"""

from __future__ import annotations

import re

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (``Ġ`` -> 0x20)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


BYTE_LEVEL = _byte_level_alphabet()


def clean_token(text: str, vocabulary_entry: bool = False) -> str:
    """A token's text without tokenizers' markers: SentencePiece's ``▁`` becomes a space;
    a raw byte-level entry is decoded from its bytes; a byte token (``<0xE2>``) and the
    bytes of an incomplete UTF-8 character become escapes (``\\xe2``).

    :param vocabulary_entry: ``text`` is known to be a vocabulary entry (the tokenizer's
        own spelling), so any text in the byte-level alphabet is decoded as bytes;
        otherwise only text with a remapped byte (``Ġ``, ``Ċ``, ``Ł``...) is.
    """
    byte = _BYTE_TOKEN.match(text)
    if byte:
        return f"\\x{byte.group(1).lower()}"
    if "▁" in text:
        return text.replace("▁", " ")
    remapped = vocabulary_entry or any(ord(ch) >= 256 for ch in text)
    if text and remapped and all(ch in BYTE_LEVEL for ch in text):
        return bytes(BYTE_LEVEL[ch] for ch in text).decode("utf-8", errors="backslashreplace")
    return text
