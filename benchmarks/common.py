"""Shared by the benchmarks: peak-memory reading, timing, one subprocess per variant.

Each variant runs in a fresh subprocess so it cannot inherit another's peak resident
memory. On CPU, RSS is the only honest peak: torch's CPU allocator keeps no peak
statistics. Before the timed repeats, freed memory is handed back to the kernel
(``malloc_trim``) and the kernel's peak mark is reset, so the reported peak is what the
repeats needed on top of what was live before them (the weights): without the trim, a
variant whose warm-up left freed memory in the allocator would look cheaper than it is.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from typing import Callable


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


def trim() -> None:
    """Return freed heap memory to the kernel, so RSS is live memory (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def time_and_peak(step: Callable[[], object], repeats: int) -> dict:
    """Median seconds of ``step`` over ``repeats`` (after one warm-up) and the peak RSS
    growth in MB during them."""
    step()
    trim()
    before = reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = status_kb("VmHWM")
    return {"median_s": statistics.median(times), "peak_growth_mb": (peak - before) / 1024}


def in_subprocess(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` and parse the JSON line it prints last."""
    out = subprocess.run([sys.executable, script, "--child", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
