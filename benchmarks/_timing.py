"""Timing helpers shared by the benchmark scripts: machine description and interleaved medians."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import timm
import torch

__all__ = ["interleaved_samples", "machine", "paired_ratio", "time_interleaved"]


def machine(threads: int) -> dict:
    """Describe the machine a benchmark ran on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time (ms) of each function, run in interleaved rounds so drift hits all alike."""
    return {k: statistics.median(v) for k, v in interleaved_samples(fns, repeats, warmup).items()}


def interleaved_samples(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall times (ms) of each function, one per interleaved round (round i of every function together)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def paired_ratio(samples: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of `name`'s time over `baseline`'s time in the same round: drift that slows a
    whole round (another process, a frequency change) cancels out, unlike a ratio of two medians."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[baseline]))
