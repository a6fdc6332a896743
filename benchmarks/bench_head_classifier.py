"""The head classifier's scoring against the plain reference loop.

On a GPT-2-small-shaped model with random weights (12 layers x 12 heads, width 768,
vocabulary 50257), score every shipped relation (all their pairs: a word-level tokenizer
holds every relation word, topped up with filler tokens to 50257) with
:func:`probescope.probes.head_classifier.relation_scores.relation_scores` and with
:func:`probescope.probes.head_classifier.relation_scores.reference_scores` (for each relation, for each head:
project, then ``topk``). Both run in float64, where near-ties cannot flip a rank, and the
scores must be identical. The fast path is also timed in float32, the probe's default.

Also printed: this machine's matmul rate (a 2048^3 product in float32 and bfloat16), the
multiply-adds the fast path actually performed and the rate it ran them at, and what the
whole factored product ``(x W_V)(W_O W_U)`` over the full vocabulary would cost at the
float32 rate (the bound without early stopping). Peak memory: each variant in its own
subprocess (see ``common.py``).

    .venv/bin/python benchmarks/bench_head_classifier.py             # full run, about 20 minutes
    .venv/bin/python benchmarks/bench_head_classifier.py --relations 3   # the first three only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_subprocess, matmul_rate, measure, relation_word_tokenizer  # noqa: E402

VOCAB, WIDTH, LAYERS, HEADS = 50257, 768, 12, 12


def build(relations: int | None):
    """The model's layout and every shipped relation's pairs as (source, target, k)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from probescope.architectures.layout import ModelLayout
    from probescope.models import find_adapter
    from probescope.plugins.manager import load_registry
    from probescope.probes.head_classifier import HeadClassifierParameters
    from probescope.probes.head_classifier.relations import builtin_relations, tokenize_relation

    chosen = list(builtin_relations())[:relations]
    tokenizer = relation_word_tokenizer(VOCAB, relations)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS)).eval()
    adapter = find_adapter(model.config, load_registry())
    layout = ModelLayout(model, adapter, adapter.blocks(model))
    params = HeadClassifierParameters()
    cache: dict = {}
    pairs = []
    for relation in chosen:
        t = tokenize_relation(tokenizer, relation, cache, vocabulary=VOCAB)
        pairs.append((t.source, t.target, params.k_for(relation, VOCAB)))
    return layout, pairs


def child(what: str, variant: str, relations: int | None) -> dict:
    from common import peak_growth_mb

    from probescope.probes.head_classifier.relation_scores import PairSet, reference_scores, relation_scores

    layout, pairs = build(relations)
    if variant == "reference":
        # Its peak is that of one head on the largest relation: measure one layer of that.
        largest = [max(pairs, key=lambda p: len(p[0]))]
        return {"peak_growth_mb": peak_growth_mb(lambda: reference_scores(layout, largest, layers=[1]), 1)}
    dtype = {"fast-float32": torch.float32, "fast-float64": torch.float64}[variant]
    pair_set = PairSet.of(pairs)
    return measure(lambda: relation_scores(layout, pair_set, dtype=dtype), what, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relations", type=int, default=None, help="score only the first N shipped relations")
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.relations)))
        return

    import numpy as np

    from probescope.probes.head_classifier.relation_scores import PairSet, reference_scores, relation_scores

    extra = [] if args.relations is None else ["--relations", str(args.relations)]
    script = str(Path(__file__).resolve())
    layout, pairs = build(args.relations)
    P = sum(len(s) for s, _, _ in pairs)
    S = len(torch.unique(torch.cat([s for s, _, _ in pairs])))
    hd = WIDTH // HEADS
    print(f"model: {LAYERS} x {HEADS} heads, width {WIDTH}, vocabulary {VOCAB}; "
          f"{len(pairs)} relations, {P} pairs, {S} distinct sources")
    f32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    f64 = matmul_rate(torch.float64)
    print(f"matmul 2048^3: float32 {f32:.0f} GFLOP/s, float64 {f64:.0f}, bfloat16 {bf16:.0f}")

    # Correctness first, in this process: float64 fast path against the reference loop.
    stats: dict = {}
    start = time.perf_counter()
    fast = relation_scores(layout, PairSet.of(pairs), dtype=torch.float64, stats=stats)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = reference_scores(layout, pairs)
    reference_s = time.perf_counter() - start
    same = np.array_equal(fast[0], reference[0]) and np.array_equal(fast[1], reference[1])
    print(f"float64 scores identical to the reference loop: {same} "
          f"(max relation score {np.nanmax(reference[0]):.3f}, max suppression {np.nanmax(reference[1]):.3f})")
    if not same:
        raise SystemExit("the fast path differs from the reference loop")

    rows = []
    for variant in ("fast-float32", "fast-float64", "reference"):
        timing = {"median_s": reference_s} if variant == "reference" else in_subprocess(script, "time", variant, *extra)
        memory = in_subprocess(script, "memory", variant, *extra)
        rows.append((variant, timing["median_s"], memory["peak_growth_mb"]))
    print(f"\n{'variant':<14} {'seconds':>9} {'x faster':>9} {'peak MB':>8}")
    for variant, seconds, mb in rows:
        print(f"{variant:<14} {seconds:9.2f} {reference_s / seconds:9.1f} {mb:8.0f}")

    flops = stats["flops"]
    print(f"\nfast path (float64, in-process run {fast_s:.2f} s): {flops / 1e9:.0f} GFLOP performed, "
          f"{flops / 1e9 / fast_s:.0f} GFLOP/s")
    f32_s = rows[0][1]
    full = 2 * LAYERS * HEADS * (S * hd * VOCAB + hd * WIDTH * VOCAB)
    print(f"float32 fast path: {flops / 1e9 / f32_s:.0f} GFLOP/s of the machine's {f32:.0f}; the full factored "
          f"product over the whole vocabulary would be {full / 1e9:.0f} GFLOP, {full / 1e9 / f32:.1f} s at that rate")
    reference_flops = 2 * LAYERS * HEADS * (P * WIDTH * VOCAB + len(pairs) * WIDTH * hd * WIDTH)
    print(f"reference loop: {reference_flops / 1e9:.0f} GFLOP, {reference_flops / 1e9 / reference_s:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
