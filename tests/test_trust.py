"""Bad inputs and trust: packaged recipes, nothing of the user's lost, all-or-nothing writes, Ctrl-C, clear errors.

Training runs use `tiny()` from test_recipes (digits, `test_resnet`, one short epoch on one thread).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import yaml
from test_recipes import tiny

import timm_exits
from timm_exits import hub
from timm_exits.training.checkpoint import load_checkpoint, save_checkpoint
from timm_exits.training.cli import main as cli_main
from timm_exits.training.recipe import RECIPE_DIR, RecipeError, list_recipes, load_recipe
from timm_exits.training.report import CalibrationError
from timm_exits.training.run_folder import RunFolderError, _clear_run
from timm_exits.training.runfiles import MANIFEST_NAME, Staging, read_manifest, remove_stale_temporaries
from timm_exits.training.train import TrainingInterrupted, _Trainer, train

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One tiny trained run with its report and saved model (no timing)."""
    return train(tiny(timing_images=0), tmp_path_factory.mktemp("trust") / "run")


# ------------------------------------------------------------------------------------------ packaging
def test_recipes_are_selected_by_name_listed_and_still_taken_by_path(tmp_path, capsys):
    by_path = load_recipe(RECIPE_DIR / "digits_quick.yaml")
    assert load_recipe("digits_quick") == by_path == load_recipe("digits_quick.yaml")
    assert load_recipe("cifar10_resnet18").data.dataset == "cifar10"
    with pytest.raises(FileNotFoundError, match="Did you mean digits_quick.*Shipped recipes.*cifar10_resnet18"):
        load_recipe("digits_quik")

    # a user's recipe next to no other file may name a shipped recipe as its base
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: cifar10_resnet18.yaml\nlr: 0.01\n")
    r = load_recipe(mine)
    assert r.optim.lr == 0.01 and r.name == "mine" and r.data.dataset == "cifar10"
    assert r.optim.epochs == load_recipe("cifar10_resnet18").optim.epochs

    assert cli_main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = sorted(p for p in RECIPE_DIR.glob("*.yaml") if not p.name.startswith("_"))
    assert [line.split()[0] for line in lines] == [p.stem for p in shipped]
    for line, path in zip(lines, shipped):
        first = next(x for x in path.read_text().splitlines() if x.startswith("#")).lstrip("#").strip()
        assert line.split(None, 1)[1] == first
    assert list_recipes()["digits_quick"].startswith("Quick end-to-end run")


def test_wheel_carries_recipes_and_card_templates(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("timm_exits-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted(RECIPE_DIR.glob("*.yaml")) + sorted((ROOT / "timm_exits" / "hub" / "hub_cards").glob("*.md")):
        assert path.relative_to(ROOT).as_posix() in names, path.name
    assert not any(n.startswith(("recipes/", "hub_cards/", "tests/")) for n in names)


def test_malformed_recipe_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet18\nlr: 0.1\n  epochs: 3\nbatch_size: 8\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml, line 3, column \d+: not valid YAML"):
        load_recipe(bad)
    assert cli_main(["train", "-c", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.yaml, line 3" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------- nothing lost
def test_overwrite_deletes_only_the_files_the_tool_wrote(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    listed = read_manifest(folder)
    assert set(listed) | {MANIFEST_NAME} == set(snapshot(folder))  # every file there was written by the tool
    assert {"report.json", "model/config.json", "plots/gate_histograms.png", "checkpoint.safetensors"} <= set(listed)
    mine = {"model/my_weights.txt": b"my weights", "plots/fig1.png": b"my figure", "notes.txt": b"keep me"}
    for rel, data in mine.items():
        (folder / rel).write_bytes(data)

    train(tiny(timing_images=0, lr=0.02), folder, overwrite=True)  # another recipe replaces the run
    after = snapshot(folder)
    assert {k: after[k] for k in mine} == mine
    assert yaml.safe_load(after["recipe.yaml"])["lr"] == json.loads(after["run.json"])["identity"]["lr"] == 0.02
    assert set(read_manifest(folder)) == set(after) - set(mine) - {MANIFEST_NAME}
    log = after["train.log"].decode()
    assert "left 3 other file(s) in place" in log and "notes.txt" in log


def test_overwrite_refuses_a_user_file_at_a_path_the_run_writes(tmp_path):
    folder = tmp_path / "mine"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    (folder / "notes.txt").write_text("keep me")
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match=r"did not write.*model/config\.json"):
        train(tiny(), folder, overwrite=True)
    assert snapshot(folder) == before


@pytest.mark.parametrize("run_json", ['{"experiment": "another tool"}', "{not json", "[1, 2]"])
def test_a_run_json_timm_exits_did_not_write_is_never_taken_for_a_run(tmp_path, run_json):
    folder = tmp_path / "theirs"
    for rel, data in {"run.json": run_json, "report.json": "{}", "train.log": "their log",
                      "model/model.safetensors": "their weights", "notes.txt": "keep me"}.items():  # fmt: skip
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(data)
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match="holds no timm-exits run"):
        train(tiny(), folder)
    with pytest.raises(RunFolderError, match=r"did not write at paths a run writes: \['model/model.safetensors', "):
        train(tiny(), folder, overwrite=True)
    with pytest.raises(RunFolderError, match="nothing to resume"):
        train(tiny(), folder, resume=True)
    assert snapshot(folder) == before


def test_a_manifest_that_lists_paths_outside_its_folder_deletes_nothing(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    victim = tmp_path / "victim.txt"
    victim.write_text("not the tool's")
    manifest = folder / MANIFEST_NAME
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({"files": [*data["files"], "../victim.txt"]}))
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match=r"lists paths outside its folder \(\['../victim.txt'\]\)"):
        train(tiny(timing_images=0), folder, overwrite=True)
    assert victim.read_text() == "not the tool's" and snapshot(folder) == before


def test_overwrite_keeps_a_subfolder_the_user_made_a_symlink(run, tmp_path):
    folder, elsewhere = tmp_path / "run", tmp_path / "plots-elsewhere"
    shutil.copytree(run, folder)
    shutil.move(folder / "plots", elsewhere)
    (folder / "plots").symlink_to(elsewhere, target_is_directory=True)  # holding only the tool's plots
    train(tiny(timing_images=0), folder, overwrite=True)
    assert (folder / "plots").is_symlink()
    assert (elsewhere / "accuracy_vs_cost.png").is_file()  # the new run's plot, written through the link


def test_failing_train_with_overwrite_keeps_the_old_run(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    before = snapshot(folder)
    with pytest.raises(FileNotFoundError, match=r"cifar10 not found under data_dir=.*nope"):
        train(tiny(dataset="cifar10", data_dir=str(tmp_path / "nope")), folder, overwrite=True)
    with pytest.raises(RecipeError, match="calibrate_target_cost=0.01 is below .* >= 0"):
        train(tiny(calibrate_target_cost=0.01), folder, overwrite=True)
    with pytest.raises(RecipeError, match=r"batch_size 256 is larger than the train split \(128 samples\)"):
        train(tiny(batch_size=256), folder, overwrite=True)  # found only once the loaders exist
    assert snapshot(folder) == before


def test_unreachable_target_cost_fails_and_rewrites_nothing(run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    before = snapshot(folder)
    cheapest = float(hub.from_pretrained(folder / "model").exit_costs.min())
    assert cli_main(["eval", str(folder), "--target-cost", "0.01", "--no-timing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of reach" in err and f"{math.ceil(cheapest * 1e4) / 1e4:.4f}" in err
    assert snapshot(folder) == before
    # the smallest target the message gives is accepted, and records what it reached
    target = float(re.search(r"at least ([0-9.]+)", err).group(1))
    assert cli_main(["eval", str(folder), "--target-cost", str(target), "--no-timing", "--threads", "1"]) == 0
    gate = json.loads((folder / "report.json").read_text())["policies"]["gate"]["calibration"]
    assert gate["target_cost"] == target and gate["val_expected_cost"] <= target + 1e-9
    assert "error" not in gate


def test_the_smallest_target_cost_an_error_gives_is_rounded_up():
    from timm_exits.training.report import _unreachable

    message = _unreachable(0.3209, 0.320917, Path("run"))
    assert "reaches on the val split is 0.3210 " in message
    assert "Give a target of at least 0.3210, e.g. --target-cost 0.3210." in message


@pytest.mark.parametrize("content", ['{"policies": ', "[1, 2]", '{"policies": {"gate": {"threshold": "x"}}}'])
def test_bench_on_a_damaged_model_report_json_is_a_one_line_error(run, tmp_path, capsys, content):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    (folder / "model" / "report.json").write_text(content)
    argv = ["bench", str(folder), "--images", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"timm-exits bench: error: {folder / 'model' / 'report.json'}") and err.count("\n") == 1
    assert f"run `timm-exits eval {folder}` again" in err


def test_a_threshold_for_the_soft_policy_is_a_one_line_error(run, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    before = snapshot(folder)
    assert cli_main(["eval", str(folder), "--policy", "soft", "--threshold", "0.5", "--no-timing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'soft' averages every exit and has none" in err
    assert snapshot(folder) == before


@pytest.mark.parametrize("run_json", ["{truncated", '{"experiment": "another tool"}'])
def test_eval_of_a_folder_with_a_damaged_or_foreign_run_json_is_a_one_line_error(run, tmp_path, capsys, run_json):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    (folder / "run.json").write_text(run_json)
    before = snapshot(folder)
    assert cli_main(["eval", str(folder), "--no-timing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("cannot be read" in err or "not written by timm-exits" in err)
    assert snapshot(folder) == before


def test_a_flag_and_an_override_that_disagree_are_a_one_line_error(tmp_path, capsys):
    argv = ["train", "-c", "digits_quick", "--output", str(tmp_path / "r"), "--data-dir", "/a", "data_dir=/b"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data-dir and the override data_dir=/b disagree" in err
    argv = ["train", "-c", "digits_quick", "--output", str(tmp_path / "r"), "--no-progress", "runtime.progress=true"]
    assert cli_main(argv) == 2
    assert "--no-progress and the override runtime.progress=True disagree" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_eval_that_fails_midway_changes_nothing(run, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    before = snapshot(folder)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(timm_exits.training.report, "render_markdown", broken)
    with pytest.raises(OSError, match="disk full"):
        timm_exits.training.report.evaluate(folder, timing=False, policy="entropy", log=lambda m: None)
    assert snapshot(folder) == before and not list(folder.glob(".timm-exits-staging-*"))
    with pytest.raises(CalibrationError, match="out of reach"):
        timm_exits.training.report.evaluate(folder, timing=False, target_cost=0.001, log=lambda m: None)
    assert snapshot(folder) == before


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    stop = {"stop_after_steps": 2, "checkpoint_every_steps": 1, "report": False}
    folder = train(tiny(**stop), tmp_path / "run")
    (folder / "checkpoint.safetensors").unlink()
    before = snapshot(folder)
    with pytest.raises(RunFolderError, match=r"checkpoint\.safetensors is missing.*--overwrite"):
        train(tiny(**stop), folder, resume=True)
    assert snapshot(folder) == before
    with pytest.raises(RunFolderError, match="nothing to resume"):
        train(tiny(), tmp_path / "never", resume=True)
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_checkpoints_at_the_step_boundary_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    recipe = tiny(epochs=2, ema=True, ema_decay=0.9, mixup=0.2, exit_drop_rate=0.1, report=False)
    full = train(recipe, tmp_path / "full")

    step = _Trainer._step

    def step_then_ctrl_c(self, *args, **kwargs):
        loss = step(self, *args, **kwargs)
        if self.pos.step == 4:  # the 5th step (the first of epoch 2) is running: Ctrl-C arrives now
            signal.raise_signal(signal.SIGINT)
        return loss

    monkeypatch.setattr(_Trainer, "_step", step_then_ctrl_c)
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(json.dumps(recipe))
    code = cli_main(["train", "-c", str(recipe_file), "--output", str(tmp_path / "cut")])
    assert code == 130
    err = capsys.readouterr().err
    final = [line for line in err.splitlines() if line.startswith("timm-exits")]
    assert final == [
        f"timm-exits train: interrupted at step 5; checkpoint written, continue with --resume "
        f"(--output {tmp_path / 'cut'})."
    ]
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
    _, meta = load_checkpoint(tmp_path / "cut")
    assert meta["position"]["step"] == 5 and meta["position"]["batch"] == 1

    monkeypatch.setattr(_Trainer, "_step", step)
    train(recipe_file, tmp_path / "cut", resume=True)
    a, b = load_checkpoint(full), load_checkpoint(tmp_path / "cut")
    for prefix in ("model", "ema"):
        assert a[0][prefix].keys() == b[0][prefix].keys()
        for k, v in a[0][prefix].items():
            torch.testing.assert_close(b[0][prefix][k], v, rtol=1e-5, atol=1e-6, msg=f"{prefix}/{k}")
    assert b[1]["position"]["done"] and b[1]["position"]["step"] == 8
    assert issubclass(TrainingInterrupted, KeyboardInterrupt)


_KILLED_SAVE = r"""
import os, signal, sys
import timm, torch
import timm_exits
from timm_exits.hub import save

torch.manual_seed(0)
model = timm_exits.wrap(timm.create_model("test_resnet", num_classes=10), input_size=(3, 32, 32))
card = save.render_model_card


def sigterm_while_writing(*args, **kwargs):  # `kill PID` or a scheduler's time limit, mid-save
    os.kill(os.getpid(), signal.SIGTERM)
    return card(*args, **kwargs)


save.render_model_card = sigterm_while_writing
model.save_pretrained(sys.argv[1])
"""


def test_a_save_killed_by_sigterm_leaves_no_staging_folder_after_the_next_save(tmp_path):
    folder = tmp_path / "m"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(folder)], env=env, stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=180)
    assert child.returncode == -signal.SIGTERM, err.decode()[-2000:]
    (killed,) = folder.iterdir()  # its staging folder, named after the dead process
    assert re.fullmatch(rf"\.saving-{child.pid}-[A-Za-z0-9._]*-[a-z0-9_]+", killed.name)
    assert {p.name for p in killed.iterdir()} == {"config.json", "model.safetensors", "exits.safetensors"}

    running = folder / killed.name.replace(f"-{child.pid}-", f"-{os.getppid()}-", 1)  # a save still running
    running.mkdir()
    old = folder / ".saving-k3j4l5m6"  # a name without a process id, from an hour and more ago
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    recent = folder / ".saving-a1b2c3d4"  # the same, but recent: its save may still run
    recent.mkdir()

    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("test_resnet", num_classes=10), input_size=(3, 32, 32))
    model.save_pretrained(folder)
    names = {"config.json", "model.safetensors", "exits.safetensors", "README.md"}
    assert {p.name for p in folder.iterdir()} == names | {running.name, recent.name}
    loaded = timm_exits.from_pretrained(folder)
    assert loaded.config.exits == model.config.exits and torch.equal(loaded.exit_costs, model.exit_costs)


_KILLED_WRITES = r"""
import os, signal, sys
from pathlib import Path
from torch import nn
from timm_exits.training import checkpoint
from timm_exits.training.runfiles import Staging

folder = Path(sys.argv[1])
save = checkpoint.safetensors.torch.save_file


def save_then_kill(*args, **kwargs):  # `kill -9` (or a lost node) before the checkpoint is moved into place
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


checkpoint.safetensors.torch.save_file = save_then_kill
with Staging(folder) as stage:  # an eval killed before it moved its files into place
    stage.path("report.json").write_text("{}")
    stage.path("model/model.safetensors").write_bytes(b"weights")
    checkpoint.save_checkpoint(folder / "checkpoint.safetensors", nn.Linear(2, 2), {"step": 1})
"""


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, int]:
    """A run folder (the tool's files in its manifest, and a user's notes.txt) where a process was killed with
    SIGKILL while it staged eval's files and wrote a checkpoint; returns the folder and the process id."""
    folder = tmp_path_factory.mktemp("killed") / "run"
    folder.mkdir()
    (folder / "run.json").write_text("{}")
    (folder / "notes.txt").write_text("the user's")
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": ["run.json", "checkpoint.safetensors"]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITES, str(folder)], env=env, stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=180)
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    return folder, child.pid


def _leftovers(folder: Path, pid: int) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if re.search(rf"[-.]{pid}(\b|-)", p.name))


@pytest.mark.parametrize("command", ["eval", "checkpoint"])
def test_temporaries_of_a_killed_command_are_removed_by_the_next_command(killed, tmp_path, command):
    folder = tmp_path / "run"
    shutil.copytree(killed[0], folder)
    pid = killed[1]
    left = _leftovers(folder, pid)
    assert len(left) == 2  # the staging folder, and the checkpoint being written
    running = [name.replace(str(pid), str(os.getppid()), 1) for name in left]  # the same, of commands still running
    for name, like in zip(running, left):
        if (folder / like).is_dir():
            shutil.copytree(folder / like, folder / name)
        else:
            shutil.copy(folder / like, folder / name)
    users = [".timm-exits-staging-drafts", ".notes.txt.tmp-1"]  # a user's names that look like temporaries
    for name in users:
        (folder / name).write_text("the user's")
        os.utime(folder / name, (time.time() - 7200, time.time() - 7200))
    if command == "eval":
        with Staging(folder) as stage:
            stage.path("report.json").write_text("{}")
            stage.commit()
    else:
        save_checkpoint(folder / "checkpoint.safetensors", torch.nn.Linear(2, 2), {"step": 2})
        assert load_checkpoint(folder)[1]["step"] == 2
    assert _leftovers(folder, pid) == []
    assert all((folder / name).exists() for name in running + users)
    assert (folder / "notes.txt").read_text() == "the user's"


def test_temporaries_named_without_their_host_are_removed_once_an_hour_old(tmp_path):
    old = [".timm-exits-staging-4242", ".checkpoint.safetensors.tmp-4242", ".run.json.tmp-4242"]  # earlier names
    recent = [".timm-exits-staging-4343", ".checkpoint.safetensors.tmp-4343"]
    for name in old + recent:
        path = tmp_path / name
        if "staging" in name:
            (path / "plots").mkdir(parents=True)
            (path / "plots" / "a.png").write_bytes(b"png")
        else:
            path.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    for name in old:
        for p in [tmp_path / name, *(tmp_path / name).rglob("*")]:
            os.utime(p, (two_hours_ago, two_hours_ago))
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(recent)


def test_overwrite_takes_a_killed_commands_temporaries_for_the_tools_files(killed, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(killed[0], folder)
    (staging,) = (name for name in _leftovers(folder, killed[1]) if "staging" in name)
    running = staging.replace(str(killed[1]), str(os.getppid()), 1)  # a staging folder of an eval still running
    shutil.copytree(folder / staging, folder / running)
    removed, kept = _clear_run(folder)  # what --overwrite does before its message "left N other file(s) in place"
    assert "run.json" in removed and kept == ["notes.txt"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["notes.txt", running])


# -------------------------------------------------------------------------------------- argument ranges
@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "RUN", "--batch-size", "0"], "argument --batch-size: 0 is out of range; valid range: [1, inf)"),
        (["eval", "RUN", "--threshold", "2"], "argument --threshold: 2 is out of range; valid range: [0, 1]"),
        (["eval", "RUN", "--threshold", "nan"], "argument --threshold: nan is out of range; valid range: [0, 1]"),
        (["eval", "RUN", "--target-cost", "0"], "argument --target-cost: 0 is out of range; valid range: (0, inf)"),
        (["push", "RUN", "--repo-id", "name"], "argument --repo-id: 'name' is not of the form ORG/NAME"),
        (["eval", "RUN", "--bogus"], "unrecognized arguments: --bogus"),
        (["recipe", "-c", "digits_quick", "--data-dir", "x"], "unrecognized arguments: --data-dir"),
        (["eval", "RUN", "--device", "gpu"], "argument --device: device=gpu: not a device; use auto, cpu, cuda"),
    ],
)
def test_out_of_range_arguments_exit_2_with_the_valid_range(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"timm-exits {argv[0]}: error: {message}" in err  # the command's name and its usage
    assert err.startswith(f"usage: timm-exits {argv[0]} ")


def test_a_diverging_training_is_one_line_saying_how_to_fix_it(tmp_path, capsys):
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(json.dumps(tiny(lr=1e12, epochs=2)))
    assert cli_main(["train", "-c", str(recipe_file), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("timm-exits train: error:")]
    assert re.search(r"error: loss is (nan|-?inf) at step \d+ .*lower lr, set clip_grad, or switch amp off\.$", line)


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_eval_and_bench_refuse_a_gpu_that_is_not_visible_and_take_cuda_as_cuda_0(command, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        cli_main([command, "RUN", "--device", "cuda:1"])
    assert e.value.code == 2
    assert "argument --device: device=cuda:1: no such CUDA device is visible (cuda:1 asked for, 0 visible)" in (
        capsys.readouterr().err
    )
    from timm_exits.training.cli import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [_device(d) for d in ("cuda", "cuda:1", "cpu")] == ["cuda:0", "cuda:1", "cpu"]


# ----------------------------------------------------------------------------------------------- wrap
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wrap_half_and_bf16_backbones(dtype):
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    low = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    low.load_state_dict(backbone.state_dict())
    low.to(dtype)
    torch.manual_seed(1)
    ref = timm_exits.wrap(backbone, input_size=(3, 32, 32)).eval()
    torch.manual_seed(1)
    model = timm_exits.wrap(low, input_size=(3, 32, 32)).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.exit_costs.dtype == torch.float32
    torch.testing.assert_close(model.exit_costs, ref.exit_costs)  # same FLOPs in any dtype
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got, want = model(x.to(dtype)), ref(x)
    assert torch.isfinite(got.log_probs.float()).all()
    # rounding only: measured max |diff| 2.8e-4 (fp16) and 2.6e-3 (bf16), while the rows of one exit lie
    # 1.2e-2 or more apart, so a sample's logits must also be nearest to its own float32 row
    atol = 1e-3 if dtype == torch.float16 else 5e-3
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=atol)
        assert torch.equal(torch.cdist(a.float(), b).argmin(dim=1), torch.arange(len(x)))
    pred = model.predict(x.to(dtype), policy="confidence", threshold=0.0)
    assert pred.exit_index.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(pred.logits.float(), want.logits[0], rtol=0, atol=atol)
    cast = timm_exits.wrap(timm.create_model("test_resnet", num_classes=10), input_size=(3, 32, 32)).to(dtype)
    assert cast.exit_costs.dtype == torch.float32 and torch.equal(cast.exit_costs, ref.exit_costs)  # not rounded
    assert {p.dtype for p in cast.parameters()} == {dtype}
    model.reset_classifier(5)  # the new classifiers take the model's dtype
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        assert [tuple(t.shape) for t in model(x.to(dtype)).logits] == [(4, 5)] * model.num_exits


def test_wrap_refuses_a_name_a_compiled_model_and_mixed_dtypes():
    with pytest.raises(TypeError, match=r"not the name 'resnet18'.*timm\.create_model\('resnet18'"):
        timm_exits.wrap("resnet18")
    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    with pytest.raises(TypeError, match=r"torch\.compile\(\)d.*wrap\(compiled\._orig_mod\)"):
        timm_exits.wrap(torch.compile(backbone))
    backbone.fc.to(torch.float16)
    with pytest.raises(TypeError, match=r"mix dtypes \['float16', 'float32'\]"):
        timm_exits.wrap(backbone, input_size=(3, 32, 32))
