"""The files of a saved multi-exit model: their names, `ExitCheckpointError`, strict safetensors reading
(header, dtypes and extents checked before any tensor is read) and the SHA-256 records that tie the files together.

Shared by the save side (`timm_exits.hub.save`) and the load side (`timm_exits.hub.load`); imports no model code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from torch import nn

from ..core.config import FORMAT_VERSION

if TYPE_CHECKING:  # annotations only: the model's save methods import this module
    from ..core.model import EarlyExitModel

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "EXITS_NAME",
    "CARD_NAME",
    "REPORT_NAME",
    "CONFIG_KEY",
    "ExitCheckpointError",
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

_DTYPE_KEY = "dtype"  # config.json "timm_exits" -> the floating dtype of the saved model's parameters

_UPSTREAM_KEY = "upstream_hf_hub_id"  # config.json "timm_exits" -> the backbone's pretrained_cfg hf_hub_id

_MEASURED_KEY = "costs_measured"  # config.json "timm_exits" -> whether the saved costs were measured, not given

_RECORD_KEYS = ("files", _DTYPE_KEY, _UPSTREAM_KEY, _MEASURED_KEY)  # what a save records beside the ExitConfig fields

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

_EXIT_PREFIXES = ("branches.", "final_head.")

_COSTS_KEY = "exit_costs"


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


def _version() -> str:
    try:
        return metadata.version("timm-exits")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------- safetensors
def _read_header(path: Path, label: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Check a safetensors file's structure without reading its tensors. Returns (tensor entries, metadata)."""
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
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
    return header, {str(k): str(v) for k, v in meta.items()}


def _read_safetensors(path: Path, label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check a safetensors file's structure, then load it (CPU). Returns (tensors, header metadata)."""
    _, meta = _read_header(path, label)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # the library's own checks; its errors name neither file nor key
        raise ExitCheckpointError(label, None, f"safetensors could not read the file: {e}") from e
    return tensors, meta


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


def _is_exit_key(key: str) -> bool:
    """Whether a wrapper state-dict key belongs in exits.safetensors (heads, gates, final head, costs)."""
    return key == _COSTS_KEY or key.startswith(_EXIT_PREFIXES)


def _exit_tensors(model: EarlyExitModel) -> dict[str, torch.Tensor]:
    """The exits' entries of the wrapper's state dict: `branches.*`, `final_head.*` and `exit_costs`."""
    return {k: v for k, v in model.state_dict().items() if _is_exit_key(k)}


# ----------------------------------------------------------------------------------------- records
def _exit_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """config.json's "timm_exits" object without what a save records beside the `ExitConfig` fields."""
    return {k: v for k, v in record.items() if k not in _RECORD_KEYS}


def _dtype_name(model: nn.Module) -> str | None:
    """The one floating dtype of `model`'s parameters, by name ("bfloat16"); None if they mix or have none."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    names = [n for n, d in _DTYPES.items() if dtypes == {d}]
    return names[0] if names else None


def _saved_dtype(hf_config: dict[str, Any], label: str) -> torch.dtype | None:
    """The parameter dtype config.json records under "timm_exits" -> "dtype" (None if it records none)."""
    name = hf_config[CONFIG_KEY].get(_DTYPE_KEY)
    if name is None:
        return None
    if not isinstance(name, str) or name not in _DTYPES:
        raise ExitCheckpointError(
            label, f"{CONFIG_KEY}.{_DTYPE_KEY}", f"expected one of {sorted(_DTYPES)}, got {name!r}."
        )
    return _DTYPES[name]


def _saved_upstream(hf_config: dict[str, Any], label: str) -> str | None:
    """The backbone's upstream Hub id config.json records under "timm_exits" (None if it records none)."""
    upstream = hf_config[CONFIG_KEY].get(_UPSTREAM_KEY)
    if upstream is not None and (not isinstance(upstream, str) or not upstream):
        raise ExitCheckpointError(
            label, f"{CONFIG_KEY}.{_UPSTREAM_KEY}", f"expected a Hub id such as 'timm/name', got {upstream!r}."
        )
    return upstream


def _saved_measured(hf_config: dict[str, Any], label: str) -> bool:
    """Whether config.json records the saved costs as measured (False for a folder that records nothing)."""
    measured = hf_config[CONFIG_KEY].get(_MEASURED_KEY, False)
    if not isinstance(measured, bool):
        raise ExitCheckpointError(label, f"{CONFIG_KEY}.{_MEASURED_KEY}", f"expected true or false, got {measured!r}.")
    return measured


# -------------------------------------------------------------------------------------------- integrity
def _host() -> str:
    """This machine's name as it goes into the names of temporaries (letters, digits, dots and "_")."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64]


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (POSIX: signal 0 checks without sending anything)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid: left alone
    return True


def _process_gone(pid: str | int, host: str) -> bool | None:
    """Whether the process `pid` on `host` that named a temporary has ended; None where that cannot be checked
    (another host, or a system without POSIX process ids)."""
    if host != _host() or os.name != "posix":
        return None
    return not _pid_alive(int(pid))


def _publish_mode(path: Path) -> None:
    """Give a file written through a private temporary (safetensors writes 0600) the mode a new file gets under
    the process's umask, as any other file the user writes."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without setting it where the system tells it (setting it is process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    except RecursionError as e:
        raise ExitCheckpointError(label, None, "not a config: its JSON is nested too deeply to read.") from e
    if not isinstance(data, dict):
        raise ExitCheckpointError(label, None, "not a JSON object.")
    return data
