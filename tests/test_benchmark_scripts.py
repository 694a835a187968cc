"""The benchmark scripts' guards: unfinished runs, filtered sweeps, damaged docs blocks and bad arguments.

Two tiny digits runs (the `tiny()` recipe of test_recipes.py) are trained once: one whose gates are
`features` gates (no fitted-gate policies apply) and one stopped after 5 of its 8 steps (unfinished). Everything
else reads small fake reports and folders, so no test trains or times a real network.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from test_recipes import tiny

from timm_exits.training.train import train

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _evidence_runs  # noqa: E402
import data_throughput  # noqa: E402
import evidence_tables  # noqa: E402
import grid_throughput  # noqa: E402
import overhead  # noqa: E402
import plan_split  # noqa: E402
import policy_frontier  # noqa: E402
import run_evidence  # noqa: E402
import speed  # noqa: E402
import speed_table  # noqa: E402
import sweep_models  # noqa: E402
import sweep_table  # noqa: E402
import time_recommended  # noqa: E402

UNFINISHED = "3 of 30 epochs, step 1053"


def _stdout(fn, *args) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        fn(*args)
    return out.getvalue()


def _exit(capsys, fn, *args) -> tuple[int | str | None, str]:
    """Run a script's main that must stop; its exit status and the last line of its stderr."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1] if err else ""


def _cli(monkeypatch, capsys, main, *argv: str) -> tuple[int | str | None, str]:
    """A script's main that reads sys.argv, run with `argv`: its exit status and last stderr line."""
    monkeypatch.setattr(sys, "argv", [f"{main.__module__}.py", *argv])
    return _exit(capsys, main)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench_runs")
    return {
        "features": train(tiny(gate="features", timing_images=0), root / "features"),
        "unfinished": train(tiny(epochs=2, stop_after_steps=5, timing_images=0), root / "unfinished"),
    }


# ------------------------------------------------------------------ unfinished runs (evidence pipeline)
def _report(unfinished: str | None, epochs: int = 30, trained: int | None = None) -> dict:
    training = {} if trained is None else {"epochs": trained, "planned_epochs": epochs, "unfinished": unfinished}
    recipe = {k: 1 for k in _evidence_runs.BUDGET_KEYS} | {"epochs": epochs, "seed": 0, "val_split": 5000}
    recipe |= {"cost_weight": 0.1, "lr": 0.1, "weights": None}
    return {"dataset": "cifar10", "method": "baseline", "recipe": recipe, "training": training}


def test_run_evidence_resumes_a_run_whose_report_says_unfinished(tmp_path, monkeypatch):
    name = "cifar10/resnet18_baseline_s0"
    run, results = tmp_path / "out" / name, tmp_path / "results"
    run.mkdir(parents=True)
    (run / "checkpoint.safetensors").write_bytes(b"")
    (run / "report.json").write_text(json.dumps(_report(UNFINISHED, trained=3)))
    started: list[list[str]] = []

    class Done:  # a training process that has already ended, leaving the run as it was
        returncode = 0

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(run_evidence.subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or Done())
    monkeypatch.setattr(run_evidence.time, "sleep", lambda s: None)
    argv = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--results", str(results), "--only", name]
    summary = json.loads(_stdout(run_evidence.main, argv))["runs"][name]
    assert len(started) == 1 and "--resume" in started[0] and "train" in started[0]
    assert summary["status"] == f"unfinished: training stopped after {UNFINISHED}"
    assert not (results / name).exists()  # never copied into the results tree
    (run / "report.json").write_text(json.dumps(_report(None, trained=30)))
    summary = json.loads(_stdout(run_evidence.main, argv))["runs"][name]
    assert summary["status"] == "done before" and len(started) == 1
    assert (results / name / "report.json").is_file()


def test_evidence_tables_refuse_an_unfinished_report(tmp_path):
    run = tmp_path / "cifar10" / "resnet18_baseline_s0"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(_report(UNFINISHED, trained=3)))
    with pytest.raises(SystemExit) as e:
        evidence_tables.main(["--results", str(tmp_path), "--check"])
    message = str(e.value.code)
    assert message.startswith("cifar10/resnet18_baseline_s0: its report is of an unfinished run")
    assert f"stopped after {UNFINISHED}" in message and "--only cifar10/resnet18_baseline_s0" in message
    assert "\n" not in message


def test_budget_reads_the_epochs_trained_and_old_reports_their_recipe():
    assert _evidence_runs.budget(_report(None, epochs=30, trained=20))["epochs"] == 20
    assert _evidence_runs.budget(_report(None, epochs=30))["epochs"] == 30  # an old report: no training fields
    old = _report(None)
    del old["training"]
    assert _evidence_runs.budget(old)["epochs"] == 30


# ------------------------------------------------------------------ unfinished runs (policy scripts)
def test_policy_scripts_refuse_an_unfinished_run_unless_asked(runs, tmp_path, capsys):
    run = runs["unfinished"]
    code, line = _exit(capsys, policy_frontier.main, ["--run", str(run), "--threads", "1"])
    assert code == 2 and "holds an unfinished run (training stopped after 1 of 2 epochs" in line
    assert "--unfinished" in line
    frontier = json.loads(_stdout(policy_frontier.main, ["--run", str(run), "--threads", "1", "--unfinished"]))
    assert frontier["training"] == {"epochs": 1, "planned_epochs": 2, "unfinished": "1 of 2 epochs, step 4"}
    (run / "frontier.json").write_text(json.dumps(frontier))
    argv = ["--run", str(run), "--threads", "1", "--images", "2", "--repeats", "1", "--warmup", "0"]
    code, line = _exit(capsys, time_recommended.main, argv)
    assert code == 2 and "holds an unfinished run" in line
    timed = json.loads(_stdout(time_recommended.main, [*argv, "--unfinished"]))
    assert timed["training"]["unfinished"] == "1 of 2 epochs, step 4" and timed["timing"]["repeats"] == 1
    code, line = _exit(capsys, plan_split.main, ["--run", str(run), "--out", str(tmp_path / "plan")])
    assert code == 2 and "holds an unfinished run" in line and not (tmp_path / "plan").exists()


# ------------------------------------------------------------------ features gates
def test_policy_frontier_skips_fitted_gates_on_a_features_gate_run(runs):
    frontier = json.loads(_stdout(policy_frontier.main, ["--run", str(runs["features"]), "--threads", "1"]))
    assert frontier["gate_fit_skipped"] == (
        "fit_gates re-fits stats gates only, and this model's gates are 'features' (recipe key gate)"
    )
    assert frontier["gate_fits"] == {} and frontier["training"]["unfinished"] is None
    assert frontier["recommended"]["candidates"] == ["confidence", "entropy", "static"]
    for row in frontier["table"]:
        assert not [k for k in row if k.startswith("gate_fitted")]
        assert {"static", "confidence", "entropy", "gate_joint"} <= set(row)
        if row["recommended"] is not None:
            assert row["recommended"]["policy"] in ("confidence", "entropy", "static")
    assert frontier["table"][-1]["recommended"] is not None


# ------------------------------------------------------------------ the model sweep
def test_a_filtered_sweep_keeps_the_files_summary_config_and_machine(tmp_path, monkeypatch):
    names = ["resnet18", "resnet34", "vit_tiny_patch16_224"]
    records = {n: {"status": "ok", "exits": 4, "time_s": 1.0} for n in names}
    config, machine = {"filter": "*", "timeout_cpu_s": 600.0}, {"git_head": "abc1234"}
    out = tmp_path / "sweep.json"
    sweep_models.write_results(out, {"machine": machine, "config": config, "summary": {}, "records": records})
    for key in sweep_models.THREAD_ENV:  # the sweep sets them for its workers; restored after the test
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with warnings.catch_warnings():
            _stdout(sweep_models.main, ["--out", str(out), "--filter", "resnet18", "--limit", "0", "--quiet"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    data = json.loads(out.read_text())
    assert data["config"] == config and data["machine"] == machine and data["records"] == records
    assert data["summary"]["models_listed"] == len(timm.list_models())
    assert data["summary"]["models_done"] == 3 and data["summary"]["ok"] == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--limit", "-1"], "argument --limit: -1 is negative; give 0 or more"),
        (["--jobs", "0"], "argument --jobs: 0 is not a positive count; give 1 or more"),
        (["--jobs", "-2"], "argument --jobs: -2 is not a positive count; give 1 or more"),
        (["--restart-every", "0"], "argument --restart-every: 0 is not a positive count; give 1 or more"),
    ],
    ids=["limit-negative", "jobs-zero", "jobs-negative", "restart-every-zero"],
)
def test_sweep_models_refuses_bad_counts(tmp_path, monkeypatch, capsys, argv, message):
    def no_worker(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(sweep_models, "Worker", no_worker)  # were a count let through, no model is run
    for key in sweep_models.THREAD_ENV:
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    out = tmp_path / "sweep.json"
    code, line = _exit(capsys, sweep_models.main, ["--out", str(out), "--filter", "resnet18", "--quiet", *argv])
    assert code == 2 and line == f"{Path(sys.argv[0]).name}: error: {message}"
    assert not out.exists()  # refused before any model list or results file


def test_sweep_models_imports_no_torch_before_its_thread_settings():
    """The script sets the thread variables before torch is first imported; its helper module imports none."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import sweep_models; print({'torch', 'timm'} & set(sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "set()"


def test_sweep_table_prints_the_committed_sweep_as_the_docs_quote_it():
    """All of its output on the committed results/sweep_models.json, the list of models beyond the limits included,
    is the block docs/compatibility.md quotes."""
    results = BENCH.parent / "results" / "sweep_models.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / "sweep_table.py"), str(results)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    doc = (BENCH.parent / "docs" / "compatibility.md").read_text()
    assert run.stdout.strip() in doc


def test_sweep_table_counts_the_records_whatever_the_summary_says(tmp_path, monkeypatch):
    records = {n: {"status": "ok", "exits": 4} for n in ("a", "b", "c")}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"summary": {"models_listed": 1}, "records": records}))
    monkeypatch.setattr(sys, "argv", ["sweep_table.py", str(path)])
    text = _stdout(sweep_table.main)
    assert text.startswith("All 3 models:\n") and "| **pass in all** | **3 of 3 (100.0 %)** |" in text


# ------------------------------------------------------------------ damaged docs blocks
BLOCK = "<!-- evidence tables: {0} -->\nold\n<!-- end evidence tables: {0} -->\n"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("# Doc\n\n<!-- evidence tables: summary -->\nold\n<!-- end evidence tables: summary  -->\n", 3),
        ("# Doc\n\n<!-- evidence tables: summary-->\nold\n<!-- end evidence tables: summary -->\n", 3),
        ("# Doc\n\n" + BLOCK.format("table1") + "<!-- end evidence tables: runs -->\n", 6),
    ],
    ids=["end-marker-spaced", "start-marker-unspaced", "end-without-start"],
)
def test_check_fails_on_a_damaged_marker_naming_file_and_line(tmp_path, text, line):
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    with pytest.raises(SystemExit) as e:
        evidence_tables.main(["--results", str(tmp_path), "--docs", str(doc), "--check"])
    assert str(e.value.code).startswith(f"{doc}:{line}: damaged or unpaired evidence tables marker")


def test_check_fails_when_a_doc_lacks_a_block_it_must_hold(tmp_path, monkeypatch):
    doc = tmp_path / "README.md"
    doc.write_text("# Doc\n\nA page quoting `<!-- evidence tables: NAME -->` in code.\n\n" + BLOCK.format("table1"))
    _stdout(evidence_tables.main, ["--results", str(tmp_path), "--docs", str(doc)])  # tables.md and the block
    check = ["--results", str(tmp_path), "--docs", str(doc), "--check"]
    assert _stdout(evidence_tables.main, check) == ""  # current, and a marker quoted in code is text
    monkeypatch.setattr(evidence_tables, "DOC_BLOCKS", {doc.resolve(): ("table1", "summary")}, raising=False)
    with pytest.raises(SystemExit) as e:
        evidence_tables.main(check)
    assert str(e.value.code) == f"{doc}: the evidence tables block 'summary' is missing"
    monkeypatch.setattr(evidence_tables, "DOC_BLOCKS", {})
    doc.write_text("# Doc that lost its markers\n")
    with pytest.raises(SystemExit) as e:
        evidence_tables.main(check)
    assert str(e.value.code) == f"{doc}: holds no evidence tables block"


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    ("main", "argv", "message"),
    [
        (run_evidence.main, ["--parallel", "0"], "argument --parallel: 0 is not a positive count"),
        (run_evidence.main, ["--timing-images", "-1"], "argument --timing-images: -1 is negative"),
        (time_recommended.main, ["--images", "0"], "argument --images: 0 is not a positive count"),
        (time_recommended.main, ["--repeats", "0"], "argument --repeats: 0 is not a positive count"),
        (policy_frontier.main, ["--threads", "0"], "argument --threads: 0 is not a positive count"),
        (plan_split.main, ["--repeats", "0"], "argument --repeats: 0 is not a positive count"),
    ],
    ids=[
        "run_evidence-parallel",
        "run_evidence-timing-images",
        "time_recommended-images",
        "time_recommended-repeats",
        "policy_frontier-threads",
        "plan_split-repeats",
    ],
)
def test_counts_below_one_are_refused(tmp_path, monkeypatch, capsys, main, argv, message):
    monkeypatch.setattr(run_evidence.subprocess, "Popen", lambda *a, **k: pytest.fail("a training was started"))
    base = {run_evidence.main: ["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]}
    code, line = _exit(capsys, main, [*base.get(main, ["--run", str(tmp_path)]), *argv])
    assert code == 2 and line.endswith(message + ("; give 0 or more" if "negative" in message else "; give 1 or more"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("main", "argv", "message"),
    [
        (speed.main, ["--repeats", "0", "--models", "resnet18"], "argument --repeats: 0 is not a positive count"),
        (speed.main, ["--batches", "0", "--models", "resnet18"], "argument --batches: 0 is not a positive count"),
        (overhead.main, ["--models", "resnet_nonexistent"], "--models: timm has no model 'resnet_nonexistent'"),
        (overhead.main, ["--repeats", "0"], "argument --repeats: 0 is not a positive count"),
        (data_throughput.main, ["--data-dir", "D", "--repeats", "0"], "argument --repeats: 0 is not a positive"),
        (grid_throughput.main, ["--data-dir", "D", "--repeats", "0"], "argument --repeats: 0 is not a positive"),
        (grid_throughput.main, ["--data-dir", "D", "--steps", "0"], "argument --steps: 0 is not a positive"),
    ],
    ids=[
        "speed-repeats",
        "speed-batches",
        "overhead-unknown-model",
        "overhead-repeats",
        "data_throughput-repeats",
        "grid_throughput-repeats",
        "grid_throughput-steps",
    ],
)
def test_sys_argv_scripts_refuse_bad_counts_and_models(monkeypatch, capsys, main, argv, message):
    code, line = _cli(monkeypatch, capsys, main, *argv)
    assert code == 2 and message in line


def test_time_recommended_without_frontier_says_how_to_make_it(tmp_path, capsys):
    code, line = _exit(capsys, time_recommended.main, ["--run", str(tmp_path), "--threads", "1"])
    assert code == 2 and line.endswith(
        f"error: {tmp_path} has no frontier.json: run python benchmarks/policy_frontier.py --run {tmp_path} > "
        f"{tmp_path / 'frontier.json'} first"
    )


def test_speed_table_refuses_a_file_that_is_not_speed_output(monkeypatch, capsys):
    other = BENCH / "results" / "overhead.json"
    code, line = _cli(monkeypatch, capsys, speed_table.main, str(other))
    assert code == 2 and line.endswith(f"error: {other} is not speed.py output (benchmark: overhead)")
    assert capsys.readouterr().out == ""  # no half table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--uplink", "0"], "argument --uplink: 0 is not a positive finite number; give e.g. 10 or 0.5"),
        (["--downlink", "nan"], "argument --downlink: nan is not a positive finite number"),
        (["--rtt", "-5"], "argument --rtt: -5 is negative or not finite; give 0 or more"),
        (["--device-speed", "0"], "argument --device-speed: 0 is not a positive finite number"),
        (["--server-speed", "inf"], "argument --server-speed: inf is not a positive finite number"),
    ],
    ids=["uplink-0", "downlink-nan", "rtt-negative", "device-speed-0", "server-speed-inf"],
)
def test_plan_split_script_refuses_a_bad_link_before_training(monkeypatch, capsys, argv, message):
    """A zero bandwidth trained the model for a minute, then stopped with a traceback (NaN gave a NaN plan)."""
    monkeypatch.setattr(plan_split, "_train", lambda *a, **k: pytest.fail("a model was trained"))
    code, line = _exit(capsys, plan_split.main, argv)
    assert code == 2 and message in line


def test_bench_restores_the_callers_thread_count_and_reports_the_one_it_timed_with(runs):
    """`benchmark(threads=N)` left torch at N threads for the rest of the caller's process."""
    from timm_exits.training.timing import benchmark

    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    res = benchmark(runs["features"], policies=["confidence"], images=2, repeats=1, warmup=0, threads=other)
    assert torch.get_num_threads() == before
    assert res["timing"]["threads"] == other
    with pytest.raises(ValueError, match=r"batch_size=0: give 1 or more images per call"):
        benchmark(runs["features"], batch_size=0)
    assert torch.get_num_threads() == before
