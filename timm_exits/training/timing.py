"""Timing at batch 1 and the ``bench`` command: `time_per_image` (median over passes, all candidates interleaved
within each pass), `machine_name`, and `benchmark`, which times a trained run's policies against its plain backbone.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.model import EarlyExitModel

__all__ = [
    "machine_name",
    "time_per_image",
    "benchmark",
]


def machine_name(device: torch.device | str = "cpu") -> str:
    """A short description of the processor (or GPU) the timings ran on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_image(
    candidates: Mapping[str, Callable[[torch.Tensor], Any]],
    inputs: Sequence[torch.Tensor],
    repeats: int = 5,
    warmup: int = 10,
) -> dict[str, float]:
    """Median milliseconds per image of each candidate over `repeats` passes through `inputs`.

    Candidates run one after the other within every pass, so a load change on the machine hits all
    of them alike.

    Args:
        candidates: Name -> function called on one input batch.
        inputs: Input batches (batch 1 for latency).
        repeats: Timed passes; the median is returned.
        warmup: Untimed calls per candidate before timing.

    Returns:
        Name -> median ms per image.
    """
    if not inputs:
        raise ValueError("time_per_image needs at least one input.")
    device = inputs[0].device
    n_images = sum(int(x.shape[0]) for x in inputs)
    with torch.no_grad():
        for fn in candidates.values():
            for i in range(warmup):
                fn(inputs[i % len(inputs)])
        _sync(device)
        times: dict[str, list[float]] = {k: [] for k in candidates}
        for _ in range(max(1, repeats)):
            for name, fn in candidates.items():
                t0 = time.perf_counter()
                for x in inputs:
                    fn(x)
                _sync(device)
                times[name].append(1000.0 * (time.perf_counter() - t0) / n_images)
    return {k: statistics.median(v) for k, v in times.items()}


def _timing_inputs(dataset: Any, count: int, device: torch.device) -> list[torch.Tensor]:
    count = min(int(count), len(dataset))
    return [dataset[i][0].unsqueeze(0).to(device) for i in range(count)]


def _time_model(
    model: EarlyExitModel,
    thresholds: Mapping[str, float | None],
    inputs: Sequence[torch.Tensor],
    repeats: int,
    warmup: int,
    models: Mapping[str, EarlyExitModel] | None = None,
) -> tuple[float, dict[str, float]]:
    """(baseline ms per image, {policy: ms per image}); "gate_0.5" style names map to their policy, run on
    `models[name]` where given, else on `model`."""
    candidates: dict[str, Callable[[torch.Tensor], Any]] = {"baseline": model.backbone}
    for name, thr in thresholds.items():
        policy, net = name.split("_")[0], (models or {}).get(name, model)
        candidates[name] = lambda x, p=policy, t=thr, m=net: m.predict(x, policy=p, threshold=t)
    ms = time_per_image(candidates, inputs, repeats, warmup)
    base = ms.pop("baseline")
    return base, ms


# ------------------------------------------------------------------------------------------ bench
def benchmark(
    run_dir: str | os.PathLike,
    *,
    policies: Sequence[str] | None = None,
    batch_size: int = 1,
    images: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    data_dir: str | None = None,
    device: str | torch.device = "cpu",
    unfinished: bool = False,
) -> dict[str, Any]:
    """Measured inference time of a trained run's policies against its plain backbone.

    Thresholds are the calibrated ones of the run's report.json (else each policy's default). Where the report
    re-fitted the gates on the val split, "gate" runs with those gates (saved in ``model/``) as its threshold
    was calibrated for; "gate_0.5" and "gate_joint" keep the jointly trained gates of the checkpoint.

    Args:
        run_dir: The run folder.
        policies: Policies to time (default: gate, confidence, entropy, soft).
        batch_size: Images per call.
        images: Test images to time (default: the recipe's ``timing_images``).
        repeats: Timed passes (median reported).
        warmup: Untimed calls per candidate first.
        threads: torch threads for the timing (default: the recipe's, else torch's); the caller's count is
            restored afterwards.
        data_dir: Where the data set lives now.
        device: Device to time on.
        unfinished: Time the last checkpoint of a run whose training has not finished (else refused).

    Raises:
        RunFolderError: An unfinished run (without `unfinished`), a report.json that cannot be read, or one made
            from another step of training than the checkpoint's.

    Returns:
        {"timing": {...}, "policies": {name: {"threshold", "ms_per_image", "speedup", "exit_distribution"}}},
        the distribution over the timed images.
    """
    from .checkpoint import load_run
    from .data import build_datasets, load_splits
    from .run_state import check_finished

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: give 1 or more images per call.")
    run_dir = Path(run_dir).expanduser()
    run = load_run(run_dir, device=device, data_dir=data_dir)
    recipe, model = run.recipe, run.model
    check_finished(run, unfinished)
    device = torch.device(device)
    n_threads = int(threads or recipe.runtime.threads or torch.get_num_threads())
    names = list(policies or ("gate", "confidence", "entropy", "soft"))
    # the report saved with model/ matches its gates (`eval --no-save` rewrites only run_dir/report.json)
    report_path = run_dir / "model" / "report.json"
    report_path = report_path if report_path.is_file() else run_dir / "report.json"
    report = _read_report(report_path, run_dir) if report_path.is_file() else {}
    _check_report_step(report, run, unfinished)
    saved = report.get("policies") or {}
    thresholds: dict[str, float | None] = {}
    for name in names:
        pol = name.split("_")[0]
        if pol not in ("gate", "confidence", "entropy", "soft"):
            raise ValueError(f"unknown policy {name!r}; choose from gate, gate_0.5, confidence, entropy, soft.")
        default = 0.5 if name == "gate_0.5" else None
        thresholds[name] = saved.get(name, {}).get("threshold", default) if pol != "soft" else None
    data = build_datasets(recipe.data, model, load_splits(recipe.data), seed=recipe.seed)
    ev = recipe.eval
    count = min(int(images or ev.timing_images or 100), len(data.test))  # timing_images 0: the run skipped timing
    singles = _timing_inputs(data.test, count, device)
    inputs = [torch.cat(singles[i : i + batch_size]) for i in range(0, len(singles), batch_size)]
    reps = int(repeats or ev.timing_repeats)
    models = {"gate": _refitted(model, run_dir)} if "gate" in names and report.get("gate_fit") else {}
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:  # the caller's thread count comes back, as it was, after the timing
        base, ms = _time_model(
            model, thresholds, inputs, reps, int(ev.timing_warmup if warmup is None else warmup), models
        )
    finally:
        torch.set_num_threads(caller_threads)
    shares = {k: _exit_shares(models.get(k, model), k, thresholds[k], inputs) for k in ms}
    return {
        "timing": {
            "machine": machine_name(device),
            "device": str(device),
            "threads": n_threads,
            "batch_size": batch_size,
            "images": count,
            "repeats": reps,
            "baseline_ms_per_image": base,
        },
        "policies": {
            k: {
                "threshold": thresholds[k],
                "ms_per_image": v,
                "speedup": base / v if v > 0 else None,
                "exit_distribution": shares[k],
            }
            for k, v in ms.items()
        },
    }


def _read_report(path: Path, run_dir: Path) -> dict[str, Any]:
    """The report `bench` takes its thresholds from; a RunFolderError naming the file when it cannot be used."""
    from .run_folder import RunFolderError

    again = f"run `timm-exits eval {run_dir}` again to write it"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} cannot be read ({e}); {again}.") from None
    policies = report.get("policies") if isinstance(report, dict) else None
    if not isinstance(report, dict) or not isinstance(policies, (dict, type(None))):
        raise RunFolderError(f"{path} is not a timm-exits report (no policies object); {again}.")
    for name, entry in (policies or {}).items():
        thr = entry.get("threshold") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or (
            thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)))
        ):
            raise RunFolderError(f"{path}: policy {name!r} has no numeric threshold ({thr!r}); {again}.")
    return report


def _check_report_step(report: dict[str, Any], run: Any, unfinished: bool) -> None:
    """Refuse a report (and the model saved with it) made from another step of training than the checkpoint's:
    its thresholds and re-fitted gates belong to other weights. Reports without ``training.steps`` pass."""
    from .run_folder import RunFolderError
    from .run_state import training_summary

    training = report.get("training")
    made = training.get("steps") if isinstance(training, dict) else None
    if made is None:
        return
    now = training_summary(run).get("steps")
    if now is not None and made != now:
        again = f"timm-exits eval {run.run_dir}" + (" --unfinished" if unfinished else "")
        raise RunFolderError(
            f"the saved model and report were made from step {made}; the checkpoint is at step {now}: "
            f"run `{again}` first"
        )


def _refitted(model: EarlyExitModel, run_dir: Path) -> EarlyExitModel:
    """A copy of `model` with the gates the report re-fitted, read from the run's saved ``model/``."""
    from ..hub import from_pretrained

    folder = run_dir / "model"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such folder; the report re-fitted the gates that 'gate' is calibrated for and saved them "
            "there. Time gate_0.5 / gate_joint instead, or run `timm-exits eval` to save the model again."
        )
    saved = from_pretrained(folder, device=next(model.parameters()).device)
    gates = {k: v for k, v in saved.state_dict().items() if ".gate." in k}
    out = copy.deepcopy(model)
    result = out.load_state_dict(gates, strict=False)
    if result.unexpected_keys or any(".gate." in k for k in result.missing_keys):
        raise ValueError(f"{folder} holds other gates than the run's model; run `timm-exits eval` to save it again.")
    return out


def _exit_shares(
    model: EarlyExitModel, name: str, threshold: float | None, inputs: Sequence[torch.Tensor]
) -> list[float]:
    """Share of `inputs` leaving at each exit under policy `name`."""
    counts = [0] * model.num_exits
    for x in inputs:
        for b, c in enumerate(model.predict(x, policy=name.split("_")[0], threshold=threshold).stats.counts):
            counts[b] += c
    total = max(sum(counts), 1)
    return [c / total for c in counts]
