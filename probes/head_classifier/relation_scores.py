"""Static relation scores of attention heads (MAPS), computed exactly and fast.

MAPS (Elhelo & Geva 2025) reads a head's function off its weights: project a source
token's vector ``x`` through the head's value-output circuit and the unembedding,
``x W_V^h W_O^h W_U``, and ask whether the related target token ranks among the top ``k``
of the vocabulary. A head's *relation score* for a relation is the fraction of its pairs
for which it does; the *suppression score* is the same for ``-x W_V^h W_O^h W_U`` (the
target among the ``k`` lowest). ``x`` is the token's embedding for heads of block 0 and,
by default, what block 0's MLP writes for that embedding for later heads, as MAPS does.
Biases and layer norms are left out, as in MAPS.

:func:`reference_scores` is that definition written plainly: for each relation and head,
project, then ``topk``. :func:`relation_scores` gives the same numbers much faster:

1. **Counting instead of sorting.** The target is in the top ``k`` exactly when fewer
   than ``k`` other tokens score at least as high as it. So no ``topk`` over the
   vocabulary: compare each logit with the target's, once.
2. **Stopping early.** The vocabulary is read in chunks. A pair is decided as soon as
   ``k`` tokens beat its target (for the relation score) and ``k`` tokens fall below it
   (for suppression). A pair whose target sits at a random rank is decided after about
   ``k * vocabulary / rank`` tokens, so after ``n`` tokens a fraction of about ``2k / n``
   is still open: the first chunk is small (64 tokens), chunks then double, and later
   ones compute the logits of the open pairs only.
3. **The cheaper product order.** For many open pairs, ``(x W_V^h)(W_O^h W_U)`` over
   each head's ``head_dim``-wide factor; for few, ``(x W_V^h W_O^h) W_U`` row by row in
   one matrix product for all heads. Each chunk takes whichever needs fewer operations.
4. **Sharing.** Sources common to several relations are projected once; with
   grouped-query attention, ``x W_V`` once per key/value head.

**Ties count against the target.** A head must *separate* the target from the rest of
the vocabulary to score: a token whose logit equals the target's (within the rounding
error of the arithmetic, :func:`tie_tolerance`) counts as beating it, for the relation
score and the suppression score alike. ``topk`` would break such ties arbitrarily, and
counting them in the target's favour would give a head whose output is the same for
every token (a pruned head, ``W_O = 0``) a score of 1.0 for every relation; under this
rule it scores 0.

**Memory stays within ``budget_bytes``** (256 MB by default), whatever the model's size:
everything the scoring allocates (the source vectors, the target columns, per-head
values, each vocabulary chunk's logits and the conversions of ``W_U`` to the arithmetic's
dtype) is planned against it, on top of the weights the layout holds. Block 0's MLP runs
on the sources a slice of rows at a time; heads go in groups whose per-pair state takes
at most half of what the sources leave, and each vocabulary chunk is as wide as the rest
allows. No ``(heads, sources, width)`` tensor is kept: the logits of the few open pairs
(``(x W_V^h W_O^h) W_U``) are computed from their own rows. A budget too small for the
model (a model of width 8192 and 3,000 sources needs about 100 MB for the sources alone)
is exceeded rather than crawled through: no chunk of columns or pairs is narrower than
``first_chunk``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from probescope import ModelLayout

#: First vocabulary chunk; each later chunk doubles, up to :data:`MAX_CHUNK`. Measured
#: on the benchmark's full run: 64 and 32 equally fast, 512 half again slower.
FIRST_CHUNK = 64
MAX_CHUNK = 8192
#: Rough upper bound on the size of one intermediate tensor.
BUDGET_BYTES = 1 << 28


@dataclass(frozen=True)
class PairSet:
    """The token pairs of the relations to score, as one model's token ids.

    :param source, target: ``(pairs,)`` long tensors, all relations concatenated.
    :param relation: ``(pairs,)`` index of each pair's relation.
    :param k: ``(relations,)`` top-k of each relation.
    """

    source: torch.Tensor
    target: torch.Tensor
    relation: torch.Tensor
    k: torch.Tensor

    @classmethod
    def of(cls, relations: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> "PairSet":
        """From ``(source ids, target ids, k)`` per relation."""
        empty = torch.zeros(0, dtype=torch.long)
        return cls(
            source=torch.cat([s for s, _, _ in relations]) if relations else empty,
            target=torch.cat([t for _, t, _ in relations]) if relations else empty,
            relation=torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, (s, _, _) in enumerate(relations)])
            if relations else empty,
            k=torch.tensor([k for _, _, k in relations], dtype=torch.long),
        )

    @property
    def relations(self) -> int:
        return int(self.k.numel())


def source_vectors(layout: ModelLayout, tokens: torch.Tensor, layer: int, through_first_mlp: bool,
                   dtype: torch.dtype, rows: int | None = None) -> torch.Tensor:
    """What a head of ``layer`` reads for each source token: its embedding, or for
    ``layer > 0`` with ``through_first_mlp`` what block 0's MLP writes for it. Computed
    ``rows`` tokens at a time (default all at once), which bounds the MLP's
    intermediate activations; each token's vector is computed on its own row either way."""
    with torch.no_grad():
        embedding = layout.embedding()
        tokens = tokens.to(embedding.weight.device)
        n = tokens.numel()
        step = max(1, n if rows is None else rows)
        out = None
        for start in range(0, max(n, 1), step):
            x = embedding(tokens[start:start + step])
            if layer > 0 and through_first_mlp:
                x = layout.mlp_output(0, x)
            if out is None:
                out = torch.empty((n, x.shape[-1]), dtype=dtype, device=x.device)
            out[start:start + x.shape[0]] = x  # converted to dtype as it is copied
            del x
            give_back_freed_memory()  # the slice's MLP activations
        return out


def _mlp_width(layout: ModelLayout) -> int:
    """The widest MLP weight's largest side (Phi-3's fused gate and up: twice the MLP
    width), read off the module's shape: what one token needs in block 0's MLP."""
    widths = [max(module.weight.shape) for name in layout.components if name.startswith("mlp.")
              for module in [layout.module(0, name)] if getattr(module, "weight", None) is not None]
    return max(widths, default=0)


def _sources_by_layer(layout: ModelLayout, tokens: torch.Tensor, through_first_mlp: bool,
                      dtype: torch.dtype, budget: int) -> Callable[[int], torch.Tensor]:
    """The sources of each layer, the one set in use kept (layer 0's embeddings are
    dropped once the later layers' MLP outputs are made). Block 0's MLP takes as many
    rows at a time as its activations (four MLP-wide and four model-wide vectors a token,
    at the arithmetic's itemsize or float32's if wider) fit in the budget beside the
    result."""
    cache: dict[bool, torch.Tensor] = {}
    itemsize = max(4, torch.empty((), dtype=dtype).element_size())

    def get(layer: int) -> torch.Tensor:
        key = layer > 0 and through_first_mlp
        if key not in cache:
            cache.clear()
            rows = None
            if key:
                width = layout.embedding().weight.shape[-1]
                result = tokens.numel() * width * itemsize
                per_row = 4 * (_mlp_width(layout) + width) * itemsize
                rows = max(1, (budget - result) // max(1, per_row))
            cache[key] = source_vectors(layout, tokens, layer, through_first_mlp, dtype, rows)
        return cache[key]

    return get


def tie_tolerance(y_norm: torch.Tensor, w_o_norm: torch.Tensor, u_norm_max: float, width: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """How close two logits of one head and source may be and still count as tied.

    A logit ``y W_O u`` is computed in either order, ``(y W_O) u`` or ``y (W_O u)``; its
    rounding error is at most a few ``eps * sqrt(width)`` times ``|y| |W_O| |u|`` (Frobenius
    norm of the head's ``W_O``, the longest unembedding column). Differences below that
    say nothing about the head, so they are ties. In float64 this is about 1e-14 of the
    logits' scale; it is exactly 0 for a head with ``W_O = 0``.

    :param y_norm: norms of ``x W_V`` for the pairs; :param w_o_norm: matching ``|W_O|``.
    """
    eps = torch.finfo(dtype).eps
    return (8 * eps * width ** 0.5 * u_norm_max) * y_norm * w_o_norm


def _count(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row of a ``(rows, columns)`` bool tensor, as int64. Summing the
    bytes as int32 is about 1.6x faster on a CPU than ``sum`` or ``count_nonzero``, which
    convert every entry to int64 first; the int32 copy costs 4 bytes an entry."""
    return mask.view(torch.uint8).sum(1, dtype=torch.int32).long()


def longest_column(W_U: torch.Tensor, dtype: torch.dtype, budget: int) -> float:
    """The largest column norm of ``W_U`` ``(d, vocab)`` in ``dtype``, converted a block of
    columns at a time so the conversion takes at most half of ``budget`` bytes (each
    column's norm is the same however many are converted together)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    d, V = W_U.shape
    step = max(1, budget // max(1, 2 * d * itemsize))
    return max((float(W_U[:, a:a + step].to(dtype).norm(dim=0).max()) for a in range(0, V, step)), default=0.0)


def _layer_hits(x: torch.Tensor, source_row: torch.Tensor, target: torch.Tensor, k: torch.Tensor,
                W_V_kv: torch.Tensor, W_O: torch.Tensor, kv_head: torch.Tensor, W_U: torch.Tensor,
                u_norm_max: float, dtype: torch.dtype, budget: int, first_chunk: int, max_chunk: int,
                stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For one layer: ``(heads, pairs)`` bools, target in the top k / bottom k.

    :param x: ``(sources, d)`` distinct source vectors; ``source_row[p]`` is pair p's row.
    :param k: ``(pairs,)`` top-k of each pair's relation.
    :param W_V_kv: ``(kv_heads, d, hd)`` value weights per key/value head; query head
        ``h`` reads ``W_V_kv[kv_head[h]]`` (never repeated per query head).
    :param u_norm_max: :func:`longest_column` of ``W_U``.
    :param budget: bytes for everything allocated here, ``x`` included (see the module's
        docstring).
    """
    H, hd, d = W_O.shape
    S, P, V = x.shape[0], target.numel(), W_U.shape[1]
    device = x.device
    itemsize = torch.empty((), dtype=dtype).element_size()
    relation_hit = torch.zeros(H, P, dtype=torch.bool, device=device)
    suppression_hit = torch.zeros(H, P, dtype=torch.bool, device=device)
    if P == 0:
        return relation_hit, suppression_hit
    unique_kv = [int(g) for g in torch.unique(kv_head)]
    W_V_kv = {g: W_V_kv[g].to(dtype) for g in unique_kv}
    # What the layer holds throughout: the sources, x W_V's factors, the hits, the pairs' indices.
    room = budget - (x.numel() + len(unique_kv) * d * hd + S * hd) * itemsize - 2 * H * P - 4 * 8 * P
    # Per head of a group: x W_V (S, hd) and its norms, and per pair the target logit and
    # its tolerance (dtype, and two more while the tolerance is made), the two counts
    # (int64), the open flag and the k (expanded, a view).
    per_head = S * (hd + 1) * itemsize + P * (4 * itemsize + 2 * 8 + 1)
    group = max(1, min(H, (room // 2) // max(1, per_head)))
    flops = 0

    for h0 in range(0, H, group):
        heads = range(h0, min(H, h0 + group))
        n = len(heads)
        group_kv = sorted({int(kv_head[h]) for h in heads})
        # x W_V once per key/value head (the query heads of a group share them), then per head (n, S, hd)
        Y = torch.empty(n, S, hd, dtype=dtype, device=device)
        for g in group_kv:
            xv = x @ W_V_kv[g]
            for i, h in enumerate(heads):
                if int(kv_head[h]) == g:
                    Y[i] = xv
            del xv
        W_O_g = W_O[h0:h0 + n].to(dtype)
        flops += 2 * len(group_kv) * S * d * hd
        left = room - n * per_head - n * hd * d * itemsize
        # Each pair's target logit, x W_V (W_O u_target): (n, P), the pairs' target columns
        # of W_U converted a slice of pairs at a time.
        t = torch.empty(n, P, dtype=dtype, device=device)
        step = max(first_chunk, left // max(1, (2 * d + 3 * n * hd) * itemsize))
        for p0 in range(0, P, step):
            p1 = min(P, p0 + step)
            U_target = W_U[:, target[p0:p1]].to(dtype)  # (d, p)
            t[:, p0:p1] = (Y[:, source_row[p0:p1]] * torch.matmul(W_O_g, U_target).transpose(1, 2)).sum(-1)
            del U_target
        flops += 2 * (n * P * d * hd + n * P * hd)
        tol = tie_tolerance(Y.norm(dim=-1)[:, source_row], W_O_g.flatten(1).norm(dim=1)[:, None], u_norm_max, d,
                            dtype)  # (n, P)
        above = torch.zeros(n, P, dtype=torch.long, device=device)
        below = torch.zeros(n, P, dtype=torch.long, device=device)
        kk = k.to(device).expand(n, P)
        open_ = torch.ones(n, P, dtype=torch.bool, device=device)

        start, size = 0, first_chunk
        while start < V:
            rows = open_.nonzero()  # (N, 2): (head in group, pair), by head
            N = rows.shape[0]
            if N == 0:
                break
            open_heads = torch.unique(rows[:, 0])
            m = open_heads.numel()
            # Operations per vocabulary column of each product order; the cheaper one wins.
            factored = m * (hd * d + S * hd)
            direct = N * d
            # Bytes: the pairs' indices and values beside the logits, then per column
            # W_U's slice, A and L (factored) and the logits, and their comparison (a
            # bool and the int32 it is summed as).
            fixed = 8 * 8 * N
            if factored < direct:
                fixed += m * (hd * d + S * hd) * itemsize  # W_O and x W_V of the open heads
                per_column = (d + m * hd + m * S + N) * itemsize + 5 * N
            else:
                fixed += N * (hd + d) * itemsize  # the open pairs' x W_V and x W_V W_O
                per_column = (d + N) * itemsize + 5 * N
            stop = start + min(V - start, max(min(size, first_chunk), min(size, (left - fixed) // per_column)))
            c = stop - start
            U = W_U[:, start:stop].to(dtype)  # (d, c)
            flops += 2 * min(factored, direct) * c
            head, pair = rows[:, 0], rows[:, 1]
            if factored < direct:
                A = torch.matmul(W_O_g[open_heads], U)  # (m, hd, c)
                L = torch.bmm(Y[open_heads], A)  # (m, S, c)
                position = torch.full((n,), -1, dtype=torch.long, device=device)
                position[open_heads] = torch.arange(m, device=device)
                logits = L[position[head], source_row[pair]]  # (N, c)
                del A, L, position
            else:
                # The open pairs' x W_V W_O, head by head (rows come grouped by head).
                Z = torch.empty(N, d, dtype=dtype, device=device)
                counts = torch.bincount(head, minlength=n).tolist()
                first = 0
                for h, count in enumerate(counts):
                    if count:
                        Z[first:first + count] = Y[h, source_row[pair[first:first + count]]] @ W_O_g[h]
                        first += count
                flops += 2 * N * hd * d
                logits = Z @ U  # (N, c)
                del Z
            del U
            own = t[head, pair]
            slack = tol[head, pair]
            # The target's own column is not a rival: NaN compares false both ways.
            tgt = target[pair]
            inside = (tgt >= start) & (tgt < stop)
            logits[inside.nonzero().squeeze(1), (tgt[inside] - start)] = float("nan")
            # Ties (within rounding) count against the target, for both scores.
            above[head, pair] += _count(logits >= (own - slack)[:, None])
            below[head, pair] += _count(logits <= (own + slack)[:, None])
            del logits
            give_back_freed_memory()  # the chunk's logits, comparisons and W_U slice
            open_ = (above < kk) | (below < kk)
            start, size = stop, min(max_chunk, size * 2)
        relation_hit[h0:h0 + n] = above < kk
        suppression_hit[h0:h0 + n] = below < kk
        del Y, t, tol, above, below, open_
        give_back_freed_memory()
    if stats is not None:
        stats["flops"] = stats.get("flops", 0) + flops
    return relation_hit, suppression_hit


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def give_back_freed_memory() -> None:
    """Hand memory that tensors freed back to the system (glibc's ``malloc_trim``).

    glibc keeps freed blocks below its mmap threshold (which grows to 32 MB) for reuse,
    and the chunks of tensors of varying sizes fragment them: without this, one layer
    left about 100 MB of them, and on the benchmark's 16-layer run the freed blocks
    held inside a layer's scoring took the resident set 100 MB past what the scoring
    holds. So the scoring calls this after each vocabulary chunk, each group of heads,
    each slice of block 0's MLP and each layer. A no-op where the C library has no
    ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _per_relation(hits: torch.Tensor, pairs: PairSet) -> np.ndarray:
    """``(heads, pairs)`` bools -> ``(heads, relations)`` fraction of each relation's pairs."""
    H, R = hits.shape[0], pairs.relations
    relation = pairs.relation.to(hits.device)
    sums = torch.zeros(H, R, dtype=torch.float64, device=hits.device)
    sums.index_add_(1, relation, hits.to(torch.float64))
    counts = torch.bincount(relation, minlength=R).to(torch.float64)
    return (sums / counts).cpu().numpy()


def relation_scores(
    layout: ModelLayout, pairs: PairSet, *, layers: Sequence[int] | None = None, through_first_mlp: bool = True,
    dtype: torch.dtype = torch.float32, budget_bytes: int = BUDGET_BYTES, first_chunk: int = FIRST_CHUNK,
    max_chunk: int = MAX_CHUNK, progress: Callable[[Iterable[int]], Iterable[int]] = iter,
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Relation and suppression scores, each ``(layers, heads, relations)`` float64.

    Computed on the device the embedding lives on, in ``dtype`` (float32 by default;
    float64 to compare with :func:`reference_scores` bit for bit). ``stats``, when given,
    collects ``flops``: the multiply-adds (times 2) of the matrix products performed.
    """
    layers = list(range(layout.num_layers)) if layers is None else list(layers)
    R, H = pairs.relations, layout.attention_shape.n_heads
    relation = np.full((len(layers), H, R), np.nan)
    suppression = np.full((len(layers), H, R), np.nan)
    if R == 0:
        return relation, suppression
    device = layout.embedding().weight.device
    distinct, source_row = torch.unique(pairs.source, return_inverse=True)
    sources = _sources_by_layer(layout, distinct, through_first_mlp, dtype, budget_bytes)
    # Every weight is brought to the embedding's device: a model split by device_map keeps
    # some blocks (and maybe the output layer) on the CPU or on disk.
    W_U = layout.unembedding().matrix().detach().to(device)
    u_norm_max = longest_column(W_U, dtype, budget_bytes)
    target, source_row, k = pairs.target.to(device), source_row.to(device), pairs.k.to(device)[pairs.relation.to(device)]
    with torch.no_grad():
        for i, layer in enumerate(progress(layers)):
            x = sources(layer).to(device)
            w = layout.heads(layer)
            give_back_freed_memory()  # what making the sources and reading the block left
            hit, supp = _layer_hits(x, source_row, target, k, w.W_V_kv.detach().to(device), w.W_O.detach().to(device),
                                    w.kv_head.to(device), W_U, u_norm_max, dtype, budget_bytes, first_chunk, max_chunk, stats)
            del w, x  # the next layer's sources are made without this layer's beside them
            give_back_freed_memory()
            relation[i] = _per_relation(hit, pairs)
            suppression[i] = _per_relation(supp, pairs)
    return relation, suppression


def reference_scores(
    layout: ModelLayout, relations: Sequence[tuple[torch.Tensor, torch.Tensor, int]], *,
    layers: Sequence[int] | None = None, through_first_mlp: bool = True, dtype: torch.dtype = torch.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """The definition, plainly: for each relation, for each head, project every source
    through ``W_V^h W_O^h`` and ``W_U`` and count the other tokens scoring at least as
    high as the target (at most as high, for suppression), ties within
    :func:`tie_tolerance` included; a hit is fewer than ``k``. That is: the target is in
    the ``topk`` however ties are broken. Slow; kept to check :func:`relation_scores`
    against."""
    layers = list(range(layout.num_layers)) if layers is None else list(layers)
    H = layout.attention_shape.n_heads
    relation = np.full((len(layers), H, len(relations)), np.nan)
    suppression = np.full_like(relation, np.nan)
    W_U = layout.unembedding().matrix().detach().to(dtype)
    u_norm_max = float(W_U.norm(dim=0).max())
    with torch.no_grad():
        for r, (source, target, k) in enumerate(relations):
            target = target.to(W_U.device)
            for i, layer in enumerate(layers):
                x = source_vectors(layout, source, layer, through_first_mlp, dtype)
                w = layout.heads(layer)
                for h in range(H):
                    y = x @ w.W_V[h].to(dtype)
                    W_O = w.W_O[h].to(dtype)
                    projected = y @ W_O @ W_U  # (pairs, vocabulary)
                    own = projected.gather(1, target[:, None])
                    tol = tie_tolerance(y.norm(dim=-1), W_O.norm(), u_norm_max, W_U.shape[0], dtype)[:, None]
                    others = torch.ones_like(projected, dtype=torch.bool).scatter_(1, target[:, None], False)
                    above = ((projected >= own - tol) & others).sum(-1)
                    below = ((projected <= own + tol) & others).sum(-1)
                    relation[i, h, r] = (above < k).double().mean().item()
                    suppression[i, h, r] = (below < k).double().mean().item()
    return relation, suppression
