"""What one exit costs in place, between two backbone stages, against the same call warm.

During real forwards of the backbone (hard-path hooks replaced by a timing probe), at each exit the
probe times the exit's work twice in a row on the branch-point tensor: the first call runs right
after the backbone stage ("in place", the caches full of the backbone's code and data), the second
immediately after the first ("warm"). Each forward runs one of three probes in turn: the eager exit
(`branch.infer(x, s)`, what the hard path runs), the same exit compiled (`compile_exits()`, compiled
in the warm-up forwards), and the first kernel alone (the pooling mean over the branch-point
tensor), so each probe's first call is always the one right after the stage. Prints JSON: medians in
microseconds per exit.

    python benchmarks/exit_cost_in_place.py --threads 2 > benchmarks/results/exit_cost_in_place.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import defaultdict

import timm
import torch
from _timing import machine, non_negative_int, positive_int

from timm_exits import wrap
from timm_exits.core._utils import feature_tensor
from timm_exits.core.layout import pool

PATHS = ("eager", "compiled", "pool")


class _Probe:
    """Stands in for a hard-path run: times one exit's work, first call and second call."""

    def __init__(self, path: str, batch: int, times: dict[str, list[float]], compiled):
        self.path = path
        self.compiled = compiled  # the model's compiled twin, whose exits the "compiled" probe runs
        self.stats = torch.zeros(batch, 0)
        self.times = times

    def _call(self, branch, x: torch.Tensor):
        if self.path == "pool":
            head = branch.head.pool
            return pool(x, head.layout, head.num_prefix_tokens, head.token_pool)
        if self.path == "compiled":
            branch = self.compiled.branches[branch.position]
        return branch.infer(x, self.stats)

    def on_exit(self, branch, output):
        x = feature_tensor(output, self.stats.shape[0])
        t0 = time.perf_counter()
        out = self._call(branch, x)
        t1 = time.perf_counter()
        self._call(branch, x)
        t2 = time.perf_counter()
        self.times[f"{self.path}.in_place"].append((t1 - t0) * 1e6)
        self.times[f"{self.path}.warm"].append((t2 - t1) * 1e6)
        if self.path != "pool":
            self.stats = out[2]
        return None


def _measure(name: str, rounds: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = wrap(timm.create_model(name, num_classes=10), "auto").eval()
    compiled = copy.deepcopy(model).compile_exits()
    x = torch.randn(1, 3, 224, 224)
    times: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for r in range(warmup + rounds):
            if r == warmup:
                times.clear()
            for path in PATHS:
                with model._attached(_Probe(path, 1, times, compiled)):
                    model.backbone(x)
    n = len(model.exits)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "batch": 1,
        "exits": [e.name for e in model.exits],
        "samples_per_value": rounds * n,
        "us_per_exit": med,
        "in_place_over_warm": {p: med[f"{p}.in_place"] / med[f"{p}.warm"] for p in PATHS},
        "compiled_over_eager_in_place": med["compiled.in_place"] / med["eager.in_place"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=40, help="timed rounds (the medians' samples)")
    p.add_argument("--warmup", type=non_negative_int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {
        "benchmark": "exit_cost_in_place",
        "machine": machine(args.threads),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "results": [_measure(n, args.rounds, args.warmup) for n in ("resnet18", "vit_tiny_patch16_224")],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
