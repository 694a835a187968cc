"""Train the evidence grid (the paper's Tables 1 and 2) on one budget and collect what the tables report.

Runs the entries of `GRID` one after another (or several at a time), each as its own `timm-exits train`
process with checkpoints: a stopped driver started again resumes every run from its last checkpoint (also
one whose report says its training is unfinished, e.g. after ``stop_after_steps``) and skips finished ones.
Each finished soft / B-Net run on the grid's split gets its policy frontier (`policy_frontier.py`) right away
and, with ``--timing-images N``, the batch-1 timing of its recommended policy against the
plain backbone (`time_recommended.py`): at the budget its rule picks on the held-out split
(``timing.json``) and, where the rule picks another budget, at the hard-exit target's own cost bound,
0.5 of the FLOPs (``timing_budget0.5.json``); then the small files of the run (report, metrics, recipe,
log, frontier, timings; never checkpoints, weights or plots: the copied report.md says where its plots
stay) are copied to ``RESULTS/<data set>/<name>``. Timing wants an otherwise idle machine, so the driver
pauses every other training process (SIGSTOP, then SIGCONT) while it times a run, and with
``--parallel`` above 1 the training processes leave out their report's own timing (``timing_images=0``),
which would run beside another training. Started again after the grid has finished, with
``--timing-images N``, the driver times every finished run that lacks a timing and copies the files
again.

On a CPU, two runs at a time with one thread each (``--parallel 2 --set threads=1``) train more
images per second in all than one run with two threads; each run takes longer.

    python benchmarks/run_evidence.py --data-dir DATA --out runs/evidence --results results/evidence

Every entry uses its recipe file as it is (the budget lives in timm_exits/training/recipes/_paper.yaml) plus its own
overrides (method, cost weight, seed). The JSON summary goes to stdout; each run's output to
``OUT/NAME.out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from _timing import non_negative_int, positive_int

from timm_exits.training.recipe import load_recipe
from timm_exits.training.report import PLOTS_HEADING

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

LAMBDA_A, LAMBDA_B = 0.1, 0.5
RESNET18_LR = load_recipe("cifar10_resnet18").optim.lr  # the peak rate of ResNet-18's budget
# the accuracy targets need no calibration split: trained on the whole training split but these images, held
# out only for the per-epoch validation, the plain network checks the budget itself and the soft method its
# ensemble target (such a run gets no policy frontier or timing: there is no held-out split to choose on)
ALLTRAIN_VAL_SPLIT = 100
WHOLE_SPLIT = "_alltrain"  # method-variant suffix of such a run's name
# method-variant suffix of a soft run whose deep supervision is the exits' mean cross-entropy
# (`exit_reduction: mean`) instead of the recipes' sum
EXIT_MEAN = "_exitmean"


def _soft(
    recipe: str, prefix: str, seeds: tuple[int, ...], soft_lambdas: tuple[float, ...], exit_mean: bool = False
) -> dict:
    suffix, loss = (EXIT_MEAN, {"exit_reduction": "mean"}) if exit_mean else ("", {})
    return {
        f"{prefix}_soft_l{lam:g}{suffix}_s{seed}": (recipe, {"method": "soft", "cost_weight": lam, "seed": seed} | loss)
        for seed in seeds
        for lam in soft_lambdas
    }


def _methods(recipe: str, prefix: str, seeds: tuple[int, ...], soft_lambdas: tuple[float, ...]) -> dict:
    grid = {}
    for seed in seeds:
        grid[f"{prefix}_baseline_s{seed}"] = (recipe, {"method": "baseline", "seed": seed})
        grid[f"{prefix}_branchynet_s{seed}"] = (recipe, {"method": "branchynet", "seed": seed})
        grid.update(_soft(recipe, prefix, (seed,), soft_lambdas))
    return grid


def _alltrain(dataset: str, seeds: tuple[int, ...], soft_lambda: float | None = None) -> dict:
    """ResNet-18 on the whole training split, one entry per seed: the plain network (the budget's own
    check), or with `soft_lambda` the soft method at that cost weight (its ensemble target without the
    held-out images the grid keeps for choosing the policy)."""
    method = {"method": "baseline"} if soft_lambda is None else {"method": "soft", "cost_weight": soft_lambda}
    variant = "baseline" if soft_lambda is None else f"soft_l{soft_lambda:g}"
    return {
        f"{dataset}/resnet18_{variant}{WHOLE_SPLIT}_s{seed}": (
            f"{dataset}_resnet18",
            {**method, "seed": seed, "val_split": ALLTRAIN_VAL_SPLIT},
        )
        for seed in seeds
    }


def _attached(joint_lr: float | None = None) -> tuple[str, dict[str, object]]:
    """Soft exits (lambda A, seed 0) attached to the seed-0 CIFAR-10 baseline's saved model: 5 epochs on the
    frozen backbone, then 5 jointly, the joint stage at `joint_lr` (default: the budget's) and the frozen one
    at the budget's peak rate ({out}: the folder of the run folders)."""
    overrides: dict[str, object] = {
        "method": "soft",
        "cost_weight": LAMBDA_A,
        "seed": 0,
        "weights": "local-dir:{out}/cifar10/resnet18_baseline_s0/model",
        "frozen_epochs": 5,
        "epochs": 5,
        "warmup_epochs": 0.75,
    }
    if joint_lr is not None:
        overrides.update(frozen_lr=RESNET18_LR, lr=joint_lr)
    return "cifar10_resnet18", overrides


# name -> (shipped recipe name, overrides), in the order they are trained: the CIFAR-10 baseline and the
# exits attached to it first (the path most users take), then seed 0 of every CIFAR-10 method, so a partial
# grid already compares the methods, then CIFAR-100 (where the recommended policy meets data it was not
# chosen on), then the plain network on the whole training split (the budget's own check), before the second
# CIFAR-10 seed, the AlexNet-style network, VGG-13, each budget check's second seed, VGG-13 on CIFAR-100,
# the AlexNet-style network's second seed, the soft runs at the second cost weight (AlexNet-style, VGG-13) and
# the soft method on the whole training split (CIFAR-10, then CIFAR-100, then their second seeds), then
# VGG-13's second cost weight on CIFAR-100, then ResNet-18's soft method with the exits' mean cross-entropy.
_CIFAR10_S0 = _methods("cifar10_resnet18", "cifar10/resnet18", (0,), (LAMBDA_A, LAMBDA_B))
_BASELINE_S0 = "cifar10/resnet18_baseline_s0"
GRID: dict[str, tuple[str, dict[str, object]]] = {
    _BASELINE_S0: _CIFAR10_S0.pop(_BASELINE_S0),
    # the path most users take: exits attached to the trained baseline, loaded as a user's own timm checkpoint
    "cifar10/resnet18_attached_soft_l0.1_s0": _attached(),
    # the same, with the joint stage at a tenth of the budget's peak rate (a fine-tune of trained weights)
    f"cifar10/resnet18_attached_lr{RESNET18_LR / 10:g}_soft_l0.1_s0": _attached(joint_lr=RESNET18_LR / 10),
    **_CIFAR10_S0,
    **_methods("cifar100_resnet18", "cifar100/resnet18", (0,), (LAMBDA_A, LAMBDA_B)),
    **_alltrain("cifar10", (0,)),
    **_alltrain("cifar100", (0,)),
    **_methods("cifar10_resnet18", "cifar10/resnet18", (1,), (LAMBDA_A, LAMBDA_B)),
    **_methods("cifar10_alexnet", "cifar10/alexnet", (0,), (LAMBDA_A,)),
    **_methods("cifar10_vgg13", "cifar10/vgg13", (0,), (LAMBDA_A,)),
    # a second seed of each budget check, so its verdict reads a mean and a spread
    **_alltrain("cifar100", (1,)),
    **_alltrain("cifar10", (1,)),
    # VGG-13 on CIFAR-100: the paper's other VGG-13 rows, and data the recommended policy was not chosen on
    **_methods("cifar100_vgg13", "cifar100/vgg13", (0,), (LAMBDA_A,)),
    # a second seed of the AlexNet-style network, the cheapest to train: its methods compared beyond the spread
    **_methods("cifar10_alexnet", "cifar10/alexnet", (1,), (LAMBDA_A,)),
    # the soft method's second cost weight on the AlexNet-style network, as on ResNet-18 (two seeds)
    **_soft("cifar10_alexnet", "cifar10/alexnet", (0, 1), (LAMBDA_B,)),
    # and on VGG-13 (one seed), so every CIFAR-10 backbone has the soft method at both cost weights
    **_soft("cifar10_vgg13", "cifar10/vgg13", (0,), (LAMBDA_B,)),
    # the soft method on the whole training split, as the plain network's budget check: its ensemble targets
    # read without the held-out images
    **_alltrain("cifar10", (0,), soft_lambda=LAMBDA_A),
    **_alltrain("cifar100", (0,), soft_lambda=LAMBDA_A),
    # and their second seeds, so each such verdict reads a mean and a spread
    **_alltrain("cifar100", (1,), soft_lambda=LAMBDA_A),
    **_alltrain("cifar10", (1,), soft_lambda=LAMBDA_A),
    # the soft method's second cost weight on VGG-13 x CIFAR-100, so every backbone and data set has both
    **_soft("cifar100_vgg13", "cifar100/vgg13", (0,), (LAMBDA_B,)),
    # ResNet-18's soft method with the exits' mean cross-entropy instead of their sum as deep supervision
    # (a quarter of the sum's weight with three early exits and the head, an eighth with the recipes' seven)
    **_soft("cifar10_resnet18", "cifar10/resnet18", (0,), (LAMBDA_A,), exit_mean=True),
    **_soft("cifar100_resnet18", "cifar100/resnet18", (0,), (LAMBDA_A,), exit_mean=True),
    **_soft("cifar10_resnet18", "cifar10/resnet18", (1,), (LAMBDA_A,), exit_mean=True),
}
# runs that start from another run's model: trained once that run has finished
REQUIRES = {name: _BASELINE_S0 for name in GRID if "_attached_" in name}
FRONTIER_BUDGETS = [round(0.2 + 0.025 * i, 3) for i in range(33)]  # 0.2 .. 1.0
TARGET_BUDGET = 0.5  # the hard-exit target's cost bound; the recommended policy is timed at it too
TARGET_TIMING = f"timing_budget{TARGET_BUDGET:g}.json"
SMALL_FILES = (
    "report.json",
    "report.md",
    "metrics.jsonl",
    "recipe.yaml",
    "train.log",
    "frontier.json",
    "timing.json",
    TARGET_TIMING,
)

PLOTS_NOTE = (
    "The gate histograms, accuracy-versus-cost and exit-distribution plots stay in the run folder's "
    "`plots/` and are not kept with these results; `timm-exits eval RUN` writes them again."
)


def _run_dir(out: Path, name: str) -> Path:
    return out / name


def unfinished(report: dict) -> str | None:
    """Where the training of a report's run stopped (``"3 of 30 epochs, step 1053"``); None when it finished
    (reports written before the field existed are of finished runs)."""
    return (report.get("training") or {}).get("unfinished")


def _not_done(run: Path) -> str | None:
    """Why the run folder holds no finished run (no report, or where its training stopped); None if it does."""
    report = run / "report.json"
    if not report.exists():
        return "no report.json"
    stopped = unfinished(json.loads(report.read_text()))
    return stopped and f"training stopped after {stopped}"


def _finished(run: Path) -> bool:
    """Whether the run folder holds the report of a run whose training finished."""
    return _not_done(run) is None


def _train_cmd(name: str, args: argparse.Namespace) -> list[str]:
    recipe, overrides = GRID[name]
    run = _run_dir(args.out, name)
    cmd = [sys.executable, "-m", "timm_exits.training.cli", "train", "-c", recipe]
    cmd += ["--data-dir", str(args.data_dir), "--output", str(run), "--no-progress"]
    cmd += ["--resume"] if (run / "checkpoint.safetensors").exists() else []
    values = {k: str(v).replace("{out}", str(args.out)) for k, v in overrides.items()}
    if args.parallel > 1:  # the report's timing would run beside another training
        values["timing_images"] = "0"
    return cmd + [f"{k}={v}" for k, v in values.items()] + list(args.set)


def _frontier(name: str, args: argparse.Namespace) -> int:
    run = _run_dir(args.out, name)
    cmd = [sys.executable, str(HERE / "policy_frontier.py"), "--run", str(run), "--data-dir", str(args.data_dir)]
    cmd += ["--threads", str(args.threads), "--budgets", *map(str, FRONTIER_BUDGETS)]
    with open(run / "frontier.json.partial", "w") as out, open(args.out / f"{name}.frontier.err", "w") as err:
        code = subprocess.call(cmd, stdout=out, stderr=err, cwd=ROOT, env=_env())
    if code == 0:
        os.replace(run / "frontier.json.partial", run / "frontier.json")
    return code


def _timing(name: str, args: argparse.Namespace, file: str = "timing.json", budget: float | None = None) -> int:
    """Time the run's recommended policy into `file`: at `budget`, or at the budget its rule picks."""
    run = _run_dir(args.out, name)
    cmd = [sys.executable, str(HERE / "time_recommended.py"), "--run", str(run), "--data-dir", str(args.data_dir)]
    cmd += ["--threads", str(args.threads), "--images", str(args.timing_images)]
    cmd += ["--repeats", str(args.timing_repeats), "--out", str(run / file)]
    cmd += ["--budget", str(budget)] if budget is not None else []
    with open(args.out / f"{name}.{Path(file).stem}.out", "w") as out:
        return subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@contextlib.contextmanager
def _paused(procs: Sequence[subprocess.Popen]) -> Iterator[None]:
    """Stop the running processes of `procs` (SIGSTOP) for the block and continue them (SIGCONT) after."""
    stopped = [p for p in procs if p.poll() is None] if hasattr(signal, "SIGSTOP") else []
    for proc in stopped:
        proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in stopped:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)


def _finish(name: str, args: argparse.Namespace, others: Sequence[subprocess.Popen] = ()) -> dict:
    """Frontier, timing (with the `others` training processes paused) and the copy of a finished run."""
    run = _run_dir(args.out, name)
    info: dict = {}
    method = json.loads((run / "report.json").read_text())["method"]
    # a run on the whole training split has no held-out split to choose a policy on: no frontier, no timing
    if method != "baseline" and f"{WHOLE_SPLIT}_s" not in name and not (run / "frontier.json").exists():
        info["frontier_returncode"] = _frontier(name, args)
    if args.timing_images and (run / "frontier.json").exists():
        if not (run / "timing.json").exists():
            with _paused(others):
                info["timing_returncode"] = _timing(name, args)
        if not (run / TARGET_TIMING).exists() and _timed_budget(run / "timing.json") != TARGET_BUDGET:
            with _paused(others):
                info["target_timing_returncode"] = _timing(name, args, TARGET_TIMING, TARGET_BUDGET)
    if args.results:
        copy_small_files(run, args.results / name)
    return info


def _timed_budget(timing: Path) -> float | None:
    """The budget a run's timing file was measured at; None without the file."""
    return json.loads(timing.read_text())["budget"] if timing.exists() else None


def copy_small_files(run: Path, dest: Path) -> None:
    """Copy a run's `SMALL_FILES` to `dest`; its report.md without the links to the plots left behind."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in SMALL_FILES:
        if not (run / f).exists():
            continue
        if f == "report.md":
            (dest / f).write_text(report_without_plots((run / f).read_text()))
        else:
            shutil.copy2(run / f, dest / f)


def report_without_plots(markdown: str) -> str:
    """A run's report.md with its plots section (images in the run folder's `plots/`) replaced by a note."""
    head, found, _ = markdown.partition(f"\n{PLOTS_HEADING}\n")
    if not found:
        return markdown
    return f"{head}\n{PLOTS_HEADING}\n\n{PLOTS_NOTE}\n"


def _procs(running: dict) -> list[subprocess.Popen]:
    """The training processes of the runs in `running` (name -> (process, start time))."""
    return [proc for proc, _ in running.values()]


def _next(queue: list[str], running: dict, summary: dict, args: argparse.Namespace) -> str | None:
    """Take the first queued run whose required run has finished; a run whose required run failed or
    is not selected is skipped. None: every queued run waits for one still training."""
    for name in list(queue):
        need = REQUIRES.get(name)
        if need is None or _finished(_run_dir(args.out, need)):
            queue.remove(name)
            return name
        if need not in queue and need not in running:
            queue.remove(name)
            summary[name] = {"status": f"skipped: needs {need}, which has not finished"}
    return None


def _check_set(names: Sequence[str], sets: Sequence[str]) -> None:
    """Refuse a `--set` key that a selected entry sets itself: given last, it would silently train that
    entry on another setting than its name and the grid say (e.g. the joint lr of an attached run)."""
    keys = {item.split("=", 1)[0].strip() for item in sets}
    clashes = [
        f"{name} sets {key}={GRID[name][1][key]}" for name in names for key in sorted(keys) if key in GRID[name][1]
    ]
    if clashes:
        raise SystemExit(
            "--set overrides a key that an entry sets itself: " + "; ".join(clashes) + ". Leave the key out of "
            "--set, or select the other entries with --only."
        )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder of the run folders")
    p.add_argument("--results", type=Path, help="copy each finished run's small files to RESULTS/NAME")
    p.add_argument("--only", nargs="+", choices=sorted(GRID), help="run these entries (default: all, in order)")
    p.add_argument("--parallel", type=positive_int, default=1, help="runs at a time")
    p.add_argument("--threads", type=positive_int, default=2, help="threads of the frontier and timing steps")
    p.add_argument(
        "--timing-images",
        type=non_negative_int,
        default=0,
        help="time each run's recommended policy on N test images (0: no)",
    )
    p.add_argument("--timing-repeats", type=positive_int, default=7, help="timed passes of the timing step (median)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides shared by every run")
    args = p.parse_args(argv)
    names = args.only or list(GRID)
    _check_set(names, args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    queue, running, summary = list(names), {}, {}
    start = time.monotonic()
    while queue or running:
        while queue and len(running) < args.parallel:
            name = _next(queue, running, summary, args)
            if name is None:
                break
            run = _run_dir(args.out, name)
            if _finished(run):
                summary[name] = {"status": "done before", **_finish(name, args, _procs(running))}
                continue  # an unfinished run's report is not: its training resumes from its checkpoint
            run.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out / f"{name.replace('/', '_')}.out", "a") as log:
                proc = subprocess.Popen(
                    _train_cmd(name, args), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env()
                )
            running[name] = (proc, time.monotonic())
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                why = _not_done(_run_dir(args.out, name)) if proc.returncode == 0 else None
                status = "failed" if proc.returncode else f"unfinished: {why}" if why else "done"
                summary[name] = {"status": status, "seconds": time.monotonic() - t0}
                if status == "done":
                    summary[name].update(_finish(name, args, _procs(running)))
        time.sleep(1.0)
    print(json.dumps({"set": args.set, "seconds": time.monotonic() - start, "runs": summary}))


if __name__ == "__main__":
    main()
