"""Relations for the head classifier: named lists of (source, target) word pairs.

A relation is what a head might implement, as a map between tokens: a country to its
capital, a verb to its past tense, a word to itself. The head classifier (MAPS, Elhelo &
Geva 2025) scores how often a head's value-output circuit sends each source token to its
target. probescope ships twenty relations in four categories (``relation_data/``); users
add their own from CSV or JSON files with categories of their own.

File formats (a user's and the shipped ones alike):

- JSON: one relation, or a list of them, each an object with ``name``, ``category``,
  ``pairs`` (a list of ``[source, target]`` or ``{"source": ..., "target": ...}``) and
  optionally ``description`` and ``copying`` (true for copying relations, which MAPS
  scores with a smaller k).
- CSV: a header naming the columns ``relation``, ``category``, ``source`` and
  ``target`` (optionally ``description``), then one pair per row; rows with the same
  ``relation`` form one relation.

Models see tokens, not words: :func:`tokenize_relation` keeps a pair only when source
and target are each one token of the model's tokenizer as they appear mid-sentence
(after a space), and says how many pairs it kept.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from probescope import ProbescopeError, lazy_import

torch = lazy_import("torch")


#: The categories of the shipped relations, in the order datasets and figures list them.
BUILTIN_CATEGORIES = ("algorithmic", "knowledge", "linguistic", "translation")

CSV_COLUMNS = ("relation", "category", "source", "target")
CSV_OPTIONAL = ("description", "copying")
JSON_KEYS = ("name", "category", "pairs")
JSON_OPTIONAL = ("description", "copying")

_CATEGORY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_RESERVED = re.compile(r"^(unclassified|\d+_categories)$")


class RelationFileError(ProbescopeError):
    """A relation file cannot be used: the message names the file and what is wrong."""


@dataclass(frozen=True)
class Relation:
    """A named list of word pairs a head may map from source to target.

    :param origin: where it was read from (a file path, or ``built-in``).
    """

    name: str
    category: str
    description: str
    pairs: tuple[tuple[str, str], ...]
    copying: bool = False
    origin: str = "built-in"


# -- reading --------------------------------------------------------------------------------


def _check_category(category: str, where: str) -> str:
    if not _CATEGORY.match(category):
        raise RelationFileError(
            f"{where}: category {category!r} must be one word of letters, digits, '_' or '-' "
            "(it names a flag in the dataset), starting with a letter")
    if _RESERVED.match(category.lower()):
        raise RelationFileError(f"{where}: category {category!r} is reserved for heads in no or several categories")
    return category.lower()


def _word(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RelationFileError(f"{where}: expected a non-empty string, found {value!r}")
    return value.strip()


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "false", "0", "no"):
        return False
    if text in ("true", "1", "yes"):
        return True
    raise RelationFileError(f"{where}: copying must be true or false, found {value!r}")


def _relation(name: Any, category: Any, description: Any, pairs: list, copying: Any, where: str,
              origin: str) -> Relation:
    name = _word(name, f"{where}: name")
    category = _check_category(_word(category, f"{where}: category"), f"{where} ({name!r})")
    if not pairs:
        raise RelationFileError(f"{where}: relation {name!r} has no pairs")
    return Relation(name, category, "" if description is None else str(description).strip(), tuple(pairs),
                    _flag(copying if copying is not None else False, f"{where} ({name!r})"), origin)


def _json_pair(item: Any, where: str) -> tuple[str, str]:
    if isinstance(item, dict):
        missing = [k for k in ("source", "target") if k not in item]
        if missing:
            raise RelationFileError(f"{where}: a pair object needs 'source' and 'target', missing {', '.join(missing)}")
        return _word(item["source"], f"{where}.source"), _word(item["target"], f"{where}.target")
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return _word(item[0], f"{where}[0]"), _word(item[1], f"{where}[1]")
    raise RelationFileError(f"{where}: expected [source, target] or {{\"source\": ..., \"target\": ...}}, found {item!r}")


def _read_json(path: Path, text: str, origin: str) -> list[Relation]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RelationFileError(f"{path}: not valid JSON: {exc}") from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise RelationFileError(f"{path}: is empty; expected a relation object or a list of them")
    relations = []
    for i, item in enumerate(items):
        where = f"{path}: relation {i}" if isinstance(data, list) else str(path)
        if not isinstance(item, dict):
            raise RelationFileError(f"{where}: expected an object with {', '.join(JSON_KEYS)}, found {type(item).__name__}")
        missing = [k for k in JSON_KEYS if k not in item]
        if missing:
            raise RelationFileError(f"{where}: missing key(s) {', '.join(missing)}; a relation needs "
                                    f"{', '.join(JSON_KEYS)} (optional: {', '.join(JSON_OPTIONAL)})")
        unknown = sorted(set(item) - set(JSON_KEYS) - set(JSON_OPTIONAL))
        if unknown:
            raise RelationFileError(f"{where}: unknown key(s) {', '.join(unknown)}; expected "
                                    f"{', '.join(JSON_KEYS + JSON_OPTIONAL)}")
        if not isinstance(item["pairs"], list):
            raise RelationFileError(f"{where}: pairs must be a list of [source, target]")
        pairs = [_json_pair(p, f"{where}: pairs[{j}]") for j, p in enumerate(item["pairs"])]
        relations.append(_relation(item["name"], item["category"], item.get("description"), pairs,
                                   item.get("copying"), where, origin))
    return relations


def _read_csv(path: Path, text: str, origin: str) -> list[Relation]:
    rows = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (rows.fieldnames or []) if h is not None]
    if not header:
        raise RelationFileError(f"{path}: is empty; expected a header naming {', '.join(CSV_COLUMNS)}")
    rows.fieldnames = header
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise RelationFileError(f"{path}: missing column(s) {', '.join(missing)}; the header must name "
                                f"{', '.join(CSV_COLUMNS)} (optional: {', '.join(CSV_OPTIONAL)}), found {', '.join(header)}")
    grouped: dict[str, dict[str, Any]] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path}: line {line}"
        if None in row:
            raise RelationFileError(f"{where}: more fields than the header's {len(header)}")
        name = _word(row["relation"], f"{where}: relation")
        category = _word(row["category"], f"{where}: category")
        group = grouped.setdefault(name, {"category": category, "description": row.get("description"),
                                          "copying": row.get("copying"), "pairs": [], "line": line})
        if category != group["category"]:
            raise RelationFileError(f"{where}: relation {name!r} has category {category!r} here but "
                                    f"{group['category']!r} on line {group['line']}; one relation has one category")
        group["pairs"].append((_word(row["source"], f"{where}: source"), _word(row["target"], f"{where}: target")))
    if not grouped:
        raise RelationFileError(f"{path}: has a header but no pairs")
    return [_relation(name, g["category"], g["description"], g["pairs"], g["copying"], f"{path}: line {g['line']}",
                      origin) for name, g in grouped.items()]


def read_relation_file(path: str | Path) -> list[Relation]:
    """The relations in one CSV or JSON file.

    A file is parsed once while it is unchanged: the config check, the check of the
    relation names across files and each model's run all ask for it.

    :raises RelationFileError: the file is missing, unreadable, empty, lacks a column or
        key, holds a relation without pairs, or names one relation twice.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise RelationFileError(f"{path}: relation files must end in .csv or .json")
    if not path.is_file():
        raise RelationFileError(f"{path}: no such file")
    stat = path.stat()
    return list(_parse_file(str(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=64)
def _parse_file(name: str, mtime_ns: int, size: int) -> tuple[Relation, ...]:
    """The relations of file ``name`` as it is at (``mtime_ns``, ``size``); errors are not cached."""
    path = Path(name)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise RelationFileError(f"{path}: cannot be read as UTF-8 text: {exc}") from None
    if not text.strip():
        raise RelationFileError(f"{path}: is empty")
    relations = (_read_json if suffix == ".json" else _read_csv)(path, text, str(path))
    _no_duplicates(relations)
    return tuple(relations)


def _no_duplicates(relations: Iterable[Relation]) -> None:
    seen: dict[str, Relation] = {}
    for relation in relations:
        if relation.name in seen:
            first = seen[relation.name]
            where = first.origin if first.origin == relation.origin else f"{first.origin} and {relation.origin}"
            raise RelationFileError(f"relation name {relation.name!r} is used twice ({where}); "
                                    "every relation needs its own name")
        seen[relation.name] = relation


@functools.lru_cache(maxsize=1)
def builtin_relations() -> tuple[Relation, ...]:
    """The shipped relations, in category order then by name."""
    folder = resources.files("probescope.probes.head_classifier") / "relation_data"
    relations = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            relations += _read_json(Path(entry.name), entry.read_text(encoding="utf-8"), "built-in")
    _no_duplicates(relations)
    order = {c: i for i, c in enumerate(BUILTIN_CATEGORIES)}
    return tuple(sorted(relations, key=lambda r: (order.get(r.category, len(order)), r.name)))


def gather_relations(files: Sequence[str | Path] = (), *, builtin: bool = True,
                     names: Sequence[str] | None = None) -> list[Relation]:
    """The shipped relations (unless ``builtin`` is False) followed by those of ``files``,
    keeping only ``names`` when given (in the order given).

    :raises RelationFileError: a bad file, a name used twice, or an unknown name.
    """
    relations = list(builtin_relations()) if builtin else []
    for path in files:
        relations += read_relation_file(path)
    _no_duplicates(relations)
    if names is None:
        return relations
    by_name = {r.name: r for r in relations}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise RelationFileError(f"unknown relation(s) {', '.join(map(repr, unknown))}; available: "
                                f"{', '.join(by_name) or 'none'}")
    return [by_name[n] for n in names]


def categories_of(relations: Iterable[Relation]) -> list[str]:
    """The categories of ``relations``: the built-in ones first in their fixed order (all
    four always, so flag values mean the same across runs), then users' in order of
    appearance."""
    extra = [c for c in dict.fromkeys(r.category for r in relations) if c not in BUILTIN_CATEGORIES]
    return list(BUILTIN_CATEGORIES) + extra


# -- tokenizing -----------------------------------------------------------------------------

_PREFIX = "a"  # a neutral word before the space, so every tokenizer shows its mid-sentence form


def word_token(tokenizer: Any, word: str) -> int | None:
    """The one token ``word`` becomes after a space in running text (GPT-2's ``Ġword``,
    SentencePiece's ``▁word``), or None when it takes several tokens, is unknown, or does
    not decode back to ``word``."""
    base = tokenizer.encode(_PREFIX, add_special_tokens=False)
    ids = tokenizer.encode(f"{_PREFIX} {word}", add_special_tokens=False)
    if len(ids) != len(base) + 1 or list(ids[: len(base)]) != list(base):
        return None
    token = int(ids[-1])
    if tokenizer.decode([token]).strip() != word:  # an unknown-word token, or a normalised form
        return None
    return token


@dataclass(frozen=True)
class TokenPairs:
    """A relation's pairs that one model's tokenizer keeps, as token ids.

    :param source, target: ``(kept,)`` long tensors.
    :param total: pairs in the relation; ``kept`` of them survived (distinct id pairs).
    """

    relation: Relation
    source: torch.Tensor
    target: torch.Tensor
    total: int

    @property
    def kept(self) -> int:
        return int(self.source.numel())


def tokenize_relation(tokenizer: Any, relation: Relation, cache: dict[str, int | None] | None = None, *,
                      vocabulary: int | None = None) -> TokenPairs:
    """Keep the pairs whose source and target are each one token (see :func:`word_token`)
    below ``vocabulary`` (the model's output size, which a tokenizer may exceed); pairs
    that become the same two tokens count once. ``cache`` maps words to tokens across
    relations."""
    cache = {} if cache is None else cache

    def token(word: str) -> int | None:
        if word not in cache:
            cache[word] = word_token(tokenizer, word)
        found = cache[word]
        return None if found is None or (vocabulary is not None and found >= vocabulary) else found

    kept: dict[tuple[int, int], None] = {}
    for source, target in relation.pairs:
        s, t = token(source), token(target)
        if s is not None and t is not None:
            kept[(s, t)] = None
    ids = torch.tensor(list(kept), dtype=torch.long).reshape(-1, 2)
    return TokenPairs(relation, ids[:, 0].contiguous(), ids[:, 1].contiguous(), len(relation.pairs))
