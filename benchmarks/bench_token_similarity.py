"""On demand, not in CI: probescope's token similarity run against a bare forward pass.

Measures, in one process, on a GPT-2-small-shaped model built from config (12 layers,
width 768, vocabulary 50257, random weights):

1. a bare ``model(input_ids)`` under ``torch.inference_mode()`` on a model object that
   nnsight never wrapped (wrapping patches every module's ``forward``);
1b. the same without the unembedding (``model.transformer(input_ids)``): probescope's
   trace stops after the last block it reads, so this is the fair baseline for its own
   overhead, while (1) is what a user's hand-written loop would pay;
2. ``probescope.run`` with ``token_similarity`` over every layer plus the embedding, on
   its own copy of the model (validation, trace, reductions and dataset building included).

It prints the median time of each and the ratios 2/1 and 2/1b, and for memory the peak
resident memory during the timed repeats above the resident memory before them (what
the pass needs on top of the weights; Linux's peak mark is reset first), each variant
in a fresh subprocess so one cannot inherit another's peak. On CPU, RSS is the only honest peak: torch's CPU allocator keeps
no peak statistics.

    python benchmarks/bench_token_similarity.py [--tokens 128 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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


def status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs); return current RSS in kB."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_kb("VmRSS")


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
    elif kind == "body":
        def step():
            with torch.inference_mode():
                model.transformer(ids)
    else:
        config = probescope_config(prompt)

        def step():
            probescope.run(config, models={"m": (model, tokenizer)}, write=False)
    step()  # warm-up
    before = reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = status_kb("VmHWM")
    return {"median_s": statistics.median(times), "peak_growth_mb": (peak - before) / 1024, "rss_mb": before / 1024,
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
    print("tokens  bare s  body s  probescope s  x bare  x body   bare MB  body MB  probescope MB  x bare  x body")
    for tokens in args.tokens:
        r = {}
        for kind in ("bare", "body", "probescope"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(tokens), "--repeats", str(args.repeats)],
                                 check=True, capture_output=True, text=True).stdout
            r[kind] = json.loads(out.strip().splitlines()[-1])
        t = {k: v["median_s"] for k, v in r.items()}
        m = {k: max(v["peak_growth_mb"], 1.0) for k, v in r.items()}
        print(f"{r['bare']['tokens']:>6} {t['bare']:>7.3f} {t['body']:>7.3f} {t['probescope']:>13.3f} "
              f"{t['probescope'] / t['bare']:>7.2f} {t['probescope'] / t['body']:>7.2f} "
              f"{m['bare']:>9.0f} {m['body']:>8.0f} {m['probescope']:>14.0f} "
              f"{m['probescope'] / m['bare']:>7.2f} {m['probescope'] / m['body']:>7.2f}")


if __name__ == "__main__":
    main()
