"""Tables and plot of the superseded CIFAR-10 runs under ``results/cifar10`` and ``results/cifar10_short``.

Prints the paper-style tables (Table 1: accuracy per method; Table 2: hard exits) and draws the
accuracy-versus-cost plot from the run reports of that flat layout (one folder per run). The evidence
grid's tables (``results/evidence``) are made by ``evidence_tables.py``.

Reads every ``*/report.json`` under the given folder (one sub-folder per run, as an earlier form of
``run_evidence.py`` committed them under ``results/``). A run's ``report_cpu.json``, when present, is
the same model re-evaluated on this CPU with batch-1 timing (``timm-exits eval RUN --device cpu``)
and is used for Table 2. ``frontier.json`` files (``policy_frontier.py``) give the curves of the plot.

    python benchmarks/superseded_tables.py results/cifar10 --plot results/cifar10/accuracy_vs_cost.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PAPER = {"baseline": 81.61, "branchynet": 83.94, "soft": 85.78}
# Rows of the paper's grid not yet trained, with the paper's numbers
# (baseline / B-Net / soft); printed as "not yet run" until a report for them is committed.
NOT_YET_RUN = {
    ("vgg13_bn", "cifar10"): ("VGG-13, CIFAR-10", "75.44 / 82.88 / 87.11"),
    ("resnet18", "cifar100"): ("ResNet-18, CIFAR-100", "51.13 / 54.78 / 58.54"),
    ("vgg13_bn", "cifar100"): ("VGG-13, CIFAR-100", "47.18 / 51.97 / 57.31"),
}
PAPER_HARD = "84.92 % at a 58 % speed-up (exits #1 0.4 %, #2 22.4 %, #6 1.6 %, #7 52.2 %, #8 13.5 %)"
FRONTIER_BUDGETS = (0.35, 0.4, 0.45, 0.5, 0.6, 0.7)
# (run method, frontier policy) -> plot label; the soft model's policies and B-Net's, on the same axes
CURVES = {
    ("soft", "gate_fitted_no_gain"): "soft model, fitted gates (library default)",
    ("soft", "gate_joint"): "soft model, jointly trained gates",
    ("soft", "confidence"): "soft model, max-softmax",
    ("branchynet", "gate_fitted_no_gain"): "B-Net, fitted gates (library default)",
    ("branchynet", "entropy"): "B-Net, entropy (BranchyNet)",
    ("branchynet", "confidence"): "B-Net, max-softmax",
}


def _dist(d: list[float]) -> str:
    return ", ".join(f"#{i + 1}: {100 * v:.1f} %" for i, v in enumerate(d) if v >= 0.0005)


def _load(folder: Path) -> dict[str, dict]:
    runs = {}
    for path in sorted(folder.glob("*/report.json")):
        run = {"report": json.loads(path.read_text())}
        for extra, key in (("report_cpu.json", "report_cpu"), ("frontier.json", "frontier")):
            if (path.parent / extra).is_file():
                run[key] = json.loads((path.parent / extra).read_text())
        runs[path.parent.name] = run
    return runs


def _exit_ce(r: dict) -> str:
    """How much per-exit cross-entropy (deep supervision) the run's loss has."""
    rec = r["recipe"]
    if r["method"] == "soft":
        return f"{rec['exit_weight']:g} x mean" if rec["exit_weight"] else "none"
    if r["method"] == "branchynet":
        return "sum" if not rec.get("branchynet_weights") else f"weighted sum {rec['branchynet_weights']}"
    return "final exit only"


def _headline(r: dict) -> float:
    t = r["test"]
    return t["soft_accuracy"] if r["method"] == "soft" else t["final_accuracy"]


def table1(runs: dict[str, dict]) -> str:
    lines = [
        "| run | method | exits | lambda | per-exit CE | test accuracy | final exit | best early exit | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        r = run["report"]
        rec, t = r["recipe"], r["test"]
        lam = rec["cost_weight"] if r["method"] == "soft" else "-"
        early = max(t["exit_accuracy"][:-1])
        lines.append(
            f"| {name} | {r['method']} | {rec['exits']} ({len(t['exit_accuracy']) - 1}) | {lam} | {_exit_ce(r)} | "
            f"{100 * _headline(r):.2f} % | {100 * t['final_accuracy']:.2f} % | {100 * early:.2f} % | "
            f"{PAPER[r['method']]:.2f} % |"
        )
    return "\n".join(lines)


def table2(name: str, run: dict) -> str:
    r = run.get("report_cpu", run["report"])
    lines = [
        f"`{name}` (paper: {PAPER_HARD}):\n",
        "| policy | test accuracy | expected cost | ms / image (batch 1) | speed-up | exit distribution |",
        "|---|---|---|---|---|---|",
    ]
    for pol_name, pol in r["policies"].items():
        ms, su = pol.get("ms_per_image"), pol.get("speedup")
        lines.append(
            f"| {pol_name} | {100 * pol['accuracy']:.2f} % | {pol['expected_cost']:.3f} | "
            f"{'-' if ms is None else f'{ms:.2f}'} | {'-' if su is None else f'{su:.2f}x'} | "
            f"{_dist(pol['exit_distribution'])} |"
        )
    tm = r["timing"]
    if tm.get("baseline_ms_per_image") is not None:
        lines.append(
            f"\nTiming: batch 1, {tm['threads']} threads, {tm['machine']} ({tm['device']}), median of "
            f"{tm['repeats']} passes over {tm['images']} test images; plain backbone "
            f"{tm['baseline_ms_per_image']:.2f} ms / image, measured in the same run."
        )
    else:
        lines.append("\nNo timing in this report (trained and evaluated on the GPU host; not re-timed here).")
    return "\n".join(lines)


def frontier_table(runs: dict[str, dict]) -> str:
    lines = [
        "| run | policy | " + " | ".join(f"cost <= {b}" for b in FRONTIER_BUDGETS) + " |",
        "|---|---|" + "---|" * len(FRONTIER_BUDGETS),
    ]
    for name, run in runs.items():
        if "frontier" not in run:
            continue
        table = run["frontier"]["table"]
        for policy in ["static", *_policies(run)]:
            cells = []
            for budget in FRONTIER_BUDGETS:
                row = next((x for x in table if abs(x["budget"] - budget) < 1e-9), None)
                v = row and row.get(policy)
                cells.append("-" if not v else f"{100 * v['test_accuracy']:.2f} % ({v['test_cost']:.2f})")
            if all(c == "-" for c in cells):  # e.g. an objective added after this frontier was computed
                continue
            label = CURVES.get((run["report"]["method"], policy), "static truncation (every image at one exit)")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _policies(run: dict) -> list[str]:
    method = run["report"]["method"]
    return [p for (m, p) in CURVES if m == method]


def plot(runs: dict[str, dict], path: Path, only: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    for name, run in runs.items():
        r = run["report"]
        if "frontier" not in run or (only and name not in only):
            continue
        for policy in _policies(run):
            pts = sorted(
                {(v["test_cost"], v["test_accuracy"]) for row in run["frontier"]["table"] if (v := row.get(policy))}
            )
            if pts:
                xs, ys = zip(*pts)
                style = "-" if r["method"] == "soft" else "--"
                ax.plot(xs, [100 * y for y in ys], style, marker=".", label=f"{CURVES[(r['method'], policy)]} [{name}]")
        static = [(c, a) for c, a in zip(run["frontier"]["exit_costs"], run["frontier"]["test_exit_accuracy"])]
        ax.plot(*zip(*[(c, 100 * a) for c, a in static]), "x", color="gray", alpha=0.6)
    for name, run in runs.items():
        if run["report"]["method"] == "baseline":
            acc = 100 * run["report"]["test"]["final_accuracy"]
            ax.plot([1.0], [acc], "k*", markersize=12, label=f"baseline network [{name}]")
    ax.set_xlabel("expected cost (fraction of the plain ResNet-18's FLOPs, gamma)")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title("Accuracy vs cost: thresholds chosen on the 5,000 held-out images (x: single exits)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--plot", type=Path, help="write the accuracy-versus-cost PNG here")
    p.add_argument("--plot-runs", nargs="+", help="runs whose curves the plot shows (default: every run)")
    args = p.parse_args()
    runs = _load(args.folder)
    if not runs:
        raise SystemExit(f"no */report.json under {args.folder}")
    r0 = next(iter(runs.values()))["report"]
    rec = r0["recipe"]
    print(
        f"Budget (same for every run): {rec['model']} at {rec['img_size']} px, {rec['epochs']} epochs, "
        f"{rec['opt']} lr {rec['lr']} (cosine, {rec['warmup_epochs']} warm-up), batch {rec['batch_size']}, "
        f"amp {rec['amp']}; {r0['splits']['train']} train / {r0['splits']['val']} val / {r0['splits']['test']} "
        "test.\n"
    )
    print("Table 1 form (test accuracy: the soft-conditional ensemble for soft runs, the final exit otherwise):\n")
    print(table1(runs))
    models = {(r["report"]["model"], r["report"]["dataset"]) for r in runs.values()}
    missing = [row for key, row in NOT_YET_RUN.items() if key not in models]
    if missing:
        print("\n| not yet run | paper (baseline / B-Net / soft) |\n|---|---|")
        for k, v in missing:
            print(f"| {k} | {v} % |")
    for name, run in runs.items():
        if run["report"]["method"] == "soft" or "report_cpu" in run:
            print("\nTable 2 form, hard exits of " + table2(name, run))
    if any("frontier" in run for run in runs.values()):
        print("\nPolicy frontier (test accuracy (test cost) at thresholds chosen on val within each budget):\n")
        print(frontier_table(runs))
    if args.plot:
        plot(runs, args.plot, args.plot_runs)
        print(f"\n![accuracy vs cost]({args.plot.name})")


if __name__ == "__main__":
    main()
