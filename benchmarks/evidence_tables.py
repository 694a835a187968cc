"""Regenerate every evidence table and plot from the run files under ``results/evidence/``.

``run_evidence.py`` copies each finished run's small files to
``results/evidence/<data set>/<backbone>_<method>[_l<lambda>]_s<seed>/``. From them this script writes
``results/evidence/tables.md`` with

- the targets: each target of the grid with the committed figure it is judged on and whether it is met;
- Table 1 form: per data set and backbone, one row per method (baseline, B-Net, soft at each lambda):
  final-exit and soft-ensemble test accuracy, mean and sample standard deviation over the seeds
  trained, beside the paper's figure;
- Table 2 form: the recommended hard-exit policy of each run at batch 1 (``timing.json`` of
  ``time_recommended.py``): accuracy, expected cost, measured speed-up against the plain backbone
  timed in the same process, exit distribution;
- the policy table: at budgets 0.4 to 0.9, the recommended policy against max-softmax, entropy and
  static truncation, with bootstrap 95 % intervals (``frontier.json`` of ``policy_frontier.py``);

and one accuracy-versus-cost PNG per data set (``<data set>/accuracy_vs_cost.png``, every policy
and method on the same axes). Rows of the grid (``run_evidence.GRID``) and of the paper that have no
run yet say "not trained yet", with the paper's figure beside. Blocks between
``<!-- evidence tables: NAME -->`` and ``<!-- end evidence tables: NAME -->`` in the docs given by
``--docs`` (docs/evidence.md and README.md) are replaced by the table NAME (``table1``, ``table2``,
``policies``, ``targets``, ``runs``: where and how fast each run trained, or ``summary``: one line per
trained run, its accuracy and its recommended policy).

    python benchmarks/evidence_tables.py            # write tables.md, the PNGs and the docs blocks
    python benchmarks/evidence_tables.py --check    # exit 1, with a diff, if any of them is stale

``--check`` compares text only (tables.md and the docs blocks) and that each PNG exists: PNG bytes
depend on the matplotlib version.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from run_evidence import ALLTRAIN_VAL_SPLIT, GRID, LAMBDA_A, LAMBDA_B

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "evidence"
DOCS = (ROOT / "docs" / "evidence.md", ROOT / "README.md")
POLICY_BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RUN_NAME = re.compile(
    r"^(?P<backbone>.+?)_(?P<variant>baseline(?:_alltrain)?|branchynet|(?:attached_(?:lr[0-9.e+-]+_)?)?soft_l[0-9.e+-]+)"
    r"_s(?P<seed>\d+)$"
)
# variant of exits attached to the trained baseline (frozen, then joint epochs), optionally naming the
# joint stage's learning rate: attached_[lr<lr>_]<the variant trained from scratch>
ATTACHED = re.compile(r"^attached_(?:lr(?P<lr>[0-9.e+-]+)_)?(?P<scratch>.+)$")
BLOCK = re.compile(r"(<!-- evidence tables: (\w+) -->\n)(.*?)(<!-- end evidence tables: \2 -->)", re.DOTALL)

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
# Table 2 of the paper (CIFAR-10, hard early exit): accuracy, time per image, speed-up
PAPER_T2 = {
    ("cifar10", "resnet18"): "84.92 %, 2.18 ms, 58 % speed-up",
    ("cifar10", "vgg13"): "86.70 %, 1.59 ms, 44 % speed-up",
    ("cifar10", "alexnet"): "79.96 %, 2.74 ms, 12 % speed-up",
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
    timing: dict | None = None
    epochs: list[dict] = field(default_factory=list)  # metrics.jsonl: one record per training epoch


@dataclass
class Row:
    """The runs of one (data set, backbone, method variant), one per seed."""

    dataset: str
    backbone: str
    variant: str
    runs: list[Run] = field(default_factory=list)


def _variants() -> list[str]:
    """The methods every backbone has a row for."""
    return ["baseline", "branchynet", f"soft_l{LAMBDA_A:g}", f"soft_l{LAMBDA_B:g}"]


def _plain(variant: str) -> bool:
    """Whether the variant is the plain network (no exits): the baseline, on the grid's or the whole
    training split."""
    return variant in ("baseline", "baseline_alltrain")


def _scratch_variant(variant: str) -> str | None:
    """The from-scratch variant that an attached variant is compared with; None for a from-scratch one."""
    m = ATTACHED.match(variant)
    return m["scratch"] if m else None


def _variant_key(variant: str) -> tuple[int, float, float]:
    """Row order (and index into the paper's triple): baseline, B-Net, soft by lambda, attached exits
    (by lambda, then joint learning rate)."""
    m = ATTACHED.match(variant)
    if m:
        return 3, _variant_key(m["scratch"])[1], float(m["lr"] or 0)
    if variant.startswith("soft_l"):
        return 2, float(variant[len("soft_l") :]), 0.0
    if variant == "baseline_alltrain":
        return 0, 1.0, 0.0
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
    plain = attached["scratch"] if attached else variant
    method = "baseline" if _plain(plain) else plain.split("_l")[0]
    matches = (
        report["dataset"] == dataset
        and (plain == "baseline_alltrain") == (float(rec["val_split"]) == ALLTRAIN_VAL_SPLIT)
        and report["method"] == method
        and int(rec["seed"]) == seed
        and (method != "soft" or f"soft_l{rec['cost_weight']:g}" == plain)
        and (attached is None) == (rec.get("weights") is None)  # attached runs, and only they, start from weights
        and (attached is None or attached["lr"] is None or float(attached["lr"]) == float(rec["lr"]))
    )
    if not matches:
        raise SystemExit(
            f"{dataset}/{name}: the report says dataset {report['dataset']}, method {report['method']}, "
            f"seed {rec['seed']}, cost_weight {rec['cost_weight']}, weights {rec.get('weights')}, lr {rec['lr']}, "
            f"val_split {rec['val_split']}"
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


OPTIMIZERS = {"sgd": "Nesterov SGD"}  # timm's "sgd" is Nesterov SGD


def budget(report: dict) -> dict:
    """The budget keys of a run's recipe."""
    return {key: report["recipe"].get(key) for key in BUDGET_KEYS}


def _check_budgets(found: dict[tuple[str, str, str], list[Run]]) -> None:
    """Refuse a from-scratch run whose budget differs from that of the other from-scratch runs of its backbone
    on its data set."""
    first: dict[tuple[str, str], tuple[str, dict]] = {}
    for (dataset, backbone, variant), runs in sorted(found.items()):
        if _scratch_variant(variant) is not None:  # exits attached to a trained network: a budget of their own
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


def budget_lines(rows: dict[tuple[str, str, str], Row]) -> str:
    """One line per backbone and budget: the budget its from-scratch runs share and the data sets they are on."""
    datasets: dict[tuple[str, tuple], list[str]] = {}  # (backbone, budget items) -> data sets, in row order
    for (dataset, backbone, variant), row in rows.items():
        if row.runs and _scratch_variant(variant) is None:
            label = DATASETS.get(dataset, dataset)
            shared = datasets.setdefault((backbone, tuple(budget(row.runs[0].report).items())), [])
            if label not in shared:
                shared.append(label)
    out = [
        "Shared by every from-scratch run of a backbone on a data set (`evidence_tables.py` refuses a run that "
        "differs).",
        "",
    ]
    for (backbone, items), names in sorted(datasets.items(), key=lambda kv: kv[0][0]):
        b = dict(items)
        opt = OPTIMIZERS.get(b["opt"], b["opt"])
        out.append(
            f"- {BACKBONES.get(backbone, backbone)} ({', '.join(names)}): {b['epochs']} epochs at batch "
            f"{b['batch_size']}, {opt} (momentum {b['momentum']:g}, weight decay {b['weight_decay']:g}), peak "
            f"lr {b['lr']:g} on a {b['sched']} schedule with {b['warmup_epochs']:g} warm-up epochs, "
            f"{b['augment']} augmentation (padding {b['crop_padding']}, flip {b['hflip']:g}), label smoothing "
            f"{b['label_smoothing']:g}, {b['img_size']} px"
        )
    return "\n".join(out)


CIFAR_TRAIN_IMAGES = 45_000  # CIFAR train split less the 5,000 images the grid recipes hold out (val_split)


def epoch_minutes(results: Path) -> dict[str, float]:
    """Measured minutes per CIFAR training epoch of a backbone, for its rows not trained yet, from the
    ``throughput_<backbone>.json`` files that ``data_throughput.py`` printed (recipe loop images/s)."""
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
        _check_name(dataset, name, m["variant"], seed, report)
        run = Run(
            name,
            seed,
            report,
            _read(path.parent / "frontier.json"),
            _read(path.parent / "timing.json"),
            _read_lines(path.parent / "metrics.jsonl"),
        )
        found.setdefault((dataset, m["backbone"], m["variant"]), []).append(run)
    _check_budgets(found)
    grid = [(n.split("/", 1)[0], RUN_NAME.match(n.split("/", 1)[1])["backbone"]) for n in GRID]
    backbones = set(grid) | set(PAPER_T1) | {(d, b) for d, b, _ in found}
    in_grid = {
        (n.split("/", 1)[0], m["backbone"], m["variant"]) for n in GRID if (m := RUN_NAME.match(n.split("/")[1]))
    }
    keys = {(d, b, v) for d, b in backbones for v in _variants()} | in_grid | set(found)
    rows = {key: Row(*key, sorted(found.get(key, []), key=lambda r: r.seed)) for key in keys}
    return dict(sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], _variant_key(kv[0][2]))))


def _label(variant: str) -> str:
    """The method as the tables name it."""
    m = ATTACHED.match(variant)
    if m:
        lr = f", joint lr {m['lr']}" if m["lr"] else ""
        return f"{_label(m['scratch'])}, exits attached to the trained baseline{lr}"
    if variant.startswith("soft_l"):
        return f"soft, lambda {variant[len('soft_l') :]}"
    whole = f"baseline, whole training split ({ALLTRAIN_VAL_SPLIT} images held out)"
    return {"baseline": "baseline", "baseline_alltrain": whole, "branchynet": "B-Net"}[variant]


def _pct(x: float) -> str:
    """A fraction as a percentage with two decimals (no sign)."""
    return f"{100 * x:.2f}"


def mean_sd(values: list[float]) -> str:
    """'mean ± sample standard deviation %' of fractions (mean alone for one value)."""
    mean = _pct(statistics.fmean(values))
    return f"{mean} %" if len(values) < 2 else f"{mean} ± {_pct(statistics.stdev(values))} %"


def _paper_t1(row: Row) -> str:
    """The paper's Table 1 figure for this row, '-' where the paper has none."""
    paper = PAPER_T1.get((row.dataset, row.backbone))
    index = _variant_key(row.variant)[0]
    if paper is None or row.variant == "baseline_alltrain" or index >= len(paper):
        return "-"
    return f"{paper[index]:.2f} %"


def _by_dataset(rows: dict[tuple[str, str, str], Row]) -> dict[str, list[Row]]:
    """The rows grouped by data set, in their order."""
    out: dict[str, list[Row]] = {}
    for row in rows.values():
        out.setdefault(row.dataset, []).append(row)
    return out


def table1(rows: dict[tuple[str, str, str], Row], minutes: dict[str, float] | None = None) -> str:
    """Table 1 form: final-exit and soft-ensemble accuracy per method, over seeds, beside the paper; rows not
    trained yet show the backbone's measured minutes per epoch where `minutes` has them."""
    minutes = minutes or {}
    out = [
        "Test accuracy, mean ± sample standard deviation over the seeds trained (the seeds column gives n). "
        "Soft ensemble: the soft-conditional output of soft runs. Paper: its baseline, B-Net and proposed "
        "figure (one figure for every lambda).",
    ]
    for dataset, group in _by_dataset(rows).items():
        out += [
            f"\n**{DATASETS.get(dataset, dataset)}**\n",
            "| backbone | method | seeds | final exit | soft ensemble | paper |",
            "|---|---|---|---|---|---|",
        ]
        for row in group:
            head = f"| {BACKBONES.get(row.backbone, row.backbone)} | {_label(row.variant)} |"
            if not row.runs:
                measured = minutes.get(row.backbone)
                per_epoch = f"{measured:.1f} min per epoch measured here" if measured else ""
                if _in_grid(row):
                    why = f"not trained yet ({per_epoch})" if per_epoch else "not trained yet"
                elif per_epoch and not _backbone_in_grid(row):
                    why = f"not trained: {per_epoch}"
                else:
                    why = "not trained yet (not in the grid)"
                out.append(f"{head} none | {why} | - | {_paper_t1(row)} |")
                continue
            tests = [r.report["test"] for r in row.runs]
            seeds = f"{len(row.runs)} ({', '.join(str(r.seed) for r in row.runs)})"
            soft = mean_sd([t["soft_accuracy"] for t in tests]) if "soft" in row.variant else "-"
            out.append(
                f"{head} {seeds} | {mean_sd([t['final_accuracy'] for t in tests])} | {soft} | {_paper_t1(row)} |"
            )
    return "\n".join(out)


def distribution(dist: list[float]) -> str:
    """'#1 98.4 %, #4 1.6 %': share of images per exit, exits no image took left out."""
    return ", ".join(f"#{i + 1} {100 * v:.1f} %" for i, v in enumerate(dist) if v >= 0.0005)


def _policy_label(choice: dict) -> str:
    """A recommended policy with its threshold (or exit), e.g. 'max-softmax >= 0.905'."""
    name = choice["policy"]
    if name == "static":
        return f"static, exit #{choice['exit']}"
    return f"{POLICY_NAMES[name]} {'<=' if name == 'entropy' else '>='} {choice['threshold']:.3f}"


def _in_grid(row: Row) -> bool:
    """Whether run_evidence.py's grid has an entry for this row."""
    return any(n.startswith(f"{row.dataset}/{row.backbone}_{row.variant}_s") for n in GRID)


def _backbone_in_grid(row: Row) -> bool:
    """Whether run_evidence.py's grid trains this row's backbone on its data set at all."""
    return any(n.startswith(f"{row.dataset}/{row.backbone}_") for n in GRID)


def _expected_runs(row: Row) -> list[str]:
    """Names of the grid's runs of this row that have no files yet."""
    have = {r.name for r in row.runs}
    prefix = f"{row.dataset}/{row.backbone}_{row.variant}_s"
    return sorted(n.split("/", 1)[1] for n in GRID if n.startswith(prefix) and n.split("/", 1)[1] not in have)


def table2(rows: dict[tuple[str, str, str], Row]) -> str:
    """Table 2 form: each run's recommended hard-exit policy, timed at batch 1 against the plain backbone."""
    out = [
        "The recommended policy of each run (`time_recommended.py`: the lowest frontier budget whose "
        "recommended policy is within 1 point of the final exit on the held-out split, unless a budget was "
        "given), through the real early-exit path: accuracy, expected cost (share of the backbone's FLOPs) "
        "and exit distribution on the whole test split; ms per image at batch 1 on the first test images, "
        "plain backbone and policy interleaved in the same process (medians).",
    ]
    machines: dict[str, list[str]] = {}
    for dataset, group in _by_dataset(rows).items():
        out += [
            f"\n**{DATASETS.get(dataset, dataset)}**\n",
            "| run | budget | policy | test accuracy | expected cost | plain ms | policy ms | speed-up "
            "| exit distribution | paper |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in group if not _plain(r.variant)):
            paper = PAPER_T2.get((row.dataset, row.backbone), "-")
            for run in row.runs:
                t = run.timing
                if t is None:
                    out.append(f"| {run.name} | not timed yet (no timing.json) | | | | | | | | {paper} |")
                    continue
                tm, test = t["timing"], t["test"]
                out.append(
                    f"| {run.name} | {t['budget']:g} | {_policy_label(t['policy'])} | {_pct(test['accuracy'])} % | "
                    f"{test['expected_cost']:.3f} | {tm['plain_ms_per_image']:.3f} | {tm['policy_ms_per_image']:.3f} | "
                    f"{tm['speedup']:.2f}x | {distribution(test['exit_distribution'])} | {paper} |"
                )
                m = t["machine"]
                setting = (
                    f"{m['cpu']} ({m['cores']} cores), torch {m['torch']}, {tm['threads']} torch thread(s), "
                    f"batch {tm['batch_size']}, {tm['images']} images, median of {tm['repeats']} passes"
                )
                machines.setdefault(setting, []).append(f"{dataset}/{run.name}")
            out += [f"| {name} | not trained yet | | | | | | | | {paper} |" for name in _expected_runs(row)]
        for backbone in sorted({r.backbone for r in group}):
            mine = [r for r in group if r.backbone == backbone]
            if (dataset, backbone) in PAPER_T2 and not any(r.runs or _in_grid(r) for r in mine):
                label = f"{BACKBONES.get(backbone, backbone)} (not in the grid)"
                out.append(f"| {label} | not trained yet | | | | | | | | {PAPER_T2[(dataset, backbone)]} |")
    for setting, names in sorted(machines.items()):
        out.append(f"\nTimed on {setting}: {', '.join(names)}.")
    return "\n".join(out)


def _cell(entry: dict | None, recommended: bool) -> str:
    """A policy-table cell: accuracy [95 % interval], then the policy chosen or the paired difference."""
    if not entry:
        return "-"
    lo, hi = entry["test_accuracy_ci95"]
    cell = f"{_pct(entry['test_accuracy'])} [{_pct(lo)}, {_pct(hi)}]"
    if recommended:
        return f"{cell} {POLICY_NAMES[entry['policy']]}"
    d = entry.get("recommended_minus_this_ci95")
    return cell if d is None else f"{cell}, Δ [{_pct(d[0])}, {_pct(d[1])}]"


def _frontier_row(frontier: dict, budget: float) -> dict:
    """The frontier's row at `budget` ({} where it has none)."""
    return next((r for r in frontier["table"] if abs(r["budget"] - budget) < 1e-9), {})


def shortfalls(frontier: dict) -> list[str]:
    """Where the recommended policy is below another beyond the test noise: the budget and policy whose
    paired interval of the difference lies wholly below zero, as 'entropy at 0.6 (Δ [-0.29, -0.03])'."""
    out = []
    for b in POLICY_BUDGETS:
        row = _frontier_row(frontier, b)
        for key, label in POLICY_ROWS.items():
            d = (row.get(key) or {}).get("recommended_minus_this_ci95")
            if key != "recommended" and d is not None and d[1] < 0:
                out.append(f"{label} at {b:g} (Δ [{_pct(d[0])}, {_pct(d[1])}])")
    return out


def policy_table(rows: dict[tuple[str, str, str], Row]) -> str:
    """Test accuracy per policy and budget, with bootstrap 95 % intervals, from each run's frontier.json."""
    out = [
        "Test accuracy (%) at thresholds chosen on the held-out split within each budget (share of the "
        "backbone's FLOPs), with its bootstrap 95 % interval over test images; Δ: the interval of the "
        "recommended policy's accuracy minus this one's (paired, points); the recommended cell names the "
        "policy it chose; -: no threshold of that policy fits the budget.",
    ]
    for dataset, group in _by_dataset(rows).items():
        runs = [run for row in group for run in row.runs if run.frontier]
        if not runs:
            continue
        out += [
            f"\n**{DATASETS.get(dataset, dataset)}**\n",
            "| run | policy | " + " | ".join(f"{b:g}" for b in POLICY_BUDGETS) + " |",
            "|---|---|" + "---|" * len(POLICY_BUDGETS),
        ]
        for run in runs:
            for key, label in POLICY_ROWS.items():
                cells = [_cell(_frontier_row(run.frontier, b).get(key), key == "recommended") for b in POLICY_BUDGETS]
                out.append(f"| {run.name} | {label} | " + " | ".join(cells) + " |")
        out.append("\nBudgets where the recommended policy is below another, the whole interval of Δ below 0:\n")
        for run in runs:
            out.append(f"- {run.name}: {'; '.join(shortfalls(run.frontier)) or 'nowhere'}")
    if len(out) == 1:
        out.append("\nNo run has a frontier.json yet.")
    return "\n".join(out)


def _plotted(group: list[Row]) -> bool:
    """Whether a data set has a plot: some run of it has a frontier."""
    return any(run.frontier for row in group for run in row.runs)


def _minutes(run: Run) -> float:
    """A run's training time in minutes (its report's training seconds)."""
    return run.report["training"]["seconds"] / 60


def _by_seed(rows: dict[tuple[str, str, str], Row], key: tuple[str, str, str]) -> dict[int, Run]:
    """The runs of one row by seed (none where the row does not exist)."""
    return {r.seed: r for r in rows[key].runs} if key in rows else {}


def attached_table(rows: dict[tuple[str, str, str], Row]) -> str:
    """Exits attached to the trained baseline against the same method trained from scratch: test
    accuracy and training minutes (the attached run's own, and with the baseline's added)."""
    out = [
        "Exits attached to the trained baseline (loaded as a timm checkpoint; frozen epochs, then joint "
        "epochs) against the same method and seed trained from scratch. Costs and policies: Table 2 and "
        "the policy table.",
        "",
        "| data set | run | epochs (frozen + joint) | peak lr (frozen / joint) | final exit | soft ensemble | "
        "train min | with baseline's | from scratch: final / soft / min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, backbone, variant), row in rows.items():
        scratch_variant = _scratch_variant(variant)
        if scratch_variant is None:
            continue
        label = DATASETS.get(dataset, dataset)
        if not row.runs:
            out.append(f"| {label} | {backbone}_{variant} | - | - | not trained yet | | | | |")
            continue
        scratch = _by_seed(rows, (dataset, backbone, scratch_variant))
        base = _by_seed(rows, (dataset, backbone, "baseline"))
        for run in row.runs:
            rec, test = run.report["recipe"], run.report["test"]
            total = f"{_minutes(run) + _minutes(base[run.seed]):.1f}" if run.seed in base else "-"
            ref = scratch.get(run.seed)
            ref_text = "not trained yet"
            if ref is not None:
                t = ref.report["test"]
                ref_text = f"{_pct(t['final_accuracy'])} % / {_pct(t['soft_accuracy'])} % / {_minutes(ref):.1f}"
            out.append(
                f"| {label} | {run.name} | {rec['frozen_epochs']} + {rec['epochs']} "
                f"| {rec.get('frozen_lr') or rec['lr']:g} / {rec['lr']:g} | {_pct(test['final_accuracy'])} % "
                f"| {_pct(test['soft_accuracy'])} % | {_minutes(run):.1f} | {total} | {ref_text} |"
            )
    return "\n".join(out)


def _precision(recipe: dict) -> str:
    """How a run's training computed: autocast dtype (or fp32) and memory format."""
    text = f"{recipe['amp']} autocast" if recipe.get("amp") else "fp32"
    return text + (", channels-last" if recipe.get("channels_last") else "")


def _trained_on(run: Run) -> tuple[str, str]:
    """(machines, threads x processes) the run's epochs recorded, each with its epoch count where several."""
    runtimes = run.report["training"].get("runtimes") or []
    if not runtimes:
        return "not recorded", "-"
    several = len(runtimes) > 1
    machines = "; ".join(
        w["machine"] + (f" ({w['epochs']} epoch{'s' if w['epochs'] != 1 else ''})" if several else "") for w in runtimes
    )
    threads = "; ".join(dict.fromkeys(f"{w['threads']} x {w['processes']}" for w in runtimes))
    return machines, threads


def runs_table(rows: dict[tuple[str, str, str], Row]) -> str:
    """Where and how fast each trained run trained: machine, threads, precision, seconds per epoch."""
    out = [
        "Each trained run: the machine and torch threads x processes its epochs recorded (runs trained before "
        "the run folder recorded them say so), its training precision, the median of its epochs' seconds "
        "(`metrics.jsonl`) and its whole training time (`report.json`). Minutes compare only between runs "
        "on the same machine and threads.",
        "",
        "| data set | run | trained on | threads x processes | precision | batch | epochs | median s per epoch "
        "| training min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, _, _), row in rows.items():
        for run in row.runs:
            recipe = run.report["recipe"]
            seconds = [float(e["seconds"]) for e in run.epochs if "seconds" in e]
            median = f"{statistics.median(seconds):.1f}" if seconds else "-"
            machines, threads = _trained_on(run)
            out.append(
                f"| {DATASETS.get(dataset, dataset)} | {run.name} | {machines} | {threads} | {_precision(recipe)} "
                f"| {recipe['batch_size']} | {len(seconds)} | {median} | {_minutes(run):.1f} |"
            )
    return "\n".join(out)


# The grid's targets for ResNet-18: test accuracy of the plain network (the budget) and of the soft ensemble
ACCURACY_TARGETS = {"cifar10": (0.865, 0.875), "cifar100": (0.605, 0.625)}
TARGET_BACKBONE = "resnet18"
ORDERING_DATASETS = ("cifar10",)  # soft >= B-Net >= baseline beyond the seed spread
POLICY_GAIN = {"cifar100": ((0.6, 0.7), 0.01)}  # recommended >= max-softmax + 1 point at these budgets
HARD_EXIT = (0.5, 1.9)  # keeps the baseline's accuracy at <= this share of its FLOPs, >= this speed-up


def _missed(value: float, goal: float) -> str:
    """'met', or 'missed by x points' for a fraction below its goal."""
    return "met" if value >= goal - 1e-12 else f"missed by {_pct(goal - value)} points"


def _accuracies(row: Row, key: str) -> list[float]:
    """One test accuracy per seed of a row (`key`: final_accuracy or soft_accuracy)."""
    return [r.report["test"][key] for r in row.runs]


def _ordered(upper: list[float], lower: list[float]) -> tuple[str, float, bool | None]:
    """How far the mean of `upper` is above that of `lower`, against the seed spread (the sum of the two
    sample standard deviations): the text, the gap, and whether it is beyond the spread (None for one seed)."""
    gap = statistics.fmean(upper) - statistics.fmean(lower)
    text = f"{'+' if gap >= 0 else '-'}{_pct(abs(gap))} points"
    if min(len(upper), len(lower)) < 2:
        return f"{text}, spread not measured (one seed)", gap, None
    spread = statistics.stdev(upper) + statistics.stdev(lower)
    beyond = gap > spread
    return f"{text}, {'beyond' if beyond else 'within'} the spread ({_pct(spread)})", gap, beyond


def _ordering_verdict(gaps: list[tuple[str, float, bool | None]]) -> str:
    """'met' when every gap of an ordering is positive and beyond the spread."""
    if any(beyond is None for _, _, beyond in gaps):
        return "not decided: one seed" if all(gap >= 0 for _, gap, _ in gaps) else "missed on one seed"
    return "met" if all(beyond for _, _, beyond in gaps) else "missed"


def _gain_cell(frontier: dict, budget: float) -> tuple[str, float | None]:
    """The recommended policy's test accuracy minus max-softmax's at `budget`, as text and as a fraction."""
    row = _frontier_row(frontier, budget)
    rec, conf = row.get("recommended"), row.get("confidence")
    if not rec or not conf:
        return f"{budget:g}: {'max-softmax' if rec else 'recommended'} has no threshold in the budget", None
    gain = rec["test_accuracy"] - conf["test_accuracy"]
    return f"{budget:g}: {'+' if gain >= 0 else '-'}{_pct(abs(gain))}", gain


def _gain_out_of_reach(frontier: dict, budget: float, goal: float) -> str | None:
    """Why max-softmax + `goal` at `budget` asks more than a single exit gives, as text; else None. Either the
    recommended policy reads no more than the best exit within the budget and the goal is above that exit (the
    gain needs a routing that beats every exit within the budget), or the goal is above every exit of the
    network at any cost."""
    row = _frontier_row(frontier, budget)
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
            f"({_pct(best)} %), below max-softmax + {100 * goal:g} ({_pct(target)} %)"
        )
    if target > best_any:
        return (
            f"at {budget:g} max-softmax + {100 * goal:g} ({_pct(target)} %) is above every exit of the network "
            f"(best {_pct(best_any)} %)"
        )
    return None


def _hard_exit(run: Run, base: list[float]) -> tuple[str, str]:
    """A timed run's recommended policy against the hard-exit target, as (measured, verdict)."""
    t = run.timing
    acc, cost, speedup = t["test"]["accuracy"], t["test"]["expected_cost"], t["timing"]["speedup"]
    measured = f"{_pct(acc)} % at {cost:.3f} of the FLOPs, {speedup:.2f}x"
    if not base:
        return measured, "no baseline trained"
    mean = statistics.fmean(base)
    measured += f"; baseline {_pct(mean)} %"
    misses = []
    if acc < mean:
        misses.append(f"accuracy {_pct(mean - acc)} points below")
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
        f"at <= {HARD_EXIT[0]:g} of its FLOPs and >= {HARD_EXIT[1]:g}x its speed.",
        "",
        "| target | runs | measured | verdict |",
        "|---|---|---|---|",
    ]
    name = BACKBONES.get(TARGET_BACKBONE, TARGET_BACKBONE)
    soft_variants = [v for v in _variants() if v.startswith("soft_l")]
    for dataset, (plain_goal, soft_goal) in ACCURACY_TARGETS.items():
        label = f"{DATASETS.get(dataset, dataset)} {name}"
        row_of = {v: rows.get((dataset, TARGET_BACKBONE, v)) or Row(dataset, TARGET_BACKBONE, v) for v in _variants()}
        checks = [("baseline", "final_accuracy", f"plain network >= {_pct(plain_goal)} %", plain_goal)]
        alltrain = rows.get((dataset, TARGET_BACKBONE, "baseline_alltrain"))
        if alltrain is not None:
            row_of["baseline_alltrain"] = alltrain
            whole = f"plain network on the whole training split >= {_pct(plain_goal)} %"
            checks.append(("baseline_alltrain", "final_accuracy", whole, plain_goal))
        checks += [
            (v, "soft_accuracy", f"{_label(v)}: soft ensemble >= {_pct(soft_goal)} %", soft_goal) for v in soft_variants
        ]
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
                what = f"{label}: {_label(variant)} >= B-Net >= baseline beyond the seed spread"
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
        if _plain(variant) or not row.runs:
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
            measured, verdict = _hard_exit(run, base)
            out.append(f"| {what} | {run.name} | {measured} | {verdict} |")
    return "\n".join(out)


def tables_md(rows: dict[tuple[str, str, str], Row], minutes: dict[str, float] | None = None) -> str:
    """The whole of tables.md."""
    parts = [
        "# Evidence tables",
        "Generated by `python benchmarks/evidence_tables.py` from the run files under `results/evidence/`; "
        "`--check` fails when this file is stale.",
        "## Targets",
        targets(rows),
        "## Budget",
        budget_lines(rows),
        "## Table 1 form: accuracy per method",
        table1(rows, minutes),
        "## Table 2 form: hard early exit at batch 1",
        table2(rows),
        "## Policies at a cost budget",
        policy_table(rows),
        "## Exits attached to a trained network",
        attached_table(rows),
        "## Training time per run",
        runs_table(rows),
    ]
    plots = [d for d, group in _by_dataset(rows).items() if _plotted(group)]
    if plots:
        parts.append("## Accuracy against cost")
        parts += [
            f"![{DATASETS.get(d, d)}: test accuracy against expected cost]({d}/accuracy_vs_cost.png)" for d in plots
        ]
    return "\n\n".join(parts) + "\n"


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
        entries = [_frontier_row(run.frontier, budget).get(policy) for run in runs]
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
    handles += [Line2D([], [], color="gray", linestyle=s, label=_label(v)) for v, s in styles.items()]
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


def summary(rows: dict[tuple[str, str, str], Row]) -> str:
    """One line per trained run: final-exit and soft-ensemble accuracy, and its recommended policy at batch 1."""
    out = [
        "| data set | backbone | method | seed | final exit | soft ensemble | recommended policy at batch 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, group in _by_dataset(rows).items():
        for row in group:
            for run in row.runs:
                test, t = run.report["test"], run.timing
                soft = f"{_pct(test['soft_accuracy'])} %" if "soft" in row.variant else "-"
                if t is not None:
                    policy = (
                        f"{_pct(t['test']['accuracy'])} % at {t['test']['expected_cost']:.3f} of the FLOPs, "
                        f"{t['timing']['speedup']:.2f}x faster than the plain network"
                    )
                else:
                    policy = "-" if _plain(row.variant) else "not timed yet"
                out.append(
                    f"| {DATASETS.get(dataset, dataset)} | {BACKBONES.get(row.backbone, row.backbone)} | "
                    f"{_label(row.variant)} | {run.seed} | {_pct(test['final_accuracy'])} % | {soft} | {policy} |"
                )
    return "\n".join(out)


def blocks(rows: dict[tuple[str, str, str], Row], minutes: dict[str, float] | None = None) -> dict[str, str]:
    """The tables that docs blocks may hold, by block name."""
    return {
        "table1": table1(rows, minutes),
        "table2": table2(rows),
        "policies": policy_table(rows),
        "summary": summary(rows),
        "targets": targets(rows),
        "runs": runs_table(rows),
    }


def fill_blocks(text: str, tables: dict[str, str], where: str) -> str:
    """`text` with every evidence-tables block replaced by its table."""

    def sub(m: re.Match) -> str:
        if m[2] not in tables:
            raise SystemExit(f"{where}: unknown evidence tables block {m[2]!r}; known: {', '.join(tables)}")
        return f"{m[1]}{tables[m[2]]}\n{m[4]}"

    return BLOCK.sub(sub, text)


def expected_files(results: Path, docs: list[Path]) -> dict[Path, str]:
    """Every text file this script writes, with the content it would write now."""
    rows = load_rows(results)
    minutes = epoch_minutes(results)
    files = {results / "tables.md": tables_md(rows, minutes)}
    tables = blocks(rows, minutes)
    for doc in docs:
        files[doc] = fill_blocks(doc.read_text(), tables, str(doc))
    return files


def check(results: Path, docs: list[Path]) -> int:
    """0 when every generated file is up to date and every plot exists; else print the diffs and return 1."""
    stale = 0
    for path, text in expected_files(results, docs).items():
        old = path.read_text() if path.is_file() else ""
        if old != text:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(path), "now"))
    for dataset, group in _by_dataset(load_rows(results)).items():
        png = results / dataset / "accuracy_vs_cost.png"
        if _plotted(group) and not png.is_file():
            stale += 1
            print(f"missing plot: {png}")
    if stale:
        print(f"\n{stale} file(s) stale: run python benchmarks/evidence_tables.py")
    return 1 if stale else 0


def write(results: Path, docs: list[Path]) -> None:
    """Write tables.md, the docs blocks and one plot per data set with a frontier."""
    for path, text in expected_files(results, docs).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}")
    for dataset, group in _by_dataset(load_rows(results)).items():
        if _plotted(group):
            plot(dataset, group, results / dataset / "accuracy_vs_cost.png")
            print(f"wrote {results / dataset / 'accuracy_vs_cost.png'}")


def main(argv: list[str] | None = None) -> int:
    """Command line: write everything, or with --check compare; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="the results tree (default: results/evidence)")
    p.add_argument(
        "--docs",
        type=Path,
        nargs="*",
        help="files with evidence-tables blocks (default: docs/evidence.md and README.md for the default "
        "results tree, none for another)",
    )
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if anything is stale")
    args = p.parse_args(argv)
    if args.docs is None:  # the repository's docs show the committed runs, never another tree's
        args.docs = list(DOCS) if args.results.resolve() == RESULTS.resolve() else []
    if args.check:
        return check(args.results, args.docs)
    write(args.results, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
