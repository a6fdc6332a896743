"""On demand, not in CI: probescope's token similarity run against a bare forward pass.

Measures, in one process, on a GPT-2-small-shaped model built from config (12 layers,
width 768, vocabulary 50257, random weights):

1. a bare ``model(input_ids)`` under ``torch.inference_mode()`` on a model object that
   nnsight never wrapped (wrapping patches every module's ``forward``);
2. ``probescope.run`` with ``token_similarity`` over every layer plus the embedding, on
   its own copy of the model (validation, trace, reductions and dataset building included).

It prints the median time of each and the ratio 2/1, and the peak resident memory of
each measured in a fresh subprocess (so one cannot inherit the other's peak).

    python benchmarks/bench_token_similarity.py [--tokens 128 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(tokens: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from probescope import demo

    tokenizer = demo.build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)).eval()
    words = (demo.DEMO_CORPUS.split() * 200)
    ids = tokenizer(" ".join(words))["input_ids"][:tokens]
    prompt = tokenizer.decode(ids)
    ids = tokenizer(prompt)["input_ids"]
    return model, tokenizer, prompt, torch.tensor([ids])


def probescope_config(prompt: str) -> dict:
    return {"inputs": {"prompts": [prompt]},
            "probes": [{"use": "token_similarity", "layers": ["embed", *range(12)]}]}


def measure(kind: str, tokens: int, repeats: int) -> dict:
    import torch

    import probescope

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer, prompt, ids = build(tokens)
    if kind == "bare":
        def step():
            with torch.inference_mode():
                model(ids)
    else:
        config = probescope_config(prompt)

        def step():
            probescope.run(config, models={"m": (model, tokenizer)}, write=False)
    step()  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_s": statistics.median(times), "peak_rss_mb": peak / 1024, "rss_before_mb": before / 1024,
            "tokens": int(ids.shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.repeats)))
        return
    print(f"{'tokens':>6} {'bare s':>8} {'probescope s':>12} {'time x':>7} {'bare MB':>8} {'probescope MB':>13} {'mem x':>6}")
    for tokens in args.tokens:
        result = {}
        for kind in ("bare", "probescope"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(tokens), "--repeats", str(args.repeats)],
                                 check=True, capture_output=True, text=True).stdout
            result[kind] = json.loads(out.strip().splitlines()[-1])
        b, p = result["bare"], result["probescope"]
        print(f"{b['tokens']:>6} {b['median_s']:>8.3f} {p['median_s']:>12.3f} {p['median_s'] / b['median_s']:>7.2f} "
              f"{b['peak_rss_mb']:>8.0f} {p['peak_rss_mb']:>13.0f} {p['peak_rss_mb'] / b['peak_rss_mb']:>6.2f}")


if __name__ == "__main__":
    main()
