"""Timing helpers shared by the benchmark scripts: machine description and interleaved medians.

On CUDA every timed call is bracketed by `torch.cuda.synchronize()`: the device's queue is empty when
the clock starts and the call's kernels have finished when it stops, so the wall time covers the
launches, the host syncs inside the call and the kernels themselves."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import timm
import torch
from _args import non_negative_int, positive_int  # re-exported: the scripts import them from here

__all__ = [
    "device_sync",
    "fail",
    "interleaved_samples",
    "machine",
    "non_negative_int",
    "paired_ratio",
    "positive_int",
    "resolve_device",
    "time_interleaved",
    "write_json",
]


def resolve_device(name: str) -> torch.device:
    """The benchmark's device from a `--device` argument; a clear error where CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported")
    return device


def device_sync(device: str | torch.device = "cpu") -> Callable[[], None] | None:
    """A function that waits for the device's queued work (None on the CPU, where calls are synchronous)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


def machine(threads: int, device: str | torch.device = "cpu") -> dict:
    """Describe the machine a benchmark ran on (on CUDA also the GPU, the CUDA, cuDNN and Triton versions,
    and the TF32 and cuDNN-autotuning settings the timings ran under)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        desc.update(
            device=str(device),
            gpu=torch.cuda.get_device_name(index),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            triton=_version("triton"),
            gpu_driver=_driver_version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_matmul=_setting(lambda: torch.backends.cuda.matmul.allow_tf32),
            tf32_cudnn=_setting(lambda: torch.backends.cudnn.allow_tf32),
        )
    return desc


def _setting(read: Callable[[], object]) -> object:
    """A backend flag's value, or None where this torch refuses the legacy flag (its newer precision API)."""
    try:
        return read()
    except Exception:
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the description says so instead of failing the run
        return None


def _driver_version() -> str | None:
    """The NVIDIA driver's version through NVML, where the bindings are installed."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Median wall time (ms) of each function, run in interleaved rounds so drift hits all alike."""
    return {k: statistics.median(v) for k, v in interleaved_samples(fns, repeats, warmup, device).items()}


def interleaved_samples(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str | torch.device = "cpu"
) -> dict[str, list[float]]:
    """Wall times (ms) of each function, one per interleaved round (round i of every function together).
    On CUDA the device is synchronised before the clock starts and before it stops."""
    sync = device_sync(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync is None:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
            else:
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def paired_ratio(samples: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of `name`'s time over `baseline`'s time in the same round: drift that slows a
    whole round (another process, a frequency change) cancels out, unlike a ratio of two medians."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[baseline]))


def fail(message: str) -> NoReturn:
    """Stop a benchmark script on bad input as argparse does: one line ``PROG: error: MESSAGE``, exit status 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def write_json(path: str, result: dict) -> None:
    """Write a benchmark's JSON whole or not at all: a run killed mid-write leaves the previous version."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
