"""Training recipes: fine-tune a multi-exit timm model on one machine or many, then evaluate and report it.

A recipe is a flat YAML mapping of the keys in `DEFAULTS` (``base: other.yaml`` merges another file
first: one next to it, else a shipped recipe of that name); the recipes shipped in ``timm_exits/recipes/``
are selected by name (``-c digits_quick``, listed by `list_recipes`), any other by its path; every key
can be overridden (``key=value``, dotted keys for dict values such as ``model_kwargs.drop_path_rate=0.1``),
and an unknown key is an error that lists the valid ones.

Methods (``method:``):

* ``baseline``: the plain backbone, trained on its own head only (`FinalExitLoss`); exits stay untrained.
* ``branchynet``: B-Net, the sum of per-exit cross-entropies (`BranchyNetLoss`); gates are not trained
  and inference uses entropy thresholds.
* ``soft``: the soft-conditional objective (`SoftConditionalLoss`) with deep supervision
  (``exit_weight``) and the cost weight warmed up linearly from 0 over the first ``cost_warmup``
  fraction of all steps (set on ``loss.cost_weight`` before every step).

``frozen_epochs`` adds a first stage that trains the exit heads and gates (and the backbone's
classifier, unless ``frozen_train_classifier: false``) on a frozen backbone held in eval mode, so its
BatchNorm statistics stay as they are; ``epochs`` of joint training follow.

Runs: ``train()`` writes a run folder (``run.json``, ``recipe.yaml``, ``checkpoint.safetensors``,
``train.log``, ``metrics.jsonl``, then ``report.json`` / ``report.md`` / ``plots/`` and ``model/``).
Checkpoints are safetensors files (model, EMA and optimizer tensors; everything else as JSON in
the header), written to a temporary file and moved into place, at the end of every epoch and every
``checkpoint_every_steps`` steps. ``resume=True`` continues from the last one and ends with the same
weights as an uninterrupted run: data order, augmentation, mixup and dropout are seeded from
(seed, epoch, sample) and (seed, step), and learning rates and the cost weight are functions of the
step. A folder holding another run, or any run without ``resume`` / ``overwrite``, is an error.

Many processes: start with ``torchrun --nproc_per_node N -m timm_exits.cli train -c recipe.yaml``.
DistributedDataParallel (nccl on GPUs, gloo on CPUs); ``batch_size`` is the global batch, split
evenly over the processes, so N processes train the same model as one (exactly so for backbones
without BatchNorm, in a frozen stage, or with ``sync_bn: true`` on GPUs); validation metrics are
summed over ranks; only rank 0 writes, and resuming needs the run folder on a shared file system.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import difflib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
import yaml
from torch import nn

from .._version import __version__
from ..core.losses import BranchyNetLoss, FinalExitLoss, SoftConditionalLoss
from ..core.model import EarlyExitModel, wrap
from ..inference.calibration import Collected, simulate
from ..inference.gate_fitting import GATE_OBJECTIVES
from ..inference.policies import POLICIES
from .data import AUGMENTS, DATASETS, build_datasets, load_splits, make_loader, make_mixup, seed_for
from .report import benchmark, evaluate
from .runfiles import MANIFEST_NAME, atomic_write_text, read_manifest, record, remove_recorded

__all__ = [
    "DEFAULTS",
    "METHODS",
    "RecipeError",
    "RunFolderError",
    "CheckpointError",
    "TrainingInterrupted",
    "RECIPE_DIR",
    "list_recipes",
    "resolve_recipe",
    "load_recipe",
    "parse_overrides",
    "build_model",
    "load_run",
    "train",
    "evaluate",
    "benchmark",
]

METHODS = ("baseline", "branchynet", "soft")
_DEFAULT_POLICY = {"baseline": "confidence", "branchynet": "entropy", "soft": "gate"}
CHECKPOINT_NAME = "checkpoint.safetensors"
_CKPT_META = "timm_exits.checkpoint"
_CKPT_VERSION = 1

# Every recipe key with its default. Comments are the documentation of the recipe format.
DEFAULTS: dict[str, Any] = {
    # -- what to train
    "name": None,  # run name (default: the recipe file's name)
    "method": "soft",  # baseline | branchynet | soft
    "seed": 0,  # seeds model init, data order, augmentation, mixup and dropout
    # -- model
    "model": "resnet18",  # any timm model name (timm_exits.models registers alexnet_cifar)
    "pretrained": False,  # ImageNet weights from timm / the HF Hub (needs network or a filled cache)
    "weights": None,  # start the backbone from a timm checkpoint: local-dir:FOLDER, hf-hub:ORG/NAME or a file
    "model_kwargs": {},  # further timm.create_model arguments (drop_rate, drop_path_rate, img_size, ...)
    "exits": "auto",  # "auto", "blocks", module names, feature_info indices or cost fractions
    "head": "linear",  # exit head: linear | mlp | conv
    "head_hidden": 256,
    "gate": "stats",  # gate input: stats | features | both
    "gate_hidden": 32,
    "gate_bias": -2.0,  # initial gate logit (negative: gates start closed)
    "detach_gate_inputs": True,
    "exit_drop_rate": 0.0,  # dropout in the exit heads
    "costs": None,  # per-exit costs overriding the fvcore measurement (final exit included)
    "init_checkpoint": None,  # start from the weights of a run folder or checkpoint of the same architecture
    # -- data
    "dataset": "digits",  # digits | cifar10 | cifar100 | cinic10 | imagefolder
    "data_dir": None,  # root folder of the data set (cifar default: ./data)
    "download": False,  # let torchvision download CIFAR
    "img_size": 32,  # input size the images are resized / cropped to
    "val_split": 0.1,  # held out of train for calibration: fraction or count
    "test_split": 0.2,  # digits / folder trees without test/: fraction or count held out as test
    "split_seed": 0,  # seed of the held-out splits (independent of seed)
    "max_train_samples": None,  # use a fixed random subset of the train split (smoke tests)
    "max_eval_samples": None,  # same for val and test
    "batch_size": 128,  # global batch, split over processes
    "eval_batch_size": 256,  # per process
    "num_workers": 2,  # loader processes of per-image data (array data sets are batched in memory)
    "augment": "auto",  # crop_flip | rrc (array data, per batch) | timm (per image) | auto: rrc or timm
    "crop_padding": 4,  # crop_flip: reflect padding before the random crop
    "crop_scale": [0.35, 1.0],  # random-resized-crop scale range (rrc and timm)
    "crop_ratio": [0.75, 1.3333333333333333],
    "hflip": 0.5,
    "color_jitter": 0.0,
    "auto_augment": None,  # e.g. "rand-m9-mstd0.5"
    "re_prob": 0.0,  # random erasing
    "crop_pct": 1.0,  # eval: resize to img_size / crop_pct, centre-crop img_size
    "interpolation": None,  # default: the backbone's
    "mixup": 0.0,  # timm Mixup alpha (soft targets)
    "cutmix": 0.0,
    "mixup_prob": 1.0,
    "label_smoothing": 0.0,
    # -- loss
    "cost_weight": 0.1,  # soft: lambda, weight of the expected cost
    "cost_warmup": 0.2,  # soft: fraction of all steps over which lambda rises linearly from 0
    "exit_weight": 1.0,  # soft: weight of the deep supervision (sum of every exit's CE, as B-Net); 0 = literal
    "branchynet_weights": None,  # branchynet: one weight per exit (default: all 1)
    # -- optimisation
    "epochs": 30,  # joint training epochs
    "frozen_epochs": 0,  # epochs of a first stage on a frozen backbone (exit heads and gates only)
    "frozen_lr": None,  # learning rate of that stage (default: lr)
    "frozen_train_classifier": True,  # train the backbone's own classifier in the frozen stage
    "opt": "sgd",  # any timm optimizer (create_optimizer_v2)
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5.0e-4,
    "sched": "cosine",  # onecycle | any timm scheduler (create_scheduler_v2), stepped every update | none
    "warmup_epochs": 0.0,  # linear warm-up (onecycle: from lr / 25 up to lr, then cosine to lr / 2.5e5)
    "warmup_lr": 1.0e-5,
    "min_lr": 0.0,
    "clip_grad": None,  # max gradient norm
    "ema": False,  # keep a timm ModelEmaV3; the EMA weights are validated, reported and saved
    "ema_decay": 0.999,
    "amp": None,  # None | bf16 | fp16 (fp16: CUDA only)
    "channels_last": False,
    "sync_bn": False,  # SyncBatchNorm across processes (CUDA only): the global batch's statistics
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "threads": None,  # torch intra-op threads per process (default: torch's)
    # -- checkpoints and logs (runtime: may change when resuming)
    "checkpoint_every_steps": None,  # also checkpoint every N steps within an epoch
    "stop_after_steps": None,  # debug: stop (as if killed) after N steps, without a final checkpoint
    "progress": "auto",  # tqdm bars: auto (only on a terminal) | true | false
    # -- evaluation and report
    "report": True,  # write the report and save the model at the end
    "policy": None,  # policy stored with the saved model (default: gate / entropy / confidence by method)
    "fit_gates": "no_gain",  # before calibration, re-fit stats gates on the val split: no_gain | correct | soft | none
    "calibrate_max_drop": 0.01,  # thresholds: lowest cost within this accuracy drop of the final exit (val)
    "calibrate_target_cost": None,  # or: best accuracy at this expected cost (overrides calibrate_max_drop)
    "timing_images": 100,  # test images timed one by one (batch 1)
    "timing_repeats": 5,  # timing passes; the median is reported
    "timing_warmup": 10,  # untimed images before timing
}

# Keys that may change between a run and its resumption without changing what is trained.
_RUNTIME_KEYS = frozenset(
    {
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
    }
)
_CHOICES = {
    "method": METHODS,
    "dataset": DATASETS,
    "augment": AUGMENTS,
    "head": ("linear", "mlp", "conv"),
    "gate": ("stats", "features", "both"),
    "amp": (None, "bf16", "fp16"),
    "policy": (None, *POLICIES),
    "fit_gates": (*GATE_OBJECTIVES, "none"),
    "progress": ("auto", True, False),
}


class RecipeError(ValueError):
    """A recipe key or value is invalid."""


class RunFolderError(RuntimeError):
    """The output folder cannot be used for this run without the user's say-so."""


class CheckpointError(ValueError):
    """A checkpoint does not fit the model or run it is loaded into."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT) at a step boundary, after writing a checkpoint to resume from."""


# ------------------------------------------------------------------------------------------ recipes
def _unknown(key: str, valid: Sequence[str]) -> RecipeError:
    close = difflib.get_close_matches(key, valid, n=3)
    parts = set(key.split("_"))
    close += [k for k in valid if k not in close and (k in parts or k.startswith(key))][: max(0, 3 - len(close))]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return RecipeError(f"unknown recipe key {key!r}.{hint} Valid keys: {', '.join(valid)}.")


# Value kinds of the keys whose default is None (the others take their default's type).
_KINDS: dict[str, Any] = {
    "name": str,
    "costs": list,
    "init_checkpoint": str,
    "weights": str,
    "data_dir": str,
    "max_train_samples": int,
    "max_eval_samples": int,
    "auto_augment": str,
    "interpolation": str,
    "branchynet_weights": list,
    "frozen_lr": float,
    "clip_grad": float,
    "amp": str,
    "threads": int,
    "checkpoint_every_steps": int,
    "stop_after_steps": int,
    "policy": str,
    "calibrate_target_cost": float,
    "val_split": "split",
    "test_split": "split",
    "exits": "exits",
    "progress": "progress",
}


def _coerce(key: str, value: Any) -> Any:
    """Check and convert one recipe value to its key's kind (YAML may give "1e-3" as a string)."""
    kind = _KINDS.get(key, type(DEFAULTS[key]))
    if isinstance(value, str) and kind is not str and value.strip().lower() in ("none", "null", "~"):
        value = None
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("true", "false") and kind in (bool, "progress"):
        value = value.strip().lower() == "true"
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if kind in (float, "split"):
            if isinstance(value, bool):
                raise TypeError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return int(v) if kind == "split" and v >= 1 else v
        if kind is list:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [float(v) for v in value]
        if kind is dict:
            if not isinstance(value, Mapping):
                raise TypeError
            return dict(value)
        if kind is str:
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError
            return str(value)
        if kind == "exits":
            if not isinstance(value, (str, list, tuple)):
                raise TypeError
            return value if isinstance(value, str) else list(value)
    except (TypeError, ValueError) as e:
        name = kind if isinstance(kind, str) else kind.__name__
        raise RecipeError(f"recipe key {key!r}: {value!r} is not a valid {name} value.") from e
    return value


def _check_recipe(r: dict[str, Any]) -> None:
    for key, choices in _CHOICES.items():
        if r[key] not in choices:
            raise RecipeError(f"recipe key {key!r}: {r[key]!r} is not one of {list(choices)}.")
    if r["epochs"] < 0 or r["frozen_epochs"] < 0 or r["epochs"] + r["frozen_epochs"] == 0:
        raise RecipeError("epochs and frozen_epochs must be >= 0 and not both 0.")
    if r["frozen_epochs"] and r["method"] == "baseline":
        raise RecipeError(
            "frozen_epochs with method 'baseline' would train nothing (the baseline trains only the backbone); "
            "use method 'soft' or 'branchynet' for a frozen stage."
        )
    for key in ("batch_size", "eval_batch_size", "img_size"):
        if r[key] < 1:
            raise RecipeError(f"recipe key {key!r} must be >= 1, got {r[key]}.")
    if not 0 <= r["cost_warmup"] <= 1:
        raise RecipeError(f"cost_warmup must be a fraction in [0, 1], got {r['cost_warmup']}.")
    if len(r["crop_scale"]) != 2 or len(r["crop_ratio"]) != 2:
        raise RecipeError("crop_scale and crop_ratio take two numbers [low, high].")
    if (r["mixup"] or r["cutmix"]) and r["batch_size"] % 2:
        raise RecipeError("mixup / cutmix need an even batch_size.")


RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


def list_recipes() -> dict[str, str]:
    """The recipes shipped with timm-exits, selectable by name (``-c digits_quick``).

    Returns:
        Name -> the first line of the file's leading comment ("" when it has none), sorted by name;
        files whose name starts with "_" are shared settings for ``base:`` and left out.
    """
    out = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        first = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                first = line.lstrip("#").strip()
                break
            if line.strip():
                break
        out[path.stem] = first
    return out


def resolve_recipe(source: str | os.PathLike) -> Path:
    """The file of a recipe given as a path or as the name of a shipped recipe.

    Args:
        source: A YAML file's path, or a shipped recipe's name with or without ".yaml".

    Returns:
        The recipe file's path.

    Raises:
        FileNotFoundError: Neither a file nor a shipped recipe; the message lists the shipped ones.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    name = str(source)
    if "/" not in name and os.sep not in name:
        stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
        shipped = RECIPE_DIR / f"{stem}.yaml"
        if shipped.is_file():
            return shipped
    names = list(list_recipes())
    close = difflib.get_close_matches(Path(name).stem, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(
        f"recipe {name!r} is neither a file nor a shipped recipe.{hint} Shipped recipes (`timm-exits recipes`): "
        f"{', '.join(names)}."
    )


def _parse_yaml(path: Path) -> Any:
    """Parse a recipe file; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"recipe {path}{where}: not valid YAML ({problem}). Fix the file there.") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.expanduser().resolve()
    if path in seen:
        raise RecipeError(f"recipe {path} includes itself through 'base:'.")
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found.")
    data = _parse_yaml(path) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of keys, got {type(data).__name__}.")
    bases = data.pop("base", None)
    merged: dict[str, Any] = {}
    for b in [bases] if isinstance(bases, str) else bases or []:
        local = path.parent / b
        merged.update(_read_yaml(local if local.is_file() else resolve_recipe(b), (*seen, path)))
    merged.update(data)
    merged.setdefault("name", None)
    if data.get("name") is None and not seen:
        merged["name"] = path.stem
    return merged


def parse_overrides(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Turn ``["lr=0.01", "model_kwargs.drop_rate=0.1"]`` (YAML values) into a dict of overrides."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key=value.")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise RecipeError(f"override {item!r} has no key.")
        out[key] = yaml.safe_load(text) if text.strip() else None
    return out


def _apply(recipe: dict[str, Any], key: str, value: Any) -> None:
    valid = list(DEFAULTS)
    if "." in key:
        top, sub = key.split(".", 1)
        if top not in DEFAULTS:
            raise _unknown(top, valid)
        if not isinstance(DEFAULTS[top], dict):
            raise RecipeError(f"dotted key {key!r}: {top!r} is not a mapping; set it as {top}=value.")
        current = dict(recipe.get(top) or {})
        node = current
        parts = sub.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        recipe[top] = current
        return
    if key not in DEFAULTS:
        raise _unknown(key, valid)
    recipe[key] = value


def load_recipe(
    source: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Resolve a recipe: defaults, then the YAML file (with its ``base:`` files) or dict, then overrides.

    Args:
        source: Path of a YAML recipe, the name of a shipped recipe (see `list_recipes`), a dict of keys, or
            None (defaults only).
        overrides: Further keys, as a dict or ``key=value`` strings (dotted keys for dict values).

    Returns:
        The full recipe, every key of `DEFAULTS` present and type-checked.

    Raises:
        RecipeError: An unknown key (the message lists the valid ones) or an invalid value.
    """
    recipe = copy.deepcopy(DEFAULTS)
    if source is None:
        given: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        given = dict(source)
        if "base" in given:
            raise RecipeError("'base:' is only understood in recipe files; merge the dicts yourself.")
    else:
        given = _read_yaml(resolve_recipe(source))
    for key, value in list(given.items()) + list(parse_overrides(overrides).items()):
        _apply(recipe, key, value)
    for key in DEFAULTS:
        recipe[key] = _coerce(key, recipe[key])
    _check_recipe(recipe)
    if recipe["policy"] is None:
        recipe["policy"] = _DEFAULT_POLICY[recipe["method"]]
    return recipe


def _identity(recipe: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k not in _RUNTIME_KEYS}


def _fingerprint(recipe: Mapping[str, Any]) -> str:
    text = json.dumps(_identity(recipe), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# ------------------------------------------------------------------------------------------- model
def _create_backbone(recipe: Mapping[str, Any], num_classes: int, load: bool) -> nn.Module:
    """The recipe's timm model, with the weights it names (``weights``) or timm's pretrained ones."""
    import timm

    name, weights = recipe["model"], recipe["weights"]
    kwargs = dict(recipe["model_kwargs"] or {})
    try:
        if load and weights and weights.startswith(("local-dir:", "hf-hub:")):
            backbone = timm.create_model(weights, pretrained=True, num_classes=num_classes, **kwargs)
            arch = backbone.pretrained_cfg.get("architecture")
            if arch != name:
                raise RecipeError(
                    f"weights {weights!r} hold a {arch!r}, but the recipe's model is {name!r}; set model: {arch}."
                )
            return backbone
        backbone = timm.create_model(name, pretrained=load and not weights, num_classes=num_classes, **kwargs)
        if load and weights:
            _load_weights_file(backbone, Path(weights).expanduser())
        return backbone
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise RecipeError(f"unknown timm model {name!r}; close names: {close}.") from e
        if not load:
            raise
        raise RuntimeError(_weights_hint(name, weights, e)) from e
    except (RecipeError, FileNotFoundError):
        raise
    except Exception as e:
        if not load:
            raise
        raise RuntimeError(_weights_hint(name, weights, e)) from e


def _load_weights_file(backbone: nn.Module, path: Path) -> None:
    """Load a timm model's weights file (safetensors or a torch state dict); a classifier of another size is skipped."""
    from timm.models import load_state_dict

    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} not found; give a file saved from a timm model, or local-dir:FOLDER / "
            "hf-hub:ORG/NAME for a folder saved by timm or timm-exits."
        )
    state = load_state_dict(str(path))
    own = backbone.state_dict()
    head = backbone.pretrained_cfg.get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    for key in [k for k in state if any(k.startswith(f"{h}.") for h in heads)]:
        if key in own and state[key].shape != own[key].shape:
            del state[key]  # another number of classes: the new head keeps its initialisation
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(k.startswith(f"{h}.") for h in heads)]
    if missing or unexpected:
        raise RecipeError(
            f"weights file {str(path)!r} does not fit {backbone.pretrained_cfg.get('architecture')!r}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}; check the recipe's model and model_kwargs."
        )


def _weights_hint(name: str, weights: str | None, e: Exception) -> str:
    if weights:
        return f"could not load the weights {weights!r} into {name!r} ({type(e).__name__}: {e})."
    return (
        f"could not load pretrained weights for {name!r} ({type(e).__name__}: {e}). Without network access, fill the "
        "Hugging Face cache first, point weights: at a local copy, or set pretrained: false."
    )


def build_model(recipe: Mapping[str, Any], num_classes: int, pretrained: bool | None = None) -> EarlyExitModel:
    """Create the recipe's timm backbone, load the weights it asks for, and attach its exits.

    Args:
        recipe: A resolved recipe.
        num_classes: Classes of the data set.
        pretrained: Load the backbone's weights (``weights``, else timm's pretrained ones); default: whether
            the recipe sets ``pretrained`` or ``weights``.

    Returns:
        The `EarlyExitModel` (on the CPU).
    """
    from . import models as _models  # noqa: F401  (registers alexnet_cifar and vgg13_cifar with timm)

    load = bool(recipe["pretrained"] or recipe["weights"]) if pretrained is None else bool(pretrained)
    backbone = _create_backbone(recipe, num_classes, load)
    size = int(recipe["img_size"])
    return wrap(
        backbone,
        exits=recipe["exits"],
        num_classes=num_classes,
        head=recipe["head"],
        gate=recipe["gate"],
        costs=recipe["costs"],
        input_size=(3, size, size),
        head_hidden=recipe["head_hidden"],
        gate_hidden=recipe["gate_hidden"],
        gate_bias=recipe["gate_bias"],
        detach_gate_inputs=recipe["detach_gate_inputs"],
        drop_rate=recipe["exit_drop_rate"],
    )


def _make_loss(recipe: Mapping[str, Any], mixup: bool) -> nn.Module:
    smoothing = 0.0 if mixup else recipe["label_smoothing"]  # timm Mixup folds smoothing into its targets
    if recipe["method"] == "baseline":
        return FinalExitLoss(label_smoothing=smoothing)
    if recipe["method"] == "branchynet":
        return BranchyNetLoss(weights=recipe["branchynet_weights"], label_smoothing=smoothing)
    return SoftConditionalLoss(cost_weight=0.0, exit_weight=recipe["exit_weight"], label_smoothing=smoothing)


@dataclass
class _Stage:
    name: str  # "frozen" | "joint"
    epochs: int
    lr: float


def _stages(recipe: Mapping[str, Any]) -> list[_Stage]:
    stages = []
    if recipe["frozen_epochs"]:
        stages.append(_Stage("frozen", recipe["frozen_epochs"], recipe["frozen_lr"] or recipe["lr"]))
    if recipe["epochs"]:
        stages.append(_Stage("joint", recipe["epochs"], recipe["lr"]))
    return stages


def _configure_stage(model: EarlyExitModel, recipe: Mapping[str, Any], stage: _Stage) -> int:
    """Set requires_grad for the stage and method; return the number of trainable parameters."""
    method = recipe["method"]
    model.requires_grad_(False)
    if stage.name == "joint":
        model.backbone.requires_grad_(True)
        if model.final_head is not None:
            model.final_head.requires_grad_(True)
    else:
        for p in model.exit_parameters():
            p.requires_grad_(True)
        if recipe["frozen_train_classifier"] and model.final_head is None:
            model.backbone.get_classifier().requires_grad_(True)
    if method == "baseline":
        model.branches.requires_grad_(False)
    else:
        for b in model.branches:
            b.head.requires_grad_(True)
            b.gate.requires_grad_(method == "soft")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _set_modes(model: EarlyExitModel, stage: _Stage) -> None:
    model.train()
    if stage.name == "frozen":
        model.backbone.eval()  # frozen BatchNorm statistics and no backbone dropout


# ----------------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_pref: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "auto":
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    elif device_pref == "cuda" and world > 1:
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    d = _Dist(device=device)
    if world > 1 or dist.is_initialized():
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
            d.owns_group = True
        d.rank, d.world, d.local_rank = dist.get_rank(), dist.get_world_size(), local_rank
    return d


def _all_sum(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _agree(d: _Dist, error: BaseException | None) -> None:
    """Raise rank 0's error (if any) on every rank, so no rank waits forever on the others."""
    if d.world == 1:
        if error is not None:
            raise error
        return
    box = [None if error is None else (type(error).__name__, str(error))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        kind, msg = box[0]
        cls = {"RunFolderError": RunFolderError, "CheckpointError": CheckpointError}.get(kind, RuntimeError)
        raise cls(f"(from rank 0) {msg}")


# ------------------------------------------------------------------------------------- checkpoints
def _plain(v: Any) -> Any:
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, tuple):
        return list(v)
    return v


def save_checkpoint(
    path: Path,
    model: nn.Module,
    meta: dict[str, Any],
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Write model / EMA / optimizer tensors and JSON metadata to one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("model", model), ("ema", ema)):
        if module is not None:
            for k, v in module.state_dict().items():
                tensors[f"{prefix}/{k}"] = v.detach().to("cpu", copy=True).contiguous()
    opt_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for name, v in st.items():
                if torch.is_tensor(v):  # 0-dim tensors (Adam's step) included: safetensors keeps them exactly
                    tensors[f"optim/{idx}/{name}"] = v.detach().to("cpu", copy=True).contiguous()
                else:
                    scalars.setdefault(str(idx), {})[name] = _plain(v)
        groups = [{k: _plain(v) for k, v in g.items()} for g in sd["param_groups"]]
        opt_meta = {"param_groups": groups, "scalars": scalars, "type": type(optimizer).__name__}
    meta = {**meta, "optimizer": opt_meta, "format_version": _CKPT_VERSION}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    safetensors.torch.save_file(tensors, str(tmp), metadata={_CKPT_META: json.dumps(meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    atomic_write_text(path.with_suffix(".json"), json.dumps({k: v for k, v in meta.items() if k != "optimizer"}))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`: ({"model"|"ema"|"optim": tensors}, metadata)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found.")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            groups: dict[str, dict[str, torch.Tensor]] = {}
            for k in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                prefix, rest = k.split("/", 1)
                groups.setdefault(prefix, {})[rest] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({e}).") from e
    if _CKPT_META not in header:
        raise CheckpointError(f"{path} is not a timm-exits training checkpoint (no {_CKPT_META!r} metadata).")
    meta = json.loads(header[_CKPT_META])
    if meta.get("format_version", 0) > _CKPT_VERSION:
        raise CheckpointError(f"{path} was written by a newer timm-exits (format {meta['format_version']}).")
    return groups, meta


def _load_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load with an error naming what does not match (another architecture, other exits)."""
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (checkpoint vs model, e.g. {shapes[:3]})")
        raise CheckpointError(
            f"{source} was saved from a different architecture or exit layout than this recipe builds: "
            + "; ".join(parts)
            + "."
        )
    module.load_state_dict(dict(tensors), strict=True)


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, values in meta["scalars"].items():
        for name, v in values.items():
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": copy.deepcopy(meta["param_groups"])})


# -------------------------------------------------------------------------------------- run folder
# Every path a run writes; taken as the tool's in a run folder written before manifests existed.
_OWN_FILES = (
    "run.json",
    "recipe.yaml",
    CHECKPOINT_NAME,
    "checkpoint.json",
    "train.log",
    "metrics.jsonl",
    "report.json",
    "report.md",
    "plots/gate_histograms.png",
    "plots/accuracy_vs_cost.png",
    "plots/exit_distribution.png",
    "model/config.json",
    "model/model.safetensors",
    "model/exits.safetensors",
    "model/README.md",
    "model/report.json",
)
_TRAIN_FILES = _OWN_FILES[:6]


def _own_files(run_dir: Path) -> list[str]:
    """Relative paths timm-exits wrote in `run_dir`: its manifest, else the fixed names of an older run."""
    try:
        listed = read_manifest(run_dir)
    except ValueError as e:
        raise RunFolderError(str(e)) from e
    if listed is not None:
        return listed
    return list(_OWN_FILES) if (run_dir / "run.json").is_file() else []


def _clear_run(run_dir: Path) -> tuple[list[str], list[str]]:
    """Delete the files timm-exits wrote in `run_dir`; return (deleted, files of others left in place)."""
    fallback = list(_OWN_FILES) if (run_dir / "run.json").is_file() else []
    return remove_recorded(run_dir, fallback)


def _prepare_run_dir(run_dir: Path, recipe: dict[str, Any], resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """Check the output folder without changing it.

    Returns:
        (resume from its checkpoint, delete the files of the run it holds before writing the new one).
    """
    if resume and overwrite:
        raise RunFolderError("pass either resume or overwrite, not both.")
    info = run_dir / "run.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output {run_dir} exists and is not a folder.")
    entries = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    if resume and not info.is_file():
        raise RunFolderError(
            f"--resume: {run_dir} holds no timm-exits run (no run.json), so there is nothing to resume; nothing was "
            "written. Give the --output of the run to continue, or leave out --resume to start a new run."
        )
    if not entries:
        return False, False
    own = set(_own_files(run_dir)) | {MANIFEST_NAME}
    others = [e for e in entries if e not in own]
    if not info.is_file():
        if not overwrite:
            raise RunFolderError(
                f"output folder {run_dir} is not empty and holds no timm-exits run (no run.json); nothing was "
                f"written. Choose a new --output, or pass --overwrite to write the run there next to its "
                f"{len(others)} file(s), which are left in place."
            )
    else:
        old = json.loads(info.read_text(encoding="utf-8"))
        changes = _diff(old.get("identity", {}), _identity(recipe))
        if not overwrite:
            if changes:
                raise RunFolderError(
                    f"output folder {run_dir} holds a different run (recipe differs: {'; '.join(changes[:8])}); "
                    "nothing was overwritten. Choose a new --output, or pass --overwrite to replace that run (only "
                    "the files timm-exits wrote are deleted)."
                )
            if not resume:
                raise RunFolderError(
                    f"output folder {run_dir} already holds this run; nothing was overwritten. Pass --resume to "
                    "continue it from its last checkpoint, or --overwrite to start it again (only the files "
                    "timm-exits wrote are deleted)."
                )
            if not (run_dir / CHECKPOINT_NAME).is_file():
                raise RunFolderError(
                    f"--resume: {run_dir / CHECKPOINT_NAME} is missing, so the run cannot continue where it stopped; "
                    "nothing was written. Restore the checkpoint, or pass --overwrite to train the run again from "
                    "step 0."
                )
            return True, False
    clash = sorted(set(others) & set(_OWN_FILES))
    if clash:
        raise RunFolderError(
            f"output folder {run_dir} holds files timm-exits did not write at paths a run writes: {clash}; nothing "
            "was written. Move them away, or choose a new --output."
        )
    return False, True


def _write_run_files(run_dir: Path, recipe: dict[str, Any], classes: list[str], world: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record(run_dir, _TRAIN_FILES)
    info = run_dir / "run.json"
    if not info.is_file():
        payload = {
            "fingerprint": _fingerprint(recipe),
            "identity": _identity(recipe),
            "classes": classes,
            "num_classes": len(classes),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timm_exits_version": __version__,
            "world_size": world,
        }
        atomic_write_text(info, json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))


def _default_output(recipe: Mapping[str, Any]) -> Path:
    name = recipe["name"] or recipe["model"]
    return Path("runs") / (name if recipe["method"] in name else f"{name}-{recipe['method']}")


@dataclass
class LoadedRun:
    """A trained run loaded back: its recipe, class names and model (EMA weights when the run kept an EMA)."""

    run_dir: Path
    recipe: dict[str, Any]
    classes: list[str]
    model: EarlyExitModel
    meta: dict[str, Any]


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> LoadedRun:
    """Rebuild a run's model from its recipe and checkpoint (no pretrained download).

    Args:
        run_dir: The run folder.
        device: Device of the model.
        **overrides: Runtime recipe keys to change (e.g. data_dir).

    Returns:
        A `LoadedRun`.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a timm-exits run folder (run.json / recipe.yaml missing).")
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    bad = sorted(k for k in overrides if k not in _RUNTIME_KEYS)
    if bad:
        raise RecipeError(
            f"only runtime keys can change for a trained run, not {bad}; runtime keys: {sorted(_RUNTIME_KEYS)}."
        )
    recipe = load_recipe(saved, {k: v for k, v in overrides.items() if v is not None})
    groups, meta = load_checkpoint(run_dir / CHECKPOINT_NAME)
    if meta.get("fingerprint") != info.get("fingerprint"):
        raise CheckpointError(f"{run_dir / CHECKPOINT_NAME} belongs to another run than {run_dir / 'run.json'}.")
    model = build_model(recipe, int(info["num_classes"]), pretrained=False)
    weights = groups.get("ema") if recipe["ema"] and "ema" in groups else groups.get("model", {})
    _load_state(model, weights, str(run_dir / CHECKPOINT_NAME))
    return LoadedRun(run_dir, recipe, list(info["classes"]), model.to(device).eval(), meta)


# ---------------------------------------------------------------------------------------- logging
class _Log:
    def __init__(self, path: Path | None, bars: bool) -> None:
        self.path = path
        self.bars = bars

    def __call__(self, msg: str) -> None:
        if self.bars:
            from tqdm import tqdm

            tqdm.write(msg)
        else:
            print(msg, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def _distribution_text(dist_: Sequence[float]) -> str:
    return ", ".join(f"#{i + 1}: {100 * p:.1f} %" for i, p in enumerate(dist_))


def _epoch_line(rec: dict[str, Any]) -> str:
    tr, va = rec["train"], rec["val"]
    parts = [f"loss {tr['loss']:.4f}"]
    for k in ("soft_ce", "exit_ce", "final_ce", "expected_cost"):
        if k in tr:
            parts.append(f"{k} {tr[k]:.4f}")
    if "cost_weight" in tr:
        parts.append(f"lambda {tr['cost_weight']:.3g}")
    accs = "/".join(f"{100 * a:.1f}" for a in va["exit_accuracy"])
    g = va["gate"]
    return (
        f"epoch {rec['epoch']}/{rec['epochs']} [{rec['stage']}] {' '.join(parts)} | lr {rec['lr']:.3g} | "
        f"val exits {accs} % | soft {100 * va['soft_accuracy']:.1f} % | gate@0.5 {100 * g['accuracy']:.1f} % "
        f"at cost {g['expected_cost']:.3f}, exits {_distribution_text(g['exit_distribution'])} | {rec['seconds']:.1f} s"
    )


# ---------------------------------------------------------------------------------------- training
def _autocast(recipe: Mapping[str, Any], device: torch.device) -> contextlib.AbstractContextManager:
    if not recipe["amp"]:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if recipe["amp"] == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def _validate_epoch(model: EarlyExitModel, loader: Any, d: _Dist, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Per-exit and soft accuracy, and the gate@0.5 policy's accuracy / cost / exit shares, summed over ranks."""
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    e = model.num_exits
    sums = torch.zeros(3 * e + 3, dtype=torch.float64)  # exit correct | gate counts | gate correct per exit | ...
    costs = model.exit_costs.detach().float().cpu()
    try:
        for x, y in loader:
            x = x.to(d.device, non_blocking=True)
            if recipe["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(recipe, d.device):
                out = model(x)
            logits = torch.stack([f.float() for f in out.logits], 1).cpu()
            gates = out.gate_logits.float().cpu()
            correct = logits.argmax(-1) == y[:, None]
            index = simulate(Collected(logits, gates, y, costs), "gate", 0.5)
            hit = correct[torch.arange(len(y)), index]
            sums[:e] += correct.sum(0)
            sums[e : 2 * e] += torch.bincount(index, minlength=e)
            sums[2 * e : 3 * e] += torch.bincount(index[hit], minlength=e)
            sums[3 * e] += (out.log_probs.float().argmax(-1).cpu() == y).sum()
            sums[3 * e + 1] += costs[index].double().sum()
            sums[3 * e + 2] += len(y)
    finally:
        for m, flag in was:
            m.training = flag
    sums = _all_sum(sums.to(d.device), d).cpu()
    n = max(float(sums[-1]), 1.0)
    return {
        "num_samples": int(sums[-1]),
        "exit_accuracy": (sums[:e] / n).tolist(),
        "soft_accuracy": float(sums[3 * e] / n),
        "gate": {
            "threshold": 0.5,
            "accuracy": float(sums[2 * e : 3 * e].sum() / n),
            "expected_cost": float(sums[3 * e + 1] / n),
            "exit_distribution": (sums[e : 2 * e] / n).tolist(),
        },
    }


def _progress_enabled(recipe: Mapping[str, Any], d: _Dist) -> bool:
    if not d.main:
        return False
    p = recipe["progress"]
    return sys.stderr.isatty() if p == "auto" else bool(p)


class OneCycle:
    """One-cycle learning rate, a pure function of the update number (so a resumed run matches).

    Linear warm-up from ``lr / div`` to ``lr`` over ``warmup_updates``, then cosine annealing to
    ``lr / (div * final_div)`` at ``total_updates``; momentum stays fixed.

    Args:
        optimizer: Its param groups' current ``lr`` is the peak.
        total_updates: Updates of the whole schedule.
        warmup_updates: Updates of the warm-up.
        div: Peak over initial learning rate.
        final_div: Initial over final learning rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_updates: int,
        warmup_updates: float,
        div: float = 25.0,
        final_div: float = 1.0e4,
    ) -> None:
        self.optimizer = optimizer
        self.peaks = [float(g["lr"]) for g in optimizer.param_groups]
        self.total, self.warmup = max(int(total_updates), 1), max(float(warmup_updates), 0.0)
        self.div, self.final_div = float(div), float(final_div)

    def factor(self, num_updates: int) -> float:
        """Learning rate over the peak after `num_updates` updates."""
        start, end = 1.0 / self.div, 1.0 / (self.div * self.final_div)
        if num_updates < self.warmup:
            return start + (1.0 - start) * num_updates / self.warmup
        span = max(self.total - self.warmup, 1.0)
        t = min(max((num_updates - self.warmup) / span, 0.0), 1.0)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))

    def step_update(self, num_updates: int) -> None:
        """Set every param group's learning rate for update `num_updates`."""
        f = self.factor(num_updates)
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            group["lr"] = peak * f


def _make_optimizer(model: EarlyExitModel, recipe: Mapping[str, Any], stage: _Stage, steps_per_epoch: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    kwargs: dict[str, Any] = {}
    if recipe["opt"].lower() in ("sgd", "momentum", "nesterov"):
        kwargs["momentum"] = recipe["momentum"]
    opt = create_optimizer_v2(model, opt=recipe["opt"], lr=stage.lr, weight_decay=recipe["weight_decay"], **kwargs)
    if recipe["sched"] in (None, "none", "const", "constant"):
        return opt, None
    if recipe["sched"] == "onecycle":
        return opt, OneCycle(opt, stage.epochs * steps_per_epoch, recipe["warmup_epochs"] * steps_per_epoch)
    sched, _ = create_scheduler_v2(
        opt,
        sched=recipe["sched"],
        num_epochs=stage.epochs,
        warmup_epochs=int(round(recipe["warmup_epochs"])),
        warmup_lr=recipe["warmup_lr"],
        min_lr=recipe["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return opt, sched


@dataclass
class _Position:
    stage: int = 0
    epoch: int = 0  # within the stage
    batch: int = 0  # within the epoch
    step: int = 0  # global optimizer steps
    done: bool = False


def train(
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    output: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Train a recipe and (on rank 0) write its report; see the module docstring.

    Args:
        config: Recipe file path or dict of keys (None: the defaults, i.e. the digits data set).
        output: Run folder (default: ``runs/<name>-<method>``).
        resume: Continue the run in `output` from its last checkpoint.
        overwrite: Replace whatever run `output` holds.
        **overrides: Recipe keys to override (``data_dir="..."``, ``epochs=2``, ...).

    Returns:
        The run folder.
    """
    recipe = load_recipe(config, overrides)
    d = _setup_distributed(recipe["device"])
    try:
        return _train(recipe, d, Path(output) if output else _default_output(recipe), resume, overwrite)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


_LOSS_PARTS = ("loss", "soft_ce", "exit_ce", "final_ce", "expected_cost", "steps")
_LOGGED_PARTS = {"soft": ("soft_ce", "exit_ce", "expected_cost"), "branchynet": (), "baseline": ("final_ce",)}


class _Trainer:
    """One rank's side of a training run: set-up, stages, epochs, steps and checkpoints (see `train`)."""

    def __init__(self, recipe: dict[str, Any], d: _Dist, run_dir: Path, resume: bool, overwrite: bool) -> None:
        self.recipe, self.d, self.run_dir = recipe, d, run_dir
        if recipe["batch_size"] % d.world:
            raise RecipeError(f"batch_size {recipe['batch_size']} (global) does not split over {d.world} processes.")
        self.per_rank = recipe["batch_size"] // d.world
        if (recipe["mixup"] or recipe["cutmix"]) and self.per_rank % 2:
            raise RecipeError(f"mixup needs an even batch per process; batch_size / processes = {self.per_rank}.")
        if recipe["amp"] == "fp16" and d.device.type != "cuda":
            raise RecipeError("amp: fp16 needs a CUDA device; use amp: bf16 on CPUs.")
        if recipe["sync_bn"] and d.world > 1 and d.device.type != "cuda":
            raise RecipeError(
                "sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); on CPUs freeze BatchNorm with "
                "frozen_epochs or use a backbone without BatchNorm."
            )
        if recipe["threads"]:
            torch.set_num_threads(recipe["threads"])

        # rank 0 checks the output folder and loads the data first (it may download); the others follow
        self.resuming, clear = self._on_rank0_first(
            lambda: _prepare_run_dir(run_dir, recipe, resume, overwrite), (False, False)
        )
        raw = self._on_rank0_first(lambda: load_splits(recipe), None)
        if raw is None:
            raw = load_splits(recipe)
        torch.manual_seed(recipe["seed"])
        self.model = build_model(recipe, len(raw.classes), pretrained=None if not self.resuming else False)
        self.data = build_datasets(recipe, self.model, raw)
        self.ckpt_path = run_dir / CHECKPOINT_NAME
        self.ckpt: dict[str, dict[str, torch.Tensor]] = {}
        meta: dict[str, Any] = {}
        if self.resuming:
            self.ckpt, meta = load_checkpoint(self.ckpt_path)
            _load_state(self.model, self.ckpt.get("model", {}), str(self.ckpt_path))
            if meta.get("fingerprint") != _fingerprint(recipe):
                raise CheckpointError(f"{self.ckpt_path} was written by another recipe than this run's.")
        elif recipe["init_checkpoint"]:
            groups, _ = load_checkpoint(recipe["init_checkpoint"])
            _load_state(self.model, groups.get("model", {}), str(recipe["init_checkpoint"]))
        self.ckpt_meta = meta
        target = recipe["calibrate_target_cost"]
        cheapest = float(self.model.exit_costs.min())
        if recipe["report"] and target is not None and target < cheapest - 1e-9:
            raise RecipeError(
                f"calibrate_target_cost={target} is below the cheapest expected cost this model can reach, "
                f"{cheapest:.4f} (every image at exit #1); set calibrate_target_cost >= {cheapest:.4f}."
            )
        kept: list[str] = []
        if d.main:  # everything above could still fail: only now is the old run's output deleted
            if clear:
                _, kept = _clear_run(run_dir)
            _write_run_files(run_dir, recipe, self.data.classes, d.world)
        self.model.to(d.device)
        if recipe["sync_bn"] and d.world > 1:  # replaces BatchNorm children in place; names and hooks stay
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if recipe["channels_last"]:
            self.model.to(memory_format=torch.channels_last)
        self.ema = None
        if recipe["ema"]:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=recipe["ema_decay"])
            if "ema" in self.ckpt:
                _load_state(self.ema.module, self.ckpt["ema"], str(self.ckpt_path))

        self.train_loader = make_loader(
            self.data.train,
            self.per_rank,
            train=True,
            num_replicas=d.world,
            rank=d.rank,
            seed=recipe["seed"],
            num_workers=recipe["num_workers"],
            pin_memory=d.device.type == "cuda",
        )
        self.val_loader = make_loader(
            self.data.val, recipe["eval_batch_size"], train=False, num_replicas=d.world, rank=d.rank
        )
        self.steps_per_epoch = self.train_loader.sampler.batches_per_epoch
        if self.steps_per_epoch == 0:
            raise RecipeError(
                f"batch_size {recipe['batch_size']} is larger than the train split ({len(self.data.train)} samples)."
            )
        self.stages = _stages(recipe)
        self.total_epochs = sum(s.epochs for s in self.stages)
        self.total_steps = self.total_epochs * self.steps_per_epoch
        self.mixup = make_mixup(recipe, self.data.num_classes)
        self.loss_fn = _make_loss(recipe, self.mixup is not None)
        self.scaler = torch.amp.GradScaler("cuda") if recipe["amp"] == "fp16" else None
        self.pos = _Position(**meta.get("position", {}))
        self.history: list[dict[str, Any]] = list(meta.get("history", []))
        self.bars = _progress_enabled(recipe, d)
        self.log = _Log(run_dir / "train.log" if d.main else None, self.bars)
        if kept:
            self.log(f"--overwrite: deleted the earlier run's files; left {len(kept)} other file(s) in place: {kept}")
        self._interrupted = False

    def _on_rank0_first(self, fn: Any, default: Any) -> Any:
        """Run `fn` on rank 0 and share its result (a bool or tuple) or its error with every rank."""
        result, error = default, None
        if self.d.main:
            try:
                result = fn()
            except Exception as e:
                error = e
        _agree(self.d, error)
        if self.d.world > 1 and isinstance(default, (bool, tuple)):
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        return result

    # ---------------------------------------------------------------------------------------- run
    def run(self) -> bool:
        """Train every remaining stage; False when stopped early by ``stop_after_steps``."""
        r, d, pos = self.recipe, self.d, self.pos
        if d.main:
            n = (len(self.data.train), len(self.data.val), len(self.data.test))
            costs = [round(c, 3) for c in self.model.exit_costs.tolist()]
            self.log(
                f"{f'resuming at step {pos.step}' if self.resuming else 'starting'}: {r['model']} with exits "
                f"{[b.name for b in self.model.branches]} (costs {costs}) on {r['dataset']} ({n[0]} train / "
                f"{n[1]} val / {n[2]} test), method {r['method']}, {d.world} process(es) on {d.device}, "
                f"{self.steps_per_epoch} steps per epoch, run folder {self.run_dir}"
            )
            if pos.done:
                self.log("training already finished; nothing to resume.")
        self.epoch_bar = None
        if self.bars and not pos.done:
            from tqdm import tqdm

            done = sum(s.epochs for s in self.stages[: pos.stage]) + pos.epoch
            self.epoch_bar = tqdm(total=self.total_epochs, initial=done, desc="epochs", position=0)
        previous = self._catch_sigint()
        try:
            while not pos.done:
                if not self._stage(pos.stage):
                    if d.main:
                        self.log(
                            f"stopped after {pos.step} steps (stop_after_steps); --resume continues from the last "
                            "checkpoint."
                        )
                    return False
        finally:
            if previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
                signal.signal(signal.SIGINT, previous)
            if self.epoch_bar is not None:
                self.epoch_bar.close()
        return True

    def _catch_sigint(self) -> Any:
        """Make Ctrl-C stop at the next step boundary, after a checkpoint; returns the handler it replaced.

        Only in a single process run from the main thread (ranks of a distributed run would stop at
        different steps); a second Ctrl-C stops at once, as without this handler.
        """
        if self.d.world > 1 or threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._previous_sigint = signal.default_int_handler if previous is None else previous
        return self._previous_sigint

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupted = True
        signal.signal(signal.SIGINT, self._previous_sigint)
        print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once).", file=sys.stderr)

    def _stop(self) -> TrainingInterrupted:
        msg = (
            f"interrupted at step {self.pos.step}; checkpoint written, continue with --resume "
            f"(--output {self.run_dir})."
        )
        if self.d.main:
            self.log(msg)
        return TrainingInterrupted(msg)

    def _stage(self, si: int) -> bool:
        stage, pos = self.stages[si], self.pos
        n_trainable = _configure_stage(self.model, self.recipe, stage)
        opt, sched = _make_optimizer(self.model, self.recipe, stage, self.steps_per_epoch)
        meta = self.ckpt_meta
        if self.resuming and meta.get("optimizer") and (pos.epoch or pos.batch):  # resumed inside this stage
            _load_optimizer(opt, self.ckpt.get("optim", {}), meta["optimizer"])
            if self.scaler is not None and meta.get("scaler"):
                self.scaler.load_state_dict(meta["scaler"])
        net: nn.Module = self.model
        if self.d.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.d.device.index] if self.d.device.type == "cuda" else None
            net = DistributedDataParallel(self.model, device_ids=ids)
        if self.d.main:
            self.log(
                f"stage {stage.name}: {stage.epochs} epoch(s), {n_trainable:,} trainable parameters, lr {stage.lr:g}"
            )
        first_epoch = sum(s.epochs for s in self.stages[:si])
        while pos.stage == si:
            if not self._epoch(si, first_epoch + pos.epoch, net, opt, sched, first_epoch * self.steps_per_epoch):
                return False
        return True

    def _epoch(self, si: int, global_epoch: int, net: nn.Module, opt, sched, stage_first_step: int) -> bool:
        r, d, pos, stage = self.recipe, self.d, self.pos, self.stages[si]
        self.data.train.set_epoch(global_epoch)
        self.train_loader.sampler.set_epoch(global_epoch, pos.batch)
        _set_modes(self.model, stage)
        t0 = time.time()
        saved = self.ckpt_meta.pop("accum", None) if self.resuming else None
        accum = torch.tensor(saved if saved and pos.batch else [0.0] * len(_LOSS_PARTS), dtype=torch.float64)
        bar = None
        if self.bars:
            from tqdm import tqdm

            bar = tqdm(
                total=self.steps_per_epoch, initial=pos.batch, desc=f"epoch {global_epoch + 1}", leave=False, position=1
            )
        try:
            for x, y in self.train_loader:
                loss = self._step(net, opt, sched, x, y, stage_first_step)
                parts = self.loss_fn.last
                accum += torch.tensor(
                    [loss] + [float(parts.get(k, 0.0)) for k in _LOSS_PARTS[1:-1]] + [1.0], dtype=torch.float64
                )
                pos.step += 1
                pos.batch += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                if r["stop_after_steps"] and pos.step >= r["stop_after_steps"]:
                    return False  # as if killed: no checkpoint
                if self._interrupted and pos.batch < self.steps_per_epoch:
                    self._checkpoint(opt, accum)
                    raise self._stop()
                every = r["checkpoint_every_steps"]
                if every and pos.step % every == 0 and pos.batch < self.steps_per_epoch:
                    self._checkpoint(opt, accum)
        finally:
            if bar is not None:
                bar.close()

        accum = _all_sum(accum.to(d.device), d).cpu() / d.world
        steps = max(float(accum[-1]), 1.0)
        train_stats = {"loss": float(accum[0]) / steps}
        for i, k in enumerate(_LOSS_PARTS[:-1]):
            if k in _LOGGED_PARTS[r["method"]]:
                train_stats[k] = float(accum[i]) / steps
        if isinstance(self.loss_fn, SoftConditionalLoss):
            train_stats["cost_weight"] = self.loss_fn.cost_weight
        val = _validate_epoch(self.ema.module if self.ema is not None else self.model, self.val_loader, d, r)
        rec = {
            "epoch": global_epoch + 1,
            "epochs": self.total_epochs,
            "stage": stage.name,
            "step": pos.step,
            "lr": float(opt.param_groups[0]["lr"]),
            "train": train_stats,
            "val": val,
            "seconds": time.time() - t0,
        }
        self.history.append(rec)
        pos.epoch, pos.batch = pos.epoch + 1, 0
        if pos.epoch == stage.epochs:
            pos.stage, pos.epoch = si + 1, 0
            pos.done = pos.stage == len(self.stages)
        self._checkpoint(opt, None)
        if d.main:
            self.log(_epoch_line(rec))
            atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))
        if self.epoch_bar is not None:
            self.epoch_bar.update(1)
        if self._interrupted:  # the last step of an epoch: stopped after its validation and checkpoint
            raise self._stop()
        return True

    def _step(self, net: nn.Module, opt, sched, x: torch.Tensor, y: torch.Tensor, stage_first_step: int) -> float:
        """One optimizer step; its randomness and learning rate depend only on the step number."""
        r, d, pos = self.recipe, self.d, self.pos
        x = x.to(d.device, non_blocking=True)
        y = y.to(d.device, non_blocking=True)
        if self.mixup is not None:
            np.random.seed(seed_for(r["seed"], pos.step, d.rank, 2))  # timm's Mixup draws from numpy
            x, y = self.mixup(x, y)
        if r["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(seed_for(r["seed"], pos.step, d.rank, 1))
        if sched is not None:
            sched.step_update(num_updates=pos.step - stage_first_step)
        if isinstance(self.loss_fn, SoftConditionalLoss):
            warm = r["cost_warmup"] * self.total_steps
            self.loss_fn.cost_weight = r["cost_weight"] * (min(1.0, pos.step / warm) if warm > 0 else 1.0)
        with _autocast(r, d.device):
            out = net(x)
        loss = self.loss_fn(out, y)
        if not torch.isfinite(loss):
            parts = {k: float(v) for k, v in self.loss_fn.last.items()}
            raise FloatingPointError(
                f"loss is {loss.item()} at step {pos.step} (parts {parts}); lower lr, set clip_grad, or switch amp off."
            )
        opt.zero_grad(set_to_none=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if r["clip_grad"]:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, r["clip_grad"])
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            if r["clip_grad"]:
                torch.nn.utils.clip_grad_norm_(params, r["clip_grad"])
            opt.step()
        if self.ema is not None:
            self.ema.update(self.model, step=pos.step + 1)
        return float(loss.detach())

    def _checkpoint(self, opt: torch.optim.Optimizer, accum: torch.Tensor | None) -> None:
        """Save on rank 0; a mid-epoch checkpoint also keeps the epoch's loss sums (averaged over ranks)."""
        acc_list = None
        if accum is not None:
            accum.copy_(_all_sum(accum.to(self.d.device), self.d).cpu() / self.d.world)
            acc_list = accum.tolist()
        if self.d.main:
            meta = {
                "fingerprint": _fingerprint(self.recipe),
                "position": dict(self.pos.__dict__),
                "history": self.history,
                "accum": acc_list,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "recipe": self.recipe,
            }
            ema = self.ema.module if self.ema is not None else None
            save_checkpoint(self.ckpt_path, self.model, meta, ema, opt)


def _train(recipe: dict[str, Any], d: _Dist, run_dir: Path, resume: bool, overwrite: bool) -> Path:
    trainer = _Trainer(recipe, d, run_dir, resume, overwrite)
    start_step, t0 = trainer.pos.step, time.time()
    if not trainer.run():
        return run_dir
    log = trainer.log
    trained_now = trainer.pos.step > start_step
    if d.main and trained_now:
        log(f"training done in {time.time() - t0:.1f} s ({trainer.pos.step - start_step} steps)")
    if d.owns_group and dist.is_initialized():  # the report is rank 0's alone
        dist.barrier()
        dist.destroy_process_group()
        d.owns_group = False
    if d.main and recipe["report"]:
        if not trained_now and (run_dir / "report.json").is_file():
            log(f"the report already exists: {run_dir / 'report.md'}")
        else:
            evaluate(run_dir, log=log)
    return run_dir
