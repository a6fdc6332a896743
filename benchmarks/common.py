"""Shared by the benchmarks: timing, peak memory, one subprocess per variant.

Each variant runs in fresh subprocesses, one for time and one for memory, so no variant
inherits another's state.

Memory. torch's CPU allocator keeps no peak statistics, so the peak is read from the
kernel: the peak resident set during the repeats (after resetting the kernel's mark)
above the resident set before them, i.e. what the pass needs on top of the weights. By
default glibc keeps freed blocks and grows its mmap threshold, so how much of a run's
memory shows in RSS depends on what earlier runs happened to leave behind: measured that
way, the same variant swung between 0.5x and 1.4x of the bare forward across runs. The
memory subprocess therefore sets ``MALLOC_MMAP_THRESHOLD_`` so every block of 64 kB or
more is its own mapping, returned to the kernel when freed: RSS then follows live memory.
That setting slows allocation, so time is measured in a separate subprocess without it.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


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


def median_time(step: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``step`` over ``repeats``, after one warm-up."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_growth_mb(step: Callable[[], object], repeats: int) -> float:
    """Peak RSS during ``repeats`` calls of ``step`` above RSS before them, in MB (after
    one warm-up). Meaningful in a process started with :data:`MEMORY_ENV`."""
    step()
    gc.collect()
    before = reset_peak_rss()
    for _ in range(repeats):
        step()
    return (status_kb("VmHWM") - before) / 1024


def measure(step: Callable[[], object], what: str, repeats: int) -> dict:
    if what == "time":
        return {"median_s": median_time(step, repeats)}
    return {"peak_growth_mb": peak_growth_mb(step, max(3, repeats // 2))}


def in_subprocess(script: str, what: str, *args: str) -> dict:
    """Run ``script --child WHAT ARGS`` (WHAT: time or memory) and parse the JSON line it
    prints last."""
    env = {**os.environ, **(MEMORY_ENV if what == "memory" else {})}
    out = subprocess.run([sys.executable, script, "--child", what, *args], check=True,
                         capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def relation_word_tokenizer(vocab: int, relations: int | None = None):
    """A word-level tokenizer holding every word of the first ``relations`` shipped
    relations (all by default) as one token, topped up with filler words to ``vocab``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from probescope.probes.head_classifier.relations import builtin_relations

    chosen = list(builtin_relations())[:relations]
    words = ["[UNK]", "a"] + list(dict.fromkeys(w for r in chosen for pair in r.pairs for w in pair))
    words += [f"filler{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def matmul_rate(dtype, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """This machine's dense matmul rate in GFLOP/s for ``dtype`` on ``device`` (n x n
    products, after a warm-up): the yardstick the benchmarks extrapolate time with."""
    import torch

    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9
