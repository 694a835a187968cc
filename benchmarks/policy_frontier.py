"""Every exit policy on the same frozen exits and the same axes: accuracy at a cost budget.

For a trained run (`timm-exits train ...`), collects every exit's outputs on the run's validation
split (used to fit gates and pick thresholds) and its test split (reported once per policy and
budget). For each budget, each policy's threshold is the one with the best validation accuracy at a
validation cost within the budget; the table gives the test accuracy and test cost it reaches.

Policies: static truncation (every sample at the exit k with the best validation accuracy within the
budget), the max-softmax threshold, BranchyNet's entropy threshold, the jointly trained gates, and
gates fitted on the validation split with each objective of `fit_gates`: "no_gain", "correct" and
the paper's "soft".

The recommended policy (``recommended``), fixed before the CIFAR-100 and AlexNet runs were trained
and reported on them unchanged: at each budget, among the `no_gain` fitted gates, the max-softmax
threshold, the entropy threshold and static truncation, the candidate (with its threshold) that
has the best validation accuracy at a validation cost within the budget; ties go to the lower
validation cost. Every row also carries a bootstrap 95 % interval over test images (1,000 resamples)
of its accuracy and of the recommended policy's accuracy minus each other policy's (paired).

A run whose gates are not stats gates (recipe key ``gate: features`` or ``both``) gets no fitted-gate
policies (``fit_gates`` re-fits stats gates only): ``gate_fit_skipped`` says why, and the recommended
policy is chosen among the other candidates. A run whose training has not finished is refused unless
``--unfinished`` asks for its last checkpoint as it is (``training`` records the epochs it holds).

    python benchmarks/policy_frontier.py --run runs/digits_quick --threads 1 \
        > benchmarks/results/policy_frontier_digits.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from _runs import add_unfinished_argument, load_finished_run, trained
from _timing import machine, positive_int

from timm_exits import Collected, collect, fit_gates, simulate, sweep
from timm_exits.core.model import EarlyExitModel
from timm_exits.inference.gate_fitting import GATE_OBJECTIVES
from timm_exits.training.data import build_datasets, make_loader

BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
RECOMMENDED_CANDIDATES = ("gate_fitted_no_gain", "confidence", "entropy", "static")
BOOTSTRAP = 1000


def _correct(test: Collected, index: torch.Tensor) -> torch.Tensor:
    picked = test.logits[torch.arange(index.shape[0]), index]
    return picked.argmax(-1) == test.labels


def _at_budget(curve: list[dict], test: Collected, policy: str, budget: float) -> tuple[dict, torch.Tensor] | None:
    """The threshold of `curve` (the policy's sweep on the validation split) with the best accuracy within
    `budget`, and what it reaches on the test split."""
    ok = [p for p in curve if p["cost"] <= budget + 1e-12]
    if not ok:
        return None
    best = max(ok, key=lambda p: (p["accuracy"], -p["cost"]))
    index = simulate(test, policy, best["threshold"])
    correct = _correct(test, index)
    return {
        "threshold": best["threshold"],
        "val_accuracy": best["accuracy"],
        "val_cost": best["cost"],
        "test_accuracy": float(correct.float().mean()),
        "test_cost": float(test.costs[index].mean()),
    }, correct


def _static(val: Collected, test: Collected, budget: float) -> tuple[dict, torch.Tensor] | None:
    accs = val.exit_accuracy
    ok = [(accs[k], -float(val.costs[k]), k) for k in range(len(accs)) if float(val.costs[k]) <= budget + 1e-12]
    if not ok:
        return None
    k = max(ok)[2]
    correct = test.logits[:, k].argmax(-1) == test.labels
    info = {"exit": k + 1, "val_accuracy": accs[k], "val_cost": float(val.costs[k])}
    return info | {"test_accuracy": float(correct.float().mean()), "test_cost": float(test.costs[k])}, correct


def _interval(samples: torch.Tensor) -> list[float]:
    lo, hi = torch.quantile(samples.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [round(lo, 5), round(hi, 5)]


def _with_intervals(row: dict, correct: dict[str, torch.Tensor], seed: int) -> None:
    """Bootstrap 95 % intervals over test images: each policy's accuracy, and recommended minus each (paired)."""
    if not correct:
        return
    n = next(iter(correct.values())).shape[0]
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (BOOTSTRAP, n), generator=g)
    means = {name: c.float()[draws].mean(1) for name, c in correct.items()}
    for name, m in means.items():
        row[name]["test_accuracy_ci95"] = _interval(m)
    if "recommended" in means:
        for name, m in means.items():
            if name != "recommended":
                row[name]["recommended_minus_this_ci95"] = _interval(means["recommended"] - m)


def _recommended(row: dict, correct: dict[str, torch.Tensor], candidates: list[str]) -> None:
    """The pre-registered choice: the candidate with the best validation accuracy within the budget."""
    picks = [(row[c]["val_accuracy"], -row[c]["val_cost"], c) for c in candidates if row.get(c)]
    if not picks:
        row["recommended"] = None
        return
    choice = max(picks)[2]
    row["recommended"] = {"policy": choice, **row[choice]}
    correct["recommended"] = correct[choice]


def gate_fit_skipped(model: EarlyExitModel) -> str | None:
    """Why the fitted-gate policies do not apply to `model` (None: they do)."""
    if not len(model.branches):
        return "the model has no early exits, so no gates to fit"
    if model.config.gate != "stats":
        return f"fit_gates re-fits stats gates only, and this model's gates are {model.config.gate!r} (recipe key gate)"
    return None


def main(argv: list[str] | None = None) -> None:
    """Command line (``argv``: the arguments, default ``sys.argv[1:]``); prints the frontier as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run folder written by timm-exits train")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    p.add_argument("--device", default="cpu", help="where the exits' outputs are collected (cpu, cuda)")
    p.add_argument("--data-dir", help="where the run's data set lives now, if it moved")
    add_unfinished_argument(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = load_finished_run(args.run, args.unfinished, device=args.device, data_dir=args.data_dir)
    model = run.model.eval()
    splits = build_datasets(run.recipe.data, model, seed=run.recipe.seed)
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
    skipped = gate_fit_skipped(model)
    for objective in GATE_OBJECTIVES if skipped is None else ():
        fitted = copy.deepcopy(model)
        fits[objective] = fit_gates(fitted, val, objective=objective).__dict__
        fval, ftest = outputs(fitted)
        policies[f"gate_fitted_{objective}"] = (fval, ftest, "gate")
    candidates = [c for c in RECOMMENDED_CANDIDATES if c in policies or c == "static"]
    curves = {name: sweep(v, policy) for name, (v, _, policy) in policies.items()}  # the same at every budget
    table = []
    for i, budget in enumerate(args.budgets):
        row: dict = {"budget": budget}
        correct: dict[str, torch.Tensor] = {}
        results = {"static": _static(val, test, budget)}
        results |= {name: _at_budget(curves[name], t, policy, budget) for name, (_, t, policy) in policies.items()}
        for name, result in results.items():
            row[name] = result and result[0]
            if result:
                correct[name] = result[1]
        _recommended(row, correct, candidates)
        _with_intervals(row, correct, seed=i)
        table.append(row)
    flat = run.recipe.flat()
    result = {
        "benchmark": "policy_frontier",
        "machine": machine(args.threads) | {"device": args.device},
        "run": args.run,
        "recipe": {k: flat[k] for k in ("model", "dataset", "method", "img_size", "epochs", "exits")},
        "training": trained(run),
        "splits": {"val": int(val.labels.shape[0]), "test": int(test.labels.shape[0])},
        "exit_costs": test.costs.tolist(),
        "val_exit_accuracy": val.exit_accuracy,
        "test_exit_accuracy": test.exit_accuracy,
        "gate_fits": fits,
        "gate_fit_skipped": skipped,
        "recommended": {"candidates": candidates, "chosen_on": "val", "bootstrap": BOOTSTRAP},
        "table": table,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
