"""Save a multi-exit model: `save_pretrained` (a folder that is also a plain timm repo) and `push_to_hub`.

This is the side `EarlyExitModel.save_pretrained` / `push_to_hub` call, so it does not import `timm_exits.core.model`
at run time: the model is recognised by its attributes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
from torch import nn

from ..core.config import FORMAT_VERSION
from .card import _architecture, _check_report, _load_report, render_model_card
from .files import (
    _META_KEY,
    _PICKLE_NAMES,
    CARD_NAME,
    CONFIG_KEY,
    CONFIG_NAME,
    EXITS_NAME,
    REPORT_NAME,
    WEIGHTS_NAME,
    _exit_tensors,
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


# --------------------------------------------------------------------------------------------- save
def save_pretrained(
    model: EarlyExitModel,
    save_directory: str | os.PathLike,
    report: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    data_config: dict[str, Any] | None = None,
) -> Path:
    """Save a multi-exit model as a timm-compatible folder (safetensors only) with a model card.

    Args:
        model: The `EarlyExitModel` to save (its backbone must be a timm model).
        save_directory: Folder to write (``~`` expanded); created if needed. Files of an earlier save are
            overwritten; a folder holding other files at the names a save writes (config.json,
            model.safetensors, exits.safetensors, README.md, report.json) is refused, nothing written.
        report: Training report (dict or path of a report.json) the card's numbers come from; None gives a card
            without numbers.
        repo_id: Hub repo the folder is meant for, used in the card's usage snippets.
        data_config: Preprocessing recorded in timm's pretrained_cfg (e.g. {"input_size": (3, 32, 32),
            "mean": ..., "std": ...}); by default the backbone's own.

    Returns:
        The folder's path.
    """
    from timm.models._hub import save_for_hf

    if not _is_exit_model(model):
        raise TypeError(f"expected an EarlyExitModel (from timm_exits.wrap), got {type(model).__name__}")
    architecture = _architecture(model.backbone)
    report_dict = _load_report(report)
    if report_dict is not None:
        _check_report(report_dict, model)
    cfg = model.config.to_dict()
    cfg["costs"] = [float(c) for c in model.exit_costs.tolist()]  # as used, so a reload needs no FLOP count
    cfg["format_version"] = FORMAT_VERSION  # the layout written here, whatever the model was loaded from
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the exit configuration cannot be written as JSON: {e}") from e

    folder = Path(save_directory).expanduser()
    _check_target(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Everything is written to a private folder inside the target first (the same file system, so each
    # move is atomic), then moved in file by file (config.json last): an interrupted save leaves the
    # earlier files, or files whose hashes config.json does not match, which loading refuses; never a
    # half-written file.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".saving-") as tmp:
        stage = Path(tmp)
        save_for_hf(
            model.backbone, stage, model_config={CONFIG_KEY: cfg}, safe_serialization=True, data_config=data_config
        )
        written = {n for n in _PICKLE_NAMES if (stage / n).exists()}
        if written:  # guards the no-pickle promise against a change of timm's save_for_hf
            raise RuntimeError(f"timm's save_for_hf wrote pickle files {sorted(written)}; nothing was saved.")
        backbone_sha = _sha256(stage / WEIGHTS_NAME)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in _exit_tensors(model).items()}
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
                os.replace(stage / name, folder / name)
    if report_dict is None and (folder / REPORT_NAME).exists():
        (folder / REPORT_NAME).unlink()  # a stale report would contradict the card
    return folder


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
    except (OSError, ValueError):
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
) -> Any:
    """Upload a multi-exit model to the Hugging Face Hub in one commit.

    Creates the repo if needed (`HfApi.create_repo(exist_ok=True)`) and the branch `revision` if it is not
    there yet, then commits config.json, model.safetensors, exits.safetensors, README.md (and report.json).

    Args:
        model: The `EarlyExitModel` to upload.
        repo_id: "org/name" on the Hub.
        report: Training report for the model card (see `save_pretrained`).
        private: Create the repo as private (ignored if it exists).
        revision: Branch to commit to (default: main).
        commit_message: Message of the commit.
        token: Hub token (default: the logged-in one).
        endpoint: Hub endpoint (default: HF_ENDPOINT or huggingface.co).
        data_config: Preprocessing recorded in timm's pretrained_cfg (see `save_pretrained`).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token, library_name="timm-exits", library_version=_version())
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and revision != "main" and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    card_id = repo_id if revision in (None, "main") else f"{repo_id}@{revision}"
    with tempfile.TemporaryDirectory(prefix="timm_exits_push_") as tmp:
        folder = save_pretrained(model, tmp, report, repo_id=card_id, data_config=data_config)
        ops = [
            CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
            for p in sorted(folder.iterdir())
            if p.is_file()
        ]
        return api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision)
