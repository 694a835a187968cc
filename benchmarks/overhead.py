"""Overhead of the exits when none is taken: plain timm forward vs the wrapped model.

For resnet18 and vit_tiny at 224x224 on the CPU (or `--device cuda`), batch 1 and 64, measures in one process:
  * plain:           `backbone(x)` with the exit hooks inactive (the user's model as it is);
  * gates_closed:    `predict(policy="gate", threshold=1.0)`: hard path, every exit evaluated, none
                     taken (the run asserts that every sample reached the final head), exits eager;
  * gates_closed_compiled: the same on a copy whose exits are compiled (`compile_exits()`; the
                     compile happens in the warm-up and is reported as `compile_s`);
  * full_forward:    `model(x)`: every exit and the soft output (training/soft-inference path);
and the training step (forward, loss, backward, SGD step) of the plain backbone with cross-entropy
vs the wrapped model with SoftConditionalLoss. The predicted cost of "no exit taken" is the plain
time times gamma_final (backbone plus every head and gate, in fvcore FLOPs).

Prints JSON: medians over interleaved repeats after warm-up, and the median over rounds of each
round's ratio to the plain forward (`*_paired`), which cancels drift that slows a whole round; the
targets are checked on that. `exits_alone_ms` is the heads and gates alone, eager and compiled, run
on the cached branch-point tensors, back to back ("warm") and right after a backbone forward
("after_backbone"), which is how they run in place. `--repeats 3 --warmup 1 --batches 1` is a smoke
run that only checks the script works. `--out PATH` writes the JSON to PATH (after every model) instead
of printing it.

`--device cuda` runs models, inputs and training steps on the GPU (the exits' costs are still counted
on the CPU when the model is wrapped) and synchronises the device around every timed call, so each
time includes the kernels and the hard path's host syncs. There the compiled exits are checked against
the eager ones to 1e-3 (Triton's reductions round differently from cuDNN's and ATen's; 1e-4 on the
CPU), `compiled_max_abs_diff` records the difference, and `compiled_graphs` counts the graphs
torch.compile built for the compiled copy (0 would mean the compiled column ran eager).

    python benchmarks/overhead.py --threads 2 --repeats 15 --out benchmarks/results/overhead.json
    python benchmarks/overhead.py --device cuda --repeats 61 --out benchmarks/results/gpu/overhead.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from _timing import (
    device_sync,
    interleaved_samples,
    machine,
    non_negative_int,
    paired_ratio,
    positive_int,
    resolve_device,
    write_json,
)
from torch._dynamo.utils import counters

from timm_exits import SoftConditionalLoss, predict, wrap
from timm_exits.core.placement import probe


def _inference(name: str, batch: int, repeats: int, warmup: int, device: torch.device | str = "cpu") -> dict:
    torch._dynamo.reset()  # drop the previous case's compiled exits: each case compiles its own copy
    torch.manual_seed(0)
    model = wrap(timm.create_model(name, num_classes=10), "auto").eval().to(device)
    x = torch.randn(batch, 3, 224, 224).to(device)
    compiled = copy.deepcopy(model).compile_exits()
    sync = device_sync(device) or (lambda: None)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        check = predict(model, x, "gate", 1.0)
        sync()
        t0 = time.perf_counter()
        check_compiled = predict(compiled, x, "gate", 1.0)
        sync()
        compile_s = time.perf_counter() - t0
    assert check.stats.counts[-1] == batch, "a gate fired at threshold 1.0"
    assert torch.equal(check_compiled.exit_index, check.exit_index)
    tol = 1e-4 if torch.device(device).type == "cpu" else 1e-3
    torch.testing.assert_close(check_compiled.logits, check.logits, rtol=tol, atol=tol)

    def plain():
        with torch.no_grad():
            model.backbone(x)

    def closed():
        predict(model, x, "gate", 1.0)

    def closed_compiled():
        predict(compiled, x, "gate", 1.0)

    def full():
        with torch.no_grad():
            model(x)

    fns = {"plain": plain, "gates_closed": closed, "gates_closed_compiled": closed_compiled, "full_forward": full}
    samples = interleaved_samples(fns, repeats, warmup, device)
    ms = {k: statistics.median(v) for k, v in samples.items()}
    gamma = float(model.costs[-1])
    predicted = ms["plain"] * gamma
    isolated = {
        "eager": _exits_isolated_ms(model, x, repeats),
        "compiled": _exits_isolated_ms(compiled, x, repeats),
    }
    graphs = counters["stats"]["unique_graphs"] - graphs
    return {
        "model": name,
        "batch": batch,
        "device": str(device),
        "repeats": repeats,
        "warmup": warmup,
        "exits": [e.name for e in model.exits],
        "gamma_final": gamma,
        "compile_s": compile_s,
        "compiled_graphs": graphs,
        "compiled_max_abs_diff": float((check_compiled.logits - check.logits).abs().max()),
        "ms": ms,
        "predicted_ms_no_exit": predicted,
        "gates_closed_over_predicted": ms["gates_closed"] / predicted,
        "gates_closed_compiled_over_predicted": ms["gates_closed_compiled"] / predicted,
        "full_forward_over_predicted": ms["full_forward"] / predicted,
        "gates_closed_over_predicted_paired": paired_ratio(samples, "gates_closed", "plain") / gamma,
        "gates_closed_compiled_over_predicted_paired": paired_ratio(samples, "gates_closed_compiled", "plain") / gamma,
        "full_forward_over_predicted_paired": paired_ratio(samples, "full_forward", "plain") / gamma,
        "exits_alone_ms": isolated,
        "exits_alone_share": {p: {k: v / ms["plain"] for k, v in t.items()} for p, t in isolated.items()},
        "target": (
            "gates_closed_over_predicted_paired <= 1.03 at batch 64; "
            "gates_closed_compiled_over_predicted_paired <= 1.03 at batch 1"
        ),
    }


def _exits_isolated_ms(model, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median time of every exit's head and gate on the branch-point tensors of one forward, run
    back to back ("warm") and right after an untimed backbone forward ("after_backbone": the caches
    and branch predictors hold the backbone's code and data, as they do in place)."""
    names = [e.name for e in model.exits]
    feats = probe(model.backbone, names, x).outputs
    sync = device_sync(x.device) or (lambda: None)  # on CUDA: the queue empty at the start, the exits done at the end

    def exits():
        stats = torch.zeros(x.shape[0], 0, device=x.device)
        for b, e in zip(model.branches, model.exits):
            _, _, stats = b.infer(feats[e.name], stats)  # what the hard path runs (compiled after compile_exits)

    times: dict[str, list[float]] = {"warm": [], "after_backbone": []}
    with torch.no_grad():
        for _ in range(3):
            exits()
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            exits()
            sync()
            times["warm"].append((time.perf_counter() - t0) * 1e3)
            model.backbone(x)
            sync()
            t0 = time.perf_counter()
            exits()
            sync()
            times["after_backbone"].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _training(name: str, batch: int, repeats: int, warmup: int, device: torch.device | str = "cpu") -> dict:
    torch.manual_seed(0)
    plain_model = timm.create_model(name, num_classes=10).train().to(device)
    wrapped = wrap(timm.create_model(name, num_classes=10), "auto").train().to(device)
    x = torch.randn(batch, 3, 224, 224).to(device)
    y = torch.randint(0, 10, (batch,)).to(device)
    opt_plain = torch.optim.SGD(plain_model.parameters(), lr=1e-3)
    opt_wrapped = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
    loss_fn = SoftConditionalLoss(cost_weight=0.1)

    def plain_step():
        opt_plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain_model(x), y).backward()
        opt_plain.step()

    def wrapped_step():
        opt_wrapped.zero_grad(set_to_none=True)
        loss_fn(wrapped(x), y).backward()
        opt_wrapped.step()

    samples = interleaved_samples({"plain_step": plain_step, "wrapped_step": wrapped_step}, repeats, warmup, device)
    ms = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "model": name,
        "batch": batch,
        "device": str(device),
        "repeats": repeats,
        "warmup": warmup,
        "ms": ms,
        "wrapped_over_plain": ms["wrapped_step"] / ms["plain_step"],
        "wrapped_over_plain_paired": paired_ratio(samples, "wrapped_step", "plain_step"),
        "target": "wrapped_over_plain_paired <= 1.15",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--models", nargs="+", default=["resnet18", "vit_tiny_patch16_224"], help="timm model names")
    p.add_argument("--batches", nargs="+", type=positive_int, default=[1, 64])
    p.add_argument("--train-batch", type=positive_int, default=32)
    p.add_argument(
        "--repeats", type=positive_int, default=41, help="rounds at batch 1 (a third, at least 5, for larger)"
    )
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--out", default=None, help="write the JSON here (after every model) instead of printing it")
    args = p.parse_args()
    unknown = [name for name in args.models if not timm.is_model(name)]
    if unknown:
        p.error(f"--models: timm has no model {', '.join(map(repr, unknown))} (timm.list_models() lists them)")
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "overhead",
        "machine": machine(args.threads, device),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "input_size": [3, 224, 224],
        "inference": [],
        "training": [],
    }
    for name in args.models:
        for batch in args.batches:
            reps = args.repeats if batch == 1 else max(5, args.repeats // 3)
            result["inference"].append(_inference(name, batch, reps, args.warmup, device))
            if args.out:
                write_json(args.out, result)
        result["training"].append(_training(name, args.train_batch, max(5, args.repeats // 3), 2, device))
        if args.out:
            write_json(args.out, result)
    if not args.out:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
