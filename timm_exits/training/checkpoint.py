"""Training checkpoints, and loading a trained run back.

Checkpoints are safetensors files (model, EMA and optimizer tensors; everything else as JSON in the header), written
in a temporary folder named after the process and moved into place. `load_run` rebuilds a run's model from its
recipe and checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from ..core.model import EarlyExitModel
from ..hub.files import _publish_mode
from .build import build_model
from .recipe import Recipe, RecipeError, load_recipe
from .recipe_schema import RUNTIME_KEYS
from .recipe_types import load_yaml
from .runfiles import _private_name, atomic_write_text, remove_stale_temporaries

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "LoadedRun",
    "load_run",
]

CHECKPOINT_NAME = "checkpoint.safetensors"

_CKPT_META = "timm_exits.checkpoint"

_CKPT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint does not fit the model or run it is loaded into."""


# ------------------------------------------------------------------------------------- checkpoints
_DTYPE_TAG, _TENSORS_TAG = "__torch_dtype__", "__tensor_list__"  # JSON markers of optimizer values


def _plain(v: Any) -> Any:
    """An optimizer value as JSON: tensors as numbers or lists, tuples as lists, dtypes tagged by name."""
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, torch.dtype):
        return {_DTYPE_TAG: str(v).removeprefix("torch.")}
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _unplain(v: Any) -> Any:
    """Undo `_plain`'s dtype tags (a tensor's value stays as the number or list it was stored as)."""
    if isinstance(v, dict):
        if set(v) == {_DTYPE_TAG}:
            return getattr(torch, v[_DTYPE_TAG])
        return {k: _unplain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unplain(x) for x in v]
    return v


def save_checkpoint(
    path: Path,
    model: nn.Module,
    meta: dict[str, Any],
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Write model / EMA / optimizer tensors and JSON metadata to one safetensors file, atomically.

    The file is written in a folder ``.timm-exits-checkpoint-<pid>-<host>`` next to `path` (safetensors' own
    temporary file lands there too), then moved into place; such folders that killed writes left behind, and the
    other temporaries of killed commands, are removed first (`runfiles.remove_stale_temporaries`).
    """
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
                elif isinstance(v, (list, tuple)) and v and all(torch.is_tensor(t) for t in v):  # Kron's factors
                    for i, t in enumerate(v):
                        tensors[f"optim/{idx}/{name}/{i}"] = t.detach().to("cpu", copy=True).contiguous()
                    scalars.setdefault(str(idx), {})[name] = {_TENSORS_TAG: len(v)}
                else:
                    scalars.setdefault(str(idx), {})[name] = _plain(v)
        groups = [{k: _plain(v) for k, v in g.items()} for g in sd["param_groups"]]
        opt_meta = {"param_groups": groups, "scalars": scalars, "type": type(optimizer).__name__}
    meta = {**meta, "optimizer": opt_meta, "format_version": _CKPT_VERSION}
    remove_stale_temporaries(path.parent)
    work = path.parent / _private_name("checkpoint")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        tmp = work / path.name
        safetensors.torch.save_file(tensors, str(tmp), metadata={_CKPT_META: json.dumps(meta)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish_mode(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    atomic_write_text(path.with_suffix(".json"), json.dumps({k: v for k, v in meta.items() if k != "optimizer"}))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`: ({"model"|"ema"|"optim": tensors}, metadata)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found.")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if _CKPT_META in header:  # else another safetensors file, refused below
                for k in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                    prefix, rest = k.split("/", 1)
                    groups.setdefault(prefix, {})[rest] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({e}).") from e
    if _CKPT_META not in header:
        raise CheckpointError(
            f"{path} is a safetensors file but not a timm-exits training checkpoint (no {_CKPT_META!r} metadata). "
            "A saved model folder loads with timm_exits.from_pretrained; backbone weights go in the recipe's "
            "`weights` key; init_checkpoint and --resume take a run folder or its checkpoint.safetensors."
        )
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
        own = state.setdefault(int(idx), {})
        for name, v in values.items():
            if isinstance(v, dict) and set(v) == {_TENSORS_TAG}:
                own[name] = [own.pop(f"{name}/{i}") for i in range(v[_TENSORS_TAG])]
            else:
                own[name] = _unplain(v)
    opt.load_state_dict({"state": state, "param_groups": _unplain(copy.deepcopy(meta["param_groups"]))})


@dataclass
class LoadedRun:
    """A trained run loaded back: its recipe, class names and model (EMA weights when the run kept an EMA)."""

    run_dir: Path
    recipe: Recipe
    classes: list[str]
    model: EarlyExitModel
    meta: dict[str, Any]


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> LoadedRun:
    """Rebuild a run's model from its recipe and checkpoint (no pretrained download).

    Args:
        run_dir: The run folder.
        device: Device of the model.
        **overrides: Runtime recipe keys to change (e.g. data_dir), by their flat names.

    Returns:
        A `LoadedRun`.
    """
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "run.json").is_file() or not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a timm-exits run folder (run.json / recipe.yaml missing).")
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        saved = load_yaml((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except ValueError as e:  # RecipeError for YAML, JSONDecodeError for run.json
        raise CheckpointError(f"{run_dir}: run.json or recipe.yaml cannot be read ({e}); the folder is damaged.") from e
    if not isinstance(info, dict) or not {"fingerprint", "num_classes", "classes"} <= set(info):
        raise CheckpointError(f"{run_dir / 'run.json'} was not written by timm-exits (fingerprint, classes missing).")
    bad = sorted(k for k in overrides if k not in RUNTIME_KEYS)
    if bad:
        raise RecipeError(
            f"only runtime keys can change for a trained run, not {bad}; runtime keys: {sorted(RUNTIME_KEYS)}."
        )
    recipe = load_recipe(saved, {k: v for k, v in overrides.items() if v is not None})
    groups, meta = load_checkpoint(run_dir / CHECKPOINT_NAME)
    if meta.get("fingerprint") != info.get("fingerprint"):
        raise CheckpointError(f"{run_dir / CHECKPOINT_NAME} belongs to another run than {run_dir / 'run.json'}.")
    model = build_model(recipe.model, int(info["num_classes"]), recipe.data.img_size, pretrained=False)
    weights = groups.get("ema") if recipe.optim.ema and "ema" in groups else groups.get("model", {})
    _load_state(model, weights, str(run_dir / CHECKPOINT_NAME))
    return LoadedRun(run_dir, recipe, list(info["classes"]), model.to(device).eval(), meta)
