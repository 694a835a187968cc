"""Training recipes: the recipe keys and their defaults (`DEFAULTS`), shipped recipes, YAML files and overrides.

A recipe is a flat YAML mapping of the keys in `DEFAULTS` (``base: other.yaml`` merges another file
first: one next to it, else a shipped recipe of that name); the recipes shipped in ``timm_exits/training/recipes/``
are selected by name (``-c digits_quick``, listed by `list_recipes`), any other by its path; every key
can be overridden (``key=value``, dotted keys for dict values such as ``model_kwargs.drop_path_rate=0.1``),
and an unknown key is an error that lists the valid ones. A run is identified by its recipe without the runtime
keys (`_identity`, hashed by `_fingerprint`): those may change when a run is resumed or evaluated.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..inference.gate_fitting import GATE_OBJECTIVES
from ..inference.policies import POLICIES
from .augment import AUGMENTS
from .data import DATASETS

__all__ = [
    "DEFAULTS",
    "METHODS",
    "RecipeError",
    "RECIPE_DIR",
    "list_recipes",
    "resolve_recipe",
    "load_recipe",
    "parse_overrides",
]

METHODS = ("baseline", "branchynet", "soft")

_DEFAULT_POLICY = {"baseline": "confidence", "branchynet": "entropy", "soft": "gate"}

# Every recipe key with its default. Comments are the documentation of the recipe format.
DEFAULTS: dict[str, Any] = {
    # -- what to train
    "name": None,  # run name (default: the recipe file's name)
    "method": "soft",  # baseline | branchynet | soft
    "seed": 0,  # seeds model init, data order, augmentation, mixup and dropout
    # -- model
    "model": "resnet18",  # any timm model name (timm_exits.training.models registers alexnet_cifar)
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


# Keys added after runs were first recorded, with the value that trains what those runs trained: at that
# value a key is left out of the identity, so a run recorded before the key existed still resumes.
_LATER_KEYS: dict[str, Any] = {"weights": None}


def _identity(recipe: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in recipe.items() if k not in _RUNTIME_KEYS and not (k in _LATER_KEYS and v == _LATER_KEYS[k])
    }


def _fingerprint(recipe: Mapping[str, Any]) -> str:
    text = json.dumps(_identity(recipe), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
