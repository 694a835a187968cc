"""Batch-1 wall time of a run's recommended exit policy against its plain backbone, on this machine.

The policy is the one ``policy_frontier.py`` recommends in the run's ``frontier.json`` at one budget:
``--budget B`` takes the frontier row at B; without it, the lowest budget whose recommended policy is
within ``--max-drop`` (default 0.01) of the final exit's accuracy on the validation split. Both rules
read validation numbers only, so the test images stay untouched by the choice (the same rule, lowest
cost within one point of the final exit, that the run's own report calibrates its policy with).

The policy is rebuilt on the trained weights as the frontier defined it: max-softmax and entropy
thresholds as stored; fitted gates fitted again on the validation split with the same call
(``fit_gates(..., objective="no_gain")`` with its defaults, which is deterministic on the CPU);
static truncation sends every image to its exit. Accuracy, expected cost and the exit distribution
come from the real early-exit path over the whole test split; the frontier's simulated figures for
the same policy are kept beside them as a check.

Timing: the first ``--images`` test images at batch 1, the policy and the plain backbone (a copy of
the same weights with every exit hook removed) called in the same process on the same images,
interleaved within each of ``--repeats`` passes, median ms per image of each (``time_per_image``).
A run whose training has not finished is refused unless ``--unfinished`` asks for its last checkpoint
as it is (``training`` records the epochs it holds).

    python benchmarks/time_recommended.py --run runs/evidence/cifar10/resnet18_soft_l0.1_s0 \\
        --data-dir DATA --threads 2 --images 500 --repeats 7 --out RUN/timing.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _runs import add_unfinished_argument, load_finished_run, trained
from _timing import fail, machine, non_negative_int, positive_int, write_json

from timm_exits import collect, fit_gates
from timm_exits.core.model import EarlyExitModel
from timm_exits.inference.hard_exit import run_assigned
from timm_exits.training.data import build_datasets, make_loader
from timm_exits.training.timing import time_per_image

EVAL_BATCH = 256  # the batch policy_frontier.py collects with
Policy = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def choose(frontier: dict, budget: float | None, max_drop: float) -> tuple[dict, str]:
    """The frontier row whose recommended policy is timed, and the rule that picked it."""
    rows = [r for r in frontier["table"] if r.get("recommended")]
    if not rows:
        raise SystemExit(f"{frontier.get('run')}: frontier.json recommends no policy at any budget")
    if budget is not None:
        row = next((r for r in rows if abs(r["budget"] - budget) < 1e-9), None)
        if row is None:
            have = ", ".join(f"{r['budget']:g}" for r in rows)
            raise SystemExit(f"no recommended policy at budget {budget:g}; budgets with one: {have}")
        return row, f"budget {budget:g} (given)"
    target = frontier["val_exit_accuracy"][-1] - max_drop
    within = [r for r in rows if r["recommended"]["val_accuracy"] >= target - 1e-12]
    rule = f"lowest budget with validation accuracy within {max_drop:g} of the final exit's"
    if within:
        return min(within, key=lambda r: r["budget"]), rule
    return max(rows, key=lambda r: r["budget"]), rule + " (none was: the highest budget)"


def build_policy(model: EarlyExitModel, choice: dict, val_loader) -> Policy:
    """A function from a batch to (logits, exit index) under the recommended policy `choice`."""
    name = choice["policy"]
    if name == "static":
        k = int(choice["exit"]) - 1

        def static(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
            return run_assigned(model, x, index), index

        return static
    if name == "gate_fitted_no_gain":
        model = copy.deepcopy(model)
        fit_gates(model, collect(model, val_loader), objective="no_gain")
        policy = "gate"
    elif name in ("confidence", "entropy"):
        policy = name
    else:
        raise SystemExit(f"recommended policy {name!r} is not one this script can rebuild")
    threshold = float(choice["threshold"])

    def hard(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = model.predict(x, policy=policy, threshold=threshold)
        return pred.logits, pred.exit_index

    return hard


def _evaluate(policy: Policy, loader, costs: torch.Tensor) -> dict:
    """Accuracy, expected cost and exit distribution of the hard path over a whole split."""
    correct, taken = [], []
    with torch.no_grad():
        for x, y in loader:
            logits, index = policy(x)
            correct.append(logits.argmax(-1).cpu() == y)
            taken.append(index.cpu())
    hit, index = torch.cat(correct), torch.cat(taken)
    counts = torch.bincount(index, minlength=costs.shape[0])
    return {
        "images": int(index.shape[0]),
        "accuracy": float(hit.float().mean()),
        "expected_cost": float(costs[index].mean()),
        "exit_distribution": (counts / counts.sum()).tolist(),
    }


def run(args: argparse.Namespace) -> dict:
    """Load the run, rebuild its recommended policy, evaluate it on the test split and time it."""
    torch.set_num_threads(args.threads)
    folder = Path(args.run)
    if not (folder / "frontier.json").is_file():
        fail(
            f"{folder} has no frontier.json: run python benchmarks/policy_frontier.py --run {folder} > "
            f"{folder / 'frontier.json'} first"
        )
    frontier = json.loads((folder / "frontier.json").read_text())
    row, rule = choose(frontier, args.budget, args.max_drop)
    choice = row["recommended"]
    loaded = load_finished_run(folder, args.unfinished, data_dir=args.data_dir)
    model = loaded.model.eval()
    splits = build_datasets(loaded.recipe.data, model, seed=loaded.recipe.seed)
    val_loader = make_loader(splits.val, EVAL_BATCH, train=False)
    test_loader = make_loader(splits.test, EVAL_BATCH, train=False)
    policy = build_policy(model, choice, val_loader)
    costs = model.exit_costs.detach().float().cpu()
    test = _evaluate(policy, test_loader, costs)
    plain = copy.deepcopy(model).unwrap().eval()
    count = min(args.images, len(splits.test))
    inputs = [splits.test[i][0].unsqueeze(0) for i in range(count)]
    ms = time_per_image({"plain": plain, "policy": policy}, inputs, repeats=args.repeats, warmup=args.warmup)
    with torch.no_grad():
        timed = torch.cat([policy(x)[1] for x in inputs])
    timed_counts = torch.bincount(timed, minlength=costs.shape[0])
    recipe = loaded.recipe
    return {
        "benchmark": "time_recommended",
        "machine": machine(args.threads),
        "run": str(folder),
        "recipe": {k: recipe.flat()[k] for k in ("model", "dataset", "method", "cost_weight", "seed", "img_size")},
        "training": trained(loaded),
        "budget": row["budget"],
        "budget_rule": rule,
        "policy": {k: choice[k] for k in ("policy", "threshold", "exit") if k in choice},
        "frontier": {k: choice[k] for k in ("val_accuracy", "val_cost", "test_accuracy", "test_cost")},
        "test": test,
        "timing": {
            "batch_size": 1,
            "images": count,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "plain_ms_per_image": ms["plain"],
            "policy_ms_per_image": ms["policy"],
            "speedup": ms["plain"] / ms["policy"],
            "exit_distribution": (timed_counts / max(count, 1)).tolist(),
            "expected_cost": float(costs[timed].mean()),
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a run folder with its checkpoint and frontier.json")
    p.add_argument("--data-dir", help="where the run's data set lives now, if it moved")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--images", type=positive_int, default=500, help="test images timed at batch 1")
    p.add_argument("--repeats", type=positive_int, default=7, help="timed passes over the images (median reported)")
    p.add_argument("--warmup", type=non_negative_int, default=10, help="untimed calls of each candidate first")
    p.add_argument("--budget", type=float, help="frontier budget whose recommended policy is timed")
    p.add_argument("--max-drop", type=float, default=0.01, help="validation accuracy drop allowed without --budget")
    p.add_argument("--out", help="write the JSON here as well as to stdout")
    add_unfinished_argument(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run from the command line; returns the result written."""
    args = parse_args(argv)
    result = run(args)
    if args.out:
        write_json(args.out, result)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
