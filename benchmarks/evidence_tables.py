"""Regenerate every evidence table and plot from the run files under ``results/evidence/``.

``run_evidence.py`` copies each finished run's small files to
``results/evidence/<data set>/<backbone>_<method>[_l<lambda>]_s<seed>/``. From them this script writes
``results/evidence/tables.md`` with

- the targets: each target of the grid with the committed figure it is judged on and whether it is met;
- Table 1 form: per data set and backbone, one row per method (baseline, B-Net, soft at each lambda):
  final-exit and soft-ensemble test accuracy, mean and sample standard deviation over the seeds
  trained, beside the paper's figure;
- Table 2 form: the recommended hard-exit policy of each run at batch 1 (``timing.json`` of
  ``time_recommended.py``, and ``timing_budget0.5.json`` at the hard-exit target's own budget where a
  run has one): accuracy, expected cost, measured speed-up against the plain backbone timed in the same
  process, exit distribution;
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
depend on the matplotlib version. The results tree is read by ``_evidence_runs.py``, the targets are
judged by ``_evidence_targets.py`` and the plot is drawn by ``_evidence_plot.py``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import statistics
import sys
from pathlib import Path

from _evidence_plot import plot
from _evidence_runs import (
    BACKBONES,
    DATASETS,
    PAPER_T1,
    POLICY_BUDGETS,
    POLICY_NAMES,
    POLICY_ROWS,
    Row,
    Run,
    budget,
    by_dataset,
    epoch_minutes,
    frontier_row,
    is_plain,
    load_rows,
    mean_sd,
    method_label,
    on_whole_split,
    pct,
    scratch_variant,
    shortfalls,
    variant_key,
)
from _evidence_targets import targets
from run_evidence import GRID, TARGET_BUDGET

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "results" / "evidence"

DOCS = (ROOT / "docs" / "evidence.md", ROOT / "README.md")

BLOCK = re.compile(r"(<!-- evidence tables: (\w+) -->\n)(.*?)(<!-- end evidence tables: \2 -->)", re.DOTALL)

# the blocks each repository doc must hold (any other doc given with --docs: at least one)
DOC_BLOCKS = {DOCS[0]: ("table1", "targets", "runs"), DOCS[1]: ("summary",)}

# Table 2 of the paper (CIFAR-10, hard early exit): accuracy, time per image, speed-up
PAPER_T2 = {
    ("cifar10", "resnet18"): "84.92 %, 2.18 ms, 58 % speed-up",
    ("cifar10", "vgg13"): "86.70 %, 1.59 ms, 44 % speed-up",
    ("cifar10", "alexnet"): "79.96 %, 2.74 ms, 12 % speed-up",
}

OPTIMIZERS = {"sgd": "Nesterov SGD"}  # timm's "sgd" is Nesterov SGD


def budget_lines(rows: dict[tuple[str, str, str], Row]) -> str:
    """One line per backbone and budget: the budget its from-scratch runs share and the data sets they are on."""
    datasets: dict[tuple[str, tuple], list[str]] = {}  # (backbone, budget items) -> data sets, in row order
    for (dataset, backbone, variant), row in rows.items():
        if row.runs and scratch_variant(variant) is None:
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


def _paper_t1(row: Row) -> str:
    """The paper's Table 1 figure for this row, '-' where the paper has none."""
    paper = PAPER_T1.get((row.dataset, row.backbone))
    index = variant_key(row.variant)[0]
    if paper is None or on_whole_split(row.variant) or index >= len(paper):
        return "-"
    return f"{paper[index]:.2f} %"


def table1(rows: dict[tuple[str, str, str], Row], minutes: dict[str, float] | None = None) -> str:
    """Table 1 form: final-exit and soft-ensemble accuracy per method, over seeds, beside the paper; rows not
    trained yet show the backbone's minutes per epoch at its measured rate where `minutes` has them."""
    minutes = minutes or {}
    out = [
        "Test accuracy, mean ± sample standard deviation over the seeds trained (the seeds column gives n). "
        "Soft ensemble: the soft-conditional output of soft runs. Paper: its baseline, B-Net and proposed "
        "figure (one figure for every lambda).",
    ]
    for dataset, group in by_dataset(rows).items():
        out += [
            f"\n**{DATASETS.get(dataset, dataset)}**\n",
            "| backbone | method | seeds | final exit | soft ensemble | paper |",
            "|---|---|---|---|---|---|",
        ]
        for row in group:
            head = f"| {BACKBONES.get(row.backbone, row.backbone)} | {method_label(row.variant)} |"
            if not row.runs:
                measured = minutes.get(row.backbone)
                per_epoch = f"{measured:.1f} min per epoch at the loop rate measured here" if measured else ""
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


def _table2_row(name: str, t: dict, paper: str) -> str:
    """One timed policy (a ``timing.json``) as a Table 2 row."""
    tm, test = t["timing"], t["test"]
    return (
        f"| {name} | {t['budget']:g} | {_policy_label(t['policy'])} | {pct(test['accuracy'])} % | "
        f"{test['expected_cost']:.3f} | {tm['plain_ms_per_image']:.3f} | {tm['policy_ms_per_image']:.3f} | "
        f"{tm['speedup']:.2f}x | {distribution(test['exit_distribution'])} | {paper} |"
    )


def table2(rows: dict[tuple[str, str, str], Row]) -> str:
    """Table 2 form: each run's recommended hard-exit policy, timed at batch 1 against the plain backbone."""
    out = [
        "The recommended policy of each run (`time_recommended.py`: the lowest frontier budget whose "
        "recommended policy is within 1 point of the final exit on the held-out split; where a run has a "
        f"second row, also at the hard-exit target's own budget, {TARGET_BUDGET:g}), through the real "
        "early-exit path: accuracy, expected cost (share of the backbone's FLOPs) and exit distribution "
        "on the whole test split; ms per image at batch 1 on the first test images, plain backbone and "
        "policy interleaved in the same process (medians).",
    ]
    machines: dict[str, list[str]] = {}
    for dataset, group in by_dataset(rows).items():
        out += [
            f"\n**{DATASETS.get(dataset, dataset)}**\n",
            "| run | budget | policy | test accuracy | expected cost | plain ms | policy ms | speed-up "
            "| exit distribution | paper |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in group if not is_plain(r.variant) and not on_whole_split(r.variant)):
            paper = PAPER_T2.get((row.dataset, row.backbone), "-")
            for run in row.runs:
                if run.timing is None:
                    out.append(f"| {run.name} | not timed yet (no timing.json) | | | | | | | | {paper} |")
                    continue
                for t in filter(None, (run.timing, run.target_timing)):
                    out.append(_table2_row(run.name, t, paper))
                tm, m = run.timing["timing"], run.timing["machine"]
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
    cell = f"{pct(entry['test_accuracy'])} [{pct(lo)}, {pct(hi)}]"
    if recommended:
        return f"{cell} {POLICY_NAMES[entry['policy']]}"
    d = entry.get("recommended_minus_this_ci95")
    return cell if d is None else f"{cell}, Δ [{pct(d[0])}, {pct(d[1])}]"


def policy_table(rows: dict[tuple[str, str, str], Row]) -> str:
    """Test accuracy per policy and budget, with bootstrap 95 % intervals, from each run's frontier.json."""
    out = [
        "Test accuracy (%) at thresholds chosen on the held-out split within each budget (share of the "
        "backbone's FLOPs), with its bootstrap 95 % interval over test images; Δ: the interval of the "
        "recommended policy's accuracy minus this one's (paired, points); the recommended cell names the "
        "policy it chose; -: no threshold of that policy fits the budget.",
    ]
    for dataset, group in by_dataset(rows).items():
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
                cells = [_cell(frontier_row(run.frontier, b).get(key), key == "recommended") for b in POLICY_BUDGETS]
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
        from_scratch = scratch_variant(variant)
        if from_scratch is None:
            continue
        label = DATASETS.get(dataset, dataset)
        if not row.runs:
            out.append(f"| {label} | {backbone}_{variant} | - | - | not trained yet | | | | |")
            continue
        scratch = _by_seed(rows, (dataset, backbone, from_scratch))
        base = _by_seed(rows, (dataset, backbone, "baseline"))
        for run in row.runs:
            rec, test = run.report["recipe"], run.report["test"]
            total = f"{_minutes(run) + _minutes(base[run.seed]):.1f}" if run.seed in base else "-"
            ref = scratch.get(run.seed)
            ref_text = "not trained yet"
            if ref is not None:
                t = ref.report["test"]
                ref_text = f"{pct(t['final_accuracy'])} % / {pct(t['soft_accuracy'])} % / {_minutes(ref):.1f}"
            out.append(
                f"| {label} | {run.name} | {rec['frozen_epochs']} + {rec['epochs']} "
                f"| {rec.get('frozen_lr') or rec['lr']:g} / {rec['lr']:g} | {pct(test['final_accuracy'])} % "
                f"| {pct(test['soft_accuracy'])} % | {_minutes(run):.1f} | {total} | {ref_text} |"
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
    plots = [d for d, group in by_dataset(rows).items() if _plotted(group)]
    if plots:
        parts.append("## Accuracy against cost")
        parts += [
            f"![{DATASETS.get(d, d)}: test accuracy against expected cost]({d}/accuracy_vs_cost.png)" for d in plots
        ]
    return "\n\n".join(parts) + "\n"


def summary(rows: dict[tuple[str, str, str], Row]) -> str:
    """One line per trained run: final-exit and soft-ensemble accuracy, and its recommended policy at batch 1."""
    out = [
        "| data set | backbone | method | seed | final exit | soft ensemble | recommended policy at batch 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, group in by_dataset(rows).items():
        for row in group:
            for run in row.runs:
                test, t = run.report["test"], run.timing
                soft = f"{pct(test['soft_accuracy'])} %" if "soft" in row.variant else "-"
                if t is not None:
                    policy = (
                        f"{pct(t['test']['accuracy'])} % at {t['test']['expected_cost']:.3f} of the FLOPs, "
                        f"{t['timing']['speedup']:.2f}x faster than the plain network"
                    )
                else:
                    policy = "-" if is_plain(row.variant) or on_whole_split(row.variant) else "not timed yet"
                out.append(
                    f"| {DATASETS.get(dataset, dataset)} | {BACKBONES.get(row.backbone, row.backbone)} | "
                    f"{method_label(row.variant)} | {run.seed} | {pct(test['final_accuracy'])} % | {soft} | {policy} |"
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


def marker_problems(text: str, doc: Path) -> list[str]:
    """What is wrong with `doc`'s blocks, one line each: a line outside every whole block that holds an
    evidence-tables marker (damaged, or without its pair: the block would be skipped, its table never
    compared), and a block the doc must hold that it lacks. Markers quoted in inline code are text."""
    names, inside = [], set()
    for m in BLOCK.finditer(text):
        names.append(m[2])
        inside.update(range(text.count("\n", 0, m.start()) + 1, text.count("\n", 0, m.end()) + 2))
    problems = [
        f"{doc}:{i}: damaged or unpaired evidence tables marker {line.strip()!r}; a block runs from "
        "`<!-- evidence tables: NAME -->` to `<!-- end evidence tables: NAME -->`"
        for i, line in enumerate(text.splitlines(), 1)
        if i not in inside and "evidence tables:" in re.sub(r"`[^`]*`", "", line)
    ]
    missing = [n for n in DOC_BLOCKS.get(doc.resolve(), ()) if n not in names]
    problems += [f"{doc}: the evidence tables block {n!r} is missing" for n in missing]
    if not names and not problems:
        problems.append(f"{doc}: holds no evidence tables block")
    return problems


def expected_files(results: Path, docs: list[Path]) -> dict[Path, str]:
    """Every text file this script writes, with the content it would write now; refuses docs whose blocks
    are damaged or missing (they would be left stale without a word)."""
    texts = {doc: doc.read_text() for doc in docs}
    problems = [line for doc, text in texts.items() for line in marker_problems(text, doc)]
    if problems:
        raise SystemExit("\n".join(problems))
    rows = load_rows(results)
    minutes = epoch_minutes(results)
    files = {results / "tables.md": tables_md(rows, minutes)}
    tables = blocks(rows, minutes)
    for doc, text in texts.items():
        files[doc] = fill_blocks(text, tables, str(doc))
    return files


def check(results: Path, docs: list[Path]) -> int:
    """0 when every generated file is up to date and every plot exists; else print the diffs and return 1."""
    stale = 0
    for path, text in expected_files(results, docs).items():
        old = path.read_text() if path.is_file() else ""
        if old != text:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(path), "now"))
    for dataset, group in by_dataset(load_rows(results)).items():
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
    for dataset, group in by_dataset(load_rows(results)).items():
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
