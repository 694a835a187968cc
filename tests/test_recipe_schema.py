"""The typed recipe: sections, round trips (dict, flat, JSON, YAML), errors, fingerprints, and sections given to parts.

No training here: every check builds recipes, or at most a model and the digits data, in a few seconds.
"""

from __future__ import annotations

import dataclasses
import json
from typing import get_args

import pytest
import torch
import yaml

from timm_exits.core.config import GATE_TYPES, HEAD_TYPES
from timm_exits.core.losses import EXIT_REDUCTIONS
from timm_exits.inference.gate_fitting import GATE_OBJECTIVES
from timm_exits.inference.policies import POLICIES
from timm_exits.training import recipe_schema as schema
from timm_exits.training.augment import AUGMENTS
from timm_exits.training.build import build_model
from timm_exits.training.cli import main as cli_main
from timm_exits.training.data import DATASETS, build_datasets, make_mixup
from timm_exits.training.recipe import RECIPE_DIR, _fingerprint, _identity, load_recipe
from timm_exits.training.recipe_schema import (
    FLAT_KEYS,
    RUNTIME_KEYS,
    SECTIONS,
    DataSection,
    MethodSection,
    ModelSection,
    OptimSection,
    Recipe,
    RecipeError,
)
from timm_exits.training.stages import _make_loss, _stages

SHIPPED = sorted(RECIPE_DIR.glob("*.yaml"))

# Fingerprints produced by the flat-dict recipe implementation (`DEFAULTS` and `_coerce`) that the typed
# recipe replaced: run folders and checkpoints are identified by them, so they must never change.
FLAT_DICT_FINGERPRINTS = {
    "_finetune224": "3fec7e8abd27eb23",
    "_paper": "8f3e12ee5acc1505",
    "cifar100_alexnet": "43d2f02668e3f50e",
    "cifar100_resnet18": "c78668275bfdf888",
    "cifar100_resnet18_ft224": "7debe6afd517d8ae",
    "cifar100_vgg13": "92c675cb26f0367e",
    "cifar100_vgg13_ft224": "51090adb8cd34d12",
    "cifar10_alexnet": "7f30a4791e577a9e",
    "cifar10_resnet18": "7467af71cd48366d",
    "cifar10_resnet18_ft224": "ffea7aaecf2edf7a",
    "cifar10_vgg13": "2647f4ac6f51f13c",
    "cifar10_vgg13_ft224": "b2eb8ddd2a58c1b5",
    "cinic10_alexnet": "4a9d29541f1c7690",
    "cinic10_resnet18": "ef15b3c89284876c",
    "cinic10_resnet18_ft224": "5720c21b899487d3",
    "cinic10_vgg13": "46c651bf2d6c6ba4",
    "cinic10_vgg13_ft224": "8740fb822000eed9",
    "digits_quick": "d265102096f6dfa3",
}
# Shipped recipes whose content changed since: these overrides give back the content the fingerprints above
# were recorded for (ResNet-18's CIFAR budget moved from batch 128 at lr 0.1 to batch 64 at lr 0.05; CINIC-10,
# read image by image, and the 224-px fine-tuning recipes left the in-memory pad-crop for crops that work there).
RECIPE_CHANGES = {
    "cifar10_resnet18": ["batch_size=128", "lr=0.1"],
    "cifar100_resnet18": ["batch_size=128", "lr=0.1"],
    **{
        name: ["augment=crop_flip"]
        for name in ("cinic10_alexnet", "cinic10_resnet18", "cinic10_vgg13")
        + tuple(f"{ds}_{arch}_ft224" for ds in ("cifar10", "cifar100", "cinic10") for arch in ("resnet18", "vgg13"))
    },
}
FLAT_DICT_OVERRIDE_FINGERPRINTS = [
    ("cifar10_resnet18", [*RECIPE_CHANGES["cifar10_resnet18"], "method=baseline", "seed=0"], "796a20228c640de7"),
    (
        "cifar10_resnet18",
        [*RECIPE_CHANGES["cifar10_resnet18"], "method=soft", "cost_weight=0.05", "seed=1"],
        "e3ade784a6b29e0c",
    ),
    (
        "cifar100_vgg13_ft224",
        [*RECIPE_CHANGES["cifar100_vgg13_ft224"], "method=branchynet", "seed=2"],
        "232d2b0ee46ce3db",
    ),
    (
        "digits_quick",
        [
            "weights=hf-hub:timm/resnet18.a1_in1k",
            "model_kwargs.drop_path_rate=0.1",
            "costs=[0.2, 0.5, 1]",
            "val_split=100",
            "exits=[1, 2]",
            "amp=bf16",
            "clip_grad=1",
        ],
        "3ed88b220394c259",
    ),
    (None, None, "7a71fa5fbb37abe2"),
]
# The runtime keys of the flat-dict implementation (its `_RUNTIME_KEYS` table).
FLAT_DICT_RUNTIME_KEYS = {
    "data_dir",
    "download",
    "num_workers",
    "eval_batch_size",
    "device",
    "threads",
    "checkpoint_every_steps",
    "stop_after_steps",
    "progress",
    "report",
    "policy",
    "fit_gates",
    "calibrate_max_drop",
    "calibrate_target_cost",
    "timing_images",
    "timing_repeats",
    "timing_warmup",
    "compile",  # added since, as a runtime key: how a run executes, not what it trains
}


# ------------------------------------------------------------------------------------- fingerprints
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_fingerprint_of_every_shipped_recipe_is_unchanged(path):
    assert _fingerprint(load_recipe(path, RECIPE_CHANGES.get(path.stem, []))) == FLAT_DICT_FINGERPRINTS[path.stem]
    if path.stem in RECIPE_CHANGES:  # the changed content is a new recipe, with a fingerprint of its own
        assert _fingerprint(load_recipe(path)) != FLAT_DICT_FINGERPRINTS[path.stem]


@pytest.mark.parametrize("source, overrides, expected", FLAT_DICT_OVERRIDE_FINGERPRINTS)
def test_fingerprint_with_overrides_is_unchanged(source, overrides, expected):
    recipe = load_recipe(source, overrides)
    assert _fingerprint(recipe) == _fingerprint(recipe.flat()) == expected
    runtime = ["device=cpu", "threads=2", "num_workers=3", "eval_batch_size=7", "policy=entropy", "progress=true"]
    runtime.append("compile=true")
    assert _fingerprint(load_recipe(source, [*(overrides or []), *runtime])) == expected


def test_runtime_keys_are_declared_in_the_sections_and_match_the_old_table():
    assert RUNTIME_KEYS == FLAT_DICT_RUNTIME_KEYS
    assert schema.LATER_KEYS == {"weights": None, "exit_reduction": "sum", "layer_decay": None}
    for name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            assert (f.name in RUNTIME_KEYS) == bool(section.RUNTIME or f.metadata.get(schema._RUNTIME)), (name, f.name)


def test_stored_flat_recipe_of_an_older_run_loads_back():
    # a checkpoint's "recipe" / run folder's recipe.yaml as the flat-dict implementation wrote it (its key order)
    stored = load_recipe("cifar10_resnet18", [*RECIPE_CHANGES["cifar10_resnet18"], "method=baseline"]).flat()
    old_order = ["name", "method", "seed", "model", "pretrained", "model_kwargs", "exits", "dataset", "lr", "epochs"]
    stored = {k: stored[k] for k in old_order} | {k: v for k, v in stored.items() if k not in old_order}
    stored.pop("weights")  # written before `weights` existed
    recipe = load_recipe(stored)
    assert recipe.method.method == "baseline" and recipe.model.weights is None
    assert _fingerprint(recipe) == _fingerprint(stored) == "796a20228c640de7"
    assert _identity(recipe) == _identity(stored)


# -------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_yaml_json_yaml_round_trip_of_every_shipped_recipe(path, tmp_path):
    recipe = load_recipe(path)
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe
    assert Recipe.from_yaml(again.to_yaml()) == recipe
    assert again.to_yaml() == recipe.to_yaml()
    assert Recipe.from_dict(recipe.to_dict()) == Recipe.from_dict(recipe.flat()) == recipe
    assert json.loads(json.dumps(recipe.flat())) == recipe.flat()
    sectioned, flat = tmp_path / "sectioned.yaml", tmp_path / "flat.yaml"
    sectioned.write_text(recipe.to_yaml())
    flat.write_text(recipe.to_yaml(flat=True))
    assert load_recipe(sectioned) == load_recipe(flat) == recipe


def test_flat_and_sectioned_yaml_give_the_same_recipe(tmp_path):
    (tmp_path / "flat.yaml").write_text(
        "base: cifar10_resnet18.yaml\nlr: 0.02\nepochs: 3\nmodel_kwargs:\n  drop_rate: 0.1\n"
    )
    (tmp_path / "sectioned.yaml").write_text(
        "base: cifar10_resnet18.yaml\noptim:\n  lr: 0.02\n  epochs: 3\nmodel:\n  model_kwargs: {drop_rate: 0.1}\n"
    )
    (tmp_path / "mixed.yaml").write_text("base: sectioned.yaml\nname: flat\noptim.lr: 0.02\n")
    flat, sectioned = load_recipe(tmp_path / "flat.yaml"), load_recipe(tmp_path / "sectioned.yaml")
    assert flat.optim.lr == 0.02 and flat.model.model_kwargs == {"drop_rate": 0.1} and flat.data.dataset == "cifar10"
    assert dataclasses.replace(sectioned, name="flat") == flat == load_recipe(tmp_path / "mixed.yaml")


def test_overrides_flat_by_section_and_into_mappings():
    plain = load_recipe("digits_quick", ["lr=0.1", "model_kwargs.drop_path_rate=0.1"])
    by_section = load_recipe("digits_quick", ["optim.lr=0.1", "model.model_kwargs.drop_path_rate=0.1"])
    assert plain == by_section and plain.optim.lr == 0.1
    assert plain.model.model_kwargs == {"drop_path_rate": 0.1}
    assert load_recipe(None, {"optim": {"lr": "1e-3"}}).optim.lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    nested = load_recipe(None, ["model_kwargs.a.b=2", "model_kwargs.a.c=3"]).model.model_kwargs
    assert nested == {"a": {"b": 2, "c": 3}}
    assert load_recipe(plain, {"seed": 3}).seed == 3 and load_recipe(plain, {"seed": 3}).optim.lr == 0.1


def test_values_are_converted_from_their_annotations():
    r = load_recipe(None, ["val_split=5000", "test_split=0.25", "progress=false", "costs=[1, 2]", "clip_grad=none"])
    assert r.data.val_split == 5000 and isinstance(r.data.val_split, int) and r.data.test_split == 0.25
    assert r.runtime.progress is False and r.model.costs == [1.0, 2.0] and r.optim.clip_grad is None
    assert r.optim.sched == "cosine" and load_recipe(None, ["sched=none"]).optim.sched == "none"
    assert load_recipe(None, {"exits": ("layer1", 2, 0.5)}).model.exits == ["layer1", 2, 0.5]
    assert load_recipe(None, {"method": "baseline"}).eval.policy == "confidence"  # the method's policy
    assert OptimSection(lr="0.5").lr == 0.5  # sections convert when built directly too


def test_flat_key_names_are_unique_across_sections():
    names = [f.name for f in dataclasses.fields(Recipe) if f.name not in SECTIONS]
    for section in SECTIONS.values():
        names += [f.name for f in dataclasses.fields(section)]
    assert len(names) == len(set(names)) == len(FLAT_KEYS)
    assert list(Recipe().flat()) == list(FLAT_KEYS)
    assert list(SECTIONS) == ["method", "model", "data", "optim", "eval", "runtime"]


def test_literal_choices_equal_the_registries():
    assert get_args(schema.DatasetName) == DATASETS
    assert get_args(schema.AugmentName) == AUGMENTS
    assert get_args(schema.FitGatesObjective) == (*GATE_OBJECTIVES, "none")
    assert get_args(schema.PolicyName) == POLICIES
    assert get_args(schema.HeadKind) == HEAD_TYPES and get_args(schema.GateKind) == GATE_TYPES
    assert get_args(schema.MethodName) == schema.METHODS == ("baseline", "branchynet", "soft")
    assert get_args(schema.ExitReduction) == EXIT_REDUCTIONS


# ------------------------------------------------------------------------------------------- errors
def test_unknown_keys_and_sections_name_the_valid_ones():
    with pytest.raises(RecipeError, match=r"unknown key 'lrr' in recipe section 'optim'\. Did you mean 'lr'\?.*epochs"):
        load_recipe(None, {"optim": {"lrr": 0.1}})
    with pytest.raises(RecipeError, match=r"'seed' is a top-level key.*Valid keys of data: dataset"):
        load_recipe(None, ["data.seed=1"])
    with pytest.raises(RecipeError, match=r"'lr' is a key of section 'optim'"):
        load_recipe(None, {"model": {"lr": 0.1}})
    with pytest.raises(RecipeError, match=r"unknown recipe key 'optimizer'\. Did you mean 'optim'.*Sections"):
        load_recipe(None, {"optimizer": {"lr": 0.1}})
    with pytest.raises(RecipeError, match=r"section 'optim' takes a mapping"):
        load_recipe(None, {"optim": 0.1})
    with pytest.raises(RecipeError, match=r"dotted key 'lr.x': 'lr' is not a mapping"):
        load_recipe(None, ["lr.x=1"])


def test_wrong_types_name_key_value_and_type_and_choices_are_listed():
    with pytest.raises(RecipeError, match=r"recipe key 'epochs': 'many' is not a valid int value"):
        load_recipe(None, {"optim": {"epochs": "many"}})
    with pytest.raises(RecipeError, match=r"recipe key 'epochs': 2\.5 is not a valid int value"):
        load_recipe(None, {"epochs": 2.5})
    with pytest.raises(RecipeError, match=r"recipe key 'costs': \['a'\] is not a valid list\[float\] \| None value"):
        load_recipe(None, {"costs": ["a"]})
    with pytest.raises(RecipeError, match=r"recipe key 'ema': 1 is not a valid bool value"):
        load_recipe(None, {"ema": 1})
    with pytest.raises(RecipeError, match=r"recipe key 'amp': 'fp32' is not one of \[None, 'bf16', 'fp16'\]"):
        load_recipe(None, ["amp=fp32"])
    with pytest.raises(RecipeError, match=r"'dataset': 'mnist' is not one of \['digits', 'cifar10'"):
        DataSection(dataset="mnist")
    with pytest.raises(RecipeError, match=r"frozen_epochs with method 'baseline' would train nothing"):
        load_recipe(None, {"method": "baseline", "frozen_epochs": 1})
    with pytest.raises(RecipeError, match=r"epochs and frozen_epochs must be >= 0 and not both 0"):
        load_recipe(None, {"epochs": 0})
    with pytest.raises(RecipeError, match=r"mixup / cutmix need an even batch_size"):
        load_recipe(None, {"mixup": 0.2, "batch_size": 7})
    with pytest.raises(RecipeError, match=r"cost_warmup must be a fraction in \[0, 1\]"):
        MethodSection(cost_warmup=2)
    with pytest.raises(RecipeError, match=r"a recipe in JSON is an object"):
        Recipe.from_json("[1, 2]")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lr=-1"], r"'lr' must lie in \(0, inf\], got -1"),
        (["ema_decay=2"], r"'ema_decay' must lie in \[0, 1\), got 2"),
        (["momentum=1"], r"'momentum' must lie in \[0, 1\)"),
        (["label_smoothing=1.5"], r"'label_smoothing' must lie in \[0, 1\)"),
        (["hflip=2"], r"'hflip' must lie in \[0, 1\]"),
        (["mixup_prob=5"], r"'mixup_prob' must lie in \[0, 1\]"),
        (["crop_pct=0"], r"'crop_pct' must lie in \(0, 1\]"),
        (["crop_pct=2"], r"'crop_pct' must lie in \(0, 1\]"),
        (["crop_scale=[-1, 1]"], r"crop_scale must be \[low, high\] with 0 < low <= high <= 1"),
        (["crop_ratio=[0, 1]"], r"crop_ratio must be \[low, high\] with 0 < low <= high"),
        (["max_train_samples=-5"], r"'max_train_samples' must be >= 1 \(or null"),
        (["sched=cosin"], r"sched 'cosin' is not one of \('none', 'const'"),
        (["sched=plateau"], r"sched 'plateau' is not one of"),
        (["sched=step"], r"sched 'step' is not one of"),  # timm's decays at epoch 90, whatever the stage's length
        (["opt=adamww"], r"opt 'adamww' is not a timm optimizer; did you mean \['adamw'"),
        (["opt=adahessian"], r"opt 'adahessian' needs a backward with create_graph=True"),
        (["branchynet_weights=[1, -1]"], r"branchynet_weights must be >= 0"),
        (["interpolation=none"], r"interpolation 'none' is not one of \(None, 'nearest'"),
        (["interpolation=random"], r"interpolation 'random' is not one of"),  # timm's eval transforms have none
        (["sched=cosine", "warmup_epochs=0.5"], r"warmup_epochs=0.5: timm's 'cosine' schedule warms up over whole"),
        (["calibrate_max_drop=-0.5"], r"'calibrate_max_drop' must lie in \[0, 1\], got -0.5"),
        (["calibrate_max_drop=5"], r"'calibrate_max_drop' must lie in \[0, 1\], got 5"),
        (["calibrate_target_cost=0"], r"'calibrate_target_cost' must lie in \(0, inf\], got 0"),
        (["timing_repeats=0"], r"'timing_repeats' must lie in \[1, inf\], got 0"),
        (["timing_warmup=-3"], r"'timing_warmup' must lie in \[0, inf\], got -3"),
        (["timing_images=-1"], r"'timing_images' must lie in \[0, inf\], got -1"),
    ],
)
def test_values_out_of_range_are_refused_when_the_recipe_loads(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("digits_quick", overrides)


# ------------------------------------------------------------------------------ sections given to parts
def test_parts_build_from_their_own_section():
    model = build_model(ModelSection(model="test_resnet", exits=[1, 2], head="mlp", head_hidden=16), 7, 32)
    assert model.num_exits == 3 and model.config.head == "mlp"
    data = build_datasets(DataSection(max_train_samples=40, max_eval_samples=20, img_size=16), seed=1)
    assert (len(data.train), len(data.val), len(data.test)) == (40, 20, 20) and data.train[0][0].shape == (3, 16, 16)
    assert make_mixup(DataSection(), 10) is None
    mix = make_mixup(DataSection(mixup=0.2), 10, 0.1)
    assert (mix.mixup_alpha, mix.label_smoothing, mix.num_classes) == (0.2, 0.1, 10)
    loss = _make_loss(MethodSection(method="branchynet", branchynet_weights=[1, 2, 3]), mixup=False)
    assert type(loss).__name__ == "BranchyNetLoss"
    soft = _make_loss(MethodSection(exit_weight=0.5, exit_reduction="mean", label_smoothing=0.1), mixup=False)
    assert (soft.exit_weight, soft.exit_reduction, soft.label_smoothing) == (0.5, "mean", 0.1)
    with pytest.raises(RecipeError, match="exit_reduction"):
        MethodSection(exit_reduction="max")
    stages = _stages(OptimSection(frozen_epochs=1, frozen_lr=0.5, epochs=2, frozen_train_classifier=False))
    assert [(s.name, s.epochs, s.lr, s.train_classifier) for s in stages] == [
        ("frozen", 1, 0.5, False),
        ("joint", 2, 0.05, True),
    ]


def test_cli_prints_the_recipe_flat_sectioned_or_as_json(capsys):
    assert cli_main(["recipe", "-c", "digits_quick", "optim.lr=0.2", "--sections"]) == 0
    sectioned = yaml.safe_load(capsys.readouterr().out)
    assert sectioned["optim"]["lr"] == 0.2 and sectioned["name"] == "digits_quick"
    assert cli_main(["recipe", "-c", "digits_quick", "lr=0.2", "--json"]) == 0
    assert Recipe.from_json(capsys.readouterr().out) == Recipe.from_dict(sectioned)


def test_model_kwargs_the_model_does_not_take_are_a_recipe_error():
    from timm_exits.training.build import build_model

    spec = load_recipe(None, ["model=test_resnet", "model_kwargs.foo=1"]).model
    with pytest.raises(RecipeError, match=r"model_kwargs \{'foo': 1\} are not all arguments of 'test_resnet'"):
        build_model(spec, 10, 32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["exits=[layer9]"], "the recipe's model keys do not fit model 'test_resnet': exit 'layer9'"),
        (["exits=[7]"], "the recipe's model keys do not fit model 'test_resnet': feature_info indices [7]"),
        (["costs=[0.5, 1.0]"], "the recipe's model keys do not fit model 'test_resnet': got 2 costs for 5 exits"),
        (["head=mlp", "head_hidden=0"], "the recipe's model keys do not fit model 'test_resnet': head_hidden=0"),
        (["model_kwargs.drop_rate=2"], "the recipe's model keys do not fit model 'test_resnet': a probe"),
        (
            ["model_kwargs.global_pool=x"],
            "recipe key 'model_kwargs' {'global_pool': 'x'} does not fit model 'test_resnet'",
        ),
        (["method=branchynet", "branchynet_weights=[1, 1]"], "branchynet_weights has 2 weights but the model has 5"),
    ],
)
def test_model_keys_that_do_not_fit_the_backbone_are_one_line_errors_and_write_nothing(
    overrides, message, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", "-c", "digits_quick", "-o", str(out), "model=test_resnet", "max_train_samples=64", "threads=1"]
    assert cli_main([*argv, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"timm-exits train: error: {message}") and err.count("\n") == 1
    assert not out.exists()  # the corrected command finds no run to refuse


def test_override_values_read_scientific_floats_and_refuse_broken_yaml():
    recipe = load_recipe(None, ["model_kwargs.drop_path_rate=1e-1", "exits=[1e-1, 5e-1]", "lr=2e-2"])
    assert recipe.model.model_kwargs == {"drop_path_rate": 0.1} and recipe.model.exits == [0.1, 0.5]
    assert recipe.optim.lr == 0.02
    with pytest.raises(RecipeError, match=r"override 'exits=\[a,b': '\[a,b' is not valid YAML \(expected ',' or '\]'"):
        load_recipe(None, ["exits=[a,b"])


def test_override_values_that_yaml_reads_as_comments_are_refused():
    assert load_recipe(None, ["name=run#1"]).name == "run#1"  # '#' inside a word is text
    assert load_recipe(None, ['name="a #1"']).name == "a #1"
    with pytest.raises(RecipeError, match=r"override 'output_dir=/tmp/a #b': YAML reads ' #...' as a comment"):
        load_recipe(None, ["output_dir=/tmp/a #b"])
    with pytest.raises(RecipeError, match=r"quote the value: name='\"#x\"'"):
        load_recipe(None, ["name=#x"])


def test_init_checkpoint_with_backbone_weights_is_refused():
    with pytest.raises(RecipeError, match=r"init_checkpoint replaces every weight that pretrained / weights would"):
        load_recipe(None, ["init_checkpoint=runs/a", "weights=local-dir:b"])
    with pytest.raises(RecipeError, match=r"set pretrained=false and weights=null"):
        load_recipe(None, ["init_checkpoint=runs/a", "pretrained=true"])
    assert load_recipe(None, ["init_checkpoint=runs/a"]).model.init_checkpoint == "runs/a"


def test_base_files_are_read_next_to_the_recipe_never_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "parent.yaml").write_text("lr: 0.02\n")
    (tmp_path / "sub" / "child.yaml").write_text("base: parent.yaml\nepochs: 3\n")
    (tmp_path / "cwd.yaml").write_text("lr: 0.3\n")
    (tmp_path / "sub" / "stray.yaml").write_text("base: cwd.yaml\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(tmp_path / "sub" / "child.yaml")
    assert (recipe.optim.lr, recipe.optim.epochs) == (0.02, 3)
    with pytest.raises(FileNotFoundError, match=r"base 'cwd.yaml' is neither .*sub/cwd.yaml nor a shipped recipe"):
        load_recipe(tmp_path / "sub" / "stray.yaml")
    (tmp_path / "sub" / "bad.yaml").write_text("base: 3\n")
    with pytest.raises(RecipeError, match=r"'base:' takes a file name or a list of them, got 3"):
        load_recipe(tmp_path / "sub" / "bad.yaml")
    (tmp_path / "sub" / "shipped.yaml").write_text("base: digits_quick\n")
    assert load_recipe(tmp_path / "sub" / "shipped.yaml").data.dataset == "digits"


def test_momentum_reaches_every_timm_optimizer_that_has_one():
    from timm_exits.training.stages import _make_optimizer

    model = build_model(ModelSection(model="test_resnet", exits=[1]), 10, 32)
    for opt in ("sgd", "rmsprop", "sgdw", "lars"):
        optim = OptimSection(opt=opt, momentum=0.5, sched="none")
        made, _ = _make_optimizer(model, optim, _stages(optim)[0], 10)
        assert {g["momentum"] for g in made.param_groups} == {0.5}, opt
    made, _ = _make_optimizer(model, OptimSection(opt="adamw", momentum=0.5), _stages(OptimSection())[0], 10)
    assert "momentum" not in made.param_groups[0]


@pytest.mark.parametrize("sched", ["onecycle", "cosine", "none"])
def test_layer_decay_scales_each_groups_rate_under_every_schedule(sched):
    from timm_exits.training.stages import _make_optimizer

    model = build_model(ModelSection(model="test_resnet", exits=[1]), 10, 32)
    optim = OptimSection(opt="sgd", lr=0.1, sched=sched, warmup_epochs=1, epochs=4, layer_decay=0.5)
    opt, sched_ = _make_optimizer(model, optim, _stages(optim)[0], 10)
    by_name = {id(p): n for n, p in model.named_parameters()}
    scale = {by_name[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale["backbone.fc.weight"] == 1.0 and scale["backbone.conv1.0.weight"] == 0.5**5
    assert [p.name for p in model.exits] == ["layer1"]
    assert scale["branches.0.head.fc.weight"] == scale["backbone.layer1.0.conv1.weight"] == 0.5**4
    if sched_ is not None:
        sched_.step_update(num_updates=20)  # after the warm-up
    rates = {by_name[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    top = rates["backbone.fc.weight"]
    assert top > 0 and all(rates[n] == pytest.approx(top * scale[n]) for n in rates)
    plain, _ = _make_optimizer(
        model, OptimSection(opt="sgd", lr=0.1, sched=sched, warmup_epochs=1, epochs=4), _stages(optim)[0], 10
    )
    assert all("lr_scale" not in g for g in plain.param_groups)
    with pytest.raises(RecipeError, match="layer_decay"):
        OptimSection(layer_decay=0.0).check()


def _stage_lrs(optim: OptimSection, stage_index: int, steps_per_epoch: int = 10) -> list[float]:
    """Learning rate of every update of one stage's schedule."""
    from timm_exits.training.stages import _make_optimizer

    model = build_model(ModelSection(model="test_resnet", exits=[1]), 10, 32)
    stage = _stages(optim)[stage_index]
    opt, sched = _make_optimizer(model, optim, stage, steps_per_epoch)
    lrs = []
    for update in range(stage.epochs * steps_per_epoch):
        sched.step_update(num_updates=update)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_a_stage_warms_up_for_at_most_half_its_epochs_then_anneals():
    optim = OptimSection(sched="onecycle", warmup_epochs=4.5, frozen_epochs=2, epochs=30, lr=0.1)
    frozen = _stage_lrs(optim, 0)
    assert frozen[0] == pytest.approx(0.1 / 25) and frozen[10] == pytest.approx(0.1)  # peak after its first epoch
    assert max(frozen) == frozen[10] and all(a > b for a, b in zip(frozen[10:], frozen[11:]))
    assert frozen[-1] < frozen[0]
    timm_optim = OptimSection(sched="cosine", warmup_epochs=5, frozen_epochs=2, epochs=30, lr=0.1)
    timm_frozen = _stage_lrs(timm_optim, 0)  # timm: whole warm-up epochs, then cosine from its update 10
    assert timm_frozen.index(max(timm_frozen)) == 9 and all(a > b for a, b in zip(timm_frozen[9:], timm_frozen[10:]))

    from timm_exits.training.stages import _warmup_note  # the training log's line

    assert _warmup_note(optim, _stages(optim)[0]) == (
        "stage frozen: warm-up capped at 1 epoch(s), half the stage's 2 (warmup_epochs 4.5)"
    )
    assert _warmup_note(timm_optim, _stages(timm_optim)[0]).startswith("stage frozen: warm-up capped at 1 epoch(s)")


def test_a_stage_longer_than_twice_the_warm_up_keeps_its_schedule():
    from timm.scheduler import create_scheduler_v2

    from timm_exits.training.stages import OneCycle

    optim = OptimSection(sched="onecycle", warmup_epochs=4.5, frozen_epochs=2, epochs=30, lr=0.1)
    joint = _stage_lrs(optim, 1)
    old = OneCycle(torch.optim.SGD([torch.zeros(1)], lr=0.1), 300, 45)  # the recipe's whole warm-up
    for update in (0, 20, 44, 45, 46, 150, 299):
        assert joint[update] == pytest.approx(0.1 * old.factor(update), rel=1e-12), update
    assert joint.index(max(joint)) == 45
    timm_optim = OptimSection(sched="cosine", warmup_epochs=5, epochs=30, lr=0.1)
    opt = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    kwargs = {"num_epochs": 30, "warmup_lr": 1e-5, "min_lr": 0.0, "step_on_epochs": False, "updates_per_epoch": 10}
    old, _ = create_scheduler_v2(opt, sched="cosine", warmup_epochs=5, **kwargs)
    joint = _stage_lrs(timm_optim, 0)
    for update in (0, 20, 49, 50, 51, 150, 299):
        old.step_update(num_updates=update)
        assert joint[update] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), update

    from timm_exits.training.stages import _warmup_note

    assert _warmup_note(optim, _stages(optim)[1]) is _warmup_note(timm_optim, _stages(timm_optim)[0]) is None


@pytest.mark.parametrize("form", [["--sections"], ["--json"], []])
def test_a_printed_recipe_fed_back_gives_the_same_recipe_and_fingerprint(form, tmp_path, capsys):
    # strings that read as floats in a recipe file (1e-3, 2.5e+1) are printed quoted; `name: null` stays None
    overrides = ["name='1e-3'", "model_kwargs.tag='2.5e+1'", "auto_augment='1E5'"]
    for extra in ([], ["name=null"]):
        assert cli_main(["recipe", "-c", "digits_quick", *overrides, *extra, *form]) == 0
        printed = tmp_path / "printed.yaml"
        printed.write_text(capsys.readouterr().out)
        expected = load_recipe("digits_quick", [*overrides, *extra])
        again = load_recipe(printed)
        assert again == expected and _fingerprint(again) == _fingerprint(expected)
    assert load_recipe(tmp_path / "printed.yaml").name is None
    (tmp_path / "unnamed.yaml").write_text("lr: 0.2\n")  # no name key: the file's name
    assert load_recipe(tmp_path / "unnamed.yaml").name == "unnamed"


def test_an_override_given_again_wins_whatever_form_each_takes():
    assert load_recipe(None, ["lr=0.1", "optim.lr=0.2", "lr=0.3"]).optim.lr == 0.3
    assert load_recipe(None, ["optim.lr=0.1", "lr=0.2", "optim.lr=0.3"]).optim.lr == 0.3
    recipe = load_recipe(None, ["model_kwargs.drop_rate=0.1", "model_kwargs={}", "model_kwargs.drop_rate=0.2"])
    assert recipe.model.model_kwargs == {"drop_rate": 0.2}
    assert load_recipe(None, ["model_kwargs.a=1", "model_kwargs={b: 2}"]).model.model_kwargs == {"b": 2}
