"""The evidence grid's targets, each judged on the committed runs: ``targets`` writes the table.

The targets are those of the ResNet-18 rows (the plain network's accuracy on the budget, the soft
ensemble's, the order of the methods beyond the seed spread, the recommended policy's gain over
max-softmax on CIFAR-100) and, for every run with exits, the recommended policy against the test noise
and the hard exit at batch 1 against the plain network. A missed target names its cause where the runs
show one.
"""

from __future__ import annotations

import statistics

from _evidence_runs import (
    BACKBONES,
    DATASETS,
    WHOLE_SPLIT,
    Row,
    exit_mean,
    frontier_row,
    is_plain,
    mean_sd,
    method_label,
    method_variants,
    on_whole_split,
    pct,
    shortfalls,
)
from run_evidence import TARGET_BUDGET

__all__ = ["ACCURACY_TARGETS", "HARD_EXIT", "POLICY_GAIN", "targets"]

# The grid's targets for ResNet-18: test accuracy of the plain network (the budget) and of the soft ensemble
ACCURACY_TARGETS = {"cifar10": (0.865, 0.875), "cifar100": (0.605, 0.625)}
TARGET_BACKBONE = "resnet18"
ORDERING_DATASETS = ("cifar10",)  # soft >= B-Net >= baseline beyond the seed spread
POLICY_GAIN = {"cifar100": ((0.6, 0.7), 0.01)}  # recommended >= max-softmax + 1 point at these budgets
HARD_EXIT = (TARGET_BUDGET, 1.9)  # keeps the baseline's accuracy at <= this share of its FLOPs, >= this speed-up


def _missed(value: float, goal: float) -> str:
    """'met', or 'missed by x points' for a fraction below its goal."""
    return "met" if value >= goal - 1e-12 else f"missed by {pct(goal - value)} points"


def _accuracies(row: Row, key: str) -> list[float]:
    """One test accuracy per seed of a row (`key`: final_accuracy or soft_accuracy)."""
    return [r.report["test"][key] for r in row.runs]


def _ordered(upper: list[float], lower: list[float]) -> tuple[str, float, bool | None]:
    """How far the mean of `upper` is above that of `lower`, against the seed spread (the sum of the two
    sample standard deviations): the text, the gap, and whether the gap, either way, is beyond the spread
    (None for one seed)."""
    gap = statistics.fmean(upper) - statistics.fmean(lower)
    text = f"{'+' if gap >= 0 else '-'}{pct(abs(gap))} points"
    if min(len(upper), len(lower)) < 2:
        return f"{text}, spread not measured (one seed)", gap, None
    spread = statistics.stdev(upper) + statistics.stdev(lower)
    beyond = abs(gap) > spread
    return f"{text}, {'beyond' if beyond else 'within'} the spread ({pct(spread)})", gap, beyond


def _ordering_verdict(gaps: list[tuple[str, float, bool | None]]) -> str:
    """'met' when every gap of an ordering is positive and beyond the spread."""
    if any(beyond is None for _, _, beyond in gaps):
        return "not decided: one seed" if all(gap >= 0 for _, gap, _ in gaps) else "missed on one seed"
    return "met" if all(beyond and gap > 0 for _, gap, beyond in gaps) else "missed"


def _gain_cell(frontier: dict, budget: float) -> tuple[str, float | None]:
    """The recommended policy's test accuracy minus max-softmax's at `budget`, as text and as a fraction."""
    row = frontier_row(frontier, budget)
    rec, conf = row.get("recommended"), row.get("confidence")
    if not rec or not conf:
        return f"{budget:g}: {'max-softmax' if rec else 'recommended'} has no threshold in the budget", None
    gain = rec["test_accuracy"] - conf["test_accuracy"]
    return f"{budget:g}: {'+' if gain >= 0 else '-'}{pct(abs(gain))}", gain


def _gain_out_of_reach(frontier: dict, budget: float, goal: float) -> str | None:
    """Why max-softmax + `goal` at `budget` asks more than a single exit gives, as text; else None. Either the
    recommended policy reads no more than the best exit within the budget and the goal is above that exit (the
    gain needs a routing that beats every exit within the budget), or the goal is above every exit of the
    network at any cost."""
    row = frontier_row(frontier, budget)
    rec, conf = row.get("recommended"), row.get("confidence")
    exits = list(zip(frontier.get("test_exit_accuracy", []), frontier.get("exit_costs", [])))
    fits = [a for a, c in exits if c <= budget + 1e-9]
    if not rec or not conf or not fits:
        return None
    target = conf["test_accuracy"] + goal
    best, best_any = max(fits), max(a for a, _ in exits)
    if rec["test_accuracy"] <= best + 1e-9 and target > best:
        return (
            f"at {budget:g} the recommended policy reads no more than the best exit within the budget "
            f"({pct(best)} %), below max-softmax + {100 * goal:g} ({pct(target)} %)"
        )
    if target > best_any:
        return (
            f"at {budget:g} max-softmax + {100 * goal:g} ({pct(target)} %) is above every exit of the network "
            f"(best {pct(best_any)} %)"
        )
    return None


def _hard_exit(t: dict, base: list[float]) -> tuple[str, str]:
    """A run's timed recommended policy (a ``timing.json``) against the hard-exit target, as (measured,
    verdict)."""
    acc, cost, speedup = t["test"]["accuracy"], t["test"]["expected_cost"], t["timing"]["speedup"]
    measured = f"{pct(acc)} % at {cost:.3f} of the FLOPs, {speedup:.2f}x"
    if not base:
        return measured, "no baseline trained"
    mean = statistics.fmean(base)
    measured += f"; baseline {pct(mean)} %"
    misses = []
    if acc < mean:
        misses.append(f"accuracy {pct(mean - acc)} points below")
    if cost > HARD_EXIT[0]:
        misses.append(f"cost above {HARD_EXIT[0]:g}")
    if speedup < HARD_EXIT[1]:
        misses.append(f"speed-up below {HARD_EXIT[1]:g}x")
    return measured, "met" if not misses else "missed: " + ", ".join(misses)


def targets(rows: dict[tuple[str, str, str], Row]) -> str:
    """Each of the grid's targets with the committed figure it is judged on and whether it is met."""
    out = [
        "Each target of the grid against the committed runs (test split; means over the seeds trained). "
        "Beyond the seed spread: the gap between two methods' means is larger than the sum of their sample "
        f"standard deviations. Hard exit: the recommended policy at batch 1 keeps the baseline's mean accuracy "
        f"at <= {HARD_EXIT[0]:g} of its FLOPs and >= {HARD_EXIT[1]:g}x its speed, judged at the budget the "
        f"policy's rule picks on the held-out split and, where timed, at the target's own budget "
        f"({HARD_EXIT[0]:g}).",
        "",
        "| target | runs | measured | verdict |",
        "|---|---|---|---|",
    ]
    name = BACKBONES.get(TARGET_BACKBONE, TARGET_BACKBONE)
    for dataset, (plain_goal, soft_goal) in ACCURACY_TARGETS.items():
        label = f"{DATASETS.get(dataset, dataset)} {name}"
        row_of = {
            v: rows.get((dataset, TARGET_BACKBONE, v)) or Row(dataset, TARGET_BACKBONE, v) for v in method_variants()
        }
        # the soft method at each cost weight, then any variant of its loss in the grid (the exits' mean CE)
        soft_variants = [v for v in method_variants() if v.startswith("soft_l")]
        for d, b, v in rows:
            if (d, b) == (dataset, TARGET_BACKBONE) and exit_mean(v) and not on_whole_split(v):
                soft_variants.append(v)
                row_of[v] = rows[d, b, v]
        goals = [("baseline", "final_accuracy", "plain network", plain_goal)]
        goals += [(v, "soft_accuracy", f"{method_label(v)}: soft ensemble", soft_goal) for v in soft_variants]
        checks = []
        for variant, key, what, goal in goals:  # each beside its run on the whole training split, if any
            checks.append((variant, key, f"{what} >= {pct(goal)} %", goal))
            whole = rows.get((dataset, TARGET_BACKBONE, variant + WHOLE_SPLIT))
            if whole is not None:
                row_of[whole.variant] = whole
                checks.append((whole.variant, key, f"{what} on the whole training split >= {pct(goal)} %", goal))
        for variant, key, what, goal in checks:
            row = row_of[variant]
            if not row.runs:
                out.append(f"| {label}: {what} | - | - | not trained yet |")
                continue
            values = _accuracies(row, key)
            seeds = ", ".join(r.name for r in row.runs)
            out.append(f"| {label}: {what} | {seeds} | {mean_sd(values)} | {_missed(statistics.fmean(values), goal)} |")
        if dataset in ORDERING_DATASETS:
            base, bnet = row_of["baseline"], row_of["branchynet"]
            for variant in soft_variants:
                soft = row_of[variant]
                what = f"{label}: {method_label(variant)} >= B-Net >= baseline beyond the seed spread"
                if not (soft.runs and bnet.runs and base.runs):
                    out.append(f"| {what} | - | - | not trained yet |")
                    continue
                gaps = [
                    _ordered(_accuracies(soft, "soft_accuracy"), _accuracies(bnet, "final_accuracy")),
                    _ordered(_accuracies(bnet, "final_accuracy"), _accuracies(base, "final_accuracy")),
                ]
                counts = f"{len(soft.runs)} / {len(bnet.runs)} / {len(base.runs)} seeds"
                measured = f"soft - B-Net {gaps[0][0]}; B-Net - baseline {gaps[1][0]}"
                out.append(f"| {what} | {counts} | {measured} | {_ordering_verdict(gaps)} |")
        if dataset in POLICY_GAIN:
            budgets, goal = POLICY_GAIN[dataset]
            at = " and ".join(f"{b:g}" for b in budgets)
            what = f"{label}: recommended policy >= max-softmax + {100 * goal:g} point at {at} of the cost"
            runs = [r for v in ("branchynet", *soft_variants) for r in row_of[v].runs]
            if not runs:
                out.append(f"| {what} | - | - | not trained yet |")
            for run in runs:
                if run.frontier is None:
                    out.append(f"| {what} | {run.name} | - | no frontier.json yet |")
                    continue
                cells = [_gain_cell(run.frontier, b) for b in budgets]
                gains = [g for _, g in cells]
                ok = all(g is not None and g >= goal - 1e-12 for g in gains)
                measured = "; ".join(c for c, _ in cells) + " points"
                short = [b for b, g in zip(budgets, gains) if g is None or g < goal - 1e-12]
                causes = [c for b in short if (c := _gain_out_of_reach(run.frontier, b, goal))]
                verdict = "met" if ok else "missed" + (": " + "; ".join(causes) if causes else "")
                out.append(f"| {what} | {run.name} | {measured} | {verdict} |")
    for (dataset, backbone, variant), row in rows.items():
        if is_plain(variant) or on_whole_split(variant) or not row.runs:
            continue
        base = _accuracies(
            rows.get((dataset, backbone, "baseline")) or Row(dataset, backbone, "baseline"), "final_accuracy"
        )
        label = f"{DATASETS.get(dataset, dataset)} {BACKBONES.get(backbone, backbone)}"
        for run in row.runs:
            what = f"{label}: hard exit keeps the baseline's accuracy at <= {HARD_EXIT[0]:g} of the FLOPs"
            if run.frontier is not None:
                misses = shortfalls(run.frontier)
                verdict = "met" if not misses else "missed: " + "; ".join(misses)
                policy_what = f"{label}: recommended policy not below max-softmax, entropy or static beyond the noise"
                out.append(f"| {policy_what} | {run.name} | budgets 0.4 to 0.9 | {verdict} |")
            if run.timing is None:
                out.append(f"| {what} | {run.name} | - | not timed yet |")
                continue
            measured, verdict = _hard_exit(run.timing, base)
            at_target = run.target_timing is None and run.timing.get("budget") == HARD_EXIT[0]
            rule = f"{what}, at budget {HARD_EXIT[0]:g} (the rule's own)" if at_target else what
            out.append(f"| {rule} | {run.name} | {measured} | {verdict} |")
            if run.target_timing is not None:
                measured, verdict = _hard_exit(run.target_timing, base)
                out.append(f"| {what}, at budget {HARD_EXIT[0]:g} | {run.name} | {measured} | {verdict} |")
    return "\n".join(out)
