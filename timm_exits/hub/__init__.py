"""Hugging Face Hub: publish and download multi-exit models as safetensors, with generated model cards.

A saved multi-exit model is a folder (or Hub repo) that is at the same time a normal timm repo:

    config.json          timm's own config (architecture, num_classes, model_args, pretrained_cfg), plus the
                         exit configuration (`ExitConfig.to_dict()`) under the top-level key "timm_exits", with
                         the SHA-256 of both weight files under "timm_exits" -> "files"
    model.safetensors    the backbone's weights, written by timm's `save_for_hf(..., safe_serialization=True)`
    exits.safetensors    exit heads, gates, the added final head (if any) and the `exit_costs` buffer, keyed as
                         in `EarlyExitModel.state_dict()`; its header metadata repeats the format version,
                         the architecture and the exit names, and records the SHA-256 of the model.safetensors
                         it was saved with ("backbone_sha256")
    README.md            a model card generated from the templates in `timm_exits/hub_cards/`
    report.json          the training report the card's numbers come from (only when one was given)

`timm.create_model("hf-hub:org/name", pretrained=True)` and `"local-dir:/path"` load the backbone from it as
they would any timm repo; `from_pretrained` rebuilds the whole multi-exit model and `load_exits` attaches the
saved exits to a backbone already in memory. Only safetensors are written or read, never pickle, and loading
is strict: every mismatch raises `ExitCheckpointError` naming the file and the key.

Integrity: loading checks each file it reads against the SHA-256 recorded in config.json, so one changed byte
anywhere in a weight file (header or tensor data) raises, naming the file and both hashes; and it checks that
exits.safetensors was saved together with this folder's model.safetensors, so exits copied over from another
trained model of the same architecture and exits are refused, naming both files. The hashes guard against
damaged downloads and mixed-up files, not against deliberate edits (whoever edits a file can edit config.json).
Folders of format version 1 (written before the hashes were recorded) still load, with a warning that they cannot
be verified; saving the loaded model again records the hashes.

The card templates are `string.Template` files in `timm_exits/hub_cards/` (package data): `model_card.md`
(the card: $front_matter, $title, $architecture, $exit_list, $final_note, $head, $gate, $policy, $trained,
$source, $timm_source, $results, $training), `results.md` ($headline, $exit_table, $policies, $speed) when a
report is given and `no_results.md` when not. Every number on a card comes from the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import string
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import yaml
from torch import nn

from ..core.config import FORMAT_VERSION, ExitConfig
from ..core.model import EarlyExitModel, wrap

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "EXITS_NAME",
    "CARD_NAME",
    "REPORT_NAME",
    "CONFIG_KEY",
    "ExitCheckpointError",
    "save_pretrained",
    "push_to_hub",
    "push_run",
    "from_pretrained",
    "load_exits",
    "render_model_card",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EXITS_NAME = "exits.safetensors"
CARD_NAME = "README.md"
REPORT_NAME = "report.json"
CONFIG_KEY = "timm_exits"

_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.pth", "model.pth", "model.pt", "exits.bin", "exits.pt")
_META_KEY = "timm_exits"  # one metadata entry (a JSON object): safetensors orders several entries at random
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E4M3FN": 1, "F8_E5M2FNUZ": 1, "F8_E4M3FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
    "C64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024
_HASHED_SINCE = 2  # first format version whose config.json records the weight files' SHA-256
_DEFAULT_COMMIT_MESSAGE = "Upload multi-exit model (timm-exits)"
_CARD_FILES = ("model_card.md", "results.md", "no_results.md")


class ExitCheckpointError(ValueError):
    """A saved multi-exit model does not match what loading expects.

    Attributes:
        file: The file at fault: its path, or for the Hub "hf-hub:org/name[@revision]/filename (cached path)".
        key: The tensor or config key at fault, when there is one.
    """

    def __init__(self, file: str, key: str | None, message: str) -> None:
        self.file = file
        self.key = key
        where = f"{file}, key {key!r}" if key is not None else file
        super().__init__(f"{where}: {message}")


# ------------------------------------------------------------------------------------------ sources
@dataclass
class _Source:
    """Where a saved model lives: a local folder or a Hub repo (with download options)."""

    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    token: str | bool | None = None
    local_files_only: bool = False

    @property
    def name(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        return f"hf-hub:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    def fetch(self, filename: str) -> tuple[Path, str]:
        """Return (local path, label for errors) of `filename`, downloading it through the HF cache if needed."""
        if self.folder is not None:
            path = self.folder / filename
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file; {_missing_hint(filename, self.folder)}")
            return path, str(path)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        label = f"{self.name}/{filename}"
        try:
            path = hf_hub_download(
                self.repo_id,
                filename,
                revision=self.revision,
                cache_dir=self.cache_dir,
                token=self.token,
                local_files_only=self.local_files_only,
                library_name="timm-exits",
                library_version=_version(),
            )
        except EntryNotFoundError as e:
            raise FileNotFoundError(f"{label}: not found ({e}); {_missing_hint(filename, None)}") from e
        return Path(path), f"{label} ({path})"


def _missing_hint(filename: str, folder: Path | None) -> str:
    if filename == EXITS_NAME:
        return "this is not a timm-exits model (a plain timm model has no exits); save one with save_pretrained()."
    if filename == WEIGHTS_NAME:
        pickles = [n for n in _PICKLE_NAMES if folder is not None and (folder / n).exists()]
        found = f" ({', '.join(pickles)} is there but is a pickle)" if pickles else ""
        return f"timm-exits reads backbone weights from {WEIGHTS_NAME} only and never loads pickle files{found}."
    return f"a saved multi-exit model has {CONFIG_NAME}, {WEIGHTS_NAME} and {EXITS_NAME}."


def _parse_source(
    source: str | os.PathLike,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
) -> _Source:
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be 'hf-hub:org/name[@revision]' or a folder, got {source!r}")
    prefix, sep, rest = source.partition(":")
    if sep and prefix.lower() in ("hf-hub", "hf_hub"):
        repo_id, at, rev = rest.partition("@")
        if not repo_id or (at and not rev) or "@" in rev:
            raise ValueError(f"{source!r}: expected 'hf-hub:org/name' or 'hf-hub:org/name@revision'.")
        if at and revision is not None and revision != rev:
            raise ValueError(f"{source!r} names revision {rev!r} but revision={revision!r} was also given.")
        return _Source(
            repo_id=repo_id,
            revision=rev or revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
    folder = Path(rest) if sep and prefix.lower() == "local-dir" else Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{source!r} is not an existing folder; use 'hf-hub:org/name' to load from the Hugging Face Hub."
        )
    return _Source(folder=folder)


def _version() -> str:
    try:
        return metadata.version("timm-exits")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------- safetensors
def _read_safetensors(path: Path, label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check a safetensors file's structure, then load it (CPU). Returns (tensors, header metadata)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ExitCheckpointError(label, None, f"file is {size} bytes, shorter than a safetensors header.")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ExitCheckpointError(
                label,
                None,
                f"header claims {n} bytes but the file has {size - 8} after its length: truncated or "
                "not a safetensors file.",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExitCheckpointError(label, None, f"header is not valid JSON ({e}): the file is corrupted.") from e
    if not isinstance(header, dict):
        raise ExitCheckpointError(label, None, "header is not a JSON object: the file is corrupted.")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ExitCheckpointError(label, "__metadata__", "metadata is not a JSON object: the file is corrupted.")
    data_size = size - 8 - n
    for key, info in header.items():
        _check_entry(label, key, info)
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):  # the first damaged in file order
        _check_extent(label, key, info, data_size)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # the library's own checks; its errors name neither file nor key
        raise ExitCheckpointError(label, None, f"safetensors could not read the file: {e}") from e
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _check_entry(label: str, key: str, info: Any) -> None:
    """One header entry: well formed, and its byte span fits its dtype and shape."""
    if not isinstance(info, dict):
        raise ExitCheckpointError(label, key, "header entry is not a JSON object: the file is corrupted.")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if (
        not isinstance(dtype, str)
        or not isinstance(shape, list)
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ExitCheckpointError(label, key, f"malformed header entry {info}: the file is corrupted.")
    width = _DTYPE_BYTES.get(dtype)
    if width is not None and math.prod(shape) * width != offsets[1] - offsets[0]:
        raise ExitCheckpointError(
            label,
            key,
            f"a {dtype} tensor of shape {tuple(shape)} needs {math.prod(shape) * width} bytes but "
            f"spans {offsets[1] - offsets[0]}: the file is corrupted.",
        )


def _check_extent(label: str, key: str, info: dict[str, Any], data_size: int) -> None:
    """One tensor's bytes lie inside the file."""
    end = info["data_offsets"][1]
    if end > data_size:
        raise ExitCheckpointError(
            label,
            key,
            f"tensor data ends at byte {end} but the file holds only {data_size} bytes of data: the file is truncated.",
        )


def _check_tensors(
    label: str, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], context: str = ""
) -> None:
    """Raise unless `tensors` has exactly the keys and shapes of `expected`."""
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    ctx = f" ({context})" if context else ""
    if missing:
        more = f" and {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else ""
        raise ExitCheckpointError(label, missing[0], f"tensor missing from the file{more}{ctx}.")
    if unexpected:
        more = f" and {len(unexpected) - 1} more: {unexpected[1:6]}" if len(unexpected) > 1 else ""
        raise ExitCheckpointError(label, unexpected[0], f"unexpected tensor in the file{more}{ctx}.")
    for k, ref in expected.items():
        if tuple(tensors[k].shape) != tuple(ref.shape):
            raise ExitCheckpointError(
                label, k, f"shape {tuple(tensors[k].shape)} in the file but {tuple(ref.shape)} in the model{ctx}."
            )


def _exit_tensors(model: EarlyExitModel) -> dict[str, torch.Tensor]:
    """Everything in the wrapper's state dict that is not the backbone's (heads, gates, final head, costs)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}


# -------------------------------------------------------------------------------------------- integrity
def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _recorded_hashes(hf_config: dict[str, Any], label: str) -> dict[str, str] | None:
    """The SHA-256 config.json records for model.safetensors and exits.safetensors.

    Returns None (after a warning) for a folder of format version 1, which records none.
    """
    d = hf_config[CONFIG_KEY]
    version = d.get("format_version", FORMAT_VERSION)
    files = d.get("files")
    key = f"{CONFIG_KEY}.files"
    if files is None and version < _HASHED_SINCE:
        warnings.warn(
            f"{label}: format version {version} records no SHA-256 of {WEIGHTS_NAME} and {EXITS_NAME}, so a "
            "damaged tensor or exits copied from another model cannot be detected; re-save the loaded model "
            "with save_pretrained() to record them.",
            UserWarning,
            stacklevel=3,
        )
        return None
    if not isinstance(files, dict):
        raise ExitCheckpointError(
            label,
            key,
            f"missing or not a JSON object ({files!r}): format version {version} records the SHA-256 of "
            f"{WEIGHTS_NAME} and {EXITS_NAME} there. The file was edited or damaged; copy the folder again or "
            "re-save the model with save_pretrained().",
        )
    for name in (WEIGHTS_NAME, EXITS_NAME):
        if not _is_sha256(files.get(name)):
            raise ExitCheckpointError(
                label,
                f"{key}.{name}",
                f"expected a SHA-256 hex digest (64 lowercase hex digits), got {files.get(name)!r}. The file was "
                "edited or damaged; copy the folder again or re-save the model with save_pretrained().",
            )
    return {name: files[name] for name in (WEIGHTS_NAME, EXITS_NAME)}


def _check_hash(path: Path, label: str, expected: str, config_label: str) -> None:
    """Raise unless the file at `path` has the SHA-256 that config.json records for it."""
    actual = _sha256(path)
    if actual != expected:
        raise ExitCheckpointError(
            label,
            None,
            f"SHA-256 is {actual} but {config_label} records {expected}: the file changed after it was saved "
            "(a damaged download or copy, an edit, or a config.json from another save). Download or copy the "
            "whole folder again, or re-save the model with save_pretrained().",
        )


def _check_pair(
    info: dict[str, Any], label: str, backbone_sha: str, weights_label: str, config_label: str, intact: bool
) -> None:
    """Raise if exits.safetensors was saved with another model.safetensors than the one config.json records.

    A missing or malformed record is only reported once the file passed its own hash check (`intact`): before,
    a damaged header would be mistaken for a missing record.
    """
    key = f"__metadata__.{_META_KEY}.backbone_sha256"
    saved_with = info.get("backbone_sha256")
    if not _is_sha256(saved_with):
        if not intact:
            return
        raise ExitCheckpointError(
            label,
            key,
            f"missing or not a SHA-256 ({saved_with!r}), but {config_label} is of a format version that records "
            f"it: the file was not written by save_pretrained() with this {CONFIG_NAME}. Copy the whole folder "
            "again or re-save the model with save_pretrained().",
        )
    if saved_with != backbone_sha:
        raise ExitCheckpointError(
            label,
            key,
            f"these exits were saved with a {WEIGHTS_NAME} of SHA-256 {saved_with}, but {weights_label} is "
            f"recorded in {config_label} with SHA-256 {backbone_sha}: {EXITS_NAME} comes from another trained model "
            f"(same architecture and exits) and does not belong with this {WEIGHTS_NAME}. Copy {CONFIG_NAME}, "
            f"{WEIGHTS_NAME} and {EXITS_NAME} together from one save_pretrained() folder.",
        )


# ----------------------------------------------------------------------------------------- config
def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExitCheckpointError(label, None, f"not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise ExitCheckpointError(label, None, "not a JSON object.")
    return data


def _exit_config(hf_config: dict[str, Any], label: str) -> ExitConfig:
    """The `ExitConfig` recorded under config.json's "timm_exits" key, version-checked."""
    if "architecture" not in hf_config:
        raise ExitCheckpointError(label, "architecture", "missing: this is not a timm config.json.")
    d = hf_config.get(CONFIG_KEY)
    if d is None:
        raise ExitCheckpointError(
            label,
            CONFIG_KEY,
            "missing: this is a plain timm model without exits; load it with "
            "timm.create_model(..., pretrained=True) and attach new exits with timm_exits.wrap().",
        )
    if not isinstance(d, dict):
        raise ExitCheckpointError(label, CONFIG_KEY, f"expected a JSON object, got {type(d).__name__}.")
    version = d.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ExitCheckpointError(label, f"{CONFIG_KEY}.format_version", f"expected an integer, got {version!r}.")
    if version > FORMAT_VERSION:
        raise ExitCheckpointError(
            label,
            f"{CONFIG_KEY}.format_version",
            f"format version {version} is newer than this timm-exits "
            f"reads ({FORMAT_VERSION}); upgrade timm-exits to load this model.",
        )
    fields = {k: v for k, v in d.items() if k != "files"}  # the weight files' hashes: see _recorded_hashes
    try:
        return ExitConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ExitCheckpointError(label, CONFIG_KEY, f"invalid exit configuration: {e}") from e


def _attach(backbone: nn.Module, config: ExitConfig, label: str) -> EarlyExitModel:
    """`wrap(backbone, config=config)`, with errors naming the config file."""
    try:
        return wrap(backbone, config=config)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ExitCheckpointError(
            label, f"{CONFIG_KEY}.exits", f"the saved exits {config.exits} do not fit this backbone: {e}"
        ) from e


def _load_exit_file(
    model: EarlyExitModel,
    path: Path,
    label: str,
    architecture: str,
    config_label: str,
    hashes: dict[str, str] | None,
    weights_label: str,
) -> None:
    """Strictly load exits.safetensors into `model`'s heads, gates, final head and costs.

    With `hashes` (from config.json), the file must have its recorded SHA-256 and must have been saved with the
    model.safetensors config.json records; nothing is loaded into `model` unless every check passes.
    """
    tensors, meta = _read_safetensors(path, label)
    info = _exit_metadata(meta, label)
    version = info.get("format_version")
    if version is not None:
        if not isinstance(version, int) or isinstance(version, bool):
            raise ExitCheckpointError(
                label, f"__metadata__.{_META_KEY}.format_version", f"not an integer: {version!r}."
            )
        if version > FORMAT_VERSION:
            raise ExitCheckpointError(
                label,
                f"__metadata__.{_META_KEY}.format_version",
                f"format version {version} is newer than this timm-exits reads ({FORMAT_VERSION}); upgrade "
                "timm-exits to load this model.",
            )
    saved_arch = info.get("architecture")
    if saved_arch is not None and saved_arch != architecture:
        raise ExitCheckpointError(
            label,
            f"__metadata__.{_META_KEY}.architecture",
            f"the exits were saved for {saved_arch!r} but {config_label} names architecture {architecture!r}.",
        )
    saved_exits = info.get("exits")
    if saved_exits is not None and saved_exits != model.config.exits:
        raise ExitCheckpointError(
            label,
            f"__metadata__.{_META_KEY}.exits",
            f"the file holds exits {saved_exits} but {config_label} names {model.config.exits}.",
        )
    _check_tensors(label, tensors, _exit_tensors(model), context=f"exits {model.config.exits}")
    costs = tensors["exit_costs"]
    if model.config.costs is not None:
        cfg_costs = torch.tensor(model.config.costs, dtype=costs.dtype)
        if not torch.allclose(costs, cfg_costs, rtol=1e-6, atol=1e-7):
            raise ExitCheckpointError(
                label,
                "exit_costs",
                f"costs {costs.tolist()} disagree with {config_label} '{CONFIG_KEY}.costs' = {model.config.costs}.",
            )
    if hashes is not None:  # foreign exits first: they fail the hash check too, but that would not say why
        _check_pair(info, label, hashes[WEIGHTS_NAME], weights_label, config_label, intact=False)
        _check_hash(path, label, hashes[EXITS_NAME], config_label)
        _check_pair(info, label, hashes[WEIGHTS_NAME], weights_label, config_label, intact=True)
    model.load_state_dict(tensors, strict=False)  # keys checked above: exactly the non-backbone ones
    model.config.costs = [float(c) for c in model.exit_costs.tolist()]


def _exit_metadata(meta: dict[str, str], label: str) -> dict[str, Any]:
    """The JSON object that save_pretrained stores in exits.safetensors' header metadata (empty if absent)."""
    raw = meta.get(_META_KEY)
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ExitCheckpointError(label, f"__metadata__.{_META_KEY}", f"not valid JSON ({e}).") from e
    if not isinstance(info, dict):
        raise ExitCheckpointError(label, f"__metadata__.{_META_KEY}", "not a JSON object.")
    return info


def _architecture(backbone: nn.Module) -> str:
    arch = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise ValueError(
            f"the backbone ({type(backbone).__name__}) is not a timm model (it has no pretrained_cfg "
            "'architecture'); the Hub format stores timm backbones only."
        )
    return str(arch)


# ------------------------------------------------------------------------------------------- report
def _load_report(report: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    if report is None:
        return None
    if isinstance(report, (str, os.PathLike)):
        path = Path(report)
        return _read_json(path, str(path))
    if isinstance(report, Mapping):
        return json.loads(json.dumps(dict(report), default=_json_scalar))  # a JSON-clean deep copy
    raise TypeError(f"report must be a dict or the path of a report.json, got {type(report).__name__}")


def _json_scalar(v: Any) -> Any:
    """numpy / torch scalars in a report, as plain Python numbers."""
    if hasattr(v, "item"):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"report value {v!r} ({type(v).__name__}) is not JSON-serialisable")


def _check_report(report: dict[str, Any], model: EarlyExitModel) -> None:
    """Refuse a report written for other exits: its numbers would end up on this model's card."""
    names = [b.name for b in model.branches]
    exits = report.get("exits")
    if isinstance(exits, list) and exits:
        reported = [e.get("name") if isinstance(e, dict) else e for e in exits]
        if reported[: len(names)] != names or len(reported) > model.num_exits:
            raise ValueError(f"the report describes exits {reported} but the model has exits {names}.")
    acc = _dict(report, "test").get("exit_accuracy")
    if isinstance(acc, list) and acc and len(acc) != model.num_exits:
        raise ValueError(
            f"the report gives {len(acc)} exit accuracies but the model has {model.num_exits} exits "
            "(the final head included)."
        )
    policies = report.get("policies")
    for name, pol in policies.items() if isinstance(policies, dict) else []:
        dist = pol.get("exit_distribution") if isinstance(pol, dict) else None
        if isinstance(dist, list) and dist and len(dist) != model.num_exits:
            raise ValueError(
                f"the report's {name!r} exit distribution has {len(dist)} entries but the model has "
                f"{model.num_exits} exits."
            )


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
        save_directory: Folder to write; created if needed. Files of an earlier save are overwritten.
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

    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    # Everything is written to a private folder beside the target first, then moved in file by file
    # (config.json last): an interrupted save leaves the earlier files, or files whose hashes config.json
    # does not match, which loading refuses; never a half-written file.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.saving-") as tmp:
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


def _is_exit_model(model: Any) -> bool:
    """Whether `model` is an `EarlyExitModel`, checked by its attributes (saving does not import the model)."""
    return isinstance(model, nn.Module) and all(hasattr(model, a) for a in ("backbone", "branches", "config"))


def _record_hashes(config_path: Path, files: dict[str, str]) -> None:
    """Add the weight files' SHA-256 under config.json's "timm_exits" -> "files" (timm ignores the key)."""
    hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    hf_config[CONFIG_KEY]["files"] = files
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


def push_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Any:
    """Push a training run folder: `run_dir/model/` (from save_pretrained) with `run_dir/report.json`.

    The model is loaded back strictly (so what is pushed is what loads) and its card is regenerated from the
    run's report.json; without one the card has no numbers.

    Args:
        run_dir: The run folder.
        repo_id: "org/name" on the Hub.
        private: Create the repo as private (ignored if it exists).
        revision: Branch to commit to (default: main).
        commit_message: Message of the commit (default names the run folder).
        token: Hub token.
        endpoint: Hub endpoint.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.
    """
    run = Path(run_dir)
    model_dir = run / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such folder; a run folder holds model/ (from save_pretrained).")
    report_path = run / REPORT_NAME
    report = None
    if report_path.is_file():
        report = _read_json(report_path, str(report_path))
    else:
        warnings.warn(f"{report_path} not found: the model card will state no results.", stacklevel=2)
    model = from_pretrained(model_dir)
    return push_to_hub(
        model,
        repo_id,
        report,
        private=private,
        revision=revision,
        commit_message=commit_message or f"Upload run {run.resolve().name} (timm-exits)",
        token=token,
        endpoint=endpoint,
    )


# --------------------------------------------------------------------------------------------- load
def from_pretrained(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
    **model_kwargs: Any,
) -> EarlyExitModel:
    """Load a multi-exit model saved by `save_pretrained` / `push_to_hub`.

    The backbone is built by `timm.create_model` from config.json with pretrained=False, then model.safetensors
    is loaded strictly; the exits are rebuilt with `wrap(backbone, config=...)` and exits.safetensors is loaded
    strictly. Both files must have the SHA-256 config.json records, and exits.safetensors must have been saved
    with this model.safetensors (see the module docstring). Hub files go through `hf_hub_download`, so the HF
    cache, revisions and offline mode work as usual.

    Args:
        source: "hf-hub:org/name", "hf-hub:org/name@revision", "local-dir:/path" or a folder.
        revision: Hub revision (branch, tag or commit), unless given in `source`.
        cache_dir: HF cache folder (default: HF_HUB_CACHE).
        token: Hub token for private repos.
        local_files_only: Use the HF cache only.
        device: Device of the returned model.
        **model_kwargs: Further `timm.create_model` arguments (e.g. drop_path_rate).

    Returns:
        The `EarlyExitModel`, in eval mode.
    """
    import timm

    if "pretrained" in model_kwargs:
        raise TypeError("from_pretrained() builds the backbone itself; do not pass pretrained=.")
    src = _parse_source(source, revision, cache_dir, token, local_files_only)
    cfg_path, cfg_label = src.fetch(CONFIG_NAME)
    hf_config = _read_json(cfg_path, cfg_label)
    exit_cfg = _exit_config(hf_config, cfg_label)
    hashes = _recorded_hashes(hf_config, cfg_label)
    architecture = str(hf_config["architecture"])
    weights_path, weights_label = src.fetch(WEIGHTS_NAME)
    exits_path, exits_label = src.fetch(EXITS_NAME)

    try:
        backbone = timm.create_model(f"local-dir:{cfg_path.parent}", pretrained=False, **model_kwargs)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        raise ExitCheckpointError(
            cfg_label,
            "architecture",
            f"{architecture!r} is not a registered timm model ({e}); import the package that registers it first.",
        ) from e
    tensors, _ = _read_safetensors(weights_path, weights_label)
    _check_tensors(weights_label, tensors, backbone.state_dict(), context=f"architecture {architecture!r}")
    if hashes is not None:
        _check_hash(weights_path, weights_label, hashes[WEIGHTS_NAME], cfg_label)
    backbone.load_state_dict(tensors, strict=True)
    del tensors

    model = _attach(backbone, exit_cfg, cfg_label)
    _load_exit_file(model, exits_path, exits_label, architecture, cfg_label, hashes, weights_label)
    return model.to(device).eval()


def load_exits(
    model: nn.Module,
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    check_architecture: bool = True,
) -> EarlyExitModel:
    """Attach saved exits to a backbone already in memory, without touching its weights.

    Only config.json and exits.safetensors are read (never the saved backbone weights); exits.safetensors must
    have the SHA-256 config.json records and have been saved with the model.safetensors it records. The backbone
    object is used as it is: the returned wrapper holds it as `.backbone`; its parameters, buffers and
    train/eval mode are left unchanged, and the exits take its mode.

    Args:
        model: A timm backbone (not wrapped), e.g. `timm.create_model("hf-hub:org/name", pretrained=True)`.
        source: "hf-hub:org/name[@revision]", "local-dir:/path" or a folder.
        revision: Hub revision, unless given in `source`.
        cache_dir: HF cache folder.
        token: Hub token for private repos.
        local_files_only: Use the HF cache only.
        check_architecture: Refuse a backbone whose timm architecture differs from the saved one.

    Returns:
        An `EarlyExitModel` wrapping `model`.
    """
    src = _parse_source(source, revision, cache_dir, token, local_files_only)
    cfg_path, cfg_label = src.fetch(CONFIG_NAME)
    hf_config = _read_json(cfg_path, cfg_label)
    exit_cfg = _exit_config(hf_config, cfg_label)
    hashes = _recorded_hashes(hf_config, cfg_label)
    architecture = str(hf_config["architecture"])
    exits_path, exits_label = src.fetch(EXITS_NAME)
    mine = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if check_architecture and mine and mine != architecture:
        raise ExitCheckpointError(
            cfg_label,
            "architecture",
            f"the exits were saved for {architecture!r} but the backbone is {mine!r} "
            "(pass check_architecture=False to attach them anyway).",
        )
    wrapped = _attach(model, exit_cfg, cfg_label)
    _load_exit_file(wrapped, exits_path, exits_label, architecture, cfg_label, hashes, f"{src.name}/{WEIGHTS_NAME}")
    wrapped.training = model.training
    for m in (wrapped.branches, wrapped.final_head):
        if m is not None:
            m.train(model.training)
    return wrapped


# --------------------------------------------------------------------------------------- model card
def _template_dir() -> Path:
    folder = Path(__file__).resolve().parent / "hub_cards"
    missing = [n for n in _CARD_FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"model card templates {missing} not found in {folder}; this installation of timm-exits is incomplete "
            "(reinstall it: the templates are package data)."
        )
    return folder


def _template(name: str) -> string.Template:
    return string.Template((_template_dir() / name).read_text(encoding="utf-8"))


def _real(v: Any) -> float | None:
    """`v` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v: float) -> str:
    """A report number as printed: integers whole, others to four significant digits (never rounded up to
    a different integer part)."""
    if float(v).is_integer():
        return str(int(v))
    if abs(v) >= 100:
        return f"{v:.1f}"
    return np.format_float_positional(v, precision=4, fractional=False, trim="-")


def _pct(v: float, digits: int) -> str:
    """A fraction (<= 1) or a percentage (> 1) as a percentage."""
    return f"{(100.0 * v if abs(v) <= 1.0 else v):.{digits}f} %"


def _fmt_any(v: Any) -> str | None:
    """A threshold or other report value for a table cell (numbers, lists of numbers, strings)."""
    if _real(v) is not None:
        return _fmt(_real(v))
    if isinstance(v, list) and v and all(_real(x) is not None for x in v):
        return ", ".join(_fmt(_real(x)) for x in v)
    if isinstance(v, str) and v:
        return v
    return None


def _dict(d: Any, key: str) -> dict[str, Any]:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


def _distribution(dist: Any) -> str | None:
    """The paper's form: "#1: 0.4 %, #2: 22.4 %, ..."."""
    if not isinstance(dist, list) or not dist or any(_real(p) is None for p in dist):
        return None
    return ", ".join(f"#{i + 1}: {_pct(_real(p), 1)}" for i, p in enumerate(dist))


def _exit_table(report: dict[str, Any], model: EarlyExitModel) -> str | None:
    test = _dict(report, "test")
    acc = test.get("exit_accuracy") if isinstance(test.get("exit_accuracy"), list) else []
    exits = report.get("exits") if isinstance(report.get("exits"), list) else []
    names = [b.name for b in model.branches] + ["(the final head)"]
    costs: list[float | None] = [None] * model.num_exits
    for i, e in enumerate(exits[: model.num_exits]):
        if isinstance(e, dict):
            costs[i] = _real(e.get("cost"))
    if not any(_real(a) is not None for a in acc) and not any(c is not None for c in costs):
        return None
    rows = ["| exit | module | cost (share of the backbone's FLOPs) | accuracy |", "|---|---|---|---|"]
    for i, name in enumerate(names):
        a = _real(acc[i]) if i < len(acc) else None
        cell = f"`{name}`" if i < len(model.branches) else name
        cost = _fmt(costs[i]) if costs[i] is not None else "not reported"
        rows.append(f"| #{i + 1} | {cell} | {cost} | {_pct(a, 2) if a is not None else 'not reported'} |")
    return "\n".join(rows)


def _policy_section(report: dict[str, Any]) -> str | None:
    policies = _dict(report, "policies")
    rows, dists = [], []
    for name, pol in policies.items():
        if not isinstance(pol, dict):
            continue
        cells = [
            _fmt_any(pol.get("threshold")),
            _pct(_real(pol["accuracy"]), 2) if _real(pol.get("accuracy")) is not None else None,
            _fmt(_real(pol["expected_cost"])) if _real(pol.get("expected_cost")) is not None else None,
            _fmt(_real(pol["ms_per_image"])) if _real(pol.get("ms_per_image")) is not None else None,
            f"{_fmt(_real(pol['speedup']))}x" if _real(pol.get("speedup")) is not None else None,
        ]
        rows.append(f"| `{name}` | " + " | ".join(c if c is not None else "not reported" for c in cells) + " |")
        d = _distribution(pol.get("exit_distribution"))
        if d is not None:
            dists.append(f"- `{name}`: {d}")
    if not rows:
        return None
    head = [
        "| policy | threshold | accuracy | expected cost (share of the backbone's FLOPs) | ms per image | "
        "measured speed-up |",
        "|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows)
    if dists:
        text += "\n\nShare of test images leaving at each exit:\n\n" + "\n".join(dists)
    return text


def _speed_text(report: dict[str, Any]) -> str | None:
    timing = _dict(report, "timing")
    parts = []
    machine = timing.get("machine")
    if isinstance(machine, str) and machine:
        parts.append(f"on {machine}")
    details = []
    if _real(timing.get("threads")) is not None:
        details.append(f"{_fmt(_real(timing['threads']))} threads")
    if _real(timing.get("batch_size")) is not None:
        details.append(f"batch size {_fmt(_real(timing['batch_size']))}")
    if details:
        parts.append(f"({', '.join(details)})")
    baseline = _real(timing.get("baseline_ms_per_image"))
    if not parts and baseline is None:
        return None
    text = "Times were measured " + (" ".join(parts) if parts else "on a machine the report does not name") + "."
    if baseline is not None:
        text += f" The plain backbone takes {_fmt(baseline)} ms per image there."
    return text + " Speed-ups are the measured ratios given in the report, not FLOP ratios."


def _headline(report: dict[str, Any], policy: str) -> str:
    test = _dict(report, "test")
    parts = []
    n = _real(test.get("num_samples"))
    on = f" on {_fmt(n)} test images" if n is not None else ""
    if _real(test.get("soft_accuracy")) is not None:
        parts.append(f"The soft-conditional output reaches {_pct(_real(test['soft_accuracy']), 2)} accuracy{on}")
    if _real(test.get("final_accuracy")) is not None:
        parts.append(f"the backbone's own head reaches {_pct(_real(test['final_accuracy']), 2)}")
    text = "; ".join(parts) + "." if parts else ""
    pol = _dict(_dict(report, "policies"), policy)
    bits = []
    if _real(pol.get("accuracy")) is not None:
        bits.append(f"{_pct(_real(pol['accuracy']), 2)} accuracy")
    if _real(pol.get("expected_cost")) is not None:
        bits.append(f"an expected cost of {_fmt(_real(pol['expected_cost']))} of the backbone's FLOPs")
    if _real(pol.get("speedup")) is not None:
        bits.append(f"a measured speed-up of {_fmt(_real(pol['speedup']))}x")
    if bits:
        text += f" With hard early exit by the stored policy (`{policy}`) it reaches " + ", ".join(bits) + "."
    return text.strip() or "The report gives no summary numbers."


def _recipe_text(report: dict[str, Any]) -> str:
    lines = []
    for key in ("model", "dataset", "method"):
        if isinstance(report.get(key), str) and report[key]:
            lines.append(f"- {key}: `{report[key]}`")
    recipe = report.get("recipe")
    if isinstance(recipe, dict):
        for k, v in recipe.items():
            shown = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            lines.append(f"- {k}: {shown}")
    if not lines:
        return "The report does not describe the training recipe."
    return "From the training report:\n\n" + "\n".join(lines)


def _front_matter(model: EarlyExitModel, report: dict[str, Any] | None) -> str:
    report = report or {}
    fm: dict[str, Any] = {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "license": report.get("license") if isinstance(report.get("license"), str) else "apache-2.0",
        "tags": ["image-classification", "timm", "early-exit", "timm-exits", "safetensors"],
    }
    if isinstance(report.get("dataset"), str) and report["dataset"]:
        fm["datasets"] = [report["dataset"]]
    base = report.get("base_model")
    if not isinstance(base, str) and _dict(report, "recipe").get("pretrained"):
        base = (getattr(model.backbone, "pretrained_cfg", None) or {}).get("hf_hub_id")
    if isinstance(base, str) and base:
        fm["base_model"] = base
    if report:
        fm["metrics"] = ["accuracy"]
    return yaml.safe_dump(fm, sort_keys=False, allow_unicode=True).strip()


def render_model_card(
    model: EarlyExitModel,
    report: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    folder_name: str | None = None,
) -> str:
    """Render the README.md model card from the templates in `timm_exits/hub_cards/`.

    Every number on the card comes from `report` (schema: see the recipes' report.json); without a report the
    card states no results and says so.

    Args:
        model: The `EarlyExitModel` the card describes (names, head and gate types, stored policy).
        report: Training report (dict or path of report.json), or None.
        repo_id: Hub repo id ("org/name" or "org/name@revision") for the usage snippets.
        folder_name: Local folder name used in the snippets when there is no repo id.

    Returns:
        The card's markdown text, with YAML front matter.
    """
    report_dict = _load_report(report)
    if report_dict is not None:
        _check_report(report_dict, model)
    architecture = _architecture(model.backbone)
    if repo_id:
        source = timm_source = f"hf-hub:{repo_id}"
        title = repo_id.split("@")[0].split("/")[-1]
    else:
        path = f"./{folder_name or 'model'}"
        source, timm_source = path, f"local-dir:{path}"
        title = folder_name or architecture
    exit_list = ", ".join(f"`{b.name}`" for b in model.branches) or "no module (only the final head)"
    final_note = " (plus a linear final head on the pooled features)" if model.final_head is not None else ""

    if report_dict is None:
        results = _template("no_results.md").substitute()
        training = "No training report was given when this model was saved."
        trained = ""
    else:
        results = _template("results.md").substitute(
            headline=_headline(report_dict, model.config.policy),
            exit_table=_exit_table(report_dict, model) or "The report gives no per-exit results.",
            policies=_policy_section(report_dict) or "The report gives no exit-policy results.",
            speed=_speed_text(report_dict) or "The report gives no timing.",
        )
        training = _recipe_text(report_dict)
        ds = report_dict.get("dataset")
        method = report_dict.get("method")
        trained = (f" Trained on `{ds}`" if isinstance(ds, str) and ds else "") + (
            f"{' with' if isinstance(ds, str) and ds else ' Trained with'} the `{method}` method"
            if isinstance(method, str) and method
            else ""
        )
        trained = f"{trained}." if trained else ""

    return _template("model_card.md").substitute(
        front_matter=_front_matter(model, report_dict),
        title=title,
        architecture=architecture,
        exit_list=exit_list,
        final_note=final_note,
        head=model.config.head,
        gate=model.config.gate,
        policy=model.config.policy,
        trained=trained,
        source=source,
        timm_source=timm_source,
        results=results.strip(),
        training=training,
    )
