"""Run folders shared with the user: one trainer at a time, `~` paths, inputs `--overwrite` would delete,
evaluation keys changed on resume, and the policy stored with ``model/``.

Training runs use `tiny()` from test_recipes (digits, `test_resnet`, one short epoch on one thread).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from test_recipes import tiny

from timm_exits.training.cli import main as cli_main
from timm_exits.training.report import evaluate
from timm_exits.training.run_folder import RunFolderError, run_lock
from timm_exits.training.timing import benchmark
from timm_exits.training.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One tiny trained run with its report and saved model (no timing)."""
    return train(tiny(timing_images=0), tmp_path_factory.mktemp("folders") / "run")


def test_a_second_trainer_in_a_locked_folder_is_refused_and_writes_nothing(tmp_path):
    folder = tmp_path / "run"
    with run_lock(folder):
        with pytest.raises(RunFolderError, match="another timm-exits process is training in .*nothing was written"):
            train(tiny(timing_images=0), folder)
        assert [p.name for p in folder.iterdir()] == [".timm-exits-lock"]  # the lock, nothing else
    assert not folder.exists()  # the lock's own folder goes with it, as nothing was written there
    with pytest.raises(RunFolderError, match="holds no timm-exits run"):
        train(tiny(timing_images=0), folder, resume=True)
    assert not folder.exists()
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(RunFolderError, match="afile exists and is not a folder"):
        train(tiny(timing_images=0), tmp_path / "afile")


def test_home_relative_run_folders_are_expanded(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(run, tmp_path / "r")
    report = evaluate("~/r", timing=False, log=lambda line: None)
    assert json.loads((tmp_path / "r" / "report.json").read_text())["created"] == report["created"]
    res = benchmark("~/r", policies=["confidence"], images=4, repeats=1, warmup=0, threads=1)
    assert res["policies"]["confidence"]["threshold"] == report["policies"]["confidence"]["threshold"]
    assert not (tmp_path / "~").exists()


def test_overrides_after_an_option_and_file_system_errors_on_the_command_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    argv = ["train", "-c", "digits_quick", "--output", str(tmp_path / "afile" / "sub"), "epochs=1"]
    assert cli_main([*argv, "lr=0.1"]) == 2  # lr=0.1 after --output is an override, not an unknown argument
    err = capsys.readouterr().err.strip()
    assert err.startswith("timm-exits train: error: ") and "afile" in err and "\n" not in err
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("key", ["init_checkpoint", "weights"])
def test_overwrite_refuses_a_starting_point_inside_the_run_it_deletes(run, tmp_path, key):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    before = (folder / "checkpoint.safetensors").read_bytes()
    start = {"init_checkpoint": str(folder / "checkpoint.safetensors"), "weights": f"local-dir:{folder / 'model'}"}
    with pytest.raises(RunFolderError, match=rf"{key}=.* lies in .*--overwrite would delete"):
        train(tiny(timing_images=0, lr=0.02, **{key: start[key]}), folder, overwrite=True)
    assert (folder / "checkpoint.safetensors").read_bytes() == before


def test_resuming_a_finished_run_with_new_evaluation_keys_says_how_to_apply_them(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    before = (folder / "report.json").read_bytes()
    train(tiny(timing_images=0, timing_repeats=3), folder, resume=True)  # a timing key: the report stands
    assert "made with other keys" not in (folder / "train.log").read_text()
    train(tiny(timing_images=0, calibrate_max_drop=0.05), folder, resume=True)
    assert (folder / "report.json").read_bytes() == before  # an earlier `eval` is never undone on its own
    assert (
        f"(calibrate_max_drop: 0.01 -> 0.05): `timm-exits eval {folder}` uses them"
        in (folder / "train.log").read_text()
    )
    report = evaluate(folder, timing=False, log=lambda line: None)  # recipe.yaml now holds the new keys
    assert report["policies"]["gate"]["calibration"]["max_accuracy_drop"] == 0.05


def test_eval_says_when_the_stored_policy_changes_and_bench_follows_the_saved_model(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    lines: list[str] = []
    evaluate(folder, policy="confidence", target_cost=0.6, timing=False, log=lines.append)
    assert any("stored policy gate" in line and "replaced by confidence at threshold" in line for line in lines)
    saved = json.loads((folder / "model" / "report.json").read_text())
    lines.clear()
    evaluate(folder, policy="entropy", target_cost=0.6, timing=False, save_model=False, log=lines.append)
    assert any("keeps its stored policy confidence" in line and "now recommends entropy" in line for line in lines)
    res = benchmark(folder, policies=["confidence"], images=4, repeats=1, warmup=0, threads=1)
    assert res["policies"]["confidence"]["threshold"] == saved["policies"]["confidence"]["threshold"]


def test_weights_files_get_the_mode_the_umask_gives_new_files(run, tmp_path):
    from timm_exits import hub

    mask = os.umask(0o027)  # one that no file mode here matches by chance
    try:
        hub.save_pretrained(hub.from_pretrained(run / "model"), tmp_path / "saved")
    finally:
        os.umask(mask)
    for rel in ("model.safetensors", "exits.safetensors"):
        assert stat.S_IMODE((tmp_path / "saved" / rel).stat().st_mode) == 0o640, rel
    for rel in ("checkpoint.safetensors", "model/model.safetensors", "model/exits.safetensors"):
        assert stat.S_IMODE((run / rel).stat().st_mode) == 0o666 & ~mask, rel  # safetensors alone writes 0600


def test_eval_moves_a_models_config_after_its_weights_and_the_report_last(run, tmp_path, monkeypatch):
    import timm_exits.training.runfiles as runfiles

    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    moved: list[str] = []
    replace = os.replace
    monkeypatch.setattr(
        runfiles.os, "replace", lambda a, b: moved.append(Path(b).relative_to(folder).as_posix()) or replace(a, b)
    )
    evaluate(folder, timing=False, log=lambda line: None)
    assert moved[-1] == "report.json" and "report.md" in moved
    weights = [moved.index(n) for n in ("model/model.safetensors", "model/exits.safetensors")]
    assert moved.index("model/config.json") > max(weights)


def test_a_write_into_a_read_only_folder_reports_the_write_not_the_cleanup(tmp_path, monkeypatch):
    import errno

    from timm_exits.training.runfiles import atomic_write_text

    def refused(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", refused)
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "no")))
    with pytest.raises(PermissionError):
        atomic_write_text(tmp_path / "x.json", "{}")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_stop_before_any_checkpoint_says_resume_cannot_continue(tmp_path):
    early = train(tiny(epochs=2, timing_images=0), tmp_path / "early", stop_after_steps=2)  # 4 steps per epoch
    assert not (early / "checkpoint.safetensors").exists()
    log = (early / "train.log").read_text()
    assert "stopped after 2 steps (stop_after_steps); no checkpoint was written yet" in log
    assert "--resume continues" not in log
    later = train(tiny(epochs=2, timing_images=0), tmp_path / "later", stop_after_steps=5)  # after epoch 1's
    log = (later / "train.log").read_text()
    assert "stopped after 5 steps (stop_after_steps); --resume continues from the last checkpoint." in log


def test_eval_refuses_an_unfinished_run_unless_asked_and_reports_the_epochs_it_trained(tmp_path, capsys):
    folder = train(tiny(epochs=2, timing_images=0), tmp_path / "run", stop_after_steps=5)  # 4 steps per epoch
    before = _files(folder)
    assert cli_main(["eval", str(folder), "--no-timing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-exits eval: error: ") and err.count("\n") == 1
    assert "unfinished run (training stopped after 1 of 2 epochs, step 4); nothing was written" in err
    assert f"`timm-exits train -c {folder / 'recipe.yaml'} --output {folder} --resume stop_after_steps=null`" in err
    assert _files(folder) == before
    bench = ["bench", str(folder), "--images", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert cli_main(bench) == 2  # bench refuses it as eval does
    err = capsys.readouterr().err
    assert err.startswith("timm-exits bench: error: ") and err.count("\n") == 1
    assert "unfinished run (training stopped after 1 of 2 epochs, step 4)" in err and "--unfinished" in err

    assert cli_main(["eval", str(folder), "--no-timing", "--unfinished"]) == 0
    training = json.loads((folder / "report.json").read_text())["training"]
    assert (training["epochs"], training["planned_epochs"], training["steps"]) == (1, 2, 4)
    assert training["unfinished"] == "1 of 2 epochs, step 4"
    assert "Trained 1 epochs (4 steps) (unfinished: 1 of 2 epochs, step 4) in " in (folder / "report.md").read_text()
    card = (folder / "model" / "README.md").read_text()  # the card pushed to the Hub says so too
    assert "Training did not finish: it stopped after 1 of 2 epochs, step 4 (1 of the 2 planned epochs trained)" in card
    assert cli_main([*bench, "--unfinished", "--policy", "gate"]) == 0

    resume = ["train", "-c", str(folder / "recipe.yaml"), "--output", str(folder), "--resume", "stop_after_steps=null"]
    assert cli_main(resume) == 0  # the command the error gives finishes the run and reports it
    training = json.loads((folder / "report.json").read_text())["training"]
    assert (training["epochs"], training["planned_epochs"], training["steps"], training["unfinished"]) == (
        2,
        2,
        8,
        None,
    )


def test_evals_policy_and_calibration_options_are_the_recipe_its_report_and_model_card_show(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    assert cli_main(["eval", str(folder), "--policy", "confidence", "--target-cost", "0.7", "--no-timing"]) == 0
    report = json.loads((folder / "report.json").read_text())
    assert (report["recipe"]["policy"], report["recipe"]["calibrate_target_cost"]) == ("confidence", 0.7)
    assert report["policies"]["confidence"]["calibration"]["target_cost"] == 0.7
    card = (folder / "model" / "README.md").read_text()
    assert "- policy: confidence\n" in card and "- calibrate_target_cost: 0.7\n" in card
    train(tiny(timing_images=0), folder, resume=True)  # the recipe's own keys differ from those the report applied
    changed = "(policy: 'confidence' -> 'gate'; calibrate_target_cost: 0.7 -> None)"
    assert changed in (folder / "train.log").read_text()

    train(tiny(timing_images=0, calibrate_target_cost=0.7), folder, resume=True)  # a target cost in recipe.yaml
    assert cli_main(["eval", str(folder), "--max-accuracy-drop", "0.05", "--no-timing"]) == 0
    report = json.loads((folder / "report.json").read_text())
    recipe = report["recipe"]
    assert (recipe["policy"], recipe["calibrate_max_drop"], recipe["calibrate_target_cost"]) == ("gate", 0.05, None)
    calibration = report["policies"]["gate"]["calibration"]
    assert (calibration["max_accuracy_drop"], calibration["target_cost"]) == (0.05, None)


def test_gates_are_re_fitted_only_where_they_are_stats_gates(tmp_path, capsys):
    folder = train(tiny(gate="features", timing_images=0), tmp_path / "run")
    report = json.loads((folder / "report.json").read_text())
    why = "fit_gates 'no_gain' re-fits stats gates only, and this model's gates are 'features'"
    assert report["gate_fit"] is None and report["recipe"]["fit_gates"] == "no_gain"
    assert report["gate_fit_skipped"] == why
    assert f"gates not re-fitted: {why}" in (folder / "train.log").read_text()
    assert f"use the jointly trained gates (not re-fitted: {why})" in (folder / "report.md").read_text()

    before = _files(folder)
    assert cli_main(["eval", str(folder), "--fit-gates", "correct", "--no-timing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-exits eval: error: --fit-gates correct re-fits stats gates only, and this run's gates")
    assert err.count("\n") == 1 and _files(folder) == before
    assert cli_main(["eval", str(folder), "--fit-gates", "none", "--no-timing"]) == 0
    report = json.loads((folder / "report.json").read_text())
    assert report["gate_fit"] is None and report["gate_fit_skipped"] is None


def test_bench_refuses_a_saved_model_and_report_made_from_another_step(run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    path = folder / "model" / "report.json"
    report = json.loads(path.read_text())
    steps = report["training"]["steps"]
    report["training"]["steps"] = steps - 1  # as after `train --resume` moved the checkpoint on
    path.write_text(json.dumps(report))
    bench = ["bench", str(folder), "--images", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert cli_main([*bench, "--policy", "confidence"]) == 2
    assert capsys.readouterr().err == (
        f"timm-exits bench: error: the saved model and report were made from step {steps - 1}; the checkpoint is "
        f"at step {steps}: run `timm-exits eval {folder}` first\n"
    )
    del report["training"]["steps"]  # a report from before `training.steps` was written: not checked
    path.write_text(json.dumps(report))
    assert cli_main([*bench, "--policy", "confidence"]) == 0


def test_report_md_after_no_save_names_no_stored_policy_and_no_saved_gates(run, tmp_path):
    stored = (run / "report.md").read_text()  # written with the model saved
    assert "| `gate` (stored) |" in stored and "the saved model holds the re-fitted gates" in stored
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    evaluate(folder, policy="entropy", timing=False, save_model=False, log=lambda line: None)
    md = (folder / "report.md").read_text()
    assert "| `entropy` (recommended) |" in md and "(stored)" not in md
    assert "the saved model holds" not in md
    assert "This evaluation did not rewrite `run/model` (--no-save): the model saved there keeps the policy" in md


def test_report_md_states_the_accuracy_drop_as_report_json_does(run):
    from timm_exits.training.report import render_markdown

    report = json.loads((run / "report.json").read_text())
    for drop, text in ((0.0025, "within 0.25 points"), (0.0004, "within 0.04 points"), (0.01, "within 1 points")):
        report["policies"]["gate"]["calibration"]["max_accuracy_drop"] = drop
        assert text in render_markdown(report, {}, run), drop
