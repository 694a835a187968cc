"""The evidence tables from a real tiny results tree: numbers equal to the run files, --check, plots.

One soft run and one baseline run are trained on digits (`test_resnet`, the `tiny()` recipe of
test_recipes.py); the soft run gets its frontier (`policy_frontier.py`) and its batch-1 timing
(`time_recommended.py`), and is copied as a second seed with other test accuracies (and no timing)
so that the spread over seeds is exercised. The tables script then reads that tree.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from test_recipes import PNG_MAGIC, tiny

from timm_exits.training.train import train

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _evidence_runs  # noqa: E402
import _evidence_targets  # noqa: E402
import evidence_tables  # noqa: E402
import policy_frontier  # noqa: E402
import run_evidence  # noqa: E402
import time_recommended  # noqa: E402

DOC = "# Doc\n\n<!-- evidence tables: table1 -->\nold\n<!-- end evidence tables: table1 -->\n\nafter\n"


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = fn(*args)
    return result, out.getvalue()


def _copy(run: Path, dest: Path) -> Path:
    run_evidence.copy_small_files(run, dest)
    return dest


def test_results_copy_of_a_report_drops_the_plots_it_does_not_copy(tree):
    run = tree.parent.parent / "runs" / "soft"
    written = (run / "report.md").read_text()
    copied = (tree / "digits" / "test_resnet_soft_l0.1_s0" / "report.md").read_text()
    assert "](plots/" in written and "](plots/" not in copied and run_evidence.PLOTS_NOTE in copied
    assert copied.split("\n## Plots\n")[0] == written.split("\n## Plots\n")[0]
    assert run_evidence.report_without_plots(copied) == copied


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """results/evidence/digits/ with soft seeds 0 and 1 and a baseline; tables.md, plot and a doc written."""
    root = tmp_path_factory.mktemp("evidence")
    soft = train(tiny(method="soft", cost_weight=0.1, timing_images=0), root / "runs" / "soft")
    base = train(tiny(method="baseline", timing_images=0), root / "runs" / "baseline")
    _, frontier = _quiet(policy_frontier.main, ["--run", str(soft), "--threads", "1"])
    (soft / "frontier.json").write_text(frontier)
    argv = ["--run", str(soft), "--threads", "1", "--images", "4", "--repeats", "2", "--warmup", "1"]
    _quiet(time_recommended.main, [*argv, "--out", str(soft / "timing.json")])
    budget = str(run_evidence.TARGET_BUDGET)
    _quiet(time_recommended.main, [*argv, "--budget", budget, "--out", str(soft / run_evidence.TARGET_TIMING)])
    results = root / "results" / "evidence"
    digits = results / "digits"
    _copy(soft, digits / "test_resnet_soft_l0.1_s0")
    _copy(base, digits / "test_resnet_baseline_s0")
    s1 = _copy(soft, digits / "test_resnet_soft_l0.1_s1")
    (s1 / "timing.json").unlink()
    (s1 / run_evidence.TARGET_TIMING).unlink()
    report = json.loads((s1 / "report.json").read_text())
    report["recipe"]["seed"] = 1
    report["test"]["final_accuracy"] += 0.125
    report["test"]["soft_accuracy"] += 0.0625
    (s1 / "report.json").write_text(json.dumps(report))
    (root / "doc.md").write_text(DOC)
    code, _ = _quiet(evidence_tables.main, ["--results", str(results), "--docs", str(root / "doc.md")])
    assert code == 0
    return results


def _row(text: str, *starts: str) -> list[str]:
    """The cells of the first table row whose leading cells are `starts`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[: len(starts)] == list(starts):
            return cells
    raise AssertionError(f"no row {starts} in:\n{text}")


def _json(tree: Path, run: str, name: str) -> dict:
    return json.loads((tree / "digits" / run / name).read_text())


def _pm(values: list[float]) -> str:
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f} %"


def test_table1_gives_mean_and_spread_over_seeds_and_marks_missing_rows(tree):
    text = (tree / "tables.md").read_text()
    tests = [_json(tree, f"test_resnet_soft_l0.1_s{s}", "report.json")["test"] for s in (0, 1)]
    row = _row(text, "test_resnet", "soft, lambda 0.1")
    assert row[2] == "2 (0, 1)"
    assert row[3] == _pm([t["final_accuracy"] for t in tests])
    assert row[4] == _pm([t["soft_accuracy"] for t in tests])
    base = _json(tree, "test_resnet_baseline_s0", "report.json")["test"]
    assert _row(text, "test_resnet", "baseline")[2:5] == ["1 (0)", f"{100 * base['final_accuracy']:.2f} %", "-"]
    assert "not trained yet" in _row(text, "test_resnet", "B-Net")[3]
    assert _row(text, "ResNet-18", "soft, lambda 0.1")[3:] == ["not trained yet", "-", "85.78 %"]
    assert _row(text, "VGG-13", "baseline")[5] == "75.44 %"


def test_exit_distribution_cells_give_each_taken_exit_and_leave_out_the_others():
    assert evidence_tables.distribution([0.984, 0.0, 0.0, 0.016]) == "#1 98.4 %, #4 1.6 %"
    assert evidence_tables.distribution([0.0004, 0.5, 0.4996]) == "#2 50.0 %, #3 50.0 %"


def test_table2_reads_timing_json_and_says_which_runs_have_none(tree):
    text = (tree / "tables.md").read_text()
    t = _json(tree, "test_resnet_soft_l0.1_s0", "timing.json")
    # the hard path over the whole test split gives what the frontier simulated for the same policy
    assert t["test"]["accuracy"] == pytest.approx(t["frontier"]["test_accuracy"])
    assert t["test"]["expected_cost"] == pytest.approx(t["frontier"]["test_cost"], abs=1e-6)
    assert t["timing"]["batch_size"] == 1 and t["timing"]["images"] == 4 and t["timing"]["threads"] == 1
    assert {"cpu", "cores"} <= set(t["machine"]) and t["timing"]["plain_ms_per_image"] > 0
    row = _row(text, "test_resnet_soft_l0.1_s0")
    assert row[1] == f"{t['budget']:g}"
    assert row[3] == f"{100 * t['test']['accuracy']:.2f} %"
    assert row[4] == f"{t['test']['expected_cost']:.3f}"
    assert row[7] == f"{t['timing']['plain_ms_per_image'] / t['timing']['policy_ms_per_image']:.2f}x"
    assert row[8] == evidence_tables.distribution(t["test"]["exit_distribution"])
    assert _row(text, "test_resnet_soft_l0.1_s1")[1] == "not timed yet (no timing.json)"
    assert _row(text, "resnet18_soft_l0.1_s0")[1:2] == ["not trained yet"]
    # the second row: the same run timed at the hard-exit target's own budget
    target = _json(tree, "test_resnet_soft_l0.1_s0", run_evidence.TARGET_TIMING)
    assert target["budget"] == run_evidence.TARGET_BUDGET
    table2 = text.split("## Table 2 form", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table2.splitlines() if line.startswith("| test_resnet_soft_l0.1_s0 |")]
    assert len(rows) == 2
    row = [c.strip() for c in rows[1].strip().strip("|").split("|")]
    assert row[1] == f"{run_evidence.TARGET_BUDGET:g}"
    assert row[3:5] == [f"{100 * target['test']['accuracy']:.2f} %", f"{target['test']['expected_cost']:.3f}"]
    assert target["frontier"]["val_cost"] <= run_evidence.TARGET_BUDGET + 1e-6  # the budget binds on held-out images


def test_runs_table_says_where_each_run_trained_and_how_fast(tree, tmp_path):
    from timm_exits.training.timing import machine_name

    text = (tree / "tables.md").read_text()
    epochs = [json.loads(line) for line in (tree / "digits/test_resnet_soft_l0.1_s0/metrics.jsonl").open()]
    report = _json(tree, "test_resnet_soft_l0.1_s0", "report.json")
    where = epochs[0]["runtime"]
    assert where["machine"] == machine_name() and where["processes"] == 1
    row = _row(text, "digits", "test_resnet_soft_l0.1_s0")
    assert row[2:6] == [machine_name(), f"{where['threads']} x 1", "fp32", str(report["recipe"]["batch_size"])]
    assert row[6:] == [
        str(len(epochs)),
        f"{statistics.median(e['seconds'] for e in epochs):.1f}",
        f"{report['training']['seconds'] / 60:.1f}",
    ]
    assert report["training"]["runtimes"] == [{**where, "epochs": len(epochs)}]
    # a run whose report predates the record, and one that moved machines when it resumed
    old = _copy(tree / "digits" / "test_resnet_baseline_s0", tmp_path / "digits" / "test_resnet_baseline_s0")
    moved = _copy(tree / "digits" / "test_resnet_soft_l0.1_s0", tmp_path / "digits" / "test_resnet_soft_l0.1_s0")
    rep = json.loads((old / "report.json").read_text())
    del rep["training"]["runtimes"]
    (old / "report.json").write_text(json.dumps(rep))
    rep = json.loads((moved / "report.json").read_text())
    rep["training"]["runtimes"] = [
        {"machine": "M1", "threads": 2, "processes": 1, "epochs": 1},
        {"machine": "M2", "threads": 1, "processes": 1, "epochs": 2},
    ]
    rep["recipe"] |= {"amp": "bf16", "channels_last": True}
    (moved / "report.json").write_text(json.dumps(rep))
    table = evidence_tables.runs_table(evidence_tables.load_rows(tmp_path))
    assert _row(table, "digits", "test_resnet_baseline_s0")[2:4] == ["not recorded", "-"]
    row = _row(table, "digits", "test_resnet_soft_l0.1_s0")
    assert row[2:5] == ["M1 (1 epoch); M2 (2 epochs)", "2 x 1; 1 x 1", "bf16 autocast, channels-last"]


def test_summary_gives_each_run_its_accuracy_and_timed_policy(tree):
    rows = evidence_tables.load_rows(tree)
    text = evidence_tables.fill_blocks(
        "<!-- evidence tables: summary -->\n<!-- end evidence tables: summary -->\n",
        evidence_tables.blocks(rows),
        "doc",
    )
    t = _json(tree, "test_resnet_soft_l0.1_s0", "timing.json")
    test = _json(tree, "test_resnet_soft_l0.1_s0", "report.json")["test"]
    row = _row(text, "digits", "test_resnet", "soft, lambda 0.1", "0")
    assert row[4:6] == [f"{100 * test['final_accuracy']:.2f} %", f"{100 * test['soft_accuracy']:.2f} %"]
    speedup = t["timing"]["plain_ms_per_image"] / t["timing"]["policy_ms_per_image"]
    assert row[6] == (
        f"{100 * t['test']['accuracy']:.2f} % at {t['test']['expected_cost']:.3f} of the FLOPs, "
        f"{speedup:.2f}x faster than the plain network"
    )
    assert _row(text, "digits", "test_resnet", "soft, lambda 0.1", "1")[6] == "not timed yet"
    base = _json(tree, "test_resnet_baseline_s0", "report.json")["test"]
    base_row = _row(text, "digits", "test_resnet", "baseline", "0")
    assert base_row[4:] == [f"{100 * base['final_accuracy']:.2f} %", "-", "-"]
    assert len([line for line in text.splitlines() if line.startswith("| digits |")]) == 3  # trained runs only


def test_policy_table_cells_are_the_frontier_numbers(tree):
    text = (tree / "tables.md").read_text()
    frontier = _json(tree, "test_resnet_soft_l0.1_s0", "frontier.json")
    by_budget = {r["budget"]: r for r in frontier["table"]}
    rec = _row(text, "test_resnet_soft_l0.1_s0", "recommended")
    conf = _row(text, "test_resnet_soft_l0.1_s0", "max-softmax")
    for i, budget in enumerate((0.4, 0.5, 0.6, 0.7, 0.8, 0.9)):
        r, c = by_budget[budget]["recommended"], by_budget[budget]["confidence"]
        if r is None:
            assert rec[2 + i] == "-"
            continue
        lo, hi = (f"{100 * v:.2f}" for v in r["test_accuracy_ci95"])
        assert rec[2 + i].startswith(f"{100 * r['test_accuracy']:.2f} [{lo}, {hi}]")
        d = [f"{100 * v:.2f}" for v in c["recommended_minus_this_ci95"]]
        assert conf[2 + i].endswith(f"Δ [{d[0]}, {d[1]}]")


def test_shortfalls_name_budgets_where_the_whole_interval_is_below_zero(tree):
    def entry(d):
        return {"test_accuracy": 0.8, "test_accuracy_ci95": [0.79, 0.81], "recommended_minus_this_ci95": d}

    frontier = {
        "table": [
            {"budget": 0.4, "confidence": entry([-0.004, -0.001]), "entropy": entry([-0.003, 0.002])},
            {"budget": 0.6, "static": entry([-0.01, 0.0]), "entropy": entry([-0.0029, -0.0003])},
            {"budget": 0.95, "confidence": entry([-0.5, -0.4])},  # outside the table's budgets
        ]
    }
    assert evidence_tables.shortfalls(frontier) == [
        "max-softmax at 0.4 (Δ [-0.40, -0.10])",
        "entropy at 0.6 (Δ [-0.29, -0.03])",
    ]
    text = (tree / "tables.md").read_text()
    run = _json(tree, "test_resnet_soft_l0.1_s0", "frontier.json")
    assert f"- test_resnet_soft_l0.1_s0: {'; '.join(evidence_tables.shortfalls(run)) or 'nowhere'}\n" in text


def test_check_passes_when_current_and_fails_after_an_edit(tree, tmp_path):
    results = tmp_path / "evidence"
    shutil.copytree(tree, results)
    doc = tmp_path / "doc.md"
    shutil.copy2(tree.parent.parent / "doc.md", doc)
    args = ["--results", str(results), "--docs", str(doc), "--check"]
    assert "<!-- evidence tables: table1 -->\nTest accuracy" in doc.read_text()
    assert doc.read_text().endswith("<!-- end evidence tables: table1 -->\n\nafter\n")
    assert _quiet(evidence_tables.main, args)[0] == 0
    tables = results / "tables.md"
    row = "| AlexNet-style | baseline | none | not trained yet"
    tables.write_text(tables.read_text().replace(row, row.replace("not trained yet", "trained"), 1))
    code, out = _quiet(evidence_tables.main, args)
    assert code == 1 and "+| AlexNet-style | baseline | none | not trained yet |" in out
    _quiet(evidence_tables.main, args[:-1])
    doc.write_text(doc.read_text().replace("± ", "+- "))
    code, out = _quiet(evidence_tables.main, args)
    assert code == 1 and str(doc) in out


def test_another_results_tree_leaves_the_repository_docs_alone(tree, tmp_path, monkeypatch):
    results = tmp_path / "evidence"
    shutil.copytree(tree, results)
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    monkeypatch.setattr(evidence_tables, "DOCS", (doc,))
    assert _quiet(evidence_tables.main, ["--results", str(results)])[0] == 0
    assert doc.read_text() == DOC and (results / "tables.md").is_file()
    monkeypatch.setattr(evidence_tables, "RESULTS", results)  # the default tree writes the default docs
    assert _quiet(evidence_tables.main, [])[0] == 0
    assert "<!-- evidence tables: table1 -->\nTest accuracy" in doc.read_text()


def test_plot_is_a_png_per_data_set(tree):
    assert (tree / "digits" / "accuracy_vs_cost.png").read_bytes()[:8] == PNG_MAGIC
    assert "](digits/accuracy_vs_cost.png)" in (tree / "tables.md").read_text()
    assert not (tree / "cifar10").exists()


def test_plot_legend_names_every_plotted_method_and_only_backbones_with_runs(tree, tmp_path):
    group = [row for (dataset, _, _), row in evidence_tables.load_rows(tree).items() if dataset == "digits"]
    soft = next(row for row in group if row.variant == "soft_l0.1")
    group += [
        evidence_tables.Row("digits", "test_resnet", "attached_soft_l0.1", soft.runs),
        evidence_tables.Row("digits", "untrained_net", "baseline", []),
    ]
    labels = evidence_tables.plot("digits", group, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == PNG_MAGIC
    assert "soft, lambda 0.1, exits attached to the trained baseline" in labels
    assert "test_resnet" in labels
    assert "untrained_net" not in labels


@pytest.mark.parametrize(
    "name, error",
    [
        ("test_resnet_baseline_s3", "seed 0"),
        ("baseline-copy", "not a run name"),
        ("test_resnet_baseline_alltrain_s0", "val_split 0.1"),
    ],
    ids=["named-for-another-seed", "not-a-run-name", "named-whole-split-but-held-out-more"],
)
def test_a_misnamed_run_folder_is_refused(tree, tmp_path, name, error):
    results = tmp_path / "evidence"
    shutil.copytree(tree, results)
    shutil.move(results / "digits" / "test_resnet_baseline_s0", results / "digits" / name)
    with pytest.raises(SystemExit, match=error):
        evidence_tables.load_rows(results)


def test_a_run_trained_on_another_budget_is_refused_and_the_budget_is_stated(tree, tmp_path):
    report = json.loads((tree / "digits" / "test_resnet_soft_l0.1_s0" / "report.json").read_text())
    rec = report["recipe"]
    line = _budget_line(evidence_tables.tables_md(evidence_tables.load_rows(tree)), "test_resnet")
    assert f"{rec['epochs']} epochs at batch {rec['batch_size']}," in line
    assert f"peak lr {rec['lr']:g} on a {rec['sched']} schedule" in line
    results = tmp_path / "evidence"
    shutil.copytree(tree, results)
    path = results / "digits" / "test_resnet_baseline_s0" / "report.json"
    other = json.loads(path.read_text())
    other["recipe"]["batch_size"] = 2 * rec["batch_size"]
    path.write_text(json.dumps(other))
    with pytest.raises(SystemExit) as refused:
        evidence_tables.load_rows(results)
    message = str(refused.value)
    assert "test_resnet_baseline_s0" in message and "one budget" in message
    assert f"batch_size {2 * rec['batch_size']}" in message and f"batch_size {rec['batch_size']}" in message


def _budget_lines(text: str, backbone: str) -> list[str]:
    section = text[text.index("## Budget") : text.index("## Table 1 form")]
    return [x for x in section.splitlines() if x.startswith(f"- {backbone} (")]


def _budget_line(text: str, backbone: str) -> str:
    (line,) = _budget_lines(text, backbone)
    return line


def _tree_with_a_copy(tree: Path, tmp_path: Path, dest: str, edit) -> Path:
    """A copy of the results tree with its baseline run copied to DEST (``<data set>/<run>``), its report
    changed in place by EDIT."""
    results = tmp_path / "evidence"
    shutil.copytree(tree, results)
    copy = results / dest
    shutil.copytree(results / "digits" / "test_resnet_baseline_s0", copy)
    report = json.loads((copy / "report.json").read_text())
    edit(report)
    (copy / "report.json").write_text(json.dumps(report))
    return results


def test_one_backbone_may_train_on_another_budget_on_another_data_set(tree, tmp_path):
    batch = json.loads((tree / "digits" / "test_resnet_baseline_s0" / "report.json").read_text())["recipe"][
        "batch_size"
    ]

    def other_data_set_and_batch(report: dict) -> None:
        report["dataset"] = "digits2"
        report["recipe"]["batch_size"] = 2 * batch

    results = _tree_with_a_copy(tree, tmp_path, "digits2/test_resnet_baseline_s0", other_data_set_and_batch)
    lines = _budget_lines(evidence_tables.tables_md(evidence_tables.load_rows(results)), "test_resnet")
    assert len(lines) == 2
    assert lines[0].startswith("- test_resnet (digits): ") and f"at batch {batch}," in lines[0]
    assert lines[1].startswith("- test_resnet (digits2): ") and f"at batch {2 * batch}," in lines[1]


def test_the_plain_network_on_the_whole_training_split_has_its_own_row(tree, tmp_path):
    def whole_split_at_half(report: dict) -> None:
        report["recipe"]["val_split"] = run_evidence.ALLTRAIN_VAL_SPLIT
        report["test"]["final_accuracy"] = 0.5

    results = _tree_with_a_copy(tree, tmp_path, "digits/test_resnet_baseline_alltrain_s0", whole_split_at_half)
    whole = results / "digits" / "test_resnet_baseline_alltrain_s0"
    rows = evidence_tables.load_rows(results)
    assert [r.name for r in rows[("digits", "test_resnet", "baseline_alltrain")].runs] == [whole.name]
    assert [r.name for r in rows[("digits", "test_resnet", "baseline")].runs] == ["test_resnet_baseline_s0"]
    label = f"baseline, whole training split ({run_evidence.ALLTRAIN_VAL_SPLIT} images held out)"
    assert _row(evidence_tables.table1(rows), "test_resnet", label)[2:] == ["1 (0)", "50.00 %", "-", "-"]
    assert whole.name not in evidence_tables.table2(rows)  # a plain network has no exit policy to time
    assert _row(evidence_tables.summary(rows), "digits", "test_resnet", label)[-1] == "-"


def test_the_soft_method_on_the_whole_training_split_reports_accuracy_and_no_policy(tree, tmp_path):
    results = tmp_path / "evidence"
    shutil.copytree(tree, results)
    soft = results / "digits" / "test_resnet_soft_l0.1_s0"
    whole = shutil.copytree(soft, results / "digits" / "test_resnet_soft_l0.1_alltrain_s0")
    report = json.loads((whole / "report.json").read_text())
    with pytest.raises(SystemExit, match="val_split 0.1"):  # named for the whole split, trained holding out more
        evidence_tables.load_rows(results)
    report["recipe"]["val_split"] = run_evidence.ALLTRAIN_VAL_SPLIT
    report["test"].update(final_accuracy=0.5, soft_accuracy=0.625)
    (whole / "report.json").write_text(json.dumps(report))
    rows = evidence_tables.load_rows(results)
    variants = [v for d, b, v in rows if (d, b) == ("digits", "test_resnet")]
    assert variants.index("soft_l0.1_alltrain") == variants.index("soft_l0.1") + 1  # right after its grid row
    label = f"soft, lambda 0.1, whole training split ({run_evidence.ALLTRAIN_VAL_SPLIT} images held out)"
    assert _row(evidence_tables.table1(rows), "test_resnet", label)[2:] == ["1 (0)", "50.00 %", "62.50 %", "-"]
    # no held-out split, so no policy: its frontier and timings (copied along) are not read as one
    assert whole.name not in evidence_tables.table2(rows)
    assert whole.name not in evidence_tables.targets(rows)
    assert _row(evidence_tables.summary(rows), "digits", "test_resnet", label)[-1] == "-"


def test_the_soft_method_with_the_exits_mean_ce_has_its_own_row_after_the_sum(tree, tmp_path):
    results = tmp_path / "evidence"
    shutil.copytree(tree, results)
    soft = results / "digits" / "test_resnet_soft_l0.1_s0"
    mean = shutil.copytree(soft, results / "digits" / "test_resnet_soft_l0.1_exitmean_s0")
    with pytest.raises(SystemExit, match="exit_reduction sum"):  # named for the mean, trained with the sum
        evidence_tables.load_rows(results)
    report = json.loads((mean / "report.json").read_text())
    report["recipe"]["exit_reduction"] = "mean"
    report["test"].update(final_accuracy=0.5, soft_accuracy=0.625)
    (mean / "report.json").write_text(json.dumps(report))
    rows = evidence_tables.load_rows(results)
    variants = [v for d, b, v in rows if (d, b) == ("digits", "test_resnet")]
    assert variants.index("soft_l0.1_exitmean") == variants.index("soft_l0.1") + 1
    assert _row(evidence_tables.table1(rows), "test_resnet", "soft, lambda 0.1, exits' mean CE")[2:5] == [
        "1 (0)",
        "50.00 %",
        "62.50 %",
    ]
    shutil.rmtree(mean)  # and a run trained with the mean but named for the sum is refused too
    report = json.loads((soft / "report.json").read_text())
    report["recipe"]["exit_reduction"] = "mean"
    (soft / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="exit_reduction mean"):
        evidence_tables.load_rows(results)


def test_the_exits_mean_ce_is_judged_on_the_soft_ensemble_target_beside_the_sum():
    def row(variant, *runs):
        return ("cifar10", "resnet18", variant), evidence_tables.Row("cifar10", "resnet18", variant, list(runs))

    rows = dict(
        [
            row("baseline", _fake_run("b0", 0, 0.858), _fake_run("b1", 1, 0.862)),
            row("branchynet", _fake_run("n0", 0, 0.868), _fake_run("n1", 1, 0.872)),
            row("soft_l0.1", _fake_run("s0", 0, 0.87, 0.870)),
            row("soft_l0.1_exitmean", _fake_run("m0", 0, 0.878, 0.8775), _fake_run("m1", 1, 0.88, 0.8785)),
        ]
    )
    text = evidence_tables.targets(rows)
    assert _row(text, "CIFAR-10 ResNet-18: soft, lambda 0.1: soft ensemble >= 87.50 %")[3] == "missed by 0.50 points"
    mean = _row(text, "CIFAR-10 ResNet-18: soft, lambda 0.1, exits' mean CE: soft ensemble >= 87.50 %")
    assert mean[1:] == ["m0, m1", _pm([0.8775, 0.8785]), "met"]
    ordering = "CIFAR-10 ResNet-18: soft, lambda 0.1, exits' mean CE >= B-Net >= baseline beyond the seed spread"
    order = _row(text, ordering)
    assert order[1] == "2 / 2 / 2 seeds" and "soft - B-Net +0.80 points" in order[2]


def test_driver_leaves_a_whole_split_run_without_frontier_and_timing(tree, tmp_path):
    import argparse

    out, name = tmp_path / "runs", "digits/test_resnet_soft_l0.1_alltrain_s0"
    run = shutil.copytree(tree.parent.parent / "runs" / "soft", out / name)
    for f in ("frontier.json", "timing.json", run_evidence.TARGET_TIMING):
        (run / f).unlink(missing_ok=True)
    args = argparse.Namespace(
        out=out, data_dir=tmp_path, threads=1, timing_images=4, timing_repeats=2, results=tmp_path / "results"
    )
    assert run_evidence._finish(name, args) == {}
    assert not (run / "frontier.json").exists() and not (run / "timing.json").exists()
    assert (tmp_path / "results" / name / "report.json").read_bytes() == (run / "report.json").read_bytes()


def test_rows_not_trained_show_the_measured_minutes_per_epoch(tmp_path, monkeypatch):
    # the paper's CIFAR-100 VGG-13 rows, taken out of the grid
    grid = {n: v for n, v in run_evidence.GRID.items() if not n.startswith("cifar100/vgg13_")}
    for module in (evidence_tables, _evidence_runs):
        monkeypatch.setattr(module, "GRID", grid)
    results = tmp_path / "evidence"
    results.mkdir()
    rate = 87.5
    (results / "throughput_vgg13.json").write_text(json.dumps({"images_per_s": {"recipe_loop": rate}}))
    minutes = evidence_tables.epoch_minutes(results)
    assert minutes == {"vgg13": pytest.approx(45_000 / rate / 60)}
    text = evidence_tables.table1(evidence_tables.load_rows(results), minutes)
    cifar100 = text[text.index("**CIFAR-100**") :]
    rows = [line for line in cifar100.splitlines() if line.startswith("| VGG-13 |")]
    assert len(rows) == 4 and all(f"| none | not trained: {45_000 / rate / 60:.1f} min per epoch" in r for r in rows)
    assert "| ResNet-18 | baseline | none | not trained yet |" in text


def test_grid_rows_not_trained_yet_show_the_measured_minutes_per_epoch(tmp_path, monkeypatch):
    # a paper row of a backbone in the grid, its own method taken out of the grid
    grid = {n: v for n, v in run_evidence.GRID.items() if n != "cifar100/vgg13_soft_l0.5_s0"}
    assert len(grid) == len(run_evidence.GRID) - 1
    for module in (evidence_tables, _evidence_runs):
        monkeypatch.setattr(module, "GRID", grid)
    results = tmp_path / "evidence"
    results.mkdir()
    rate = 70.0
    (results / "throughput_alexnet.json").write_text(json.dumps({"images_per_s": {"recipe_loop": rate}}))
    text = evidence_tables.table1(evidence_tables.load_rows(results), evidence_tables.epoch_minutes(results))

    def rows_of(dataset: str, backbone: str) -> dict[str, str]:  # method -> its line in the data set's Table 1
        section = text.split(f"**{dataset}**")[1].split("\n**")[0]
        return {line.split(" | ")[1]: line for line in section.splitlines() if line.startswith(f"| {backbone} |")}

    rows = rows_of("CIFAR-10", "AlexNet-style")
    per_epoch = f"{45_000 / rate / 60:.1f} min per epoch at the loop rate measured here"
    for method in ("baseline", "B-Net", "soft, lambda 0.1", "soft, lambda 0.5"):  # in the grid: still to be trained
        assert f"| none | not trained yet ({per_epoch}) |" in rows[method]
    vgg13 = rows_of("CIFAR-10", "VGG-13")
    assert "| none | not trained yet |" in vgg13["soft, lambda 0.5"]  # in the grid, no throughput measured
    vgg13_cifar100 = rows_of("CIFAR-100", "VGG-13")
    assert "| none | not trained yet (not in the grid) |" in vgg13_cifar100["soft, lambda 0.5"]
    assert "not in the grid" not in vgg13_cifar100["soft, lambda 0.1"]
    assert "| ResNet-18 | baseline | none | not trained yet |" in text


def _fake_run(name: str, seed: int, final: float, soft: float = 0.0, **files) -> evidence_tables.Run:
    return evidence_tables.Run(name, seed, {"test": {"final_accuracy": final, "soft_accuracy": soft}}, **files)


def test_targets_judge_each_target_on_the_committed_figures():
    def row(dataset, variant, *runs):
        return (dataset, "resnet18", variant), evidence_tables.Row(dataset, "resnet18", variant, list(runs))

    def entry(acc, d=(-0.001, 0.002)):
        return {"test_accuracy": acc, "test_accuracy_ci95": [acc - 0.01, acc + 0.01], "recommended_minus_this_ci95": d}

    frontier = {
        "table": [
            {"budget": 0.6, "recommended": entry(0.600), "confidence": entry(0.585)},  # +1.5 points
            {
                "budget": 0.7,
                "recommended": entry(0.610),
                "confidence": entry(0.605),
                "entropy": entry(0.62, (-0.02, -0.01)),
            },
        ],
        "exit_costs": [0.3, 0.65, 1.0],
        "test_exit_accuracy": [0.5, 0.61, 0.62],
    }
    # the same, but at 0.7 the recommended policy beats every exit within the budget (61.2 against 61.0 %)
    routed = copy.deepcopy(frontier)
    routed["table"][1]["recommended"] = entry(0.612)
    # routed, but max-softmax + 1 at 0.7 (61.5 %) is above every exit (best 61.2 %)
    beyond = copy.deepcopy(routed)
    beyond["test_exit_accuracy"] = [0.5, 0.61, 0.612]
    timing = {"test": {"accuracy": 0.866, "expected_cost": 0.31}, "timing": {"speedup": 2.5}}
    slow = {"test": {"accuracy": 0.87, "expected_cost": 0.45}, "timing": {"speedup": 1.5}}
    over = {"test": {"accuracy": 0.855, "expected_cost": 0.52}, "timing": {"speedup": 2.0}}
    rows = dict(
        [
            # CIFAR-10, two seeds each: baseline 0.860 ± 0.0028, B-Net 0.870 ± 0.0028, soft ensemble 0.880 ± 0.0007
            row("cifar10", "baseline", _fake_run("b0", 0, 0.858), _fake_run("b1", 1, 0.862)),
            row("cifar10", "baseline_alltrain", _fake_run("w0", 0, 0.867)),
            row(
                "cifar10",
                "branchynet",
                _fake_run("n0", 0, 0.868, timing=timing),
                _fake_run("n1", 1, 0.872, timing=slow, target_timing=over),
            ),
            row("cifar10", "soft_l0.1", _fake_run("s0", 0, 0.88, 0.8795), _fake_run("s1", 1, 0.88, 0.8805)),
            row("cifar10", "soft_l0.1_alltrain", _fake_run("a0", 0, 0.878, 0.877, frontier=frontier, timing=timing)),
            row("cifar10", "soft_l0.5", _fake_run("h0", 0, 0.87, 0.869)),
            row("cifar100", "soft_l0.1", _fake_run("c0", 0, 0.62, 0.63, frontier=frontier)),
            row(
                "cifar100",
                "soft_l0.5",
                _fake_run("c1", 0, 0.62, 0.63, frontier=routed),
                _fake_run("c2", 1, 0.612, 0.63, frontier=beyond),
            ),
        ]
    )
    text = evidence_tables.targets(rows)
    plain = _row(text, "CIFAR-10 ResNet-18: plain network >= 86.50 %")
    assert plain[1:] == ["b0, b1", _pm([0.858, 0.862]), "missed by 0.50 points"]
    whole = _row(text, "CIFAR-10 ResNet-18: plain network on the whole training split >= 86.50 %")
    assert whole[1:] == ["w0", "86.70 %", "met"]
    assert _row(text, "CIFAR-10 ResNet-18: soft, lambda 0.1: soft ensemble >= 87.50 %")[3] == "met"
    soft_whole = "CIFAR-10 ResNet-18: soft, lambda 0.1: soft ensemble on the whole training split >= 87.50 %"
    assert _row(text, soft_whole)[1:] == ["a0", "87.70 %", "met"]
    lines = [line.split(" | ")[0] for line in text.splitlines()]
    assert (
        lines.index(f"| {soft_whole}")
        == lines.index("| CIFAR-10 ResNet-18: soft, lambda 0.1: soft ensemble >= 87.50 %") + 1
    )
    assert [line for line in text.splitlines() if "| a0 |" in line] == [f"| {soft_whole} | a0 | 87.70 % | met |"]
    assert _row(text, "CIFAR-10 ResNet-18: soft, lambda 0.5: soft ensemble >= 87.50 %")[3] == "missed by 0.60 points"
    # soft - B-Net = 1.00 points against a spread of 0.28 + 0.07; B-Net - baseline = 1.00 against 0.28 + 0.28
    order = _row(text, "CIFAR-10 ResNet-18: soft, lambda 0.1 >= B-Net >= baseline beyond the seed spread")
    assert order[1] == "2 / 2 / 2 seeds" and order[3] == "met"
    assert order[2] == (
        "soft - B-Net +1.00 points, beyond the spread (0.35); B-Net - baseline +1.00 points, beyond the spread (0.57)"
    )
    # lambda 0.5 has one seed and lies below B-Net: missed, the spread unmeasured
    order = _row(text, "CIFAR-10 ResNet-18: soft, lambda 0.5 >= B-Net >= baseline beyond the seed spread")
    assert order[3] == "missed on one seed" and "-0.10 points, spread not measured" in order[2]
    assert _row(text, "CIFAR-100 ResNet-18: plain network >= 60.50 %")[3] == "not trained yet"
    assert _row(text, "CIFAR-100 ResNet-18: soft, lambda 0.1: soft ensemble >= 62.50 %")[3] == "met"
    what = "CIFAR-100 ResNet-18: recommended policy >= max-softmax + 1 point at 0.6 and 0.7 of the cost"
    assert _row(text, what, "c0")[2:] == [
        "0.6: +1.50; 0.7: +0.50 points",
        "missed: at 0.7 the recommended policy reads no more than the best exit within the budget (61.00 %), "
        "below max-softmax + 1 (61.50 %)",
    ]
    assert _row(text, what, "c1")[2:] == ["0.6: +1.50; 0.7: +0.70 points", "missed"]
    assert _row(text, what, "c2")[3] == (
        "missed: at 0.7 max-softmax + 1 (61.50 %) is above every exit of the network (best 61.20 %)"
    )
    noise = _row(
        text, "CIFAR-100 ResNet-18: recommended policy not below max-softmax, entropy or static beyond the noise"
    )
    assert noise[1] == "c0" and noise[3] == "missed: entropy at 0.7 (Δ [-2.00, -1.00])"
    hard = "CIFAR-10 ResNet-18: hard exit keeps the baseline's accuracy at <= 0.5 of the FLOPs"
    assert _row(text, hard, "n0")[2:] == ["86.60 % at 0.310 of the FLOPs, 2.50x; baseline 86.00 %", "met"]
    assert _row(text, hard, "n1")[3] == "missed: speed-up below 1.9x"
    assert _row(text, hard, "s0")[2:] == ["-", "not timed yet"]
    # a second timing, at the target's own budget, gets its own row; only n1 has one
    assert _row(text, f"{hard}, at budget 0.5", "n1")[2:] == [
        "85.50 % at 0.520 of the FLOPs, 2.00x; baseline 86.00 %",
        "missed: accuracy 0.50 points below, cost above 0.5",
    ]
    assert [line for line in text.splitlines() if f"{hard}, at budget 0.5 |" in line and "| n0 |" in line] == []


def test_a_rule_budget_equal_to_the_target_budget_is_judged_as_the_target_row():
    timing = {"budget": 0.5, "test": {"accuracy": 0.87, "expected_cost": 0.49}, "timing": {"speedup": 1.95}}
    rows = {
        ("cifar10", "resnet18", v): evidence_tables.Row("cifar10", "resnet18", v, runs)
        for v, runs in (
            ("baseline", [_fake_run("b0", 0, 0.86)]),
            ("branchynet", [_fake_run("n0", 0, 0.87, timing=timing)]),
        )
    }
    text = evidence_tables.targets(rows)
    hard = "CIFAR-10 ResNet-18: hard exit keeps the baseline's accuracy at <= 0.5 of the FLOPs"
    assert _row(text, f"{hard}, at budget 0.5 (the rule's own)", "n0")[2:] == [
        "87.00 % at 0.490 of the FLOPs, 1.95x; baseline 86.00 %",
        "met",
    ]
    assert sum(f"| {hard}" in line for line in text.splitlines()) == 1


def test_exits_attached_to_the_trained_baseline_are_compared_with_scratch(tree, tmp_path):
    results = tmp_path / "evidence"
    shutil.copytree(tree, results)
    base_model = tmp_path / "base"
    base = train(tiny(method="baseline", timing_images=0, report=True), base_model)
    shutil.copy2(base / "report.json", results / "digits" / "test_resnet_baseline_s0" / "report.json")
    overrides = {"weights": f"local-dir:{base / 'model'}", "frozen_epochs": 1, "epochs": 1}
    attached = train(tiny(method="soft", cost_weight=0.1, timing_images=0, **overrides), tmp_path / "attached")
    _copy(attached, results / "digits" / "test_resnet_attached_soft_l0.1_s0")
    rows = evidence_tables.load_rows(results)
    row = _row(evidence_tables.attached_table(rows), "digits", "test_resnet_attached_soft_l0.1_s0")
    rep, scratch = (
        json.loads((d / "report.json").read_text()) for d in (attached, tree / "digits" / "test_resnet_soft_l0.1_s0")
    )
    minutes = rep["training"]["seconds"] / 60
    lr = rep["recipe"]["lr"]
    assert row[2] == "1 + 1"
    assert row[3] == f"{lr:g} / {lr:g}"
    assert row[4:6] == [f"{100 * rep['test']['final_accuracy']:.2f} %", f"{100 * rep['test']['soft_accuracy']:.2f} %"]
    assert row[6] == f"{minutes:.1f}"
    base_minutes = json.loads((base / "report.json").read_text())["training"]["seconds"] / 60
    assert row[7] == f"{minutes + base_minutes:.1f}"
    assert row[8].startswith(f"{100 * scratch['test']['final_accuracy']:.2f} % / ")
    assert "exits attached to the trained baseline" in evidence_tables.table1(rows)
    # a name may state the joint stage's learning rate: its own row, compared with the same scratch run
    _copy(attached, results / "digits" / f"test_resnet_attached_lr{lr:g}_soft_l0.1_s0")
    rows = evidence_tables.load_rows(results)
    tagged = _row(evidence_tables.attached_table(rows), "digits", f"test_resnet_attached_lr{lr:g}_soft_l0.1_s0")
    assert tagged[4:] == row[4:]
    assert f"exits attached to the trained baseline, joint lr {lr:g}" in evidence_tables.table1(rows)
    # ... and must be the rate the run used
    shutil.move(
        results / "digits" / f"test_resnet_attached_lr{lr:g}_soft_l0.1_s0",
        results / "digits" / f"test_resnet_attached_lr{10 * lr:g}_soft_l0.1_s0",
    )
    with pytest.raises(SystemExit, match=f"lr {lr}"):
        evidence_tables.load_rows(results)
    shutil.rmtree(results / "digits" / f"test_resnet_attached_lr{10 * lr:g}_soft_l0.1_s0")
    # a folder named as attached whose run started from scratch is refused
    shutil.rmtree(results / "digits" / "test_resnet_attached_soft_l0.1_s0")
    digits = results / "digits"
    shutil.move(digits / "test_resnet_soft_l0.1_s0", digits / "test_resnet_attached_soft_l0.1_s0")
    with pytest.raises(SystemExit, match="weights None"):
        evidence_tables.load_rows(results)


def test_driver_starts_a_run_only_after_the_run_it_starts_from(tmp_path):
    import argparse

    args = argparse.Namespace(out=tmp_path)
    attached, base = (
        "cifar10/resnet18_attached_soft_l0.1_s0",
        run_evidence.REQUIRES["cifar10/resnet18_attached_soft_l0.1_s0"],
    )
    other = "cifar10/resnet18_baseline_s1"
    queue, summary = [attached, other], {}
    assert run_evidence._next(queue, {base: None}, summary, args) == other  # base still training
    assert run_evidence._next(queue, {base: None}, summary, args) is None and queue == [attached]
    (tmp_path / base).mkdir(parents=True)
    (tmp_path / base / "report.json").write_text("{}")
    assert run_evidence._next(queue, {}, summary, args) == attached and not summary
    (tmp_path / base / "report.json").unlink()
    queue = [attached]
    assert run_evidence._next(queue, {}, summary, args) is None and queue == []  # base failed: skipped
    assert summary[attached]["status"].startswith("skipped")
    cmd = run_evidence._train_cmd(attached, argparse.Namespace(out=tmp_path, data_dir=tmp_path, set=[], parallel=1))
    assert f"weights=local-dir:{tmp_path}/{base}/model" in cmd
    assert not any(c.startswith("timing_images=") for c in cmd)


def test_driver_refuses_a_shared_override_of_a_key_an_entry_sets_itself(tmp_path):
    attached = next(n for n in run_evidence.GRID if "_attached_lr" in n)
    joint_lr = run_evidence.GRID[attached][1]["lr"]
    assert joint_lr == pytest.approx(run_evidence.RESNET18_LR / 10) and f"_lr{joint_lr:g}_" in attached
    argv = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "runs"), "--set", "threads=1", "lr=0.05"]
    with pytest.raises(SystemExit, match=rf"{attached} sets lr={joint_lr}.*Leave the key out of --set"):
        run_evidence.main([*argv, "--only", "cifar10/resnet18_baseline_s0", attached])
    with pytest.raises(SystemExit, match="sets seed=0"):
        run_evidence.main([*argv[:-2], "seed=3", "--only", "cifar10/resnet18_baseline_s0"])
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    run_evidence._check_set(["cifar10/resnet18_baseline_s0"], ["threads=1", "lr=0.05"])  # keys no entry sets


def test_driver_keeps_timing_away_from_other_training(tmp_path):
    """Runs trained side by side skip their report's timing (a --set still wins); the timing step pauses
    the other training processes and lets them go on after, even when it fails."""
    import argparse
    import subprocess
    import time

    name = "cifar10/resnet18_soft_l0.1_s0"
    args = argparse.Namespace(out=tmp_path, data_dir=tmp_path, set=[], parallel=2)
    cmd = run_evidence._train_cmd(name, args)
    assert "timing_images=0" in cmd
    args.set = ["timing_images=50"]
    cmd = run_evidence._train_cmd(name, args)
    assert cmd.index("timing_images=50") > cmd.index("timing_images=0")  # the CLI takes the last value

    def stopped(proc, want: bool) -> bool:  # waits up to 10 s for the signal to take effect
        for _ in range(200):
            if (Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T") == want:
                return True
            time.sleep(0.05)
        return False

    if not Path("/proc/self/stat").exists():
        pytest.skip("process states are read from /proc")
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    try:
        with pytest.raises(RuntimeError), run_evidence._paused([*procs, done]):
            assert all(stopped(p, True) for p in procs)
            raise RuntimeError("timing failed")
        assert all(stopped(p, False) for p in procs)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_committed_tables_match_the_committed_runs():
    """results/evidence/tables.md, docs/evidence.md and README.md hold what the script makes of results/."""
    code, out = _quiet(evidence_tables.main, ["--check"])
    assert code == 0, out


def test_committed_timings_come_from_the_weights_of_their_committed_run():
    """Each timing's real early-exit pass reads its run's committed frontier row at that budget, to the image."""
    timings = sorted(evidence_tables.RESULTS.glob("*/*/timing*.json"))
    assert timings
    for path in timings:
        timing = json.loads(path.read_text())
        frontier = json.loads((path.parent / "frontier.json").read_text())
        rows = [r["recommended"] for r in frontier["table"] if r.get("recommended") and r["budget"] == timing["budget"]]
        assert len(rows) == 1, path
        assert {k: rows[0][k] for k in timing["frontier"]} == timing["frontier"], path
        assert timing["test"]["accuracy"] == pytest.approx(rows[0]["test_accuracy"], abs=1e-9), path
        assert timing["test"]["expected_cost"] == pytest.approx(rows[0]["test_cost"], abs=1e-6), path


def test_ordering_gap_below_beyond_the_spread_is_named_beyond_and_missed():
    # means 86.00 and 86.90, sample sds 0.14 and 0.07: the gap (-0.90) exceeds the spread (0.21) the wrong way
    gap = _evidence_targets._ordered([0.859, 0.861], [0.8685, 0.8695])
    assert gap[0] == "-0.90 points, beyond the spread (0.21)"
    assert gap[1] == pytest.approx(-0.009) and gap[2] is True
    above = _evidence_targets._ordered([0.8685, 0.8695], [0.859, 0.861])
    assert above[0] == "+0.90 points, beyond the spread (0.21)"
    assert _evidence_targets._ordering_verdict([above, above]) == "met"
    assert _evidence_targets._ordering_verdict([above, gap]) == "missed"


def test_driver_times_a_finished_run_at_its_rule_and_at_the_target_budget(tree, tmp_path):
    import argparse

    out, name = tmp_path / "runs", "digits/test_resnet_soft_l0.1_s0"
    run = out / name
    shutil.copytree(tree.parent.parent / "runs" / "soft", run)
    for f in ("timing.json", run_evidence.TARGET_TIMING):
        (run / f).unlink()
    args = argparse.Namespace(
        out=out, data_dir=tmp_path, threads=1, timing_images=4, timing_repeats=2, results=tmp_path / "results"
    )
    info = run_evidence._finish(name, args)
    rule = json.loads((run / "timing.json").read_text())
    assert "given" not in rule["budget_rule"] and rule["timing"]["images"] == 4
    # the target's own budget is timed apart only where the rule picked another one
    assert info == {"timing_returncode": 0} | (
        {} if rule["budget"] == run_evidence.TARGET_BUDGET else {"target_timing_returncode": 0}
    )
    (run / "timing.json").write_text(json.dumps({**rule, "budget": 0.3}))
    (run / run_evidence.TARGET_TIMING).unlink(missing_ok=True)
    assert run_evidence._finish(name, args) == {"target_timing_returncode": 0}
    target = json.loads((run / run_evidence.TARGET_TIMING).read_text())
    assert target["budget_rule"] == "budget 0.5 (given)"
    assert target["budget"] == run_evidence.TARGET_BUDGET and target["timing"]["images"] == 4
    copied = tmp_path / "results" / name
    assert json.loads((copied / run_evidence.TARGET_TIMING).read_text()) == target
    assert not any(copied.glob("*.safetensors"))
    # a rule that picks the target's budget itself leaves nothing to time again
    (run / run_evidence.TARGET_TIMING).unlink()
    (run / "timing.json").write_text(json.dumps({**rule, "budget": run_evidence.TARGET_BUDGET}))
    assert run_evidence._finish(name, args) == {}
    assert not (run / run_evidence.TARGET_TIMING).exists()
