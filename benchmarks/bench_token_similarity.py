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
resident memory during repeats above the resident memory before them (what the pass
needs on top of the weights), each measured in fresh subprocesses as described in
``common.py``.

    python benchmarks/bench_token_similarity.py [--tokens 128 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_one_pass import child as one_pass_child  # noqa: E402
from common import in_subprocess  # noqa: E402


def child(what: str, kind: str, tokens: int, repeats: int) -> dict:
    """The one-pass benchmark's variants, on its GPT-2-small-shaped model, with only
    token_similarity at the embedding and every block."""
    probes = [{"use": "token_similarity", "layers": ["embed", *range(12)]}]
    return one_pass_child(what, kind, "gpt2", tokens, repeats, probes=probes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "KIND", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, kind, tokens = args.child
        print(json.dumps(child(what, kind, int(tokens), args.repeats)))
        return
    print("tokens  bare s  body s  probescope s  x bare  x body   bare MB  body MB  probescope MB  x bare  x body")
    for tokens in args.tokens:
        r = {}
        for kind in ("bare", "body", "probescope"):
            r[kind] = {**in_subprocess(__file__, "time", kind, str(tokens), "--repeats", str(args.repeats)),
                       **in_subprocess(__file__, "memory", kind, str(tokens), "--repeats", str(args.repeats))}
        t = {k: v["median_s"] for k, v in r.items()}
        m = {k: max(v["peak_growth_mb"], 1.0) for k, v in r.items()}
        print(f"{r['bare']['tokens']:>6} {t['bare']:>7.3f} {t['body']:>7.3f} {t['probescope']:>13.3f} "
              f"{t['probescope'] / t['bare']:>7.2f} {t['probescope'] / t['body']:>7.2f} "
              f"{m['bare']:>9.0f} {m['body']:>8.0f} {m['probescope']:>14.0f} "
              f"{m['probescope'] / m['bare']:>7.2f} {m['probescope'] / m['body']:>7.2f}")


if __name__ == "__main__":
    main()
