"""The evidence grid's results tree read into rows, with the checks and labels every table shares.

``run_evidence.py`` copies each finished run's small files to
``results/evidence/<data set>/<backbone>_<method>[_l<lambda>]_s<seed>/``. :func:`load_rows` reads them into
one :class:`Row` per (data set, backbone, method variant), one :class:`Run` per seed, after refusing a
folder whose name disagrees with its report and a from-scratch run trained on another budget than the
other runs of its backbone on its data set. The labels, percentages and frontier look-ups here are the
ones ``evidence_tables.py`` and its targets print.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from run_evidence import (
    ALLTRAIN_VAL_SPLIT,
    EXIT_MEAN,
    GRID,
    LAMBDA_A,
    LAMBDA_B,
    TARGET_TIMING,
    WHOLE_SPLIT,
    unfinished,
)

__all__ = [
    "BACKBONES",
    "DATASETS",
    "PAPER_T1",
    "POLICY_BUDGETS",
    "POLICY_NAMES",
    "POLICY_ROWS",
    "WHOLE_SPLIT",
    "Row",
    "Run",
    "budget",
    "by_dataset",
    "epoch_minutes",
    "exit_mean",
    "frontier_row",
    "is_plain",
    "load_rows",
    "mean_sd",
    "method_label",
    "method_variants",
    "on_whole_split",
    "pct",
    "scratch_variant",
    "shortfalls",
    "variant_key",
]

POLICY_BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

RUN_NAME = re.compile(
    rf"^(?P<backbone>.+?)_(?P<variant>(?:baseline|soft_l[0-9.e+-]+(?:{EXIT_MEAN})?)(?:{WHOLE_SPLIT})?|branchynet"
    r"|attached_(?:lr[0-9.e+-]+_)?soft_l[0-9.e+-]+)_s(?P<seed>\d+)$"
)

# variant of exits attached to the trained baseline (frozen, then joint epochs), optionally naming the
# joint stage's learning rate: attached_[lr<lr>_]<the variant trained from scratch>
ATTACHED = re.compile(r"^attached_(?:lr(?P<lr>[0-9.e+-]+)_)?(?P<scratch>.+)$")

DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
BACKBONES = {"resnet18": "ResNet-18", "vgg13": "VGG-13", "alexnet": "AlexNet-style"}

# Table 1 of the paper: test accuracy of baseline / B-Net / the soft-conditional method
PAPER_T1 = {
    ("cifar10", "resnet18"): (81.61, 83.94, 85.78),
    ("cifar10", "vgg13"): (75.44, 82.88, 87.11),
    ("cifar10", "alexnet"): (73.21, 80.59, 82.54),
    ("cifar100", "resnet18"): (51.13, 54.78, 58.54),
    ("cifar100", "vgg13"): (47.18, 51.97, 57.31),
}

POLICY_ROWS = {"recommended": "recommended", "confidence": "max-softmax", "entropy": "entropy", "static": "static"}

POLICY_NAMES = {
    "gate_fitted_no_gain": "fitted gates",
    "confidence": "max-softmax",
    "entropy": "entropy",
    "static": "static",
    "gate_joint": "joint gates",
    "recommended": "recommended",
}


@dataclass
class Run:
    """One run folder's files."""

    name: str
    seed: int
    report: dict
    frontier: dict | None = None
    timing: dict | None = None  # timing.json: at the budget the rule picks on the held-out split
    epochs: list[dict] = field(default_factory=list)  # metrics.jsonl: one record per training epoch
    target_timing: dict | None = None  # the same at the hard-exit target's own budget


@dataclass
class Row:
    """The runs of one (data set, backbone, method variant), one per seed."""

    dataset: str
    backbone: str
    variant: str
    runs: list[Run] = field(default_factory=list)


def method_variants() -> list[str]:
    """The methods every backbone has a row for."""
    return ["baseline", "branchynet", f"soft_l{LAMBDA_A:g}", f"soft_l{LAMBDA_B:g}"]


def is_plain(variant: str) -> bool:
    """Whether the variant is the plain network (no exits): the baseline, on the grid's or the whole
    training split."""
    return variant.removesuffix(WHOLE_SPLIT) == "baseline"


def exit_mean(variant: str) -> bool:
    """Whether the variant is the soft method with the exits' mean cross-entropy as deep supervision."""
    return variant.removesuffix(WHOLE_SPLIT).endswith(EXIT_MEAN)


def on_whole_split(variant: str) -> bool:
    """Whether the variant trained on the whole training split: it has no held-out split, so no policy chosen
    on one (no frontier, no timing); only its accuracy counts, against the budget and ensemble targets."""
    return variant.endswith(WHOLE_SPLIT)


def scratch_variant(variant: str) -> str | None:
    """The from-scratch variant that an attached variant is compared with; None for a from-scratch one."""
    m = ATTACHED.match(variant)
    return m["scratch"] if m else None


def variant_key(variant: str) -> tuple[int, float, float]:
    """Row order (and index into the paper's triple): baseline, B-Net, soft by lambda, attached exits
    (by lambda, then joint learning rate)."""
    m = ATTACHED.match(variant)
    if m:
        return 3, variant_key(m["scratch"])[1], float(m["lr"] or 0)
    if on_whole_split(variant):  # right after the same method on the grid's split
        first, second, third = variant_key(variant.removesuffix(WHOLE_SPLIT))
        return first, second, third + 0.5
    if variant.startswith("soft_l"):  # by lambda, the exits' sum before their mean
        return 2, float(variant.removesuffix(EXIT_MEAN)[len("soft_l") :]), float(exit_mean(variant))
    return (0 if variant == "baseline" else 1), 0.0, 0.0


def _read(path: Path) -> dict | None:
    """A JSON file's content, None where it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def _read_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none if it is absent)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _check_name(dataset: str, name: str, variant: str, seed: int, report: dict) -> None:
    """Refuse a run whose folder name disagrees with its report (a mislabelled copy)."""
    rec = report["recipe"]
    attached = ATTACHED.match(variant)
    scratch = attached["scratch"] if attached else variant
    plain = scratch.removesuffix(WHOLE_SPLIT)
    method = "baseline" if is_plain(plain) else plain.split("_l")[0]
    matches = (
        report["dataset"] == dataset
        and on_whole_split(scratch) == (float(rec["val_split"]) == ALLTRAIN_VAL_SPLIT)
        and report["method"] == method
        and int(rec["seed"]) == seed
        and (method != "soft" or f"soft_l{rec['cost_weight']:g}" == plain.removesuffix(EXIT_MEAN))
        and (rec.get("exit_reduction", "sum") == "mean") == exit_mean(plain)
        and (attached is None) == (rec.get("weights") is None)  # attached runs, and only they, start from weights
        and (attached is None or attached["lr"] is None or float(attached["lr"]) == float(rec["lr"]))
    )
    if not matches:
        raise SystemExit(
            f"{dataset}/{name}: the report says dataset {report['dataset']}, method {report['method']}, "
            f"seed {rec['seed']}, cost_weight {rec['cost_weight']}, weights {rec.get('weights')}, lr {rec['lr']}, "
            f"val_split {rec['val_split']}, exit_reduction {rec.get('exit_reduction', 'sum')}"
        )


def _check_finished(dataset: str, name: str, report: dict) -> None:
    """Refuse the report of a run whose training stopped before its last epoch: the tables show finished runs."""
    stopped = unfinished(report)
    if stopped:
        raise SystemExit(
            f"{dataset}/{name}: its report is of an unfinished run (training stopped after {stopped}); finish it "
            f"with `python benchmarks/run_evidence.py --only {dataset}/{name} --data-dir DATA --out RUNS --results "
            "RESULTS` (it resumes from the run's checkpoint), or keep the run out of the results tree"
        )


# Recipe keys that make up the training budget. Every from-scratch run of one backbone on one data set
# (each method and seed) must share them: the grid compares methods on one budget.
BUDGET_KEYS = (
    "epochs",
    "batch_size",
    "opt",
    "lr",
    "momentum",
    "weight_decay",
    "sched",
    "warmup_epochs",
    "augment",
    "crop_padding",
    "hflip",
    "label_smoothing",
    "img_size",
)


def budget(report: dict) -> dict:
    """The budget keys of a run's recipe, its epochs those it trained (``training.epochs``; reports written
    before that field existed are of finished runs: their recipe's epochs)."""
    keys = {key: report["recipe"].get(key) for key in BUDGET_KEYS}
    trained = (report.get("training") or {}).get("epochs")
    return keys | {"epochs": keys["epochs"] if trained is None else trained}


def _check_budgets(found: dict[tuple[str, str, str], list[Run]]) -> None:
    """Refuse a from-scratch run whose budget differs from that of the other from-scratch runs of its backbone
    on its data set."""
    first: dict[tuple[str, str], tuple[str, dict]] = {}
    for (dataset, backbone, variant), runs in sorted(found.items()):
        if scratch_variant(variant) is not None:  # exits attached to a trained network: a budget of their own
            continue
        for run in runs:
            ref_name, ref = first.setdefault((dataset, backbone), (f"{dataset}/{run.name}", budget(run.report)))
            differs = {k: v for k, v in budget(run.report).items() if v != ref[k]}
            if differs:
                theirs = ", ".join(f"{k} {ref[k]}" for k in differs)
                ours = ", ".join(f"{k} {v}" for k, v in differs.items())
                raise SystemExit(
                    f"{dataset}/{run.name} was trained with {ours}, {ref_name} with {theirs}: the grid compares "
                    "methods on one budget; train every run of the backbone on this data set on it, or keep "
                    "this run out of the results tree"
                )


CIFAR_TRAIN_IMAGES = 45_000  # CIFAR train split less the 5,000 images the grid recipes hold out (val_split)


def epoch_minutes(results: Path) -> dict[str, float]:
    """Minutes per CIFAR training epoch of a backbone at its measured recipe-loop rate (images/s of a few steps
    in the ``throughput_<backbone>.json`` files that ``data_throughput.py`` printed), extrapolated to the train
    split, for its rows not trained yet."""
    out = {}
    for path in sorted(results.glob("throughput_*.json")):
        rate = json.loads(path.read_text())["images_per_s"]["recipe_loop"]
        out[path.stem[len("throughput_") :]] = CIFAR_TRAIN_IMAGES / rate / 60
    return out


def load_rows(results: Path) -> dict[tuple[str, str, str], Row]:
    """Every row, keyed (data set, backbone, variant), sorted: each method of every backbone in the grid,
    the paper or the results tree, with the runs found for it (none: not trained yet)."""
    found: dict[tuple[str, str, str], list[Run]] = {}
    for path in sorted(results.glob("*/*/report.json")):
        dataset, name = path.parent.parent.name, path.parent.name
        m = RUN_NAME.match(name)
        if not m:
            raise SystemExit(f"{path.parent}: not a run name of the form <backbone>_<method>[_l<lambda>]_s<seed>")
        seed, report = int(m["seed"]), json.loads(path.read_text())
        _check_finished(dataset, name, report)
        _check_name(dataset, name, m["variant"], seed, report)
        policy = not on_whole_split(m["variant"])  # no held-out split: no policy files are read, even if present
        run = Run(
            name,
            seed,
            report,
            _read(path.parent / "frontier.json") if policy else None,
            _read(path.parent / "timing.json") if policy else None,
            _read_lines(path.parent / "metrics.jsonl"),
            _read(path.parent / TARGET_TIMING) if policy else None,
        )
        found.setdefault((dataset, m["backbone"], m["variant"]), []).append(run)
    _check_budgets(found)
    grid = [(n.split("/", 1)[0], RUN_NAME.match(n.split("/", 1)[1])["backbone"]) for n in GRID]
    backbones = set(grid) | set(PAPER_T1) | {(d, b) for d, b, _ in found}
    in_grid = {
        (n.split("/", 1)[0], m["backbone"], m["variant"]) for n in GRID if (m := RUN_NAME.match(n.split("/")[1]))
    }
    keys = {(d, b, v) for d, b in backbones for v in method_variants()} | in_grid | set(found)
    rows = {key: Row(*key, sorted(found.get(key, []), key=lambda r: r.seed)) for key in keys}
    return dict(sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], variant_key(kv[0][2]))))


def method_label(variant: str) -> str:
    """The method as the tables name it."""
    m = ATTACHED.match(variant)
    if m:
        lr = f", joint lr {m['lr']}" if m["lr"] else ""
        return f"{method_label(m['scratch'])}, exits attached to the trained baseline{lr}"
    if on_whole_split(variant):
        held_out = f"whole training split ({ALLTRAIN_VAL_SPLIT} images held out)"
        return f"{method_label(variant.removesuffix(WHOLE_SPLIT))}, {held_out}"
    if exit_mean(variant):
        return f"{method_label(variant.removesuffix(EXIT_MEAN))}, exits' mean CE"
    if variant.startswith("soft_l"):
        return f"soft, lambda {variant[len('soft_l') :]}"
    return {"baseline": "baseline", "branchynet": "B-Net"}[variant]


def pct(x: float) -> str:
    """A fraction as a percentage with two decimals (no sign)."""
    return f"{100 * x:.2f}"


def mean_sd(values: list[float]) -> str:
    """'mean ± sample standard deviation %' of fractions (mean alone for one value)."""
    mean = pct(statistics.fmean(values))
    return f"{mean} %" if len(values) < 2 else f"{mean} ± {pct(statistics.stdev(values))} %"


def by_dataset(rows: dict[tuple[str, str, str], Row]) -> dict[str, list[Row]]:
    """The rows grouped by data set, in their order."""
    out: dict[str, list[Row]] = {}
    for row in rows.values():
        out.setdefault(row.dataset, []).append(row)
    return out


def frontier_row(frontier: dict, budget: float) -> dict:
    """The frontier's row at `budget` ({} where it has none)."""
    return next((r for r in frontier["table"] if abs(r["budget"] - budget) < 1e-9), {})


def shortfalls(frontier: dict) -> list[str]:
    """Where the recommended policy is below another beyond the test noise: the budget and policy whose
    paired interval of the difference lies wholly below zero, as 'entropy at 0.6 (Δ [-0.29, -0.03])'."""
    out = []
    for b in POLICY_BUDGETS:
        row = frontier_row(frontier, b)
        for key, label in POLICY_ROWS.items():
            d = (row.get(key) or {}).get("recommended_minus_this_ci95")
            if key != "recommended" and d is not None and d[1] < 0:
                out.append(f"{label} at {b:g} (Δ [{pct(d[0])}, {pct(d[1])}])")
    return out
