"""Train the CIFAR-10 evidence grid (the paper's Tables 1 and 2) and collect what README.md reports.

Runs every entry of `GRID` with the same budget (the recipe file plus the shared overrides given here),
several at a time, each as its own `timm-exits train` process with checkpoints (a killed run resumes
with ``--resume``). When the runs are done it computes the policy frontier of every soft and B-Net run
(`policy_frontier.py`, dense budgets) and copies the small files of each run (report, metrics, recipe,
log, frontier; never checkpoints or weights) to ``--results``.

    python benchmarks/run_evidence.py --data-dir /tmp/data --out runs/evidence --results results/cifar10 \\
        --epochs 30 --parallel 2 --set threads=1 num_workers=1

The JSON summary (per run: status, wall seconds) goes to stdout; each run's output to ``OUT/NAME.out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (recipe file under recipes/, overrides). The budget (epochs, optimiser, augmentation) is shared.
GRID: dict[str, tuple[str, dict[str, object]]] = {
    "resnet18_blocks_baseline": ("cifar10_resnet18", {"method": "baseline"}),
    "resnet18_blocks_branchynet": ("cifar10_resnet18", {"method": "branchynet"}),
    "resnet18_blocks_soft": ("cifar10_resnet18", {"method": "soft", "cost_weight": 0.1}),
    "resnet18_blocks_soft_lambda1": ("cifar10_resnet18", {"method": "soft", "cost_weight": 1.0}),
    "resnet18_auto_branchynet": ("cifar10_resnet18", {"method": "branchynet", "exits": "auto"}),
    "resnet18_auto_soft": ("cifar10_resnet18", {"method": "soft", "cost_weight": 0.1, "exits": "auto"}),
    "vgg13_baseline": ("cifar10_vgg13", {"method": "baseline"}),
    "vgg13_branchynet": ("cifar10_vgg13", {"method": "branchynet"}),
    "vgg13_soft": ("cifar10_vgg13", {"method": "soft", "cost_weight": 0.1}),
}
FRONTIER_BUDGETS = [round(0.3 + 0.025 * i, 3) for i in range(29)]  # 0.3 .. 1.0
SMALL_FILES = ("report.json", "report.md", "metrics.jsonl", "recipe.yaml", "train.log", "frontier.json")


def _train_cmd(name: str, args: argparse.Namespace) -> list[str]:
    recipe, overrides = GRID[name]
    sets = {**overrides, "epochs": args.epochs}
    cmd = [sys.executable, "-m", "timm_exits.cli", "train", "-c", str(ROOT / "recipes" / f"{recipe}.yaml")]
    cmd += ["--data-dir", str(args.data_dir), "--output", str(args.out / name), "--no-progress"]
    cmd += ["--resume"] if (args.out / name / "checkpoint.json").exists() else []
    return cmd + [f"{k}={v}" for k, v in sets.items()] + list(args.set)


def _start_frontier(name: str, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE / "policy_frontier.py"), "--run", str(args.out / name)]
    cmd += ["--device", args.frontier_device, "--threads", str(args.frontier_threads), "--budgets"]
    cmd += [str(b) for b in FRONTIER_BUDGETS]
    with open(args.out / name / "frontier.json", "w") as out, open(args.out / f"{name}.frontier.err", "w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=_env())  # the child keeps the files


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder of the run folders")
    p.add_argument("--results", type=Path, help="copy each finished run's small files to RESULTS/NAME")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--only", nargs="+", choices=sorted(GRID), help="run these entries (default: all)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--deadline", type=float, help="seconds: stop (runs keep their checkpoints) after this long")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides shared by every run")
    p.add_argument("--frontier-device", default="cpu")
    p.add_argument("--frontier-threads", type=int, default=2)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(GRID)
    env = _env()
    start = time.monotonic()
    queue, running, summary = list(names), {}, {}
    while queue or running:
        late = args.deadline is not None and time.monotonic() - start > args.deadline
        while queue and len(running) < args.parallel and not late:
            name = queue.pop(0)
            with open(args.out / f"{name}.out", "w") as log:
                proc = subprocess.Popen(_train_cmd(name, args), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            running[name] = (proc, time.monotonic())
        for name, (proc, t0) in list(running.items()):
            if late and proc.poll() is None:
                proc.terminate()
                proc.wait()
            if proc.poll() is not None:
                status = "done" if proc.returncode == 0 else ("stopped at the deadline" if late else "failed")
                summary[name] = {"status": status, "returncode": proc.returncode, "seconds": time.monotonic() - t0}
                del running[name]
        if late:
            summary.update({n: {"status": "not started (deadline)"} for n in queue})
            queue.clear()
        time.sleep(1.0)
    finished = [n for n in names if summary[n]["status"] == "done" and (args.out / n / "report.json").exists()]
    frontiers = {}
    for name in finished:  # every frontier at once: each is short and mostly waits on the device
        if json.loads((args.out / name / "report.json").read_text())["method"] != "baseline":
            frontiers[name] = _start_frontier(name, args)
    for name, proc in frontiers.items():
        summary[name]["frontier_returncode"] = proc.wait()
    for name in finished:
        if args.results:
            dest = args.results / name
            dest.mkdir(parents=True, exist_ok=True)
            for f in SMALL_FILES:
                if (args.out / name / f).exists():
                    shutil.copy2(args.out / name / f, dest / f)
    print(json.dumps({"epochs": args.epochs, "set": args.set, "seconds": time.monotonic() - start, "runs": summary}))


if __name__ == "__main__":
    main()
