"""Save a multi-exit model: `save_pretrained` (a folder that is also a plain timm repo) and `push_to_hub`.

This is the side `EarlyExitModel.save_pretrained` / `push_to_hub` call, so it does not import `timm_exits.core.model`
at run time: the model is recognised by its attributes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from torch import nn

from ..core.config import FORMAT_VERSION, ExitConfig
from .card import _architecture, _check_repo_id, _check_report, _load_report, render_model_card
from .files import (
    _COSTS_KEY,
    _DTYPE_KEY,
    _MEASURED_KEY,
    _META_KEY,
    _PICKLE_NAMES,
    _UPSTREAM_KEY,
    CARD_NAME,
    CONFIG_KEY,
    CONFIG_NAME,
    EXITS_NAME,
    REPORT_NAME,
    WEIGHTS_NAME,
    _dtype_name,
    _exit_fields,
    _host,
    _is_exit_key,
    _process_gone,
    _publish_mode,
    _sha256,
    _version,
)

if TYPE_CHECKING:  # annotations only: the model's save methods import this module
    from ..core.model import EarlyExitModel

__all__ = [
    "save_pretrained",
    "push_to_hub",
]

_DEFAULT_COMMIT_MESSAGE = "Upload multi-exit model (timm-exits)"

_STAGE_PREFIX = ".saving-"

_STAGE_MAX_AGE_S = 3600.0  # a staging folder whose owner cannot be checked is left alone this long

# The names of the staging folders saves write: ".saving-<pid>-<host>-<tempfile's 8 random characters>", and
# ".saving-<8 random characters>" as earlier versions named them. Any other ".saving-*" folder is a user's.
_STAGE_NAME = re.compile(rf"{re.escape(_STAGE_PREFIX)}(\d+)-([A-Za-z0-9._]*)-[a-z0-9_]{{8}}")
_OLD_STAGE_NAME = re.compile(rf"{re.escape(_STAGE_PREFIX)}[a-z0-9_]{{8}}")
# What a staging folder can hold: the files a save writes, and safetensors' temporary file (".tmp" and 6 letters).
_STAGE_FILE = re.compile(
    "|".join(map(re.escape, (CONFIG_NAME, WEIGHTS_NAME, EXITS_NAME, CARD_NAME, REPORT_NAME))) + r"|\.tmp[A-Za-z0-9]{6}"
)


# --------------------------------------------------------------------------------------------- save
def save_pretrained(
    model: EarlyExitModel,
    save_directory: str | os.PathLike,
    report: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    data_config: dict[str, Any] | None = None,
    model_args: dict[str, Any] | None = None,
) -> Path:
    """Save a multi-exit model as a timm-compatible folder (safetensors only) with a model card.

    Args:
        model: The `EarlyExitModel` to save (its backbone must be a timm model); a `torch.compile`d one is
            saved as the model it compiles.
        save_directory: Folder to write (``~`` expanded); created if needed. Files of an earlier save are
            overwritten; a folder holding other files at the names a save writes (config.json,
            model.safetensors, exits.safetensors, README.md, report.json) is refused, nothing written.
            Staging folders (".saving-<pid>-<host>-*") that earlier saves were killed before removing are deleted;
            other folders named ".saving-*" are left alone.
        report: Training report (dict or path of a report.json) the card's numbers come from; None gives a card
            without numbers.
        repo_id: Hub repo the folder is meant for, used in the card's usage snippets.
        data_config: Preprocessing recorded in timm's pretrained_cfg (e.g. {"input_size": (3, 32, 32),
            "mean": ..., "std": ...}); by default the backbone's own.
        model_args: JSON replacements for `timm.create_model` arguments of the backbone that JSON cannot hold,
            recorded in config.json's model_args (timm's `save_for_hf` argument): a backbone created with
            `act_layer=nn.SiLU` is saved with `model_args={"act_layer": "silu"}`.

    Returns:
        The folder's path.

    Raises:
        ValueError: `model.config` would not load back (e.g. thresholds with policy "soft"), or a backbone argument
            is not JSON and `model_args` gives no replacement; nothing is written, and a folder the call created
            is removed again.
    """
    model = _unwrap_compiled(model)
    if not _is_exit_model(model):
        raise TypeError(f"expected an EarlyExitModel (from timm_exits.wrap), got {type(model).__name__}")
    _check_materialized(model)
    if repo_id:
        _check_repo_id(repo_id)
    architecture = _architecture(model.backbone)
    report_dict = _load_report(report)
    if report_dict is not None:
        _check_report(report_dict, model)
    cfg = _exit_record(model)
    exit_state = _exit_state(model)

    folder = Path(save_directory).expanduser()
    _check_target(folder)
    # Everything is written to a private folder inside the target first (the same file system, so each
    # move is atomic), then moved in file by file (config.json last): an interrupted save leaves the
    # earlier files, or files whose hashes config.json does not match, which loading refuses; never a
    # half-written file. A save killed before it cleans up leaves its folder, which a later save removes.
    with _target_folder(folder), tempfile.TemporaryDirectory(dir=folder, prefix=_stage_prefix()) as tmp:
        stage = Path(tmp)
        _save_backbone(model.backbone, stage, cfg, data_config, model_args)
        written = {n for n in _PICKLE_NAMES if (stage / n).exists()}
        if written:  # guards the no-pickle promise against a change of timm's save_for_hf
            raise RuntimeError(f"timm's save_for_hf wrote pickle files {sorted(written)}; nothing was saved.")
        backbone_sha = _sha256(stage / WEIGHTS_NAME)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in exit_state.items()}
        info = {
            "format_version": FORMAT_VERSION,
            "architecture": architecture,
            "exits": list(model.config.exits),
            "backbone_sha256": backbone_sha,
        }
        meta = {_META_KEY: json.dumps(info, sort_keys=True)}
        safetensors.torch.save_file(tensors, str(stage / EXITS_NAME), metadata=meta)
        _record_hashes(stage / CONFIG_NAME, {WEIGHTS_NAME: backbone_sha, EXITS_NAME: _sha256(stage / EXITS_NAME)})
        if report_dict is not None:
            (stage / REPORT_NAME).write_text(json.dumps(report_dict, indent=2) + "\n", encoding="utf-8")
        card = render_model_card(model, report_dict, repo_id=repo_id, folder_name=folder.resolve().name)
        (stage / CARD_NAME).write_text(card, encoding="utf-8")
        for name in (WEIGHTS_NAME, EXITS_NAME, REPORT_NAME, CARD_NAME, CONFIG_NAME):
            if (stage / name).exists():
                _publish_mode(stage / name)
                os.replace(stage / name, folder / name)
    if report_dict is None and (folder / REPORT_NAME).exists():
        (folder / REPORT_NAME).unlink()  # a stale report would contradict the card
    return folder


@contextlib.contextmanager
def _target_folder(folder: Path) -> Iterator[None]:
    """Create `folder` (and its missing parents) for a save, and remove those it created if the save fails.

    Only folders this call created, and only while empty, are removed: a folder the user had, or one another
    process wrote into meanwhile, stays.
    """
    created = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        created.append(path)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _remove_stale_stages(folder)
        yield
    except BaseException:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break
        raise


def _save_backbone(
    backbone: nn.Module,
    stage: Path,
    cfg: dict[str, Any],
    data_config: dict[str, Any] | None,
    model_args: dict[str, Any] | None,
) -> None:
    """What timm's `save_for_hf` writes for the backbone (model.safetensors, then config.json with the exit record)
    into `stage`, with tensors in a non-default memory format (a channels_last model) saved as contiguous copies."""
    from timm.models._hub import save_config_for_hf

    if model_args is not None and not isinstance(model_args, dict):
        raise TypeError(f"model_args must be a dict of timm.create_model arguments, got {type(model_args).__name__}.")
    tensors = {k: v.contiguous() for k, v in backbone.state_dict().items()}  # the same tensors where contiguous
    safetensors.torch.save_file(tensors, str(stage / WEIGHTS_NAME))
    del tensors
    try:
        save_config_for_hf(
            backbone,
            str(stage / CONFIG_NAME),
            model_config={CONFIG_KEY: cfg},
            model_args=model_args,
            data_config=data_config,
        )
    except ValueError as e:
        if "model_args" not in str(e):
            raise
        raise ValueError(
            f"{e} Pass save_pretrained(..., model_args={{name: value}}) (push_to_hub takes it too) with a JSON value "
            "timm.create_model accepts in its place, e.g. model_args={'act_layer': 'silu'} for act_layer=nn.SiLU; "
            "nothing was written."
        ) from e


def _unwrap_compiled(model: Any) -> Any:
    """The module a `torch.compile` wrapper holds (its `_orig_mod`); any other object as it is."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported whenever a compiled module exists
    optimized = getattr(eval_frame, "OptimizedModule", None)
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


def _check_materialized(model: nn.Module) -> None:
    """Refuse a model whose tensors are on the 'meta' device (shapes without values).

    Raises:
        ValueError: Some parameter or buffer is a meta tensor; nothing is written.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = [name for name, t in tensors if t.is_meta]
    if meta:
        raise ValueError(
            f"{len(meta)} of the model's {len(tensors)} tensors (e.g. {meta[0]!r}) are on the 'meta' device and hold "
            "no values; nothing was written. Give them values first (model.to_empty(device='cpu'), then "
            "load_state_dict) and save again."
        )


def _exit_record(model: EarlyExitModel) -> dict[str, Any]:
    """The "timm_exits" object of config.json (without the file hashes), checked to load back.

    Raises:
        ValueError: The configuration is not JSON, or `ExitConfig.from_dict` would refuse it on loading.
    """
    cfg = model.config.to_dict()
    cfg["costs"] = [float(c) for c in model.exit_costs.tolist()]  # as used, so a reload needs no FLOP count
    cfg[_MEASURED_KEY] = model.config.costs is None  # measured costs are measured again after reset_classifier
    cfg["format_version"] = FORMAT_VERSION  # the layout written here, whatever the model was loaded from
    dtype = _dtype_name(model)
    if dtype is not None:
        cfg[_DTYPE_KEY] = dtype
    upstream = (getattr(model.backbone, "pretrained_cfg", None) or {}).get("hf_hub_id")
    if isinstance(upstream, str) and upstream:
        cfg[_UPSTREAM_KEY] = upstream
    try:
        text = json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the exit configuration cannot be written as JSON: {e}") from e
    try:
        ExitConfig.from_dict(_exit_fields(json.loads(text)))
    except (TypeError, ValueError) as e:
        reason = str(e).rstrip(".")
        raise ValueError(
            f"model.config (policy={cfg['policy']!r}, thresholds={cfg['thresholds']!r}) would not load back: "
            f"{reason}. Nothing was written; fix model.config (thresholds: None, or one value in [0, 1] per early "
            "exit) and save again."
        ) from e
    return cfg


def _exit_state(model: EarlyExitModel) -> dict[str, torch.Tensor]:
    """The tensors of exits.safetensors, refusing a state dict with entries neither backbone nor exits.

    Raises:
        ValueError: Some entries would be saved in neither file, or `exit_costs` is missing.
    """
    state = model.state_dict()
    other = [k for k in state if not k.startswith("backbone.") and not _is_exit_key(k)]
    if other or _COSTS_KEY not in state:
        shown = f"{other[:5]}" + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise ValueError(
            f"the model's state dict holds {shown if other else f'no {_COSTS_KEY!r}'}: a saved model keeps only "
            f"'backbone.*' (in {WEIGHTS_NAME}) and 'branches.*', 'final_head.*' and {_COSTS_KEY!r} (in "
            f"{EXITS_NAME}); nothing was written. Save the EarlyExitModel itself, not a module wrapping it."
        )
    return {k: v for k, v in state.items() if _is_exit_key(k)}


def _stage_prefix() -> str:
    """Name prefix of this process's staging folders: ".saving-<pid>-<host>-"."""
    return f"{_STAGE_PREFIX}{os.getpid()}-{_host()}-"


def _remove_stale_stages(folder: Path) -> None:
    """Remove staging folders that earlier saves, killed before they cleaned up, left in `folder`."""
    for path in folder.glob(f"{_STAGE_PREFIX}*"):
        if path.is_dir() and not path.is_symlink() and _stage_is_stale(path):
            shutil.rmtree(path, ignore_errors=True)


def _stage_is_stale(path: Path) -> bool:
    """Whether `path` is a staging folder of a save that is gone: its process (on this host) no longer runs; for a
    folder of another host, or of the older name format, that holds only what a save writes, whether it is older
    than an hour. A folder whose name a save never writes (a user's ".saving-drafts") is never stale."""
    m = _STAGE_NAME.fullmatch(path.name)
    gone = None if m is None else _process_gone(m.group(1), m.group(2))
    if gone is not None:
        return gone
    if m is None and _OLD_STAGE_NAME.fullmatch(path.name) is None:
        return False
    if not _holds_only_save_files(path):
        return False
    try:
        return time.time() - path.stat().st_mtime > _STAGE_MAX_AGE_S
    except OSError:
        return False


def _holds_only_save_files(path: Path) -> bool:
    """Whether folder `path` holds nothing but files a save writes in its staging folder."""
    try:
        return all(p.is_file() and not p.is_symlink() and _STAGE_FILE.fullmatch(p.name) for p in path.iterdir())
    except OSError:
        return False


def _check_target(folder: Path) -> None:
    """Refuse a folder holding files at the names a save writes that no earlier save wrote."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"save_directory {folder} exists and is not a folder; nothing was written.")
    names = (CONFIG_NAME, WEIGHTS_NAME, EXITS_NAME, CARD_NAME, REPORT_NAME)
    present = [n for n in names if (folder / n).exists()]
    if not present or _saved_here(folder):
        return
    raise FileExistsError(
        f"save_directory {folder} holds {', '.join(present)}, which no earlier timm-exits save wrote (its "
        f"{CONFIG_NAME} has no {CONFIG_KEY!r} entry); nothing was written. Save into a new folder, or move those "
        "files away."
    )


def _saved_here(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get(CONFIG_KEY), dict)


def _is_exit_model(model: Any) -> bool:
    """Whether `model` is an `EarlyExitModel`, checked by its attributes (saving does not import the model)."""
    return isinstance(model, nn.Module) and all(hasattr(model, a) for a in ("backbone", "branches", "config"))


# pretrained_cfg keys that name the upstream checkpoint the architecture's default weights came from; the
# saved weights are this model's own, so a saved config does not claim that checkpoint's tag, URL or paper.
_UPSTREAM_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "tag", "origin_url", "paper_ids", "paper_name", "notes")


def _record_hashes(config_path: Path, files: dict[str, str]) -> None:
    """Add the weight files' SHA-256 under config.json's "timm_exits" -> "files" (timm ignores the key), and
    drop the upstream checkpoint's identity from timm's pretrained_cfg."""
    hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    hf_config[CONFIG_KEY]["files"] = files
    for key in _UPSTREAM_KEYS:
        hf_config.get("pretrained_cfg", {}).pop(key, None)
    config_path.write_text(json.dumps(hf_config, indent=2), encoding="utf-8")  # as timm's save_for_hf writes it


def push_to_hub(
    model: EarlyExitModel,
    repo_id: str,
    report: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = _DEFAULT_COMMIT_MESSAGE,
    token: str | None = None,
    endpoint: str | None = None,
    data_config: dict[str, Any] | None = None,
    model_args: dict[str, Any] | None = None,
) -> Any:
    """Upload a multi-exit model to the Hugging Face Hub in one commit.

    Saves the model first (a model `save_pretrained` refuses never reaches the Hub), then creates the repo if
    needed (`HfApi.create_repo(exist_ok=True)`) and the branch `revision` if it is not there yet, then commits
    config.json, model.safetensors, exits.safetensors, README.md and report.json; without a report, the commit
    deletes a report.json an earlier push left there (it would contradict the new card).

    Args:
        model: The `EarlyExitModel` to upload (or a `torch.compile`d one).
        repo_id: "org/name" on the Hub.
        report: Training report for the model card (see `save_pretrained`).
        private: Create the repo as private (ignored if it exists).
        revision: Branch to commit to (default: main).
        commit_message: Message of the commit.
        token: Hub token (default: the logged-in one).
        endpoint: Hub endpoint (default: HF_ENDPOINT or huggingface.co).
        data_config: Preprocessing recorded in timm's pretrained_cfg (see `save_pretrained`).
        model_args: JSON replacements for backbone arguments JSON cannot hold (see `save_pretrained`).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    model = _unwrap_compiled(model)
    api = HfApi(endpoint=endpoint, token=token, library_name="timm-exits", library_version=_version())

    def save(folder: str, repo: str) -> Path:
        card_id = repo if revision in (None, "main") else f"{repo}@{revision}"
        return save_pretrained(model, folder, report, repo_id=card_id, data_config=data_config, model_args=model_args)

    with tempfile.TemporaryDirectory(prefix="timm_exits_push_") as tmp:
        folder = save(os.path.join(tmp, "model"), repo_id)  # a model that cannot be saved never reaches the Hub
        created = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and revision != "main" and not revision.startswith("refs/"):
            api.create_branch(created, branch=revision, exist_ok=True)
        if created != repo_id:  # the Hub completed the name (its namespace): the card names the repository
            folder = save(os.path.join(tmp, "named"), created)
        repo_id = created
        ops: list[Any] = [
            CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
            for p in sorted(folder.iterdir())
            if p.is_file()
        ]
        if not (folder / REPORT_NAME).exists() and api.file_exists(repo_id, REPORT_NAME, revision=revision):
            ops.append(CommitOperationDelete(path_in_repo=REPORT_NAME))  # an earlier push's report contradicts the card
        return api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision)
