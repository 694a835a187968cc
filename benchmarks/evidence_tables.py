"""Print the paper-style tables (Table 1: accuracy per method; Table 2: hard exits) from run reports.

Reads every ``report.json`` under the given folder (one sub-folder per run, as committed under
``results/``), and prints Markdown with the paper's numbers beside ours.

    python benchmarks/evidence_tables.py results/cifar10_short
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PAPER = {"baseline": 81.61, "branchynet": 83.94, "soft": 85.78}
PAPER_HARD = "84.92 % at a 58 % speed-up (exits #1 0.4 %, #2 22.4 %, #6 1.6 %, #7 52.2 %, #8 13.5 %)"


def _dist(d: list[float]) -> str:
    return ", ".join(f"#{i + 1}: {100 * v:.1f} %" for i, v in enumerate(d))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    args = p.parse_args()
    reports = {}
    for path in sorted(args.folder.glob("*/report.json")):
        r = json.loads(path.read_text())
        reports[r["method"]] = r
    if not reports:
        raise SystemExit(f"no */report.json under {args.folder}")
    any_r = next(iter(reports.values()))
    rec = any_r["recipe"]
    print(
        f"Budget (same for every method): {rec['model']} at {rec['img_size']} px, exits {rec['exits']}, "
        f"{rec['epochs']} epochs, {rec['opt']} lr {rec['lr']}, batch {rec['batch_size']}, {rec['sched']}; "
        f"{any_r['splits']['train']} train / {any_r['splits']['val']} val / {any_r['splits']['test']} test.\n"
    )
    print("| method | test accuracy (soft ensemble for soft; final exit otherwise) | final exit | paper |")
    print("|---|---|---|---|")
    for m in ("baseline", "branchynet", "soft"):
        if m in reports:
            t = reports[m]["test"]
            acc = t["soft_accuracy"] if m == "soft" else t["final_accuracy"]
            print(f"| {m} | {100 * acc:.2f} % | {100 * t['final_accuracy']:.2f} % | {PAPER[m]:.2f} % |")
    print()
    if "soft" in reports:
        r = reports["soft"]
        print(f"Hard exits of the soft model (paper: {PAPER_HARD}):\n")
        print("| policy | accuracy | expected cost | ms / image (batch 1) | speed-up | exit distribution |")
        print("|---|---|---|---|---|---|")
        for name, pol in r["policies"].items():
            ms = pol.get("ms_per_image")
            su = pol.get("speedup")
            print(
                f"| {name} | {100 * pol['accuracy']:.2f} % | {pol['expected_cost']:.3f} | "
                f"{'-' if ms is None else f'{ms:.2f}'} | {'-' if su is None else f'{su:.2f}x'} | "
                f"{_dist(pol['exit_distribution'])} |"
            )
        tm = r["timing"]
        print(
            f"\nTiming: batch 1, {tm['threads']} threads, {tm['machine']}; plain backbone "
            f"{tm['baseline_ms_per_image']:.2f} ms / image, measured in the same run."
        )


if __name__ == "__main__":
    main()
