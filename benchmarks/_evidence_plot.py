"""The accuracy-versus-cost plot of one data set: every policy of every method and backbone on one set of axes."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

from _evidence_runs import DATASETS, POLICY_NAMES, Row, Run, frontier_row, method_label
from run_evidence import LAMBDA_A, LAMBDA_B

__all__ = ["plot"]


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or a clear error naming what to install."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "the plots need matplotlib, a dependency of timm-exits: pip install 'matplotlib>=3.7' "
            "(or reinstall the package: pip install -e .)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(runs: list[Run], policy: str) -> list[tuple[float, float]]:
    """(cost, accuracy %) per budget, averaged over the runs (budgets where every run has a point)."""
    points = set()
    for budget in sorted({r["budget"] for r in runs[0].frontier["table"]}):
        entries = [frontier_row(run.frontier, budget).get(policy) for run in runs]
        if all(entries):
            cost = statistics.fmean(e["test_cost"] for e in entries)
            points.add((round(cost, 6), round(100 * statistics.fmean(e["test_accuracy"] for e in entries), 6)))
    return sorted(points)


def plot(dataset: str, group: list[Row], path: Path) -> list[str]:
    """Every policy (colour) of every method (line style) and backbone (marker) on one set of axes;
    baseline networks as black stars at cost 1.0.

    Returns:
        The legend's labels: the policies, B-Net and the grid's two soft methods, any other method
        with a frontier, and each backbone with runs.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    colours = dict(zip(POLICY_NAMES, ("C0", "C1", "C2", "C7", "C4", "k")))
    styles: dict[str, object] = {"branchynet": "--", f"soft_l{LAMBDA_A:g}": "-", f"soft_l{LAMBDA_B:g}": ":"}
    others = sorted({r.variant for r in group if r.variant not in styles and any(run.frontier for run in r.runs)})
    dashes = itertools.cycle(("-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2))))
    styles.update({v: next(dashes) for v in others})
    backbones = sorted({row.backbone for row in group if row.runs})
    markers = dict(zip(backbones, "os^Dv<>p"))
    fig, ax = plt.subplots(figsize=(10.0, 5.5), dpi=120)
    for row in group:
        runs = [run for run in row.runs if run.frontier]
        if row.variant == "baseline" and row.runs:
            acc = 100 * statistics.fmean(r.report["test"]["final_accuracy"] for r in row.runs)
            ax.plot([1.0], [acc], marker="*", color="k", markersize=12, linestyle="none")
            ax.annotate(
                row.backbone,
                (1.0, acc),
                xytext=(-8, 0),
                textcoords="offset points",
                fontsize=7,
                va="center",
                ha="right",
            )
        for policy, colour in colours.items():
            pts = _mean_curve(runs, policy) if runs else []
            if pts:
                xs, ys = zip(*pts)
                recommended = policy == "recommended"
                ax.plot(
                    xs,
                    ys,
                    linestyle=styles[row.variant],
                    marker=markers[row.backbone],
                    markersize=3,
                    color=colour,
                    linewidth=4.0 if recommended else 1.0,
                    alpha=0.3 if recommended else 1.0,
                    zorder=1 if recommended else 2,
                )
    handles = [Line2D([], [], color=c, label=POLICY_NAMES[p]) for p, c in colours.items() if p != "recommended"]
    handles.append(Line2D([], [], color="k", linewidth=4.0, alpha=0.3, label="recommended (under its choice)"))
    handles += [Line2D([], [], color="gray", linestyle=s, label=method_label(v)) for v, s in styles.items()]
    handles += [Line2D([], [], color="gray", marker=markers[b], linestyle="none", label=b) for b in backbones]
    handles.append(Line2D([], [], color="k", marker="*", linestyle="none", label="baseline network"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("expected cost (share of the backbone's FLOPs)")
    ax.set_ylabel(f"{DATASETS.get(dataset, dataset)} test accuracy (%), mean over seeds")
    ax.set_title("Thresholds chosen on the held-out split within each budget", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return [h.get_label() for h in handles]
