"""Every exit policy on the same frozen exits and the same axes: accuracy at a cost budget.

For a trained run (`timm-exits train ...`), collects every exit's outputs on the run's validation
split (used to fit gates and pick thresholds) and its test split (reported once per policy and
budget). For each budget, each policy's threshold is the one with the best validation accuracy at a
validation cost within the budget; the table gives the test accuracy and test cost it reaches.

Policies: static truncation (every sample at exit k), the max-softmax threshold, BranchyNet's
entropy threshold, the jointly trained gates, and gates fitted on the validation split with each
objective of `fit_gates`: "no_gain" (the library's default and recommended policy), "correct" and the
paper's "soft".

    python benchmarks/policy_frontier.py --run runs/digits_quick > benchmarks/results/policy_frontier_digits.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from _timing import machine

from timm_exits import Collected, collect, fit_gates, simulate, sweep
from timm_exits.data import build_datasets, make_loader
from timm_exits.gate_fitting import GATE_OBJECTIVES
from timm_exits.train import load_run

BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def _at_budget(val: Collected, test: Collected, policy: str, budget: float) -> dict | None:
    ok = [p for p in sweep(val, policy) if p["cost"] <= budget + 1e-12]
    if not ok:
        return None
    best = max(ok, key=lambda p: (p["accuracy"], -p["cost"]))
    index = simulate(test, policy, best["threshold"])
    picked = test.logits[torch.arange(index.shape[0]), index]
    return {
        "threshold": best["threshold"],
        "val_accuracy": best["accuracy"],
        "test_accuracy": float((picked.argmax(-1) == test.labels).float().mean()),
        "test_cost": float(test.costs[index].mean()),
    }


def _static(test: Collected, budget: float) -> dict | None:
    accs = test.exit_accuracy
    ok = [(accs[k], float(test.costs[k]), k) for k in range(len(accs)) if float(test.costs[k]) <= budget + 1e-12]
    if not ok:
        return None
    acc, cost, k = max(ok)
    return {"exit": k + 1, "test_accuracy": acc, "test_cost": cost}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run folder written by timm-exits train")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    p.add_argument("--device", default="cpu", help="where the exits' outputs are collected (cpu, cuda)")
    p.add_argument("--data-dir", help="where the run's data set lives now, if it moved")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run, device=args.device, data_dir=args.data_dir)
    model = run.model.eval()
    splits = build_datasets(run.recipe, model)
    loaders = {name: make_loader(getattr(splits, name), 256, train=False) for name in ("val", "test")}

    def outputs(m):
        return collect(m, loaders["val"]), collect(m, loaders["test"])

    val, test = outputs(model)
    policies = {
        "confidence": (val, test, "confidence"),
        "entropy": (val, test, "entropy"),
        "gate_joint": (val, test, "gate"),
    }
    fits = {}
    for objective in GATE_OBJECTIVES:
        fitted = copy.deepcopy(model)
        fits[objective] = fit_gates(fitted, val, objective=objective).__dict__
        fval, ftest = outputs(fitted)
        policies[f"gate_fitted_{objective}"] = (fval, ftest, "gate")
    table = []
    for budget in args.budgets:
        row = {"budget": budget, "static": _static(test, budget)}
        for name, (v, t, policy) in policies.items():
            row[name] = _at_budget(v, t, policy, budget)
        table.append(row)
    result = {
        "benchmark": "policy_frontier",
        "machine": machine(args.threads) | {"device": args.device},
        "run": args.run,
        "recipe": {k: run.recipe.get(k) for k in ("model", "dataset", "method", "img_size", "epochs", "exits")},
        "splits": {"val": int(val.labels.shape[0]), "test": int(test.labels.shape[0])},
        "exit_costs": test.costs.tolist(),
        "val_exit_accuracy": val.exit_accuracy,
        "test_exit_accuracy": test.exit_accuracy,
        "gate_fits": fits,
        "recommended": "gate_fitted_no_gain",
        "table": table,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
