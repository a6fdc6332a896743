"""On demand, not in CI: every activation probe in one traced pass, against a bare forward.

Measures, in one process per variant, on two models built from config with random
weights:

- ``gpt2``: GPT-2-small-shaped (12 layers, width 768, 12 heads, vocabulary 50257);
- ``llama``: Llama-shaped (12 layers, width 768, 12 heads, 4 key/value heads, MLP width
  2048, vocabulary 32000);

at each sequence length, the median over repeats of:

1. ``bare``: ``model(input_ids)`` under ``torch.inference_mode()``, on a model object
   nnsight never wrapped;
2. ``body``: the same without the unembedding (probescope's trace stops after the last
   block it reads, so this is the baseline for its own overhead);
3. ``probescope``: ``probescope.run`` with ``token_similarity`` over every layer and
   ``component_norm`` (``activation_norm``) over all seven components of every layer, in
   one run: validation, the shared trace, reductions and dataset building included.

It prints the ratio 3/1 for time and peak memory (goal: at most 1.15 each) and 3/2.

    python benchmarks/bench_one_pass.py [--models gpt2 llama] [--tokens 128 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import in_subprocess, measure  # noqa: E402


def build(family: str, tokens: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from probescope import demo

    tokenizer = demo.build_tokenizer()
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024))
        body = model.transformer
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                             num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                                             max_position_embeddings=1024))
        body = model.model
    words = demo.DEMO_CORPUS.split() * 200
    ids = tokenizer(" ".join(words))["input_ids"][:tokens]
    prompt = tokenizer.decode(ids)
    ids = tokenizer(prompt)["input_ids"]
    return model.eval(), body, tokenizer, prompt, torch.tensor([ids])


#: Every activation probe at every site: token similarity over all layers and the
#: activation norm of all seven components of all layers.
ONE_PASS_PROBES = [{"use": "token_similarity"}, {"use": "component_norm", "statistic": "activation_norm"}]


def child(what: str, kind: str, family: str, tokens: int, repeats: int, probes: list = ONE_PASS_PROBES) -> dict:
    """Measure one variant (``bare``, ``body`` or ``probescope`` running ``probes``)."""
    import torch

    import probescope

    torch.set_num_threads(os.cpu_count() or 1)
    model, body, tokenizer, prompt, ids = build(family, tokens)
    if kind == "bare":
        def step():
            with torch.inference_mode():
                model(ids)
    elif kind == "body":
        def step():
            with torch.inference_mode():
                body(ids)
    else:
        config = {"inputs": {"prompts": [prompt]}, "probes": probes}

        def step():
            probescope.run(config, models={"m": (model, tokenizer)}, write=False)
    return {**measure(step, what, repeats), "tokens": int(ids.shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", nargs=4, metavar=("WHAT", "KIND", "MODEL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, kind, family, tokens = args.child
        print(json.dumps(child(what, kind, family, int(tokens), args.repeats)))
        return
    print("model  tokens  bare s  body s  probescope s  x bare  x body   bare MB  body MB  probescope MB  x bare")
    for family in args.models:
        for tokens in args.tokens:
            r = {}
            for kind in ("bare", "body", "probescope"):
                r[kind] = {**in_subprocess(__file__, "time", kind, family, str(tokens), "--repeats", str(args.repeats)),
                           **in_subprocess(__file__, "memory", kind, family, str(tokens), "--repeats", str(args.repeats))}
            t = {k: v["median_s"] for k, v in r.items()}
            m = {k: max(v["peak_growth_mb"], 1.0) for k, v in r.items()}
            print(f"{family:<6} {r['bare']['tokens']:>6} {t['bare']:>7.3f} {t['body']:>7.3f} {t['probescope']:>13.3f} "
                  f"{t['probescope'] / t['bare']:>7.2f} {t['probescope'] / t['body']:>7.2f} "
                  f"{m['bare']:>9.0f} {m['body']:>8.0f} {m['probescope']:>14.0f} {m['probescope'] / m['bare']:>7.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
