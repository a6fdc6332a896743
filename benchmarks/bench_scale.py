"""On demand, not in CI: activation probes over many prompts, against a bare forward and
against the same statistics written with plain forward hooks.

Prompts: ``--prompts`` counts (default 250, 500 and 1000: the curve), each a window of
20 to 256 tokens of the demo corpus (lengths drawn uniformly, seeded, in random order),
batch size 16. Models built from config with random weights (see ``bench_one_pass.py``):
GPT-2-small-shaped and Llama-shaped. Variants, each in a fresh subprocess:

1. ``bare``: ``model(input_ids, attention_mask=...)`` under ``torch.inference_mode()``
   over the prompts in the user's order, 16 at a time, right-padded to each batch's
   longest (naive padding), logits included: what a user's loop pays;
2. ``hooks``: the same batches through the model's body (no unembedding) with plain
   forward hooks computing the same statistics: every component's summed output norm
   and real-token count per (layer, component), accumulated in place in float64, and
   token similarity in the form the probescope variant asks for;
3. ``probescope``: ``probescope.run`` (no files written) with ``component_norm``
   (``activation_norm``, all layers, all seven components) and ``token_similarity`` in
   the form ``--similarity`` names (``by_distance``, the summary, by default; ``full``;
   ``none`` leaves it out): validation, tokenization,
   the shared traces, reductions and dataset building included.

Time: one timed run after a warm-up on two short prompts (``--repeats`` for a median).
Memory, as users see it: the peak resident set during one run above the resident set
just before it (the model already loaded), in a fresh process, once with glibc's
default malloc and once with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed blocks go back to
the kernel, so RSS follows live memory; see ``common.py``).

On a GPU (``--device cuda``) the model, the batches and the hooks' totals live on the
GPU; each variant runs once per model over every count (250, 500, 1,000 in one
process, timed with ``torch.cuda.synchronize``), and its GPU memory is torch's peak
allocation during the run above what was allocated before it (``gpu-memory``), exact
where RSS is not.

    python benchmarks/bench_scale.py [--prompts 250 500 1000] [--models gpt2 llama]
        [--similarity by_distance|full|none] [--repeats 1] [--variants bare hooks probescope]
        [--device cpu|cuda] [--measure time memory memory-default] [--longest 256]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_one_pass import build as build_model  # noqa: E402
from common import in_subprocess, reset_peak_rss, status_kb  # noqa: E402

BATCH_SIZE = 16
SHORTEST, LONGEST = 20, int(os.environ.get("BENCH_SCALE_LONGEST", "256"))  # --longest sets it for the children
COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "mlp.gate")


def prompt_texts(tokenizer, count: int, seed: int = 0) -> list[str]:
    """``count`` prompts of ``SHORTEST``-``LONGEST`` tokens (drawn uniformly, in random
    order), windows of the demo corpus; the first ``n`` of a longer list are the same."""
    from probescope import demo

    ids = tokenizer(" ".join(demo.DEMO_CORPUS.split() * 100))["input_ids"]
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        n = rng.randint(SHORTEST, LONGEST)
        start = rng.randrange(0, len(ids) - LONGEST)
        text = tokenizer.decode(ids[start:start + n])
        while len(tokenizer(text)["input_ids"]) > LONGEST:  # decoding can merge into other tokens
            text = text[:-1]
        texts.append(text)
    return texts


def user_order_batches(tokenizer, texts: list[str]):
    """``(input_ids, attention_mask)`` per batch of ``BATCH_SIZE`` prompts in the given
    order, each prompt tokenized on its own and right-padded to its batch's longest."""
    import torch

    out = []
    for start in range(0, len(texts), BATCH_SIZE):
        rows = [tokenizer(t)["input_ids"] for t in texts[start:start + BATCH_SIZE]]
        width = max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        out.append((ids, mask))
    return out


def component_modules(model, family: str) -> dict[tuple[int, str], tuple[object, slice | None]]:
    """``(layer, component) -> (module, slice of its output or None)`` for plain hooks."""
    out = {}
    if family == "gpt2":
        width = model.config.n_embd
        for layer, block in enumerate(model.transformer.h):
            for i, name in enumerate(("attn.q", "attn.k", "attn.v")):
                out[(layer, name)] = (block.attn.c_attn, slice(i * width, (i + 1) * width))
            out[(layer, "attn.o")] = (block.attn.c_proj, None)
            out[(layer, "mlp.up")] = (block.mlp.c_fc, None)
            out[(layer, "mlp.down")] = (block.mlp.c_proj, None)
    else:
        for layer, block in enumerate(model.model.layers):
            attn, mlp = block.self_attn, block.mlp
            for name, module in (("attn.q", attn.q_proj), ("attn.k", attn.k_proj), ("attn.v", attn.v_proj),
                                 ("attn.o", attn.o_proj), ("mlp.up", mlp.up_proj), ("mlp.down", mlp.down_proj),
                                 ("mlp.gate", mlp.gate_proj)):
                out[(layer, name)] = (module, None)
    return out


def hooks_run(model, body, family: str, batches, similarity: str, n_prompts: int):
    """The statistics with plain forward hooks over the body: per (layer, component) the
    summed norm and token count (float64, in place); per (prompt, layer) the dense
    similarity matrix when ``similarity == "full"``; per (layer, distance i - j) the sum
    and count of the similarities when ``similarity == "by_distance"`` (in place)."""
    import numpy as np
    import torch

    from probescope.probes.token_similarity import similarity_matrix

    layers = model.config.num_hidden_layers
    device = next(model.parameters()).device
    sums = torch.zeros((layers, len(COMPONENTS), 2), dtype=torch.float64, device=device)
    sims = (np.full((n_prompts, layers + 1, LONGEST, LONGEST), np.nan, dtype=np.float32)
            if similarity == "full" else None)
    by_distance = (torch.zeros((layers + 1, 2, LONGEST), dtype=torch.float64, device=device)
                   if similarity == "by_distance" else None)
    state = {}
    handles = []

    def norm_hook(layer, ci, part):
        def hook(module, args, output):
            out = output if part is None else output[..., part]
            norms = torch.linalg.vector_norm(out.float(), dim=-1)
            mask = state["mask"]
            sums[layer, ci, 0] += norms.masked_fill(~mask, 0).sum(dtype=torch.float64)
            sums[layer, ci, 1] += state["tokens"]
        return hook

    def sim_hook(layer):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            rows, width = hidden.shape[:2]
            start = state["row"]
            sims[start:start + rows, layer, :width, :width] = similarity_matrix(hidden, state["mask"], "cosine").cpu().numpy()
        return hook

    def distance_hook(layer):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
            width = hidden.shape[1]
            position = torch.arange(width, device=hidden.device)
            distance = position[:, None] - position[None, :]
            mask = state["mask"]
            keep = mask[:, :, None] & mask[:, None, :] & (distance >= 0)
            values = (unit @ unit.transpose(1, 2))[keep].double()
            at = distance.expand_as(keep)[keep]
            by_distance[layer, 0].index_add_(0, at, values)
            by_distance[layer, 1].index_add_(0, at, torch.ones_like(values))
        return hook

    for (layer, name), (module, part) in component_modules(model, family).items():
        handles.append(module.register_forward_hook(norm_hook(layer, COMPONENTS.index(name), part)))
    if similarity != "none":
        per_layer = sim_hook if similarity == "full" else distance_hook
        blocks = model.transformer.h if family == "gpt2" else model.model.layers
        embed = model.transformer.drop if family == "gpt2" else model.model.embed_tokens
        handles.append(embed.register_forward_hook(per_layer(0)))
        for layer, block in enumerate(blocks):
            handles.append(block.register_forward_hook(per_layer(layer + 1)))
    try:
        with torch.inference_mode():
            row = 0
            for ids, mask in batches:
                state.update(mask=mask.bool(), tokens=int(mask.sum()), row=row)
                body(ids, attention_mask=mask)
                row += ids.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return sums, sims if similarity == "full" else by_distance


def child(what: str, kind: str, family: str, counts: list[int], similarity: str, repeats: int,
          device: str = "cpu") -> list[dict]:
    """Measure one variant on each of ``counts`` prompts (the first ``n`` of one list), in
    this process, one after another. On a GPU, each timed run also gives the peak of the
    GPU memory allocated above what was allocated before it (torch's own statistics)."""
    import torch

    import probescope

    torch.set_num_threads(os.cpu_count() or 1)
    model, body, tokenizer, _, _ = build_model(family, 8)
    model.to(device)
    cuda = torch.device(device).type == "cuda"
    texts = prompt_texts(tokenizer, max(counts))
    warm_texts = [texts[0][:60], texts[1][:60]]

    def on_device(batches):
        return [(ids.to(device), mask.to(device)) for ids, mask in batches]

    def step_for(prompts):
        if kind == "bare":
            batches = on_device(user_order_batches(tokenizer, prompts))

            def step():
                with torch.inference_mode():
                    for ids, mask in batches:
                        model(ids, attention_mask=mask)
        elif kind == "hooks":
            batches = on_device(user_order_batches(tokenizer, prompts))

            def step():
                hooks_run(model, body, family, batches, similarity, len(prompts))
        else:
            probes = [{"use": "component_norm", "statistic": "activation_norm"}]
            if similarity != "none":
                probes.append({"use": "token_similarity", "form": similarity,
                               "layers": ["embed", *range(model.config.num_hidden_layers)]})
            config = {"inputs": {"prompts": list(prompts), "batch_size": BATCH_SIZE}, "probes": probes}

            def step():
                probescope.run(config, models={"m": (model, tokenizer)}, write=False)
        return step

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    step_for(warm_texts)()  # imports, plugin registry, first-call set-up: paid once per process
    results = []
    for n in counts:
        step = step_for(texts[:n])
        gc.collect()
        synchronize()
        if what == "time":
            times, gpu_peaks = [], []
            for _ in range(repeats):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    allocated = torch.cuda.memory_allocated()
                start = time.perf_counter()
                step()
                synchronize()
                times.append(time.perf_counter() - start)
                if cuda:
                    gpu_peaks.append((torch.cuda.max_memory_allocated() - allocated) / 2 ** 20)
            result = {"seconds": sorted(times)[len(times) // 2]}
            if cuda:
                result["gpu_peak_mb"] = sorted(gpu_peaks)[len(gpu_peaks) // 2]
        else:
            before = reset_peak_rss()
            step()
            result = {"peak_growth_mb": (status_kb("VmHWM") - before) / 1024, "baseline_mb": before / 1024}
        del step
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--variants", nargs="+", default=["bare", "hooks", "probescope"],
                        choices=["bare", "hooks", "probescope"])
    parser.add_argument("--similarity", default="by_distance", choices=["by_distance", "full", "none"],
                        help="token_similarity's form in the hooks and probescope variants (none: left out)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--longest", type=int, default=LONGEST, help="longest prompt, in tokens (default 256)")
    parser.add_argument("--measure", nargs="+", default=["time", "memory", "memory-default"],
                        choices=["time", "memory", "memory-default"])
    parser.add_argument("--device", default="cpu", help='where the model runs ("cuda" on a GPU machine)')
    parser.add_argument("--child", nargs=4, metavar=("WHAT", "KIND", "MODEL", "PROMPTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, kind, family, counts = args.child
        counts = [int(n) for n in counts.split(",")]
        print(json.dumps(child(what, kind, family, counts, args.similarity, args.repeats, args.device)))
        return
    os.environ["BENCH_SCALE_LONGEST"] = str(args.longest)
    extra = ["--similarity", args.similarity, "--repeats", str(args.repeats), "--device", args.device]
    cuda = args.device.startswith("cuda")
    print(f"similarity: {args.similarity}; batch size {BATCH_SIZE}; prompts of {SHORTEST}-{args.longest} tokens; "
          f"device {args.device}; load average {os.getloadavg()}")
    rows: dict = {}  # (family, n, kind, measure) -> value
    for family in args.models:
        for kind in args.variants:
            for what in args.measure:
                # On a GPU, time and GPU memory come from one process per variant over every
                # count (torch's statistics are exact there); host memory needs a fresh process.
                groups = [args.prompts] if (cuda and what == "time") else [[n] for n in args.prompts]
                for counts in groups:
                    results = in_subprocess(__file__, what, kind, family, ",".join(map(str, counts)), *extra)
                    for n, r in zip(counts, results):
                        if what == "time":
                            rows[(family, n, kind, "time")] = r["seconds"]
                            if "gpu_peak_mb" in r:
                                rows[(family, n, kind, "gpu-memory")] = max(r["gpu_peak_mb"], 1.0)
                        else:
                            rows[(family, n, kind, what)] = max(r["peak_growth_mb"], 1.0)
                done = {f"{key[1]} {key[3]}": round(v, 2) for key, v in rows.items() if key[0] == family and key[2] == kind}
                print(f"  done: {family} {kind} {what} ({time.strftime('%H:%M:%S')}): {done}", flush=True)
    measures = [m for m in ("time", "gpu-memory", "memory", "memory-default")
                if any(key[3] == m for key in rows)]
    print(f"load average after: {os.getloadavg()}")
    print("model  prompts  variant     measure          value  x bare  per prompt")
    for family in args.models:
        for n in args.prompts:
            for kind in args.variants:
                for what in measures:
                    value = rows.get((family, n, kind, what))
                    if value is None:
                        continue
                    base = rows.get((family, n, args.variants[0], what), value)
                    unit = "s" if what == "time" else "MB"
                    per = f"{1000 * value / n:8.2f} ms" if what == "time" else ""
                    print(f"{family:<6} {n:>7}  {kind:<11} {what:<14} {value:>8.1f}{unit:<2} {value / base:>6.2f}  {per}")


if __name__ == "__main__":
    main()
