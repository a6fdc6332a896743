"""Token similarity: how alike the hidden states of every pair of tokens are, layer by layer.

Answers "do token representations become more alike with depth?" (the token similarity grid).
For each prompt and chosen layer, the similarity of token i's residual stream with each
token j <= i (causal: a token only sees its past), computed inside the trace so that
only those pairs' similarities leave it.

The full form is stored ragged, as a list of pairs: a ``pair`` dimension running through
every kept pair ``(i, j)`` of every prompt, prompt by prompt (the CF convention's
contiguous ragged array: ``n_pairs`` per prompt counts them), each labelled with its
``pair_prompt``, ``pair_token`` (i) and ``pair_context_token`` (j). Its size follows the
real token pairs, never the longest prompt of the run; :func:`prompt_matrix` gives one
prompt's ``(layer, token, context_token)`` matrix back.

With ``form = "by_distance"`` only a summary leaves the trace: per layer and token
distance ``i - j``, the sum, sum of squares and count of the similarities of every real
pair in the batch (:func:`distance_totals`), added at once to one running total per
layer for the whole run. The dataset holds their mean, standard deviation and count, so
its size, and the run's memory, depend on the longest prompt, never on how many prompts
there are (the figure is ``similarity_by_distance``).
"""

from __future__ import annotations

from typing import Iterator, Literal, Sequence

from pydantic import Field, field_validator

from probescope import (
    EMBED_LAYER, THUMBNAIL_SIDE, TOKEN_KINDS, Batch, DatasetSchema, Layer, Parameters, Probe, ProbeRun, Problem, Read, Variable, distinct, embed,
    hookimpl, layer_label, layer_problems, lazy_variable, resid, resolve_layers, thumbnails, token_kind_codes, lazy_import,
)

np = lazy_import("numpy")
torch = lazy_import("torch")
xr = lazy_import("xarray")


class TokenSimilarityParameters(Parameters):
    """Parameters of ``token_similarity``."""

    layers: list[Layer] | None = Field(
        default=None,
        description='block indices (negative count from the end), "last", and/or "embed" for the '
        "embedding output; default: every block",
    )
    metric: Literal["cosine", "centred_cosine"] = Field(
        default="cosine",
        description="cosine of the hidden states, or cosine after subtracting the prompt's "
        "mean token vector (raw cosine in real models is dominated by one shared direction)",
    )

    centre_without_first_token: bool = Field(
        default=False,
        description="centred_cosine: subtract the mean of the tokens after the first. Trained "
        "models give the first token massive activations (SmolLM2: a norm a hundred times the "
        "others'), which otherwise set the mean, so that every later token looks alike",
    )

    form: Literal["full", "by_distance"] = Field(
        default="full",
        description='"full": the similarity of every pair of tokens of every prompt (for '
        'similarity_grid); "by_distance": per layer and token distance i - j, the mean (and '
        "standard deviation and count) over every pair of every prompt, a dataset whose size "
        "does not grow with the number of prompts (for similarity_by_distance)",
    )

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: list[Layer] | None) -> list[Layer] | None:
        return distinct(layers)


SCHEMA = DatasetSchema(
    probe="token_similarity",
    dims={
        "prompt": "the run's prompts, in order",
        "layer": "the layers read: block index from 0; -1 is the embedding output",
        "token": "token position in a prompt",
        "pair": "every pair (i, j) of tokens kept, of every prompt: prompt by prompt, then i, then j",
        "pixel_row": "rows of a prompt's image thumbnail (prompts with images only)",
        "pixel_column": "columns of a prompt's image thumbnail (prompts with images only)",
        "channel": "colour channels of the thumbnail",
    },
    coords={
        "prompt": Variable(("prompt",), "int64", "prompt index"),
        "prompt_text": Variable(("prompt",), "str", "the prompt"),
        "n_tokens": Variable(("prompt",), "int64", "real (non-padding) tokens of the prompt"),
        "n_image_tokens": Variable(("prompt",), "int64", "tokens standing for the prompt's image"),
        "n_prefix_tokens": Variable(("prompt",), "int64", "leading tokens that attend both ways "
                                    "(vision-language models with a bidirectional prefix)", optional=True),
        "image_file": Variable(("prompt",), "str", "the prompt's image file name; \"\" for none", optional=True),
        "thumbnail_height": Variable(("prompt",), "int64", "height of the thumbnail in pixels", optional=True),
        "thumbnail_width": Variable(("prompt",), "int64", "width of the thumbnail in pixels", optional=True),
        "channel": Variable(("channel",), "str", "red, green, blue", optional=True),
        "layer": Variable(("layer",), "int64", "block index; -1 the embedding output (the residual stream entering block 0)"),
        "layer_label": Variable(("layer",), "str", '"embed" or the block index'),
        "token": Variable(("token",), "int64", "token position"),
        "token_text": Variable(("prompt", "token"), "str", 'the token as text; "" past the prompt\'s end'),
        "token_id": Variable(("prompt", "token"), "int64", "the token's id; -1 past the prompt's end"),
        "n_pairs": Variable(("prompt",), "int64", "pairs of the prompt, stored one after another along pair "
                                                 "(CF: the count variable of a contiguous ragged array)"),
        "pair": Variable(("pair",), "int64", "pair index"),
        "pair_prompt": Variable(("pair",), "int32", "the prompt the pair is of"),
        "pair_token": Variable(("pair",), "int32", "position i of the token compared"),
        "pair_context_token": Variable(("pair",), "int32", "position j of the earlier (or same) token it is compared with"),
        "token_kind": Variable(("prompt", "token"), "int8",
                               "text, image (the model's image token) or special; -1 past the prompt's end", flags=True),
    },
    variables={
        "similarity": Variable(("layer", "pair"), "float32",
                               "similarity of token i's hidden state with token j's, for every pair j <= i of real "
                               "tokens (with a bidirectional prefix, j > i too among its tokens)"),
        "thumbnail": Variable(("prompt", "pixel_row", "pixel_column", "channel"), "uint8",
                              "each prompt's image, RGB, padded with 0 beyond its thumbnail size", optional=True),
    },
    attrs={"metric": "cosine or centred_cosine",
           "centre_without_first_token": "0 or 1: the first token left out of the centring mean",
           "attention": "causal, or bidirectional prefix",
           "form": "full"},
)

#: The dataset of ``form = "by_distance"``: one mean per layer and token distance.
BY_DISTANCE_SCHEMA = DatasetSchema(
    probe="token_similarity",
    dims={
        "layer": "the layers read: block index from 0; -1 is the embedding output",
        "distance": "token distance i - j between the token compared (i) and the context token (j); "
                    "negative only among the tokens of a bidirectional prefix",
    },
    coords={
        "layer": Variable(("layer",), "int64", "block index; -1 the embedding output (the residual stream entering block 0)"),
        "layer_label": Variable(("layer",), "str", '"embed" or the block index'),
        "distance": Variable(("distance",), "int64", "i - j; 0 is each token against itself"),
        "n_pairs": Variable(("distance",), "int64", "pairs of real tokens at this distance, over every prompt "
                                                   "(padding never counts): the weight to pool datasets with"),
    },
    variables={
        "similarity": Variable(("layer", "distance"), "float64",
                               "mean similarity of the hidden states of token i and token j over every pair "
                               "at this distance of every prompt"),
        "similarity_std": Variable(("layer", "distance"), "float64",
                                   "standard deviation of those similarities (over the pairs, not its error)"),
    },
    attrs={"metric": "cosine or centred_cosine",
           "centre_without_first_token": "0 or 1: the first token left out of the centring mean",
           "attention": "causal, or bidirectional prefix",
           "form": "by_distance",
           "n_prompts": "prompts summarised"},
)


def similarity_matrix(hidden: torch.Tensor, mask: torch.Tensor, metric: str,
                      centre_without_first_token: bool = False,
                      prefix: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, token, token)`` similarities of a ``(batch, token, width)`` tensor.

    Entry ``[b, i, j]`` compares token i with token j; it is NaN unless j <= i (or both
    are in a bidirectional ``prefix``, ``(batch, token)`` bool) and both are real tokens.
    Computed in float32 at least, whatever the model's dtype. With
    ``centre_without_first_token`` the centring mean leaves out position 0 (in prompts
    of two or more tokens). ``keep``: :func:`kept_pairs` of ``mask`` and ``prefix``,
    when the caller already has it (it is the same for every layer of a batch).
    """
    h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    real = mask.to(h.dtype).unsqueeze(-1)  # (batch, token, 1)
    if metric == "centred_cosine":
        weight = real
        if centre_without_first_token:
            weight = real.clone()
            weight[:, 0] = torch.where(real.sum(dim=1) > 1, 0.0, weight[:, 0])
        mean = (h * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True)
        h = h - mean
    unit = torch.nn.functional.normalize(h, dim=-1)
    sims = unit @ unit.transpose(1, 2)
    return sims.masked_fill(~(kept_pairs(mask, prefix) if keep is None else keep), float("nan"))


def kept_pairs(mask: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, token, token)`` bool: which pairs ``(i, j)`` a result keeps. Both must be
    real tokens (``mask``, ``(batch, token)``), and j <= i, or both in a bidirectional
    ``prefix``."""
    n = mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if prefix is not None:  # tokens of a bidirectional prefix also see later ones
        causal = causal | (prefix.unsqueeze(2) & prefix.unsqueeze(1))
    return causal & mask.unsqueeze(2) & mask.unsqueeze(1)


def pair_count(n: int, prefix: int = 0) -> int:
    """How many pairs a prompt of ``n`` tokens keeps: j <= i, and j > i among its first
    ``prefix`` tokens (a bidirectional prefix)."""
    return n * (n + 1) // 2 + prefix * (prefix - 1) // 2 if prefix else n * (n + 1) // 2


def pair_positions(n: int, prefix: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(i, j)`` of the pairs a prompt of ``n`` tokens keeps, in the order the dataset
    stores them (and :func:`kept_pairs` selects them): by i, then j."""
    keep = np.tri(n, dtype=bool)
    keep[:prefix, :prefix] = True
    i, j = np.nonzero(keep)
    return i.astype(np.int32), j.astype(np.int32)


def prompt_matrix(ds: xr.Dataset, prompt: int) -> xr.DataArray:
    """One prompt's similarities as a ``(layer, token, context_token)`` matrix of its real
    tokens, NaN where no pair is kept (j > i), token texts on both axes.

    Reads both layouts: the pair list (``similarity`` along ``pair``) and the dense one
    files written before it hold (``(prompt, layer, token, context_token)``, padded to
    the longest prompt). ``prompt`` is the value of the ``prompt`` coordinate.
    """
    one = ds.sel(prompt=prompt) if "prompt" in ds.coords else ds.isel(prompt=prompt)
    sim = ds["similarity"]
    if "pair" not in sim.dims:  # the dense layout
        n = _real_tokens(one)
        dense = one["similarity"].transpose("layer", "token", "context_token")
        values = np.asarray(dense.values)[:, :n, :n]
    else:
        where = _pairs_of(ds, prompt)
        i = np.asarray(ds["pair_token"].isel(pair=where).values).astype(np.intp)
        j = np.asarray(ds["pair_context_token"].isel(pair=where).values).astype(np.intp)
        n = _real_tokens(one) if ("n_tokens" in one.coords or "token_id" in one.coords) else int(i.max(initial=-1)) + 1
        flat = np.asarray(sim.isel(pair=where).transpose("layer", "pair").values)
        values = np.full((sim.sizes["layer"], n, n), np.nan, dtype=flat.dtype if flat.dtype.kind == "f" else float)
        values[:, i, j] = flat
    coords = {"layer": ds["layer"].values, "token": np.arange(n), "context_token": np.arange(n)}
    if "layer_label" in ds.coords:
        coords["layer_label"] = ("layer", ds["layer_label"].values)
    if "token_text" in one.coords:
        texts = np.asarray(one["token_text"].values)[:n]
        coords["token_text"] = ("token", texts)
        coords["context_token_text"] = ("context_token", texts.copy())
    return xr.DataArray(values, dims=("layer", "token", "context_token"), coords=coords, attrs=dict(sim.attrs),
                        name="similarity")


def _pairs_of(ds: xr.Dataset, prompt: int) -> slice | np.ndarray:
    """Where along ``pair`` a prompt's pairs are: its stretch of the contiguous ragged
    array (from ``n_pairs``; only that stretch is read from a file opened lazily), else
    found by ``pair_prompt``."""
    counts, owners = ds.coords.get("n_pairs"), ds["pair_prompt"]
    if counts is not None and counts.dims == ("prompt",) and owners.dims == ("pair",):
        k = int(np.flatnonzero(np.asarray(ds["prompt"].values) == prompt)[0]) if "prompt" in ds.coords else prompt
        sizes = np.asarray(counts.values, dtype=np.int64)
        start = int(sizes[:k].sum())
        stretch = slice(start, start + int(sizes[k]))
        if (np.asarray(owners.isel(pair=stretch).values) == prompt).all():
            return stretch
    return np.flatnonzero(np.asarray(owners.values) == prompt)


def _real_tokens(one: xr.Dataset) -> int:
    """A prompt's real tokens: ``n_tokens``, else the ids that are not padding, else every position."""
    if "n_tokens" in one.coords:
        return int(one["n_tokens"].values)
    if "token_id" in one.coords:
        return int((np.asarray(one["token_id"].values) >= 0).sum())
    return int(one.sizes["token"])


def as_pairs(ds: xr.Dataset) -> xr.Dataset:
    """A full-form dataset in the pair layout: unchanged if it is already, else (a file
    written by an earlier probescope, dense and padded to the longest prompt) converted,
    keeping every value of every real pair."""
    if "similarity" not in ds or "context_token" not in ds["similarity"].dims:
        return ds
    prompts = [int(v) for v in ds["prompt"].values] if "prompt" in ds.coords else list(range(ds.sizes["prompt"]))
    lengths = [_real_tokens(ds.isel(prompt=k)) for k in range(len(prompts))]
    prefixes = ([int(v) for v in ds["n_prefix_tokens"].values] if "n_prefix_tokens" in ds.coords
                else [0] * len(prompts))
    dense = np.asarray(ds["similarity"].transpose("prompt", "layer", "token", "context_token").values)
    parts, tokens, contexts, owners, counts = [], [], [], [], []
    for k, (p, n, prefix) in enumerate(zip(prompts, lengths, prefixes)):
        i, j = pair_positions(n, prefix)
        parts.append(dense[k][:, i, j])
        tokens.append(i)
        contexts.append(j)
        owners.append(np.full(len(i), p, dtype=np.int32))
        counts.append(len(i))
    values = np.concatenate(parts, axis=1) if parts else np.zeros((ds.sizes["layer"], 0), np.float32)
    out = ds.drop_vars(["similarity", "context_token", "context_token_text"], errors="ignore")
    out = out.drop_dims("context_token", errors="ignore")
    out["similarity"] = (("layer", "pair"), values, dict(ds["similarity"].attrs))
    pair_prompt = np.concatenate(owners) if owners else np.zeros(0, np.int32)
    return out.assign_coords(
        n_pairs=("prompt", np.array(counts, dtype=np.int64), {"sample_dimension": "pair"}),
        pair=("pair", np.arange(len(pair_prompt), dtype=np.int64)),
        pair_prompt=("pair", pair_prompt),
        pair_token=("pair", np.concatenate(tokens) if tokens else np.zeros(0, np.int32)),
        pair_context_token=("pair", np.concatenate(contexts) if contexts else np.zeros(0, np.int32)),
    )


def layers_read(params: TokenSimilarityParameters, num_layers: int) -> list[int] | None:
    """The layers an entry of this probe reads, resolved from its ``layers`` as users
    write them; None when they are wrong for the model (the probe's own check says so,
    so a renderer checking its layer choices against them reports nothing twice)."""
    try:
        return resolve_layers(getattr(params, "layers", None), num_layers)
    except ValueError:
        return None


def distance_totals(sims: torch.Tensor, keep: torch.Tensor, both_directions: bool = True) -> torch.Tensor:
    """``(3, 2, token)`` float64: the sum, the sum of squares and the number (axis 0) of
    the kept similarities of a ``(batch, token, token)`` batch at each token distance
    ``d = i - j``. Row 0 of axis 1 holds ``d >= 0`` at column ``d``; row 1 holds the
    negative distances (j > i, only among a bidirectional prefix's tokens) at column
    ``-d`` (its column 0 stays zero). What ``form = "by_distance"`` keeps of a batch: its
    size does not depend on the number of prompts. ``both_directions=False`` says no
    pair has j > i (no bidirectional prefix), which halves the work.

    Start-aligned (column ``k`` is the same distance whatever the batch's length), so
    totals of batches of different lengths add up after zero-padding the shorter one at
    its end: the read says :attr:`probescope.Read.last_dim_grows`, and one running total
    serves the whole run.

    Each distance's values are one diagonal of the matrix: the batch is summed first
    (dense reductions), then the diagonals of the one ``(token, token)`` sum are read
    through a strided view (:func:`_diagonal_sums`); no scatter, no per-pair indices."""
    values = sims.to(torch.float64).masked_fill(~keep, 0.0)
    per_pair = torch.stack([values.sum(0), (values * values).sum(0), keep.sum(0, dtype=torch.float64)])
    totals = torch.zeros(3, 2, sims.shape[-1], dtype=torch.float64, device=sims.device)
    totals[:, 0] = _diagonal_sums(per_pair)
    if both_directions:
        totals[:, 1, 1:] = _diagonal_sums(per_pair.transpose(1, 2))[:, 1:]
    return totals


def _diagonal_sums(x: torch.Tensor) -> torch.Tensor:
    """``(k, token)``: entry ``[k, d]`` is the sum over i of ``x[k, i, i - d]``.

    With ``n`` zero rows below each ``(n, n)`` matrix (row stride ``n``), element
    ``x[k, d + m, m]`` sits at ``d * n + m * (n + 1)`` from the matrix's start: a view of
    strides ``(n, n + 1)`` puts diagonal ``d`` in row ``d``, and where ``d + m >= n`` it
    reads the zero rows."""
    k, n, _ = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 0, n))  # (k, 2n, n), contiguous
    return padded.as_strided((k, n, n), (2 * n * n, n, n + 1)).sum(dim=2)


class TokenSimilarity(Probe):
    name = "token_similarity"
    version = "0.1.0"
    description = "similarity of the hidden states of every pair of tokens (j <= i), per layer"
    Parameters = TokenSimilarityParameters
    schema = SCHEMA
    any_prompt_order = True  # build places each batch's rows by prompt index

    forms = {"by_distance": BY_DISTANCE_SCHEMA}

    def schema_for(self, params: TokenSimilarityParameters) -> DatasetSchema:
        return BY_DISTANCE_SCHEMA if params.form == "by_distance" else SCHEMA

    def check(self, params: TokenSimilarityParameters, model) -> list[Problem]:
        return layer_problems(params.layers, model.num_layers, embed=True)

    def reads(self, params: TokenSimilarityParameters, model) -> list[Read]:
        metric, skip_first = params.metric, params.centre_without_first_token

        last: dict = {}  # the batch whose kept pairs were made last: the same for every layer

        def prefix_of(batch: Batch) -> torch.Tensor | None:
            return batch.prefix_mask if batch.has_prefix else None

        def keep_of(batch: Batch) -> torch.Tensor:
            if last.get("batch") is not batch:
                last.update(batch=batch, keep=kept_pairs(batch.mask, prefix_of(batch)))
            return last["keep"]

        def matrix(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
            return similarity_matrix(hidden, batch.mask, metric, skip_first, prefix_of(batch), keep=keep_of(batch))

        def pairs(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
            # Only the kept pairs leave the pass, in the order the dataset stores them.
            return matrix(hidden, batch)[keep_of(batch)]

        def totals(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
            return distance_totals(matrix(hidden, batch), keep_of(batch),
                                   both_directions=batch.has_prefix)

        # by_distance: one running total per layer for the whole run, grown to the
        # longest batch (distance_totals is start-aligned); full: every batch's pairs,
        # which are the dataset itself, spilled to disk batch by batch.
        summary = params.form == "by_distance"
        return [
            Read(layer, embed() if layer == EMBED_LAYER else resid(layer), totals if summary else pairs,
                 accumulate=summary, last_dim_grows=summary, spill=not summary)
            for layer in resolve_layers(params.layers, model.num_layers)
        ]

    def build(self, params: TokenSimilarityParameters, run: ProbeRun) -> xr.Dataset:
        if params.form == "by_distance":
            return _by_distance(params, run)
        layers = resolve_layers(params.layers, run.model.info.num_layers)
        width = max(len(p) for p in run.prompts)
        counts = np.array([pair_count(len(p), p.prefix) for p in run.prompts], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        total, chunk = int(counts.sum()), _pair_chunk(counts)

        def labels(what: str, description: str) -> xr.Variable:
            """A pair label, computed per region like the similarities (20 bytes a pair
            held otherwise)."""
            return lazy_variable(("pair",), (total,), np.int32, _PairLabels(run.prompts, counts, starts, what),
                                 {"description": description}, chunk=chunk)

        texts = np.full((len(run.prompts), width), "", dtype=object)
        ids = np.full((len(run.prompts), width), -1, dtype=np.int64)
        for p in run.prompts:
            texts[p.index, : len(p)] = p.tokens
            ids[p.index, : len(p)] = p.token_ids
        positions = np.arange(width)
        label = _LABELS[params.metric]
        bidirectional = _bidirectional(run)
        description = ("similarity of token i's hidden state (pair_token) with context token j <= i's "
                       "(pair_context_token), for every pair of real tokens of every prompt (pair_prompt)")
        if bidirectional:
            description += ("; the first n_prefix_tokens tokens (image and prompt) attend to each other "
                            "both ways, so among them j > i is kept too")
        # Computed from the spilled batches region by region: never held whole (written
        # to the file slab by slab, or loaded when the run writes nothing).
        variables: dict = {"similarity": lazy_variable(
            ("layer", "pair"), (len(layers), total), np.float32,
            _PairReader(run.reductions, layers, run.batches, counts, starts),
            {"long_name": label, "description": description}, parted="pair", chunk=chunk)}
        coords: dict = {}
        images = thumbnails(run.prompts)
        if images is not None:
            pixels, sizes = images
            variables["thumbnail"] = (
                ("prompt", "pixel_row", "pixel_column", "channel"), pixels,
                {"long_name": "image thumbnail",
                 "description": f"each prompt's image, at most {THUMBNAIL_SIDE} px a side, RGB, padded "
                                "with 0 beyond thumbnail_height x thumbnail_width"})
            coords["channel"] = ("channel", np.array(["red", "green", "blue"], dtype=object))
            coords["thumbnail_height"] = ("prompt", sizes[:, 0])
            coords["thumbnail_width"] = ("prompt", sizes[:, 1])
            coords["image_file"] = ("prompt", np.array(
                [p.image.name if p.image is not None else "" for p in run.prompts], dtype=object))
        if bidirectional:
            coords["n_prefix_tokens"] = ("prompt", np.array([p.prefix for p in run.prompts], dtype=np.int64),
                                         {"description": "leading tokens that attend both ways"})
        ds = xr.Dataset(
            variables,
            coords={
                "prompt": np.arange(len(run.prompts)),
                "prompt_text": ("prompt", np.array([p.text for p in run.prompts], dtype=object)),
                "n_tokens": ("prompt", np.array([len(p) for p in run.prompts], dtype=np.int64)),
                "n_image_tokens": ("prompt", np.array([p.n_image_tokens for p in run.prompts], dtype=np.int64),
                                   {"description": "tokens standing for the prompt's image"}),
                **coords,
                "layer": ("layer", np.array(layers, dtype=np.int64),
                          {"description": "block index (0-based); -1 is the embedding output, "
                                          "the residual stream entering block 0"}),
                "layer_label": ("layer", np.array([layer_label(layer) for layer in layers], dtype=object)),
                "token": ("token", positions, {"description": "token position"}),
                "token_text": (("prompt", "token"), texts),
                "token_id": (("prompt", "token"), ids, {"description": "-1 past the prompt's end"}),
                "n_pairs": ("prompt", counts, {"sample_dimension": "pair",
                                               "description": "pairs of the prompt, one after another along pair"}),
                "pair": ("pair", np.arange(total, dtype=np.int64)),
                "pair_prompt": labels("prompt", "the prompt the pair is of"),
                "pair_token": labels("token", "position i of the token compared"),
                "pair_context_token": labels("context", "position j of the earlier (or same) token compared with"),
                "token_kind": (("prompt", "token"), token_kind_codes(run.prompts, width),
                               {"long_name": "token kind", "flag_values": np.arange(len(TOKEN_KINDS), dtype=np.int8),
                                "flag_meanings": " ".join(TOKEN_KINDS),
                                "description": "text, image (the model's image token) or special (other "
                                               "special and added tokens); -1 past the prompt's end"}),
            },
            attrs={**_attrs(params, bidirectional), "form": "full"},
        )
        # On disk the pair labels (runs and ramps of small integers) shrink to almost
        # nothing under zlib; the similarities a little.
        for name in ("similarity", "pair", "pair_prompt", "pair_token", "pair_context_token"):
            ds.variables[name].encoding.update(zlib=True, complevel=1, shuffle=True)
        # One layer at a time, about a long prompt's pairs per chunk: a prompt's matrix at
        # one layer reads one or two chunks (and one or two of each pair label's).
        ds.variables["similarity"].encoding["chunksizes"] = (1, chunk)
        for name in ("pair", "pair_prompt", "pair_token", "pair_context_token"):
            ds.variables[name].encoding["chunksizes"] = (chunk,)
        return ds


def _pair_chunk(counts: np.ndarray) -> int:
    """The file's chunk length along ``pair``: the pairs of the run's longest prompt,
    at least 4,096 and at most 2**18 (1 MiB of float32), never more than there are."""
    return int(min(max(int(counts.max()), 4096), 2**18, int(counts.sum())))


def _overlapping(starts: np.ndarray, counts: np.ndarray, a: int, z: int) -> Iterator[tuple[int, int, int]]:
    """``(prompt, lo, hi)`` for each prompt with pairs in ``[a, z)`` of ``pair``: the part
    ``[lo, hi)`` of ``pair`` that is both."""
    first = max(int(np.searchsorted(starts, a, side="right")) - 1, 0)
    for p in range(first, int(np.searchsorted(starts, z, side="left"))):
        lo, hi = max(a, int(starts[p])), min(z, int(starts[p] + counts[p]))
        if lo < hi:
            yield p, lo, hi


class _PairLabels:
    """Any region of a pair label: the prompt of each pair (``"prompt"``), its token i
    (``"token"``) or its context token j (``"context"``)."""

    def __init__(self, prompts, counts, starts, what):
        self.prompts, self.counts, self.starts, self.what = prompts, counts, starts, what

    def __call__(self, region: tuple) -> np.ndarray:
        (columns,) = region
        out = np.empty(columns.stop - columns.start, dtype=np.int32)
        for p, lo, hi in _overlapping(self.starts, self.counts, columns.start, columns.stop):
            into = slice(lo - columns.start, hi - columns.start)
            if self.what == "prompt":
                out[into] = p
            else:
                i, j = pair_positions(len(self.prompts[p]), self.prompts[p].prefix)
                out[into] = (i if self.what == "token" else j)[lo - self.starts[p] : hi - self.starts[p]]
        return out


class _PairReader:
    """Any ``(layer, pair)`` region of the full form's similarities, copied from each
    prompt's stretch of the batch results it is in (batches in any order)."""

    def __init__(self, reductions, layers, batches, counts, starts):
        self.reductions, self.layers, self.counts, self.starts = reductions, layers, counts, starts
        # prompt -> (batch, offset of its pairs in the batch's flat result)
        self.batch = np.empty(len(counts), dtype=np.int64)
        self.offset = np.empty(len(counts), dtype=np.int64)
        for b, batch in enumerate(batches):
            at = 0
            for prompt in batch.prompts:
                self.batch[prompt.index], self.offset[prompt.index] = b, at
                at += counts[prompt.index]

    def __call__(self, region: tuple) -> np.ndarray:
        rows, columns = region
        a, z = columns.start, columns.stop
        out = np.empty((rows.stop - rows.start, z - a), dtype=np.float32)
        pieces: dict[int, list] = {}  # batch -> (where in its result, where in out)
        for p, lo, hi in _overlapping(self.starts, self.counts, a, z):
            at = self.offset[p] - self.starts[p]
            pieces.setdefault(int(self.batch[p]), []).append((at + lo, at + hi, lo - a, hi - a))
        for r, li in enumerate(range(rows.start, rows.stop)):
            per_batch = self.reductions[self.layers[li]]
            for b, spans in pieces.items():
                flat = per_batch[b].float().numpy()
                for lo, hi, to, end in spans:
                    out[r, to:end] = flat[lo:hi]
                del flat
        return out


def _bidirectional(run: ProbeRun) -> bool:
    vision = run.model.info.vision
    return vision is not None and vision.bidirectional_prefix


def _attrs(params: TokenSimilarityParameters, bidirectional: bool) -> dict:
    """The attributes both forms carry."""
    return {"metric": params.metric,
            "centre_without_first_token": int(params.centre_without_first_token),
            "attention": "bidirectional prefix" if bidirectional else "causal"}


_LABELS = {"cosine": "cosine similarity", "centred_cosine": "centred cosine similarity"}


def _by_distance(params: TokenSimilarityParameters, run: ProbeRun) -> xr.Dataset:
    """The ``by_distance`` dataset: each layer's running total of the run
    (:func:`distance_totals`, added up batch by batch inside the pass), laid out from
    distance ``-(width - 1)`` to ``width - 1``, then mean and standard deviation per
    distance."""
    layers = resolve_layers(params.layers, run.model.info.num_layers)
    parts = {}
    for layer in layers:
        (parts[layer],) = run.reductions[layer]  # the read accumulates: one total per layer
    width = max(int(part.shape[-1]) for part in parts.values())
    totals = np.zeros((len(layers), 3, 2 * width - 1))
    for li, layer in enumerate(layers):
        part = parts[layer].numpy()  # (3, 2, n): row 0 distances 0..n-1, row 1 (none), -1, ..., -(n-1)
        n = part.shape[-1]
        totals[li, :, width - 1 : width - 1 + n] = part[:, 0]
        totals[li, :, width - n : width - 1] += part[:, 1, :0:-1]
    counts = totals[0, 2]
    present = np.flatnonzero(counts > 0)
    totals = totals[:, :, present]
    counts = counts[present]
    mean = totals[:, 0] / counts
    spread = np.sqrt(np.maximum(totals[:, 1] / counts - mean**2, 0.0))
    bidirectional = _bidirectional(run)
    label = _LABELS[params.metric]
    return xr.Dataset(
        {"similarity": (("layer", "distance"), mean,
                        {"long_name": f"mean {label}",
                         "description": "mean similarity of token i's hidden state with token j's over every "
                                        "pair of real tokens with i - j = distance, of every prompt"}),
         "similarity_std": (("layer", "distance"), spread,
                            {"long_name": f"standard deviation of the {label}",
                             "description": "over the pairs at this distance (not the error of the mean)"})},
        coords={
            "layer": ("layer", np.array(layers, dtype=np.int64),
                      {"description": "block index (0-based); -1 is the embedding output, "
                                      "the residual stream entering block 0"}),
            "layer_label": ("layer", np.array([layer_label(layer) for layer in layers], dtype=object)),
            "distance": ("distance", (present - (width - 1)).astype(np.int64),
                         {"description": "i - j: positions between the token compared and the context token"}),
            "n_pairs": ("distance", np.rint(counts).astype(np.int64),
                        {"description": "pairs of real tokens averaged at this distance, over every prompt"}),
        },
        attrs={**_attrs(params, bidirectional), "form": "by_distance", "n_prompts": len(run.prompts)},
    )


def pool_by_distance(datasets: Sequence[xr.Dataset]) -> xr.Dataset:
    """One ``form = "by_distance"`` summary of several made over different prompts (the
    same model, layers and parameters): means and standard deviations weighted by
    ``n_pairs``, exactly what one run over every prompt gives. Distances one dataset
    lacks count as zero pairs there.

    :raises ValueError: a dataset that is not a ``by_distance`` summary, or summaries of
        different layers.
    """
    items = list(datasets)
    if not items:
        raise ValueError("nothing to pool: give at least one by_distance dataset")
    for k, ds in enumerate(items):
        if "distance" not in ds.dims or "n_pairs" not in ds.coords:
            raise ValueError(f'dataset {k} is not token_similarity\'s form = "by_distance" summary')
        if list(ds.layer.values) != list(items[0].layer.values):
            raise ValueError(f"dataset {k} has layers {list(ds.layer.values)}, dataset 0 "
                             f"{list(items[0].layer.values)}; pool summaries of the same layers")
    distances = sorted(set().union(*(ds.distance.values.tolist() for ds in items)))
    count, total, squares = 0.0, 0.0, 0.0
    for ds in items:
        ds = ds.reindex(distance=distances)
        weight = ds.n_pairs.fillna(0.0).reset_coords(drop=True)
        total = total + (ds.similarity * weight).fillna(0.0)
        squares = squares + ((ds.similarity_std**2 + ds.similarity**2) * weight).fillna(0.0)
        count = count + weight
    mean = total / count
    out = items[0].reindex(distance=distances).copy()
    out["similarity"] = mean.assign_attrs(items[0].similarity.attrs)
    out["similarity_std"] = np.sqrt(np.maximum(squares / count - mean**2, 0.0)).assign_attrs(
        items[0].similarity_std.attrs)
    out = out.assign_coords(n_pairs=("distance", count.values.astype(np.int64), items[0].n_pairs.attrs))
    out.attrs["n_prompts"] = int(sum(int(ds.attrs.get("n_prompts", 0)) for ds in items))
    out.attrs.pop("prompts", None)  # provenance of one part only
    return out


@hookimpl
def register_probes(register):
    register(TokenSimilarity())
