"""The report's plots (matplotlib, headless): gate-value histograms per exit, accuracy against expected cost for
every policy's threshold sweep next to static truncation, and each policy's exit distribution.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..inference.calibration import Collected

__all__ = [
    "write_plots",
]


# ------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def write_plots(
    folder: Path, test: Collected, report: Mapping[str, Any], curves: Mapping[str, list[dict[str, float]]]
) -> dict[str, Path]:
    """Write the three report plots as PNG (matplotlib's Agg canvas; no global backend change).

    Args:
        folder: Output folder (created).
        test: Every exit's outputs on the test split.
        report: The report dict (exits, static points, policies).
        curves: Policy -> threshold sweep on the test split (from `timm_exits.sweep`).

    Returns:
        Plot name -> path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    pols = report["policies"]

    n_early = test.gate_logits.shape[1]
    cols = max(1, min(4, n_early))
    rows = max(1, -(-n_early // cols))
    fig = _figure(3.2 * cols, 2.6 * rows)
    gates = torch.sigmoid(test.gate_logits.float())
    for b in range(n_early):
        ax = fig.add_subplot(rows, cols, b + 1)
        ax.hist(gates[:, b].numpy(), bins=40, range=(0, 1), color="tab:blue")
        ax.axvline(0.5, color="k", ls="--", lw=1, label="0.5")
        ax.axvline(pols["gate"]["threshold"], color="tab:red", lw=1, label="calibrated")
        ax.set_title(f"exit #{b + 1} ({report['exits'][b]['name']})", fontsize=9)
        ax.set_xlabel("gate value g(x)", fontsize=8)
        ax.set_yscale("log")
        if b == 0:
            ax.set_ylabel("test images", fontsize=8)
            ax.legend(fontsize=7)
    if n_early == 0:
        fig.text(0.5, 0.5, "no early exits", ha="center")
    fig.suptitle("Gate values on the test split", fontsize=10)
    fig.tight_layout()
    paths["gate_histograms"] = folder / "gate_histograms.png"
    fig.savefig(paths["gate_histograms"])

    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    static = report["static"]
    ax.plot(
        [s["cost"] for s in static], [100 * s["accuracy"] for s in static], "ks-", lw=1, label="static: all at exit k"
    )
    for i, s in enumerate(static):
        ax.annotate(
            f"#{i + 1}", (s["cost"], 100 * s["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=7
        )
    colors = {"gate": "tab:blue", "gate_joint": "tab:purple", "confidence": "tab:orange", "entropy": "tab:green"}
    for p, curve in curves.items():
        pts = sorted((c["cost"], 100 * c["accuracy"]) for c in curve)
        ax.plot([c for c, _ in pts], [a for _, a in pts], "-", color=colors.get(p), lw=1, alpha=0.8, label=f"{p} sweep")
        ax.plot(pols[p]["expected_cost"], 100 * pols[p]["accuracy"], "o", color=colors.get(p), ms=7, mec="k")
    g = pols["gate_0.5"]
    ax.plot(g["expected_cost"], 100 * g["accuracy"], "D", color="tab:blue", mec="k", label="gate @ 0.5")
    s = pols["soft"]
    refit = "soft_accuracy_fitted_gates" in report["test"]
    label = "soft ensemble (re-fitted gates)" if refit else "soft ensemble"
    ax.plot(s["expected_cost"], 100 * s["accuracy"], "*", color="tab:purple", ms=11, mec="k", label=label)
    if refit:
        joint = 100 * report["test"]["soft_accuracy"]
        ax.plot(
            s["expected_cost"], joint, "*", color="white", ms=11, mec="tab:purple", label="soft ensemble (joint gates)"
        )
    ax.set_xlabel("expected cost (share of the backbone's FLOPs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs cost (circles: thresholds calibrated on val)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths["accuracy_vs_cost"] = folder / "accuracy_vs_cost.png"
    fig.savefig(paths["accuracy_vs_cost"])

    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    names = [n for n in ("gate", "gate_joint", "gate_0.5", "confidence", "entropy") if n in pols]
    e = len(report["exits"])
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(e)]
        ax.bar(xs, [100 * v for v in pols[n]["exit_distribution"]], width, label=n)
    ax.set_xticks(range(e), [f"#{i + 1}" for i in range(e)])
    ax.set_xlabel("exit")
    ax.set_ylabel("share of test images (%)")
    ax.set_title("Exit distribution per policy", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths["exit_distribution"] = folder / "exit_distribution.png"
    fig.savefig(paths["exit_distribution"])
    return paths
