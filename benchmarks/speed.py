"""Hard early exit on the wall clock: measured vs FLOP-predicted speed-up.

For resnet18 at 224x224 and 32x32 and vit_tiny at 224x224, and the evidence grid's `alexnet_cifar`
and `vgg13_cifar` at 32x32 when `--models` names them (CPU, fixed threads), batch 1 and 64,
measures in one process: the plain timm forward (`backbone(x)`, hooks inactive); the wrapped model
with no exit taken; and hard early exit with controlled exit mixes, every sample at exit k for each
k, and a mixed distribution. Exits are assigned with `timm_exits.inference.hard_exit.run_assigned`, the same
code path as `predict` with the policy's decision fixed in advance, so the mix is exactly known.
Every case runs twice, side by side: with eager exits and on a copy whose exits are compiled
(`compile_exits()`; compiled during the warm-up rounds, which are not timed).

For each case: measured speed-up = plain time / case time; predicted speed-up = 1 / mean(gamma_b
of the exits taken); their ratio. FLOPs over-predict the saving where early, high-resolution stages
are memory-bound, so "all at exit k" also reports the time of the bare backbone truncated at that
exit (`forward_intermediates(..., stop_early=True)`, no heads): the honest limit for that pattern;
for the mixed pattern the limit is the sum of each stage's time at the batch that runs it
(truncated runs at the shrunk batch sizes). `--channels-last` runs everything in that memory format.
Prints JSON (medians over interleaved repeats after warm-up); `--out PATH` writes it to PATH instead,
rewritten after every case so that a run stopped part-way keeps the cases it finished.
`--repeats 3 --warmup 1 --batches 1 --models resnet18` is a smoke run that only checks the script works.

`--device cuda` runs the models and inputs on the GPU (the exits' costs are still counted on the CPU
when the model is wrapped) and synchronises the device around every timed call; the assigned exits
live on the device, so at batch 1 `run_assigned` reads the target exit back once per call (one small
sync on an empty queue). `compiled_graphs` counts the graphs torch.compile built for the case's
compiled copy (0 would mean the compiled column ran eager).

    python benchmarks/speed.py --threads 2 --repeats 7 --out benchmarks/results/speed.json
    python benchmarks/speed.py --threads 2 --repeats 7 --models resnet18 --channels-last \
        --out benchmarks/results/speed_channels_last.json
    python benchmarks/speed.py --threads 2 --batches 1 --repeats 61 --warmup 5 \
        --models alexnet_cifar vgg13_cifar --out benchmarks/results/speed_cifar_networks.json
    python benchmarks/speed.py --device cuda --repeats 31 --out benchmarks/results/gpu/speed.json
"""

from __future__ import annotations

import argparse
import copy
import json

import timm
import torch
from _timing import machine, non_negative_int, positive_int, resolve_device, time_interleaved, write_json
from torch._dynamo.utils import counters

from timm_exits import wrap
from timm_exits.inference.hard_exit import run_assigned

CASES = [("resnet18", 224), ("resnet18", 32), ("vit_tiny_patch16_224", 224)]
# The evidence grid's 32-px CIFAR networks (registered with timm by timm_exits), run only when --models names them.
NAMED_ONLY = [("alexnet_cifar", 32), ("vgg13_cifar", 32)]
MIX = (0.4, 0.3, 0.2, 0.1)  # share of samples per exit (first exits first), the final head last


def _mixed_assignment(batch: int, num_exits: int) -> torch.Tensor:
    shares = list(MIX[: num_exits - 1]) + [1.0 - sum(MIX[: num_exits - 1])]
    counts = [round(s * batch) for s in shares]
    counts[-1] = batch - sum(counts[:-1])
    index = torch.cat([torch.full((c,), b, dtype=torch.long) for b, c in enumerate(counts)])
    return index[torch.randperm(batch, generator=torch.Generator().manual_seed(0))]


def _case(
    name: str,
    size: int,
    batch: int,
    repeats: int,
    warmup: int,
    channels_last: bool = False,
    device: torch.device | str = "cpu",
) -> dict:
    torch._dynamo.reset()  # drop the previous case's compiled exits: each case compiles its own copy
    torch.manual_seed(0)
    model = wrap(timm.create_model(name, num_classes=10), "auto", input_size=(3, size, size)).eval()
    gamma = model.costs.float().clone()  # on the CPU, for the predicted speed-ups
    model = model.to(device)
    x = torch.randn(batch, 3, size, size).to(device)
    if channels_last:  # the plain forward, the truncated backbone and the hard path all run in it
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compiled = copy.deepcopy(model).compile_exits()
    k = model.num_exits
    assignments = {f"all_at_exit_{b + 1}": torch.full((batch,), b, dtype=torch.long) for b in range(k)}
    if batch > 1:
        assignments["mixed"] = _mixed_assignment(batch, k)
    on_device = {label: index.to(device) for label, index in assignments.items()}

    fns = {"plain": _timed_prefix(model, x, None)}
    for label, index in on_device.items():
        fns[label] = lambda index=index: run_assigned(model, x, index)
        fns[f"{label}.compiled"] = lambda index=index: run_assigned(compiled, x, index)
    for b in range(k - 1):
        fns[f"truncated_{b + 1}"] = _timed_prefix(model, x, b)
    if "mixed" in assignments:  # each stage's bounds at the batch that runs it: the mix's limit
        for b, n in enumerate(_running(assignments["mixed"], k)):
            for end in (b - 1, b) if b else (b,):
                fns[f"end_{end}@{n}"] = _timed_prefix(model, x[:n], end if end < k - 1 else None)
    graphs = counters["stats"]["unique_graphs"]
    ms = time_interleaved(fns, repeats, warmup, device)
    graphs = counters["stats"]["unique_graphs"] - graphs
    rows = []
    for label, index in assignments.items():
        predicted = 1.0 / float(gamma[index].mean())
        measured = ms["plain"] / ms[label]
        row = {
            "case": label,
            "exit_distribution": (torch.bincount(index, minlength=k).float() / batch).tolist(),
            "ms": ms[label],
            "measured_speedup": measured,
            "predicted_speedup": predicted,
            "measured_over_predicted": measured / predicted,
            "ms_compiled": ms[f"{label}.compiled"],
            "measured_speedup_compiled": ms["plain"] / ms[f"{label}.compiled"],
            "measured_over_predicted_compiled": ms["plain"] / ms[f"{label}.compiled"] / predicted,
        }
        if label.startswith("all_at_exit_"):
            trunc = ms.get(label.replace("all_at_exit_", "truncated_"))
        else:
            trunc = _stage_limit_ms(ms, index, k)
        if trunc is not None:
            row["truncated_backbone_ms"] = trunc
            row["truncated_speedup"] = ms["plain"] / trunc
            row["measured_over_truncated"] = trunc / ms[label]
            row["measured_over_truncated_compiled"] = trunc / ms[f"{label}.compiled"]
        rows.append(row)
    return {
        "model": name,
        "input_size": [3, size, size],
        "device": str(device),
        "memory_format": "channels_last" if channels_last else "contiguous (NCHW)",
        "batch": batch,
        "repeats": repeats,
        "exits": [e.name for e in model.exits],
        "gamma": gamma.tolist(),
        "plain_ms": ms["plain"],
        "compiled_graphs": graphs,
        "cases": rows,
    }


def _timed_prefix(model, x: torch.Tensor, exit_index: int | None):
    """A function running the bare backbone up to early exit `exit_index` (None: the whole backbone)."""
    if exit_index is None:

        def whole() -> None:
            with torch.no_grad():
                model.backbone(x)

        return whole
    i = [f["module"] for f in model.backbone.feature_info].index(model.exits[exit_index].name)

    def prefix() -> None:
        with torch.no_grad():
            model.backbone.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)

    return prefix


def _stage_limit_ms(ms: dict[str, float], index: torch.Tensor, k: int) -> float:
    """The truncated backbone's limit for a mix of exits: the sum over stages of each stage's time at
    the batch that runs it (from truncated runs at that batch, timed in `_case`)."""
    limit = 0.0
    for b, n in enumerate(_running(index, k)):
        if n:
            limit += ms[f"end_{b}@{n}"] - (ms[f"end_{b - 1}@{n}"] if b else 0.0)
    return limit


def _running(index: torch.Tensor, k: int) -> list[int]:
    """Samples that run through stage b (the backbone up to exit b) for b = 0..k-1."""
    return [int((index >= b).sum()) for b in range(k)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--batches", nargs="+", type=positive_int, default=[1, 64])
    p.add_argument("--repeats", type=positive_int, default=21)
    p.add_argument("--warmup", type=non_negative_int, default=3)
    names = sorted({n for n, _ in CASES + NAMED_ONLY})
    p.add_argument(
        "--models", nargs="+", default=None, choices=names, help="the cases' models (default: all but NAMED_ONLY)"
    )
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last memory format")
    p.add_argument("--out", default=None, help="write the JSON here (after every case) instead of printing it")
    args = p.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    out = {
        "benchmark": "speed",
        "machine": machine(args.threads, device),
        "warmup": args.warmup,
        "targets": {
            "batch_1": "measured_over_predicted >= 0.9",
            "batch_64": "measured_over_predicted >= 0.8",
            "resnet18_224_b1_all_at_exit_1": "measured_speedup >= 2",
        },
        "results": [],
    }
    for name, size in CASES + NAMED_ONLY:
        if name not in (args.models or [n for n, _ in CASES]):
            continue
        for batch in args.batches:
            reps = args.repeats if batch == 1 or size <= 64 else max(5, args.repeats // 3)
            out["results"].append(_case(name, size, batch, reps, args.warmup, args.channels_last, device))
            if args.out:
                write_json(args.out, out)
    if args.out:
        write_json(args.out, out)
    else:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
