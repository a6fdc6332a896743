"""A weights-only run streamed from safetensors shards against loading the whole model.

Builds (once, in ``--dir``) a sharded Llama-shaped checkpoint with random bfloat16
weights, written tensor by tensor so the builder never holds more than one block:
``--layers`` blocks of width ``--width``, 32 query heads on 8 key/value heads, MLP width
4 x width, vocabulary ``--vocab`` (untied), and a word-level tokenizer holding every word
of the shipped relations (topped up with fillers to the vocabulary).

Then the full ``head_classifier`` run (every shipped relation, float32 arithmetic, the
probe's default) three ways, each in a fresh subprocess, side by side:

- ``streamed``: dtype ``auto``; every probe reads only weights, so the layout streams the
  shards one block at a time and the model is never built;
- ``loaded-auto``: the same run forced to load the whole model (``from_pretrained``) in
  the checkpoint's dtype, as before streaming existed for this dtype;
- ``loaded-float32``: the whole model in float32, the default load dtype before ``auto``.

Peak memory is the kernel's high-water mark of the child's resident set (VmHWM) above its
resident set just before ``probescope.run``, with glibc's default malloc settings (what a
user sees). That baseline is the process with its libraries imported: probescope and its
registry, and the transformers modeling code every variant uses (about 95 MB of RSS,
imported before measuring since it is code, not working set; ``--cold-baseline``
measures from before it instead). Scores of ``streamed`` and
``loaded-auto`` must be identical (same dtype, same arithmetic); the run stops otherwise.

Finally, the extrapolation to Llama-3.1-70B from this run's measured rates.

    .venv/bin/python benchmarks/bench_streamed.py                  # 15-30 minutes
    .venv/bin/python benchmarks/bench_streamed.py --layers 2 --variants streamed loaded-auto   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_rate, relation_word_tokenizer, status_kb  # noqa: E402

HEADS, KV_HEADS = 32, 8
BF16 = 2  # bytes
VARIANTS = ("streamed", "loaded-auto", "loaded-float32")


def shape(args) -> dict:
    return dict(vocab=args.vocab, width=args.width, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                inner=args.inner or 4 * args.width, head_dim=args.width // args.heads)


def checkpoint_folder(root: Path, s: dict) -> Path:
    """Where the checkpoint of shape ``s`` is kept (reused by later runs)."""
    name = f"llama-{s['layers']}x{s['width']}-v{s['vocab']}"
    if (s["heads"], s["kv_heads"], s["inner"]) != (HEADS, KV_HEADS, 4 * s["width"]):
        name += f"-h{s['heads']}-kv{s['kv_heads']}-mlp{s['inner']}"
    return root / name


def build_checkpoint(folder: Path, s: dict, shard_bytes: int = 500 << 20, device: str = "cpu") -> None:
    """Write the checkpoint shard by shard (random N(0, 0.02^2) weights, unit norms;
    drawn on ``device``, which a GPU does much faster for a 70B-wide shape)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    d, hd, V, inner = s["width"], s["head_dim"], s["vocab"], s["inner"]
    heads, kv_heads = s["heads"], s["kv_heads"]
    tensors = [("model.embed_tokens.weight", (V, d))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                    (p + "self_attn.q_proj.weight", (heads * hd, d)), (p + "self_attn.k_proj.weight", (kv_heads * hd, d)),
                    (p + "self_attn.v_proj.weight", (kv_heads * hd, d)), (p + "self_attn.o_proj.weight", (d, heads * hd)),
                    (p + "mlp.gate_proj.weight", (inner, d)), (p + "mlp.up_proj.weight", (inner, d)),
                    (p + "mlp.down_proj.weight", (d, inner))]
    tensors += [("model.norm.weight", (d,)), ("lm_head.weight", (V, d))]
    groups, current, size = [], [], 0
    for name, dims in tensors:
        nbytes = BF16 * torch.Size(dims).numel()
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, dims))
        size += nbytes
    groups.append(current)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(0)
    weight_map, total = {}, 0
    for n, group in enumerate(groups):
        file = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, dims in group:
            t = torch.ones(dims) if len(dims) == 1 else torch.randn(dims, generator=g, device=device).mul_(0.02)
            shard[name] = t.to(torch.bfloat16).cpu()
            weight_map[name] = file
            total += shard[name].numel() * BF16
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        del shard
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=inner, num_hidden_layers=s["layers"],
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, dtype="bfloat16").save_pretrained(folder)
    relation_word_tokenizer(V).save_pretrained(folder)
    (folder / "shape.json").write_text(json.dumps(s))


def child(variant: str, folder: Path, out: Path, cold: bool = False, device: str = "cpu") -> dict:
    """One run of head_classifier in this process; scores written to ``out``. On a GPU
    also the peak of GPU memory allocated during the run above what was allocated before."""
    import importlib

    import probescope
    from probescope import checkpoint as checkpoint_mod
    from probescope import runner
    from probescope.plugins.manager import load_registry

    scores_mod = importlib.import_module("probescope.probes.head_classifier.relation_scores")
    load_registry()
    if not cold:  # the libraries every variant imports, in the baseline
        import transformers.modeling_utils  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401
    if variant != "streamed":
        runner._weights_only = lambda tasks, info: False  # force the whole model to load
    read_bytes = [0]
    original_read = checkpoint_mod.Checkpoint.read

    def counting_read(self, key):
        tensor = original_read(self, key)
        read_bytes[0] += tensor.numel() * tensor.element_size()
        return tensor

    checkpoint_mod.Checkpoint.read = counting_read
    stats: dict = {}
    scores_mod.relation_scores.__kwdefaults__["stats"] = stats  # count the scoring's multiply-adds
    entry = {"name": "m", "path": str(folder), "device": device}
    if variant == "loaded-float32":
        entry["dtype"] = "float32"
    config = {"models": [entry], "probes": [{"use": "head_classifier"}]}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.init()
        gpu_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    before = status_kb("VmRSS")
    start = time.perf_counter()
    ds = probescope.run(config, write=False)["m"]["head_classifier"]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = status_kb("VmHWM")
    ds[["relation_score", "suppression_score"]].drop_attrs().to_netcdf(out)
    return {"seconds": seconds, "peak_growth_mb": (peak - before) / 1024, "baseline_mb": before / 1024,
            "read_mb": read_bytes[0] / 2 ** 20, "flops": stats.get("flops", 0),
            "gpu_peak_mb": (torch.cuda.max_memory_allocated() - gpu_before) / 2 ** 20 if cuda else None}


def budget_mb(s: dict, budget_bytes: int) -> dict:
    """The goal's terms: embedding, unembedding and one block in the checkpoint's dtype,
    plus the scoring budget."""
    d, V, hd, inner = s["width"], s["vocab"], s["head_dim"], s["inner"]
    block = (2 * s["heads"] * hd * d + 2 * s["kv_heads"] * hd * d + 3 * inner * d + 2 * d) * BF16
    return {"embedding": V * d * BF16 / 2 ** 20, "unembedding": V * d * BF16 / 2 ** 20,
            "one block": block / 2 ** 20, "scoring budget": budget_bytes / 2 ** 20}


def duration(seconds: float) -> str:
    """``seconds`` in the unit that reads best."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def factored_bound_flops(s: dict, layers: int, sources: int) -> float:
    """FLOPs of scoring every head without early stopping, the cheaper product order:
    ``x W_V`` per key/value head, then ``(x W_V)(W_O W_U)`` per head over the whole vocabulary."""
    d, V, hd, H, KV = s["width"], s["vocab"], s["head_dim"], s["heads"], s["kv_heads"]
    per_layer = sources * d * KV * hd + H * (hd * d * V + sources * hd * V)
    return 2.0 * layers * per_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/probescope-bench-streamed"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=HEADS, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=KV_HEADS, help="key/value heads")
    parser.add_argument("--inner", type=int, default=None, help="MLP width (default 4 x width)")
    parser.add_argument("--device", default="cpu", help='where the run computes ("cuda" on a GPU machine)')
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which runs (streamed is always one: the others are compared with it)")
    parser.add_argument("--cold-baseline", action="store_true",
                        help="measure memory from before transformers' modeling code is imported")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    s = shape(args)
    folder = checkpoint_folder(args.dir, s)
    if args.child:
        print(json.dumps(child(args.child[0], folder, Path(args.child[1]), args.cold_baseline, args.device)))
        return

    import numpy as np
    import xarray as xr

    from probescope.probes.head_classifier.relation_scores import BUDGET_BYTES

    if not (folder / "shape.json").is_file():
        start = time.perf_counter()
        build_checkpoint(folder, s, device=args.device)
        print(f"built {folder} in {time.perf_counter() - start:.0f} s")
    size_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 ** 20
    shards = len(list(folder.glob("*.safetensors")))
    print(f"checkpoint: {args.layers} layers, width {args.width}, {s['heads']}/{s['kv_heads']} heads, MLP {s['inner']}, "
          f"vocabulary {args.vocab}, bfloat16: {size_mb:.0f} MB in {shards} shards")
    with open("/proc/loadavg") as f:
        print(f"load average before ({os.cpu_count()} cores): {f.read().split()[:3]}")
    if args.device.startswith("cuda"):
        f32 = matmul_rate(torch.float32, n=8192, repeats=10, device=args.device)
        print(f"device: {torch.cuda.get_device_name(args.device)}; matmul 8192^3: float32 {f32:.0f} GFLOP/s "
              f"(TF32 off, torch's default)")
    else:
        f32 = matmul_rate(torch.float32)  # the scoring's arithmetic (bfloat16 matmul is slow on this CPU)
        print(f"matmul 2048^3: float32 {f32:.0f} GFLOP/s")

    variants = ["streamed", *(v for v in args.variants if v != "streamed")]
    results = {}
    for variant in variants:
        out = args.dir / f"scores-{variant}.nc"
        done = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--layers", str(args.layers),
                               "--width", str(args.width), "--vocab", str(args.vocab), "--heads", str(args.heads),
                               "--kv-heads", str(args.kv_heads), "--inner", str(s["inner"]), "--device", args.device,
                               "--child", variant, str(out)]
                              + ["--cold-baseline"] * args.cold_baseline, check=True, capture_output=True, text=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        results[variant]["scores"] = xr.load_dataset(out)
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().split()[:3]}")

    streamed = results["streamed"]["scores"]
    if "loaded-auto" in results:
        loaded = results["loaded-auto"]["scores"]
        same = all(np.array_equal(streamed[v].values, loaded[v].values, equal_nan=True)
                   for v in ("relation_score", "suppression_score"))
        print(f"streamed scores identical to the loaded model's (same dtype): {same}")
        if not same:
            raise SystemExit("streamed scores differ from the loaded model's")
    if "loaded-float32" in results:
        f32_scores = results["loaded-float32"]["scores"]
        differ = sum(int((~np.isclose(streamed[v].values, f32_scores[v].values, rtol=0, atol=0,
                                      equal_nan=True)).sum()) for v in ("relation_score", "suppression_score"))
        print(f"against a float32 load {differ} of {2 * streamed.relation_score.size} scores differ")

    budget = budget_mb(s, BUDGET_BYTES)
    goal = sum(budget.values())
    gpu = args.device.startswith("cuda")
    print(f"\n{'variant':<16} {'seconds':>8} {'peak MB':>8} {'x ckpt':>7} {'x goal':>7} {'read MB':>8}"
          + (f" {'GPU MB':>8} {'x goal':>7}" if gpu else ""))
    for variant in variants:
        r = results[variant]
        print(f"{variant:<16} {r['seconds']:8.1f} {r['peak_growth_mb']:8.0f} {r['peak_growth_mb'] / size_mb:7.2f} "
              f"{r['peak_growth_mb'] / goal:7.2f} {r['read_mb']:8.0f}"
              + (f" {r['gpu_peak_mb']:8.0f} {r['gpu_peak_mb'] / goal:7.2f}" if gpu else ""))
    if gpu:
        print("peak MB: the host's resident set (tensors pass through it from the shards); "
              "GPU MB: torch's peak allocation on the GPU")
    print("goal: peak above baseline <= " + " + ".join(f"{k} {v:.0f}" for k, v in budget.items())
          + f" = {goal:.0f} MB; baseline (RSS before the run) {results['streamed']['baseline_mb']:.0f} MB")

    # -- extrapolation ---------------------------------------------------------------------
    r = results["streamed"]
    flops = r["flops"]
    from probescope.probes.head_classifier.relations import builtin_relations, tokenize_relation
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    cache: dict = {}
    sources = set()
    for relation in builtin_relations():
        sources.update(tokenize_relation(tokenizer, relation, cache, vocabulary=args.vocab).source.tolist())
    bound = factored_bound_flops(s, args.layers, len(sources))
    score_rate = flops / r["seconds"] / 1e9
    print(f"\nscoring: {flops / 1e9:.0f} GFLOP performed ({flops / bound:.1%} of the {bound / 1e9:.0f} GFLOP "
          f"factored bound, {len(sources)} distinct sources); whole run at {score_rate:.1f} GFLOP/s effective, "
          f"{r['read_mb'] / r['seconds']:.0f} MB/s of checkpoint read over the run")
    big = dict(vocab=128256, width=8192, layers=80, heads=64, kv_heads=8, inner=28672, head_dim=128)
    if all(s[key] == big[key] for key in ("vocab", "width", "heads", "kv_heads", "inner")):
        per_layer = r["seconds"] / args.layers
        print(f"this checkpoint has Llama-3.1-70B's layer shape: {per_layer:.2f} s a layer measured (set-up, "
              f"embedding and unembedding included), so 80 layers at most {80 * per_layer / 60:.1f} min at this "
              f"random model's early stopping")
    big_bound = factored_bound_flops(big, 80, len(sources))
    attn = (2 * 64 * 128 * 8192 + 2 * 8 * 128 * 8192) * BF16
    read_gb = (80 * attn + 2 * 128256 * 8192 * BF16 + 3 * 28672 * 8192 * BF16) / 2 ** 30
    print(f"Llama-3.1-70B: reads {read_gb:.0f} GB of the 131 GB checkpoint; factored bound {big_bound / 1e12:.0f} TFLOP, "
          f"at this run's fraction {flops / bound:.1%}: {big_bound * flops / bound / 1e12:.1f} TFLOP; "
          f"{duration(big_bound * flops / bound / (f32 * 1e9))} at the float32 matmul rate "
          f"({duration(big_bound / (f32 * 1e9))} for the bound)")
    big_budget = budget_mb(big, BUDGET_BYTES)
    big_goal = sum(big_budget.values())
    print("Llama-3.1-70B goal terms: " + ", ".join(f"{k} {v / 1024:.2f} GB" for k, v in big_budget.items())
          + f" = {big_goal / 1024:.1f} GB")
    weights = budget["embedding"] + budget["unembedding"] + budget["one block"]
    big_weights = big_budget["embedding"] + big_budget["unembedding"] + big_budget["one block"]
    # scoring and everything else, measured here (on a GPU, in its memory: the weights live there)
    rest = (r["gpu_peak_mb"] if gpu else r["peak_growth_mb"]) - weights
    print(f"  estimate: those weights {big_weights / 1024:.1f} GB + this run's measured rest {rest / 1024:.2f} GB "
          f"(scoring, tokenisation; grows with width for the source vectors) = {(big_weights + rest) / 1024:.1f} GB, "
          f"against {2 * 70.6:.0f} GB to load it in bfloat16 and {4 * 70.6:.0f} GB in float32")


if __name__ == "__main__":
    main()
