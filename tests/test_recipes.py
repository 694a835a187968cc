"""Training recipes end to end on tiny offline runs: methods, report, resume, CLI, data and bad input.

Every run uses scikit-learn's bundled digits, `test_resnet` at 32x32, a 128-image train subset, one
thread and one short epoch, so the whole file takes well under a minute on 2 idle cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import yaml
from PIL import Image

from timm_exits import collect, hub, predict
from timm_exits.training.build import build_model
from timm_exits.training.checkpoint import CheckpointError, load_checkpoint, load_run
from timm_exits.training.cli import main as cli_main
from timm_exits.training.data import build_datasets, load_splits, make_loader
from timm_exits.training.recipe import RECIPE_DIR, Recipe, RecipeError, load_recipe
from timm_exits.training.report import evaluate
from timm_exits.training.run_folder import RunFolderError
from timm_exits.training.sampling import ShardSampler
from timm_exits.training.timing import machine_name
from timm_exits.training.train import train

RECIPES = RECIPE_DIR
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(**overrides) -> dict:
    """A recipe that trains in a few seconds on 2 CPU cores."""
    base = {
        "name": "tiny",
        "model": "test_resnet",
        "dataset": "digits",
        "img_size": 32,
        "max_train_samples": 128,
        "max_eval_samples": 64,
        "batch_size": 32,
        "eval_batch_size": 64,
        "num_workers": 0,
        "epochs": 1,
        "lr": 0.05,
        "hflip": 0.0,
        "threads": 1,
        "progress": False,
        "timing_images": 3,
        "timing_repeats": 1,
        "timing_warmup": 1,
    }
    base.update(overrides)
    return base


def model_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    groups, _ = load_checkpoint(run_dir)
    return groups["model"]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------- methods
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One short run per method (branchynet with a frozen stage first, baseline under bf16 autocast)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    variants = (
        ("soft", {}),
        ("branchynet", {"frozen_epochs": 1}),
        ("baseline", {"amp": "bf16", "channels_last": True}),
    )
    for method, extra in variants:
        out[method] = train(tiny(method=method, **extra), root / method)
    return out


@pytest.mark.parametrize("method", ["soft", "branchynet", "baseline"])
def test_method_trains_one_epoch_and_writes_a_valid_report(runs, method):
    run = runs[method]
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == method and report["model"] == "test_resnet" and report["dataset"] == "digits"
    assert report["recipe"]["method"] == method and set(Recipe().flat()) <= set(report["recipe"])
    exits = report["exits"]
    assert exits[-1]["name"] == "final" and len(exits) >= 2
    costs = [e["cost"] for e in exits]
    assert costs == sorted(costs) and 0 < costs[0] < 1
    test = report["test"]
    assert len(test["exit_accuracy"]) == len(exits) and test["num_samples"] == 64
    assert all(0 <= a <= 1 for a in test["exit_accuracy"])
    assert test["final_accuracy"] == test["exit_accuracy"][-1] and 0 <= test["soft_accuracy"] <= 1
    for name in ("gate", "confidence", "entropy", "gate_0.5", "soft"):
        pol = report["policies"][name]
        assert 0 <= pol["accuracy"] <= 1 and costs[0] - 1e-9 <= pol["expected_cost"] <= costs[-1] + 1e-9
        assert len(pol["exit_distribution"]) == len(exits) and abs(sum(pol["exit_distribution"]) - 1) < 1e-6
        assert pol["ms_per_image"] > 0 and pol["speedup"] > 0
    assert report["policies"]["gate_0.5"]["threshold"] == 0.5
    assert report["policies"]["gate"]["calibration"]["split"] == "val"
    fit = report["gate_fit"]  # stats gates are re-fitted on the val split before calibration
    assert fit["objective"] == "no_gain" and fit["split"] == "val" and fit["loss_after"] < fit["loss_before"]
    joint = report["policies"]["gate_joint"]
    assert joint["ms_per_image"] > 0 and len(joint["exit_distribution"]) == len(exits)
    # the report's figures, recomputed from the saved model on the recipe's test split
    saved = hub.from_pretrained(run / "model").eval()
    recipe = load_run(run).recipe
    data = build_datasets(recipe.data, saved, load_splits(recipe.data), seed=recipe.seed)
    test_images = make_loader(data.test, 64, train=False)
    assert test["exit_accuracy"] == pytest.approx(collect(saved, test_images).exit_accuracy, abs=1e-6)
    images, labels = map(torch.cat, zip(*test_images))
    stored = predict(saved, images, labels=labels)  # the policy and thresholds stored with the model
    assert report["policies"][report["recommended_policy"]]["accuracy"] == pytest.approx(stored.stats.accuracy)
    assert report["policies"][report["recommended_policy"]]["expected_cost"] == pytest.approx(
        stored.stats.expected_cost, abs=1e-6
    )
    soft = predict(saved, images, policy="soft", labels=labels)  # the saved gates' mixture of every exit
    assert report["policies"]["soft"]["accuracy"] == pytest.approx(soft.stats.accuracy)
    if report["gate_fit"] is not None:
        assert test["soft_accuracy_fitted_gates"] == pytest.approx(soft.stats.accuracy)
    timing = report["timing"]
    assert timing["batch_size"] == 1 and timing["threads"] == 1 and timing["baseline_ms_per_image"] > 0
    for name, pol in report["policies"].items():  # every row timed against the one baseline the report shows
        assert pol["speedup"] == timing["baseline_ms_per_image"] / pol["ms_per_image"], name
    assert isinstance(timing["machine"], str) and timing["repeats"] == 1

    md = (run / "report.md").read_text()
    assert "#1: " in md and "Soft-conditional ensemble" in md and "ms / image" in md
    # every epoch records where it ran; the report sums them per machine
    where = history(run)[0]["runtime"]
    assert where["machine"] == machine_name() and where["processes"] == 1 and where["threads"] >= 1
    assert all(h["runtime"] == where for h in history(run))
    assert report["training"]["runtimes"] == [{**where, "epochs": len(history(run))}]
    assert f"s on {machine_name()} ({where['threads']} threads x 1 process(es))." in md
    for png in ("gate_histograms", "accuracy_vs_cost", "exit_distribution"):
        data = (run / "plots" / f"{png}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, png

    # one log line per epoch with per-exit val accuracy and the gate policy's exit distribution
    log = (run / "train.log").read_text()
    epochs = [line for line in log.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == (2 if method == "branchynet" else 1)
    assert all("val exits" in line and "soft" in line and "#1: " in line for line in epochs)
    rec = history(run)[-1]
    assert len(rec["val"]["exit_accuracy"]) == len(exits) and len(rec["val"]["gate"]["exit_distribution"]) == len(exits)

    # the saved model loads back strictly and carries the stored policy with its calibrated threshold
    model = hub.from_pretrained(run / "model")
    assert model.config.policy == report["recommended_policy"]
    expected = {"soft": "gate", "branchynet": "entropy", "baseline": "confidence"}[method]
    assert report["recommended_policy"] == expected
    thr = report["policies"][expected]["threshold"]
    assert model.config.thresholds == pytest.approx([thr] * (len(exits) - 1))


def test_logged_lr_is_the_schedules_rate_with_layer_decay(tmp_path):
    """With `layer_decay` the log and metrics.jsonl give the schedule's rate, not the stem's decayed one."""
    recipe = tiny(method="soft", frozen_epochs=1, epochs=1, sched="cosine", warmup_epochs=0, report=False)
    plain = history(train(recipe, tmp_path / "plain"))
    decayed = history(train({**recipe, "layer_decay": 0.5}, tmp_path / "decayed"))
    assert [h["lr"] for h in decayed] == pytest.approx([h["lr"] for h in plain])
    assert all(h["lr"] > 0 for h in plain)


def test_frozen_stage_keeps_backbone_and_batchnorm_fixed(tmp_path):
    recipe = tiny(method="soft", frozen_epochs=1, epochs=0, sched="onecycle", warmup_epochs=3, report=False)
    run = train(recipe, tmp_path / "frozen")
    log = (run / "train.log").read_text().splitlines()
    assert "stage frozen: warm-up capped at 0.5 epoch(s), half the stage's 1 (warmup_epochs 3)" in log
    torch.manual_seed(0)
    fresh = build_model(load_recipe(tiny()).model, 10, 32).state_dict()
    saved = model_tensors(run)
    classifier = "backbone.fc."
    for k, v in fresh.items():
        if k.startswith("backbone.") and not k.startswith(classifier):
            assert torch.equal(saved[k], v), f"{k} changed in the frozen stage"
    changed = [k for k in saved if k.startswith("branches.") and not torch.equal(saved[k], fresh[k])]
    assert changed, "exit heads / gates were not trained"
    assert not torch.equal(saved["backbone.fc.weight"], fresh["backbone.fc.weight"])


def test_soft_cost_weight_is_warmed_up(runs, tmp_path):
    rec = history(runs["soft"])[-1]
    # one epoch of 4 steps with cost_warmup 0.2 of 4 steps: lambda reaches cost_weight
    assert rec["train"]["cost_weight"] == pytest.approx(Recipe().method.cost_weight)
    assert "soft_ce" in rec["train"] and "exit_ce" in rec["train"]
    # warmed up over the whole run (2 epochs of 4 steps): lambda = cost_weight * step / 8 at each epoch's last step
    slow = train(tiny(method="soft", epochs=2, cost_warmup=1.0, cost_weight=0.4, report=False), tmp_path / "warm")
    assert [h["train"]["cost_weight"] for h in history(slow)] == pytest.approx([0.4 * 3 / 8, 0.4 * 7 / 8])


@pytest.mark.slow  # compiles each stage's forward and backward: minutes on 2 cores
def test_compiled_training_follows_the_eager_run(tmp_path):
    recipe = tiny(method="soft", frozen_epochs=1, epochs=1, report=False, exit_drop_rate=0.3)  # dropout included
    eager = train(recipe, tmp_path / "eager")
    compiled = train({**recipe, "compile": True}, tmp_path / "compiled")
    a, b = model_tensors(eager), model_tensors(compiled)
    assert a.keys() == b.keys()
    for k, v in a.items():  # fused kernels round differently: close, not bitwise equal
        torch.testing.assert_close(b[k], v, rtol=1e-2, atol=5e-3, msg=k)
    losses = [[h["train"]["loss"] for h in history(run)] for run in (eager, compiled)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-3)


# ------------------------------------------------------------------------------------ resume
def test_resume_after_a_kill_mid_epoch_ends_like_an_uninterrupted_run(tmp_path):
    recipe = tiny(
        epochs=2,
        ema=True,
        ema_decay=0.9,
        mixup=0.2,
        exit_drop_rate=0.1,
        checkpoint_every_steps=2,
        report=False,
    )
    full = train(recipe, tmp_path / "full")
    killed = train(recipe, tmp_path / "killed", stop_after_steps=7)
    _, meta = load_checkpoint(killed)
    assert meta["position"]["step"] == 6 and meta["position"]["batch"] == 2  # mid-epoch checkpoint
    with pytest.raises(RunFolderError, match="--resume"):
        train(recipe, tmp_path / "killed")
    train(recipe, tmp_path / "killed", resume=True)

    a, b = load_checkpoint(full), load_checkpoint(killed)
    for prefix in ("model", "ema"):
        assert a[0][prefix].keys() == b[0][prefix].keys()
        for k, v in a[0][prefix].items():
            torch.testing.assert_close(b[0][prefix][k], v, rtol=1e-5, atol=1e-6, msg=f"{prefix}/{k}")
    ha, hb = history(full), history(killed)
    assert len(ha) == len(hb) == 2
    for ra, rb in zip(ha, hb):
        assert ra["val"]["exit_accuracy"] == pytest.approx(rb["val"]["exit_accuracy"])
        assert ra["train"]["loss"] == pytest.approx(rb["train"]["loss"], rel=1e-5)
    assert b[1]["position"]["done"]


def test_a_user_threshold_applies_to_the_refit_gates_and_leaves_the_joint_gates_calibrated(runs, tmp_path):
    plain, forced = tmp_path / "plain", tmp_path / "forced"
    for run in (plain, forced):
        shutil.copytree(runs["soft"], run)
    evaluate(plain, policy="gate", timing=False, save_model=False, log=lambda m: None)
    evaluate(forced, policy="gate", threshold=0.123, timing=False, save_model=False, log=lambda m: None)
    a, b = (json.loads((r / "report.json").read_text())["policies"] for r in (plain, forced))
    assert b["gate"]["threshold"] == pytest.approx(0.123) and b["gate"]["calibration"]["overridden_by_user"]
    assert "overridden_by_user" not in b["gate_joint"]["calibration"]
    assert b["gate_joint"]["threshold"] == a["gate_joint"]["threshold"]
    assert b["gate_joint"]["accuracy"] == a["gate_joint"]["accuracy"]


# --------------------------------------------------------------------------------------- CLI
def test_cli_recipe_eval_and_bench(runs, tmp_path, capsys):
    assert cli_main(["recipe", "-c", str(RECIPES / "digits_quick.yaml"), "epochs=2", "--set", "lr=0.01"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["epochs"] == 2 and printed["lr"] == 0.01 and printed["name"] == "digits_quick"

    run = tmp_path / "copy"
    shutil.copytree(runs["soft"], run)
    assert cli_main(["eval", str(run), "--policy", "entropy", "--no-timing", "--threads", "1"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["recommended_policy"] == "entropy"
    assert hub.from_pretrained(run / "model").config.policy == "entropy"
    assert "policy entropy" in capsys.readouterr().out

    # runtime overrides of the evaluation: the gate re-fit objective and the number of timed images
    assert cli_main(["eval", str(run), "--fit-gates", "correct", "--timing-images", "3", "--threads", "1"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["gate_fit"]["objective"] == "correct" and report["timing"]["images"] == 3
    assert report["policies"]["gate"]["ms_per_image"] > 0
    capsys.readouterr()

    assert cli_main(["bench", str(run), "--images", "2", "--repeats", "1", "--warmup", "0", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["timing"]["baseline_ms_per_image"] > 0
    assert set(bench["policies"]) == {"gate", "confidence", "entropy", "soft"}


def test_backbone_starts_from_a_users_timm_checkpoint(runs, tmp_path):
    saved = runs["baseline"] / "model"
    reference = safetensors.torch.load_file(str(saved / "model.safetensors"))
    for weights in (f"local-dir:{saved}", str(saved / "model.safetensors")):
        recipe = load_recipe(tiny(), {"weights": weights, "method": "soft", "frozen_epochs": 1, "epochs": 0})
        model = build_model(recipe.model, 10, recipe.data.img_size)
        state = model.backbone.state_dict()
        assert reference.keys() <= state.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
        plain = build_model(load_recipe(tiny()).model, 10, 32)
        assert not torch.equal(plain.backbone.conv1[0].weight, state["conv1.0.weight"])
    five = build_model(load_recipe(tiny(), {"weights": str(saved / "model.safetensors")}).model, 5, 32)
    five = five.backbone.state_dict()
    assert five["fc.weight"].shape[0] == 5 and torch.equal(five["conv1.0.weight"], reference["conv1.0.weight"])
    with pytest.raises(RecipeError, match="hold a 'test_resnet'.*set model: test_resnet"):
        build_model(load_recipe(tiny(), {"weights": f"local-dir:{saved}", "model": "resnet18"}).model, 10, 32)
    with pytest.raises(FileNotFoundError, match="weights file .*not found"):
        build_model(load_recipe(tiny(), {"weights": str(tmp_path / "missing.safetensors")}).model, 10, 32)
    with pytest.raises(FileNotFoundError, match=r"weights local-dir: folder '.*missing' not found; give a folder"):
        build_model(load_recipe(tiny(), {"weights": f"local-dir:{tmp_path / 'missing'}"}).model, 10, 32)
    with pytest.raises(FileNotFoundError, match=r"weights local-dir: '.*' has no config.json; give a folder saved"):
        build_model(load_recipe(tiny(), {"weights": f"local-dir:{tmp_path}"}).model, 10, 32)


def test_weights_for_other_classes_need_a_stage_that_trains_the_classifier(tmp_path):
    from timm.models import save_for_hf

    seven = timm.create_model("test_resnet", num_classes=7)
    save_for_hf(seven, tmp_path / "seven", safe_serialization=True)
    file = tmp_path / "seven.safetensors"
    safetensors.torch.save_file(seven.state_dict(), str(file))
    frozen_only = {"method": "soft", "frozen_epochs": 1, "epochs": 0, "frozen_train_classifier": False}
    for weights in (f"local-dir:{tmp_path / 'seven'}", str(file)):
        spec = load_recipe(tiny(), {"weights": weights, **frozen_only}).model
        with pytest.raises(RecipeError, match=r"made for another number of classes than the data's 10, .*stay random"):
            build_model(spec, 10, 32, classifier_trained=False)
        fresh = build_model(spec, 10, 32, classifier_trained=True).backbone  # a stage trains the new classifier
        assert fresh.fc.weight.shape[0] == 10
        assert torch.equal(fresh.layer1[0].conv1.weight, seven.layer1[0].conv1.weight)
        kept = build_model(spec, 7, 32, classifier_trained=False).backbone  # its own classes: nothing to train
        assert torch.equal(kept.fc.weight, seven.fc.weight)
    recipe = load_recipe(tiny(), {"weights": str(file), **frozen_only})
    with pytest.raises(RecipeError, match="frozen_train_classifier: true or epochs above 0"):
        train(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_a_weights_file_of_another_image_size_is_a_recipe_error(tmp_path):
    vit = timm.create_model("test_vit", num_classes=10, img_size=32)
    safetensors.torch.save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    recipe = load_recipe(tiny(), {"model": "test_vit", "weights": str(tmp_path / "vit.safetensors")})
    with pytest.raises(RecipeError, match=r"of another shape \['pos_embed \(1, 5, 64\) \(model: \(1, 101, 64\)\)'\]"):
        build_model(recipe.model, 10, 32)  # the recipe forgot model_kwargs: {img_size: 32}
    fits = load_recipe(
        tiny(), {"model": "test_vit", "weights": str(tmp_path / "vit.safetensors"), "model_kwargs": {"img_size": 32}}
    )
    state = build_model(fits.model, 10, 32).backbone.state_dict()
    assert torch.equal(state["pos_embed"], vit.state_dict()["pos_embed"])


def test_every_recipe_file_resolves():
    files = sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith("_"))
    assert len(files) >= 16
    methods = set()
    for path in files:
        r = load_recipe(path)
        assert r.name == path.stem
        methods.add(r.method.method)
        for m in ("baseline", "branchynet", "soft"):
            assert load_recipe(path, {"method": m}).method.method == m
    grid = {p.stem for p in files}
    for ds in ("cifar10", "cifar100", "cinic10"):
        for arch in ("resnet18", "vgg13", "alexnet"):
            assert f"{ds}_{arch}" in grid
    assert "digits_quick" in grid


def test_alexnet_cifar_builds_with_auto_exits_and_saves_as_a_timm_model(tmp_path):
    recipe = load_recipe(RECIPES / "cifar10_alexnet.yaml")
    model = build_model(recipe.model, 10, recipe.data.img_size).eval()
    assert [b.name for b in model.branches] == ["stages.1", "stages.2", "stages.3"]
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert len(out.logits) == 4 and out.final.shape == (2, 10)
    back = hub.from_pretrained(hub.save_pretrained(model, tmp_path / "alexnet"))
    torch.testing.assert_close(back(x).log_probs, out.log_probs)


@pytest.mark.parametrize("name", ["alexnet_cifar", "vgg13_cifar"])
def test_cifar_networks_answer_timms_intermediate_feature_api(name):
    """forward_intermediates, features_only and prune_intermediate_layers give the stage outputs that
    forward hooks on the feature_info modules see."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    hooks = [
        model.get_submodule(f["module"]).register_forward_hook(lambda m, i, o: seen.append(o))
        for f in model.feature_info
    ]
    logits = model(x)
    for h in hooks:
        h.remove()
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 5 and all(torch.equal(a, b) for a, b in zip(inter, seen))
    torch.testing.assert_close(model.forward_head(final), logits)
    early = model.forward_intermediates(x, indices=[1, 2], stop_early=True, intermediates_only=True)
    assert [t.shape[1] for t in early] == [model.feature_info[i]["num_chs"] for i in (1, 2)]
    assert torch.equal(early[1], seen[2])
    feats = timm.create_model(name, features_only=True, out_indices=(1, 2))
    feats.load_state_dict(
        {
            k.replace(".", "_", 1): v
            for k, v in model.state_dict().items()
            if k[:9] in ("stages.0.", "stages.1.", "stages.2.")
        }
    )
    assert all(torch.equal(a, b) for a, b in zip(feats.eval()(x), early))
    assert feats.feature_info.channels() == [model.feature_info[i]["num_chs"] for i in (1, 2)]
    assert model.prune_intermediate_layers([2]) == [2]
    assert len(model.stages) == 3 and model.num_features == seen[2].shape[1]
    torch.testing.assert_close(model(x), seen[2].mean((2, 3)))
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


# -------------------------------------------------------------------------------------- data
def test_shard_sampler_splits_global_batches_exactly():
    one = ShardSampler(50, 1, 0, shuffle=True, seed=3, batch_size=8)
    two = [ShardSampler(50, 2, r, shuffle=True, seed=3, batch_size=4) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(1)
    assert one.batches_per_epoch == two[0].batches_per_epoch == 6
    full, parts = list(one), [list(s) for s in two]
    for step in range(6):
        glob = set(full[8 * step : 8 * step + 8])
        assert glob == set(parts[0][4 * step : 4 * step + 4]) | set(parts[1][4 * step : 4 * step + 4])
    one.set_epoch(1, start_batch=2)
    assert list(one) == full[16:]
    ev = [list(ShardSampler(11, 2, r, shuffle=False)) for r in range(2)]
    assert sorted(ev[0] + ev[1]) == list(range(11))


def test_digits_splits_are_fixed_and_disjoint():
    cfg = load_recipe(None, {"dataset": "digits"}).data
    a, b = load_splits(cfg), load_splits(cfg)
    assert a.train[1] == b.train[1] and a.test[1] == b.test[1]
    tr, va, te = set(a.train[1]), set(a.val[1]), set(a.test[1])
    assert not (tr & va or tr & te or va & te) and len(tr | va | te) == 1797
    data = build_datasets(cfg, seed=0)
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10 and data.num_classes == 10


def _image_tree(root: Path, splits: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder_tree_holds_out_val_when_missing(tmp_path):
    _image_tree(tmp_path, {"train": 10, "test": 3})
    cfg = load_recipe(None, {"dataset": "imagefolder", "data_dir": str(tmp_path), "val_split": 4})
    data = build_datasets(cfg.data, seed=cfg.seed)
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 6)
    assert data.classes == ["cat", "dog"] and data.test[0][0].shape == (3, 32, 32)


def test_cifar_npz_copy_is_read(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "cifar10").mkdir()
    for split, n in (("train", 40), ("test", 10)):
        np.savez(
            tmp_path / "cifar10" / f"{split}.npz",
            x=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
            y=np.arange(n) % 10,
            label_names=np.array([f"c{i}" for i in range(10)]),
        )
    data = build_datasets(
        load_recipe(None, {"dataset": "cifar10", "data_dir": str(tmp_path), "val_split": 10}).data, seed=0
    )
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 10) and data.classes[0] == "c0"


# --------------------------------------------------------------------------------- bad input
def test_missing_data_folder_is_a_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="local copy|download"):
        train(tiny(dataset="cifar10", data_dir=str(tmp_path / "nope")), out)
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="needs data_dir"):
        train(tiny(dataset="imagefolder"), out)
    assert not out.exists()


def test_unknown_recipe_key_names_the_valid_keys(tmp_path, capsys):
    with pytest.raises(RecipeError, match="Did you mean .*'lr'.*Valid keys: name, method"):
        load_recipe(tiny(), {"lr_rate": 0.1})
    with pytest.raises(RecipeError, match="unknown recipe key 'epoch'"):
        load_recipe(None, ["epoch=3"])
    with pytest.raises(RecipeError, match="'epochs'.*not a valid"):
        load_recipe(None, {"epochs": "many"})
    with pytest.raises(RecipeError, match="method.*not one of"):
        load_recipe(None, {"method": "fancy"})
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("base: digits_quick.yaml\nlearning_rate: 0.1\n")
    (tmp_path / "digits_quick.yaml").write_text((RECIPES / "digits_quick.yaml").read_text())
    assert cli_main(["train", "-c", str(recipe), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe key 'learning_rate'" in err and "Valid keys:" in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_from_another_architecture_is_refused(runs, tmp_path):
    vit = tiny(model="test_vit", model_kwargs={"img_size": 32}, init_checkpoint=str(runs["soft"]))
    with pytest.raises(CheckpointError, match="different architecture"):
        train(vit, tmp_path / "vit")
    saved_model = runs["soft"] / "model" / "model.safetensors"  # a saved model's weights, not a checkpoint
    with pytest.raises(CheckpointError, match=r"not a timm-exits training checkpoint .*from_pretrained.*`weights`"):
        train(tiny(init_checkpoint=str(saved_model)), tmp_path / "init")
    # a checkpoint swapped into a run folder is refused on resume, and left as it is
    stop = {"stop_after_steps": 2, "checkpoint_every_steps": 1}
    other = train(tiny(model="test_vit", model_kwargs={"img_size": 32}, **stop), tmp_path / "o")
    target = train(tiny(**stop), tmp_path / "t")
    (target / "checkpoint.safetensors").write_bytes((other / "checkpoint.safetensors").read_bytes())
    before = (target / "checkpoint.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="different architecture"):
        train(tiny(), tmp_path / "t", resume=True)
    assert (target / "checkpoint.safetensors").read_bytes() == before


def test_output_folder_with_another_run_or_other_files_is_not_touched(runs, tmp_path):
    run = runs["baseline"]
    same = tiny(method="baseline", amp="bf16", channels_last=True)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="different run.*lr"):
        train({**same, "lr": 0.01}, run)
    with pytest.raises(RunFolderError, match="different run"):
        train({**same, "lr": 0.01}, run, resume=True)
    with pytest.raises(RunFolderError, match="already holds this run"):
        train(same, run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="no timm-exits run"):
        train(tiny(), other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_checkpoints_are_safetensors_without_pickle(runs):
    path = runs["soft"] / "checkpoint.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    assert any(k.startswith("optim/") for k in tensors) and any(k.startswith("model/") for k in tensors)
    assert not list(runs["soft"].rglob("*.pt")) and not list(runs["soft"].rglob("*.bin"))
    assert not list(runs["soft"].glob(".*tmp*"))


def test_key_added_later_keeps_older_runs_resumable():
    from timm_exits.training.recipe import _fingerprint

    recipe = load_recipe(tiny()).flat()
    older = {k: v for k, v in recipe.items() if k != "weights"}  # written before `weights` existed
    assert _fingerprint(older) == _fingerprint(recipe) == _fingerprint(load_recipe(tiny()))
    assert _fingerprint({**recipe, "weights": "local-dir:/somewhere"}) != _fingerprint(recipe)
    assert _fingerprint({**recipe, "lr": 0.2}) != _fingerprint(recipe)


def test_bench_times_gate_with_the_refitted_gates_and_takes_a_run_that_skipped_timing(tmp_path, capsys):
    from timm_exits.training.timing import benchmark

    run = tmp_path / "run"
    train(tiny(epochs=3, calibrate_max_drop=0.0, max_train_samples=512, timing_images=0), run)
    report = json.loads((run / "report.json").read_text())
    assert report["gate_fit"] and report["timing"]["images"] == 0
    res = benchmark(run, policies=["gate", "gate_0.5"], images=report["splits"]["test"], repeats=1, warmup=0)
    for name in ("gate", "gate_0.5"):  # every test image timed: the report's distribution, measured again
        got, want = res["policies"][name]["exit_distribution"], report["policies"][name]["exit_distribution"]
        assert got == pytest.approx(want, abs=1e-9), name
    capsys.readouterr()
    assert cli_main(["bench", str(run), "--policy", "confidence", "--repeats", "1", "--warmup", "0", "--json"]) == 0
    timed = json.loads(capsys.readouterr().out)["policies"]["confidence"]
    assert timed["exit_distribution"] and sum(timed["exit_distribution"]) == pytest.approx(1.0)
    assert cli_main(["bench", str(run), "--policy", "confidence", "--images", "4", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].lstrip().startswith("plain backbone") and lines[2].lstrip().startswith("confidence")
    assert lines[3].strip().startswith("exits (#1 / ... / final):") and lines[3].endswith(" %")


def test_resume_at_a_stage_boundary_keeps_the_fp16_scale_an_uninterrupted_run_carries(tmp_path, monkeypatch):
    """The fp16 GradScaler spans the stages; its CUDA-only parts are swapped for torch's CPU scaler here (the
    same state machine), with a scale small enough to grow during the frozen stage."""
    import timm_exits.training.train as trainer

    real_scaler, real_batch = torch.amp.GradScaler, trainer._batch_per_rank

    def cpu_scaler(device="cuda", **kwargs):
        return real_scaler("cpu", init_scale=2.0**16, growth_interval=2)

    def no_cuda_check(recipe, d):  # the check that fp16 needs CUDA
        amp = recipe.optim.amp
        object.__setattr__(recipe.optim, "amp", None)
        try:
            return real_batch(recipe, d)
        finally:
            object.__setattr__(recipe.optim, "amp", amp)

    monkeypatch.setattr(torch.amp, "GradScaler", cpu_scaler)
    monkeypatch.setattr(trainer, "_batch_per_rank", no_cuda_check)
    recipe = tiny(method="soft", frozen_epochs=1, epochs=1, amp="fp16", report=False)
    full = train(recipe, tmp_path / "full")
    killed = train(recipe, tmp_path / "killed", stop_after_steps=5)  # last checkpoint: the end of the frozen stage
    assert load_checkpoint(killed)[1]["position"]["epoch"] == 0
    train(recipe, killed, resume=True)
    (a, meta_a), (b, meta_b) = load_checkpoint(full), load_checkpoint(killed)
    assert meta_b["scaler"]["scale"] == meta_a["scaler"]["scale"] != 2.0**16
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_loaders_get_the_recipes_workers_and_data_errors_are_one_line_cli_errors(tmp_path, monkeypatch, capsys):
    import timm_exits.training.data as data_module
    import timm_exits.training.train as trainer

    seen = []

    def recording(make):
        def wrapped(dataset, batch_size, **kwargs):
            seen.append((kwargs["train"], kwargs.get("num_workers", 0)))
            return make(dataset, batch_size, **kwargs)

        return wrapped

    monkeypatch.setattr(trainer, "make_loader", recording(trainer.make_loader))
    monkeypatch.setattr(data_module, "make_loader", recording(data_module.make_loader))  # the report's
    train(tiny(num_workers=1, timing_images=0), tmp_path / "run")
    assert sorted(set(seen)) == [(False, 1), (True, 1)] and len(seen) == 4  # train, val; the report's val, test
    argv = ["train", "-c", "digits_quick", "--output", str(tmp_path / "x"), "augment=crop_flip", "color_jitter=0.4"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("timm-exits train: error: color_jitter need timm's per-image transforms") and "\n" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.filterwarnings("ignore:It is highly recommended to have 'opt_einsum'")
@pytest.mark.parametrize("opt", ["sgd", "adamw", "adafactorbv", "kron", "lookahead_adamw"])
def test_optimizer_state_round_trips_through_a_checkpoint_exactly(opt, tmp_path):
    """adafactorbv keeps a dtype in its param groups and Kron a list of tensors in its state: both are stored."""
    from timm.optim import create_optimizer_v2

    from timm_exits.training.checkpoint import _load_optimizer, save_checkpoint

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        return net, create_optimizer_v2(net, opt=opt, lr=0.01, weight_decay=1e-4)

    def steps(net, optimizer, first, n):
        for k in range(first, first + n):
            torch.manual_seed(100 + k)  # Kron draws from the global generator, which a resume restores too
            x = torch.randn(8, 8)
            optimizer.zero_grad()
            net(x).pow(2).mean().backward()
            optimizer.step()

    a, opt_a = make()
    steps(a, opt_a, 0, 2)
    save_checkpoint(tmp_path / "c.safetensors", a, {}, None, opt_a)
    groups, meta = load_checkpoint(tmp_path / "c.safetensors")
    b, opt_b = make()
    b.load_state_dict(a.state_dict())
    _load_optimizer(opt_b, groups.get("optim", {}), meta["optimizer"])
    steps(a, opt_a, 2, 2)
    steps(b, opt_b, 2, 2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_every_shipped_recipe_is_listed_with_a_whole_sentence_naming_its_data_set():
    from timm_exits.training.recipe import list_recipes

    shown = {"digits": "digits", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "cinic10": "CINIC-10"}
    for name, line in list_recipes().items():
        assert line.endswith("."), (name, line)
        dataset = load_recipe(name).data.dataset
        assert shown[dataset] in line or f"{dataset}_" in line, (name, line)
