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

Memory stays bounded: heads are processed in groups and the vocabulary in chunks, so the
largest intermediate is about ``budget_bytes``, whatever the model's size.
"""

from __future__ import annotations

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
                   dtype: torch.dtype) -> torch.Tensor:
    """What a head of ``layer`` reads for each source token: its embedding, or for
    ``layer > 0`` with ``through_first_mlp`` what block 0's MLP writes for it."""
    with torch.no_grad():
        embedding = layout.embedding()
        device = embedding.weight.device
        x = embedding(tokens.to(device))
        if layer > 0 and through_first_mlp:
            x = layout.mlp_output(0, x)
        return x.to(dtype)


def _sources_by_layer(layout: ModelLayout, tokens: torch.Tensor, through_first_mlp: bool,
                      dtype: torch.dtype) -> Callable[[int], torch.Tensor]:
    cache: dict[bool, torch.Tensor] = {}

    def get(layer: int) -> torch.Tensor:
        key = layer > 0 and through_first_mlp
        if key not in cache:
            cache[key] = source_vectors(layout, tokens, layer, through_first_mlp, dtype)
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
    convert every entry to int64 first."""
    return mask.view(torch.uint8).sum(1, dtype=torch.int32).long()


def _layer_hits(x: torch.Tensor, source_row: torch.Tensor, target: torch.Tensor, k: torch.Tensor,
                W_V: torch.Tensor, W_O: torch.Tensor, kv_head: torch.Tensor, W_U: torch.Tensor,
                dtype: torch.dtype, budget: int, first_chunk: int, max_chunk: int,
                stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For one layer: ``(heads, pairs)`` bools, target in the top k / bottom k.

    :param x: ``(sources, d)`` distinct source vectors; ``source_row[p]`` is pair p's row.
    :param k: ``(pairs,)`` top-k of each pair's relation.
    """
    H, hd, d = W_O.shape
    S, P, V = x.shape[0], target.numel(), W_U.shape[1]
    device = x.device
    itemsize = torch.empty((), dtype=dtype).element_size()
    relation_hit = torch.zeros(H, P, dtype=torch.bool, device=device)
    suppression_hit = torch.zeros(H, P, dtype=torch.bool, device=device)
    if P == 0:
        return relation_hit, suppression_hit
    # Heads in groups small enough that x W_V W_O (group, sources, d) and the first chunk's
    # logits, (group, sources, chunk) and (group, pairs, chunk), fit the budget.
    per_head = (S * d + S * first_chunk + P * first_chunk + P * hd) * itemsize
    group = max(1, min(H, budget // max(1, per_head)))
    unique_kv = torch.unique(kv_head)
    W_V_kv = {int(g): W_V[int((kv_head == g).nonzero()[0])].to(dtype) for g in unique_kv}
    U_target = W_U[:, target].to(dtype).t()  # (P, d)
    u_norm_max = float(W_U.to(dtype).norm(dim=0).max())
    flops = 0

    for h0 in range(0, H, group):
        heads = range(h0, min(H, h0 + group))
        n = len(heads)
        # x W_V once per key/value head, then per query head (n, S, hd) and x W_V W_O (n, S, d)
        xv = {g: x @ w for g, w in W_V_kv.items() if g in {int(kv_head[h]) for h in heads}}
        Y = torch.stack([xv[int(kv_head[h])] for h in heads])
        W_O_g = W_O[h0:h0 + n].to(dtype)
        Z = torch.bmm(Y, W_O_g)  # (n, S, d)
        # Each pair's target logit, x W_V (W_O u_target): (n, P)
        t = (Y[:, source_row] * torch.matmul(U_target, W_O_g.transpose(1, 2))).sum(-1)
        tol = tie_tolerance(Y.norm(dim=-1)[:, source_row], W_O_g.flatten(1).norm(dim=1)[:, None], u_norm_max, d,
                            dtype)  # (n, P)
        flops += 2 * (len(xv) * S * d * hd + n * S * hd * d + n * P * d * hd + n * P * hd)
        above = torch.zeros(n, P, dtype=torch.long, device=device)
        below = torch.zeros(n, P, dtype=torch.long, device=device)
        kk = k.to(device).expand(n, P)
        open_ = torch.ones(n, P, dtype=torch.bool, device=device)

        start, size = 0, first_chunk
        while start < V:
            rows = open_.nonzero()  # (N, 2): (head in group, pair)
            N = rows.shape[0]
            if N == 0:
                break
            open_heads = torch.unique(rows[:, 0])
            # Operations per vocabulary column of each product order; the cheaper one wins.
            factored = open_heads.numel() * (hd * d + S * hd)
            direct = N * d
            held = open_heads.numel() * S + N if factored < direct else N  # elements per column
            stop = start + max(1, min(size, V - start, budget // (itemsize * held)))
            c = stop - start
            U = W_U[:, start:stop].to(dtype)  # (d, c)
            flops += 2 * min(factored, direct) * c
            if factored < direct:
                A = torch.matmul(W_O_g[open_heads], U)  # (h', hd, c)
                L = torch.bmm(Y[open_heads], A)  # (h', S, c)
                position = torch.full((n,), -1, dtype=torch.long, device=device)
                position[open_heads] = torch.arange(open_heads.numel(), device=device)
                logits = L[position[rows[:, 0]], source_row[rows[:, 1]]]  # (N, c)
                del A, L
            else:
                logits = Z[rows[:, 0], source_row[rows[:, 1]]] @ U  # (N, c)
            own = t[rows[:, 0], rows[:, 1]]
            slack = tol[rows[:, 0], rows[:, 1]]
            # The target's own column is not a rival: NaN compares false both ways.
            tgt = target[rows[:, 1]]
            inside = (tgt >= start) & (tgt < stop)
            logits[inside.nonzero().squeeze(1), (tgt[inside] - start)] = float("nan")
            # Ties (within rounding) count against the target, for both scores.
            above[rows[:, 0], rows[:, 1]] += _count(logits >= (own - slack)[:, None])
            below[rows[:, 0], rows[:, 1]] += _count(logits <= (own + slack)[:, None])
            open_ = (above < kk) | (below < kk)
            start, size = stop, min(max_chunk, size * 2)
        relation_hit[h0:h0 + n] = above < kk
        suppression_hit[h0:h0 + n] = below < kk
    if stats is not None:
        stats["flops"] = stats.get("flops", 0) + flops
    return relation_hit, suppression_hit


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
    sources = _sources_by_layer(layout, distinct, through_first_mlp, dtype)
    W_U = layout.unembedding().matrix().detach()
    target, source_row, k = pairs.target.to(device), source_row.to(device), pairs.k.to(device)[pairs.relation.to(device)]
    with torch.no_grad():
        for i, layer in enumerate(progress(layers)):
            w = layout.heads(layer)
            hit, supp = _layer_hits(sources(layer).to(device), source_row, target, k, w.W_V.detach(),
                                    w.W_O.detach(), w.kv_head.to(device), W_U, dtype, budget_bytes,
                                    first_chunk, max_chunk, stats)
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
