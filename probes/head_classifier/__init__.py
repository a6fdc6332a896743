"""Head classifier: which operations each attention head implements, read off its
weights as in MAPS (Elhelo & Geva, "Inferring Functionality of Attention Heads from
their Parameters", ACL 2025).

For every relation (a list of source -> target word pairs: country -> capital, verb ->
past tense, word -> itself, ...) and every head (l, h), the **relation score** is the
fraction of pairs whose target token is among the top ``k`` tokens of
``x W_V^h W_O^h W_U``, ``x`` being the source token's embedding, passed through block 0's
MLP for heads after block 0 (``through_first_mlp``, on by default as in MAPS). The
**suppression score** is the same for the ``k`` lowest tokens. No forward pass: only
weights are read (:mod:`probescope.probes.head_classifier.relation_scores` says how it is
fast and exact). The plugin is self-contained: its scoring, its relation files' reader
(:mod:`~probescope.probes.head_classifier.relations`) and the shipped relations
(``relation_data/``) live in this folder.

A head **belongs to a category** (algorithmic, knowledge, linguistic, translation, or a
user's own) when any relation of that category scores at least ``threshold`` for it;
heads in several categories are counted as such.

Pairs are tokenised per model: a pair counts only when source and target are each one
token as they appear after a space. A relation that keeps fewer than ``min_pairs`` pairs
is not scored (NaN, and a warning names it) rather than scored on a handful.

Defaults follow the MAPS code: ``k`` = 10 (1 for copying relations), or 25 and 3 for
vocabularies of 100,000 tokens or more (MAPS used those for Llama-3.1's 128,256);
``min_pairs`` = 30; the first MLP applied. The default ``threshold`` of 0.15 is our
choice for the category map, recorded in each dataset's attributes; see
docs/configuration.md.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal, Optional, Sequence

from pydantic import AfterValidator, Field, PositiveInt, field_validator, model_validator

from probescope import (
    Block, ConfigPath, DatasetSchema, Parameters, Probe, ProbeRun, ProbescopeWarning, Problem, Variable, distinct,
    hookimpl, layer_problems, progress, resolve_layers, lazy_import,
)
from probescope.probes.head_classifier.relations import (
    Relation,
    RelationFileError,
    categories_of,
    gather_relations,
    read_relation_file,
    tokenize_relation,
)

np = lazy_import("numpy")
torch = lazy_import("torch")
xr = lazy_import("xarray")


#: Vocabularies at least this large get MAPS's Llama-3 defaults for k.
LARGE_VOCABULARY = 100_000
DEFAULT_THRESHOLD = 0.15
DEFAULT_MIN_PAIRS = 30


class RelationCoverageWarning(ProbescopeWarning):
    """A relation kept too few single-token pairs for a model and was not scored."""


def _readable(path: Any) -> Any:
    try:
        read_relation_file(path)
    except RelationFileError as exc:
        raise ValueError(str(exc)) from None
    return path


RelationFile = Annotated[ConfigPath, AfterValidator(_readable)]


class HeadClassifierParameters(Parameters):
    """Parameters of ``head_classifier``."""

    relations: Optional[list[str]] = Field(
        None, description="names of the relations to score, default all (shipped and from relation_files)")
    builtin_relations: bool = Field(True, description="include the twenty shipped relations")
    relation_files: list[RelationFile] = Field(
        default_factory=list, description="your own relations: CSV or JSON files, relative to the config file")
    k: Optional[PositiveInt] = Field(
        None, description="top-k for every relation but copying ones; default 10, or 25 for vocabularies >= 100,000 (MAPS)")
    k_copying: Optional[PositiveInt] = Field(
        None, description="top-k for copying relations; default 1, or 3 for vocabularies >= 100,000 (MAPS)")
    min_pairs: PositiveInt = Field(
        DEFAULT_MIN_PAIRS, description="relations keeping fewer single-token pairs are not scored (NaN, with a warning)")
    through_first_mlp: bool = Field(
        True, description="for heads after block 0, pass source embeddings through block 0's MLP (MAPS)")
    threshold: float = Field(
        DEFAULT_THRESHOLD, gt=0.0, le=1.0, description="a head is in a category when a relation of it scores at least this")
    classify_by: Literal["relation", "suppression", "either"] = Field(
        "relation", description="which score places heads in categories")
    layers: Optional[list[Block]] = Field(
        None, description='block indices (negative count from the end) or "last"; default every block')
    precision: Literal["float32", "float64"] = Field(
        "float32", description="arithmetic of the projections; float64 rules out near-ties flipping a rank")

    @field_validator("relations", "layers")
    @classmethod
    def _not_empty(cls, values: Optional[list]) -> Optional[list]:
        return distinct(values)

    @model_validator(mode="after")
    def _relations_exist(self) -> "HeadClassifierParameters":
        if not self.builtin_relations and not self.relation_files:
            raise ValueError("no relations: builtin_relations is false and relation_files is empty")
        try:
            self.chosen()
        except RelationFileError as exc:
            raise ValueError(str(exc)) from None
        return self

    def chosen(self) -> list[Relation]:
        """The relations to score, in dataset order."""
        return gather_relations(self.relation_files, builtin=self.builtin_relations, names=self.relations)

    def k_for(self, relation: Relation, vocabulary: int) -> int:
        large = vocabulary >= LARGE_VOCABULARY
        if relation.copying:
            return self.k_copying or (3 if large else 1)
        return self.k or (25 if large else 10)


SCHEMA = DatasetSchema(
    probe="head_classifier",
    dims={
        "layer": "blocks, from 0",
        "head": "query heads, from 0",
        "relation": "the relations scored",
        "category_name": "the categories, built-in first, then users' in order of appearance",
    },
    coords={
        "layer": Variable(("layer",), "int64", "block index"),
        "head": Variable(("head",), "int64", "query head index"),
        "relation": Variable(("relation",), "str", "relation name"),
        "relation_category": Variable(("relation",), "str", "the relation's category"),
        "relation_description": Variable(("relation",), "str", "what the relation maps"),
        "kept_pairs": Variable(("relation",), "int64", "pairs whose source and target are single tokens for this model"),
        "total_pairs": Variable(("relation",), "int64", "pairs in the relation"),
        "k": Variable(("relation",), "int64", "the top-k the scores use"),
        "category_name": Variable(("category_name",), "str", "category name"),
    },
    variables={
        "relation_score": Variable(("layer", "head", "relation"), "float64",
                                   "fraction of kept pairs with the target among the head's top k tokens; "
                                   "NaN where the relation was not scored"),
        "suppression_score": Variable(("layer", "head", "relation"), "float64",
                                      "the same for the head's k lowest tokens"),
        "category": Variable(("layer", "head"), "int8",
                             "0 unclassified, 1..C one category (category_name order), C + n - 1 for n >= 2 categories",
                             flags=True),
        "in_category": Variable(("layer", "head", "category_name"), "bool",
                                "the head implements some relation of the category"),
        "n_categories": Variable(("layer", "head"), "int64", "how many categories the head is in"),
    },
    attrs={
        "threshold": "a head is in a category when a relation of it scores at least this",
        "classify_by": "relation, suppression or either: the score that places heads in categories",
        "min_pairs": "relations keeping fewer pairs are not scored",
        "through_first_mlp": "0 or 1: source embeddings passed through block 0's MLP",
        "precision": "float32 or float64",
        "unscored_relations": "relations that kept fewer than min_pairs pairs, space-separated",
    },
)


class HeadClassifier(Probe):
    name = "head_classifier"
    version = "0.1.0"
    description = "MAPS: relation and suppression scores of every attention head, and its categories, from weights"
    Parameters = HeadClassifierParameters
    schema = SCHEMA

    def check(self, params: HeadClassifierParameters, model: Any) -> list[Problem]:
        problems = layer_problems(params.layers, model.num_layers)
        adapter = model.adapter
        missing = [c for c in ("attn.v", "attn.o") if c not in adapter.components(model.config)]
        if missing:
            problems.append(Problem("", f"architecture {adapter.name!r} names no {' or '.join(missing)} weights; "
                                        "the head classifier needs an adapter that does (see docs/architectures.md)"))
        elif params.through_first_mlp and not adapter.names_mlp():
            problems.append(Problem("through_first_mlp", f"architecture {adapter.name!r} does not name its MLP; "
                                                         "set through_first_mlp = false"))
        return problems

    def build(self, params: HeadClassifierParameters, run: ProbeRun) -> xr.Dataset:
        loaded = run.model
        layout = loaded.layout
        layers = sorted(resolve_layers(params.layers, loaded.info.num_layers))
        relations = params.chosen()
        vocabulary = int(layout.unembedding().weight.shape[0])  # the output layer's rows

        cache: dict[str, int | None] = {}
        tokenized = [tokenize_relation(loaded.tokenizer, r, cache, vocabulary=vocabulary) for r in relations]
        ks = [params.k_for(r, vocabulary) for r in relations]
        scored = [i for i, t in enumerate(tokenized) if t.kept >= params.min_pairs]
        skipped = [i for i in range(len(relations)) if i not in scored]
        for i in skipped:
            t = tokenized[i]
            warnings.warn(
                f"model {loaded.name!r}: relation {relations[i].name!r} kept {t.kept} of {t.total} pairs as single "
                f"tokens, fewer than min_pairs = {params.min_pairs}; it is not scored (NaN)",
                RelationCoverageWarning, stacklevel=2)

        H = layout.attention_shape.n_heads
        relation = np.full((len(layers), H, len(relations)), np.nan)
        suppression = np.full_like(relation, np.nan)
        if scored:
            # Imported here: the scoring module reads torch at import (its default dtypes),
            # and listing plugins must not pay for torch.
            from probescope.probes.head_classifier.relation_scores import PairSet, relation_scores

            pairs = PairSet.of([(tokenized[i].source, tokenized[i].target, ks[i]) for i in scored])
            rel, sup = relation_scores(
                layout, pairs, layers=layers, through_first_mlp=params.through_first_mlp,
                dtype=getattr(torch, params.precision),
                progress=lambda xs: progress(xs, desc=f"{loaded.name}: head classifier layers"))
            relation[..., scored] = rel
            suppression[..., scored] = sup

        categories = categories_of(relations)
        member = _membership(relation, suppression, relations, categories, params)
        return _dataset(layers, H, relations, tokenized, ks, categories, relation, suppression, member, params,
                        skipped)


def _membership(relation: np.ndarray, suppression: np.ndarray, relations: list[Relation], categories: list[str],
                params: HeadClassifierParameters) -> np.ndarray:
    """``(layer, head, category)`` bools: some relation of the category passes the threshold."""
    return membership(relation, suppression, [r.category for r in relations], categories, params.threshold,
                      params.classify_by)


def membership(relation: np.ndarray, suppression: np.ndarray, relation_categories: Sequence[str],
               categories: Sequence[str], threshold: float, classify_by: str) -> np.ndarray:
    """``(..., category)`` bools from ``(..., relation)`` scores: some relation of the
    category scores at least ``threshold`` (by relation score, suppression score, or
    either). NaN never passes."""
    by = {"relation": [relation], "suppression": [suppression], "either": [relation, suppression]}[classify_by]
    member = np.zeros(relation.shape[:-1] + (len(categories),), dtype=bool)
    with np.errstate(invalid="ignore"):
        for ci, category in enumerate(categories):
            columns = [i for i, c in enumerate(relation_categories) if c == category]
            for scores in by:
                member[..., ci] |= (scores[..., columns] >= threshold).any(-1)
    return member


def reclassify(ds: xr.Dataset, threshold: float | None = None, classify_by: str | None = None) -> xr.Dataset:
    """A ``head_classifier`` dataset with ``category``, ``in_category`` and
    ``n_categories`` rebuilt from its stored scores for another ``threshold`` or
    ``classify_by`` (each defaults to the dataset's own), without the model.

    The scores do not depend on the threshold, so this gives exactly what running the
    probe again with the new parameters would give. Heads without a category flag (NaN:
    padding from combining models of different size) stay without one. The new
    ``threshold`` and ``classify_by`` are recorded in ``attrs`` and in ``parameters``.

    :raises ValueError: a threshold outside (0, 1], an unknown ``classify_by``, or a
        dataset without the scores.
    """
    threshold = float(ds.attrs["threshold"] if threshold is None else threshold)
    classify_by = str(ds.attrs.get("classify_by", "relation") if classify_by is None else classify_by)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if classify_by not in ("relation", "suppression", "either"):
        raise ValueError(f"classify_by must be 'relation', 'suppression' or 'either', got {classify_by!r}")
    missing = [v for v in ("relation_score", "suppression_score", "category") if v not in ds.data_vars]
    if missing:
        raise ValueError(f"not a head_classifier dataset: no {', '.join(missing)} variable(s)")
    others = [d for d in ds.relation_score.dims if d != "relation"]
    relation = ds.relation_score.transpose(*others, "relation").values
    suppression = ds.suppression_score.transpose(*others, "relation").values
    categories = [str(c) for c in ds.category_name.values]
    member = membership(relation, suppression, [str(c) for c in ds.relation_category.values], categories,
                        threshold, classify_by)
    flags, count = category_flags(member)
    old = ds.category.transpose(*others).values
    unflagged = np.isnan(old) if np.issubdtype(old.dtype, np.floating) else np.zeros(old.shape, dtype=bool)
    if unflagged.any():  # keep the padding NaN, as combining left it
        flags = np.where(unflagged, np.nan, flags)
        count = np.where(unflagged, np.nan, count)
        member = np.where(unflagged[..., None], np.nan, member)
    out = ds.copy()
    out["category"] = xr.DataArray(flags, dims=others, attrs=ds.category.attrs).transpose(*ds.category.dims)
    out["in_category"] = xr.DataArray(member, dims=[*others, "category_name"],
                                      attrs=ds.in_category.attrs).transpose(*ds.in_category.dims)
    out["n_categories"] = xr.DataArray(count, dims=others, attrs=ds.n_categories.attrs).transpose(
        *ds.n_categories.dims)
    out.attrs.update(threshold=threshold, classify_by=classify_by)
    if "parameters" in ds.attrs:
        import json

        params = json.loads(ds.attrs["parameters"])
        params.update(threshold=threshold, classify_by=classify_by)
        out.attrs["parameters"] = json.dumps(params, separators=(",", ":"))
    return out


def category_flags(member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CF flags of ``(layer, head, category)`` membership: 0 unclassified, ``1..C`` one
    category (in order), ``C + n - 1`` for ``n >= 2`` categories. Returns the
    ``(layer, head)`` int8 flags and the number of categories per head."""
    C = member.shape[-1]
    count = member.sum(-1)
    single = np.argmax(member, axis=-1) + 1
    flags = np.where(count == 0, 0, np.where(count == 1, single, C + count - 1))
    return flags.astype(np.int8), count.astype(np.int64)


def flag_meanings(categories: list[str]) -> list[str]:
    return ["unclassified", *categories, *(f"{n}_categories" for n in range(2, len(categories) + 1))]


def _dataset(layers, H, relations, tokenized, ks, categories, relation, suppression, member, params, skipped):
    flags, count = category_flags(member)
    meanings = flag_meanings(categories)
    names = np.array([r.name for r in relations], dtype=object)
    score_attrs = {"description": "fraction of the relation's kept pairs whose target is among the head's top k "
                                  "tokens; NaN where the relation was not scored"}
    return xr.Dataset(
        {
            "relation_score": (("layer", "head", "relation"), relation,
                               {"long_name": "relation score", **score_attrs}),
            "suppression_score": (("layer", "head", "relation"), suppression,
                                  {"long_name": "suppression score",
                                   "description": "fraction of the relation's kept pairs whose target is among the "
                                                  "head's k lowest tokens; NaN where the relation was not scored"}),
            "category": (("layer", "head"), flags,
                         {"long_name": "head category", "flag_values": np.arange(len(meanings), dtype=np.int8),
                          "flag_meanings": " ".join(meanings)}),
            "in_category": (("layer", "head", "category_name"), member,
                            {"long_name": "whether the head implements a relation of the category"}),
            "n_categories": (("layer", "head"), count, {"long_name": "number of categories"}),
        },
        coords={
            "layer": ("layer", np.array(layers, dtype=np.int64), {"description": "block index (0-based)"}),
            "head": ("head", np.arange(H, dtype=np.int64), {"description": "query head index"}),
            "relation": ("relation", names),
            "relation_category": ("relation", np.array([r.category for r in relations], dtype=object)),
            "relation_description": ("relation", np.array([r.description for r in relations], dtype=object)),
            "kept_pairs": ("relation", np.array([t.kept for t in tokenized], dtype=np.int64),
                           {"description": "pairs whose source and target are single tokens for this model"}),
            "total_pairs": ("relation", np.array([t.total for t in tokenized], dtype=np.int64)),
            "k": ("relation", np.array(ks, dtype=np.int64), {"description": "top-k of the scores"}),
            "category_name": ("category_name", np.array(categories, dtype=object)),
        },
        attrs={
            "threshold": params.threshold,
            "classify_by": params.classify_by,
            "min_pairs": params.min_pairs,
            "through_first_mlp": int(params.through_first_mlp),
            "precision": params.precision,
            "unscored_relations": " ".join(relations[i].name for i in skipped),
        },
    )


@hookimpl
def register_probes(register):
    register(HeadClassifier())
