"""On demand, not in CI: the size and memory of token_similarity's datasets on a skewed prompt set.

The case that made the full form's dense storage hurt: 63 prompts of about 20 tokens and
one of 512 (padded to the longest, the dense dataset was 806 MB and 0.9% finite), on a
GPT-2-small-shaped model built from config (12 layers, width 768, vocabulary 50257,
random weights), ``token_similarity`` at the embedding and every block, batch size 8.
For each form (``full``, ``by_distance``) it runs ``probescope.run`` writing the dataset
and reports, each from fresh subprocesses:

- the dataset's size on disk, and how many similarity values it holds;
- the run's wall time (median of ``--repeats``; one warm-up run on a short prompt first,
  so imports and first-call set-up are not counted);
- the peak resident memory during the run above the resident memory before it (the model
  loaded), once with glibc's default malloc (what users see) and once with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (RSS follows live memory; see ``common.py``);
- the same peak for a bare forward over the same batches (``model.transformer``, no
  probescope), for scale.

    python benchmarks/bench_similarity_storage.py [--short 63] [--short-tokens 20] [--long-tokens 512]
        [--before OLD_CHECKOUT]
    python benchmarks/bench_similarity_storage.py --uniform 256 [--batch-size 16] [--before OLD_CHECKOUT]

``--uniform N`` takes instead the prompt set of ``bench_scale.py``: N prompts of 20 to
256 tokens (lengths drawn uniformly, seeded, in random order), where the full form's
size grows with the prompt count rather than with one long prompt.

``--before`` adds the full form as another checkout of probescope computes it (the code
before a change, its ``probes``, ``renderers`` and ``plugins`` folders linked inside its
``probescope`` folder as an install would place them), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import MEMORY_ENV, reset_peak_rss, status_kb  # noqa: E402

BATCH_SIZE = 8


def build(short: int, short_tokens: int, long_tokens: int, uniform: int = 0):
    """The model, its tokenizer and the skewed prompts (``short`` of about
    ``short_tokens`` tokens, then one of ``long_tokens``), or with ``uniform`` that many
    prompts of 20-256 tokens (``bench_scale.prompt_texts``)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from probescope import demo

    tokenizer = demo.build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024))
    if uniform:
        from bench_scale import prompt_texts

        return model.eval(), tokenizer, prompt_texts(tokenizer, uniform)
    ids = tokenizer(" ".join(demo.DEMO_CORPUS.split() * 200))["input_ids"]
    prompts = [tokenizer.decode(ids[k * 7 : k * 7 + short_tokens]) for k in range(short)]
    prompts.append(tokenizer.decode(ids[: long_tokens]))
    return model.eval(), tokenizer, prompts


def child(what: str, form: str, short: int, short_tokens: int, long_tokens: int, repeats: int,
          uniform: int = 0, batch_size: int = BATCH_SIZE) -> dict:
    import torch

    import probescope

    model, tokenizer, prompts = build(short, short_tokens, long_tokens, uniform)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    form_key = {"form": form} if form != "full" else {}  # the default, and all code before the key existed knows
    probes = [{"use": "token_similarity", "layers": ["embed", *range(12)], **form_key}] if form != "bare" else []
    out_dir = Path(tempfile.mkdtemp(prefix="simstore."))

    def run(texts):
        if form == "bare":  # the same batches, no probescope: the pass alone
            with torch.inference_mode():
                for start in range(0, len(texts), batch_size):
                    group = [tokenizer(t)["input_ids"] for t in texts[start : start + batch_size]]
                    width = max(map(len, group))
                    ids = torch.tensor([g + [0] * (width - len(g)) for g in group])
                    mask = torch.tensor([[1] * len(g) + [0] * (width - len(g)) for g in group])
                    model.transformer(ids, attention_mask=mask)
            return
        config = {"inputs": {"prompts": texts, "batch_size": batch_size}, "probes": probes,
                  "output": {"dir": str(out_dir)}}
        probescope.run(config, models={"gpt2": (model, tokenizer)})

    run(prompts[:2])  # warm-up: imports, nnsight's first wrap
    result = {"tokens": lengths}
    if what == "time":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(prompts)
            times.append(time.perf_counter() - start)
        result["median_s"] = statistics.median(times)
    else:
        import gc

        gc.collect()
        before = reset_peak_rss()
        start = time.perf_counter()
        run(prompts)
        result["median_s"] = time.perf_counter() - start
        result["peak_growth_mb"] = (status_kb("VmHWM") - before) / 1024
    path = out_dir / "gpt2" / "token_similarity.nc"
    if path.exists():
        import xarray as xr

        result["file_mb"] = path.stat().st_size / 1e6
        with xr.open_dataset(path) as ds:
            sim = ds["similarity"]
            result["values"] = int(sim.size)
            result["finite"] = int(sim.notnull().sum())
    return result


def in_subprocess(env: dict, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=63)
    parser.add_argument("--short-tokens", type=int, default=20)
    parser.add_argument("--long-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uniform", type=int, default=0, metavar="N",
                        help="N prompts of 20-256 tokens (bench_scale.py's set) instead of the skewed set")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--no-time", action="store_true",
                        help="measure memory only (the time column is then the memory run's wall time, "
                             "under the mmap threshold)")
    parser.add_argument("--forms", nargs="+", default=["bare", "full", "by_distance"])
    parser.add_argument("--before", metavar="CHECKOUT",
                        help="also run the full form with this checkout of probescope first on PYTHONPATH "
                             "(the code before a change), side by side in the same run")
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "FORM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.short, args.short_tokens, args.long_tokens, args.repeats, args.uniform, args.batch_size)
    if args.child:
        what, form = args.child
        print(json.dumps(child(what, form, *shape)))
        return
    options = ["--short", str(args.short), "--short-tokens", str(args.short_tokens),
               "--long-tokens", str(args.long_tokens), "--repeats", str(args.repeats),
               "--uniform", str(args.uniform), "--batch-size", str(args.batch_size)]
    variants = [(form, form, {}) for form in args.forms]
    if args.before:
        before = {"PYTHONPATH": os.path.abspath(args.before)}
        variants.insert(1, ("full before", "full", before))
    print("variant       time s  peak MB, default malloc  peak MB, mmap threshold  file MB  values    finite %")
    tokens = None
    for name, form, env in variants:
        default = in_subprocess(env, "--child", "memory", form, *options)
        mapped = in_subprocess({**env, **MEMORY_ENV}, "--child", "memory", form, *options)
        timed = mapped if args.no_time else in_subprocess(env, "--child", "time", form, *options)
        tokens = timed["tokens"]
        file_mb = f"{timed['file_mb']:.2f}" if "file_mb" in timed else "-"
        values = timed.get("values", 0)
        finite = f"{100 * timed['finite'] / values:.1f}" if values else "-"
        print(f"{name:<12} {timed['median_s']:>7.2f}  {default['peak_growth_mb']:>23.0f}  "
              f"{mapped['peak_growth_mb']:>23.0f}  {file_mb:>7}  {values or '-':>9}  {finite:>8}", flush=True)
    if tokens and args.uniform:
        print(f"prompts: {len(tokens)}, tokens: {min(tokens)}-{max(tokens)}, batch size {args.batch_size}, "
              f"{sum(n * (n + 1) // 2 for n in tokens)} token pairs (j <= i) per layer")
    elif tokens:
        print(f"prompts: {len(tokens)}, tokens: {min(tokens[:-1])}-{max(tokens[:-1])} and {tokens[-1]}, "
              f"{sum(n * (n + 1) // 2 for n in tokens)} token pairs (j <= i) per layer")


if __name__ == "__main__":
    main()
