"""Load a multi-exit model: `from_pretrained` rebuilds it (backbone and exits) from a folder or a Hub repo,
`load_exits` attaches saved exits to a backbone already in memory. Strict: every mismatch raises
`ExitCheckpointError` naming the file and the key; only safetensors are read, never pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import FORMAT_VERSION, ExitConfig
from ..core.model import EarlyExitModel, wrap
from .files import (
    _META_KEY,
    _PICKLE_NAMES,
    CONFIG_KEY,
    CONFIG_NAME,
    EXITS_NAME,
    WEIGHTS_NAME,
    ExitCheckpointError,
    _check_hash,
    _check_pair,
    _check_tensors,
    _exit_fields,
    _exit_tensors,
    _read_header,
    _read_json,
    _read_safetensors,
    _recorded_hashes,
    _saved_dtype,
    _saved_measured,
    _saved_upstream,
    _version,
)

__all__ = [
    "from_pretrained",
    "load_exits",
]


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
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

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
        except LocalEntryNotFoundError as e:  # an EntryNotFoundError too: offline, the Hub was never asked
            raise FileNotFoundError(f"{label}: {_not_cached_hint(filename, self.local_files_only)}") from e
        except EntryNotFoundError as e:
            raise FileNotFoundError(f"{label}: not found ({e}); {_missing_hint(filename, None)}") from e
        return Path(path), f"{label} ({path})"


def _not_cached_hint(filename: str, local_files_only: bool) -> str:
    """Why a Hub file could not be had without the network, and how to get it."""
    from huggingface_hub import constants

    if local_files_only or constants.HF_HUB_OFFLINE:
        why = "offline mode (HF_HUB_OFFLINE=1 or local_files_only=True) does not ask the Hub"
    else:
        why = "the Hub could not be reached"
    plain = (
        f" (timm.create_model(..., pretrained=True) caches {CONFIG_NAME} and {WEIGHTS_NAME} only)"
        if filename == EXITS_NAME
        else ""
    )
    return (
        f"not in the local Hugging Face cache, and {why}. Connect to the network, or download it once without "
        f"HF_HUB_OFFLINE and local_files_only so that it is cached{plain}."
    )


def _missing_hint(filename: str, folder: Path | None) -> str:
    if filename == EXITS_NAME:  # fetched only once config.json was read and has its "timm_exits" entry
        where, fix = (
            ("the folder", "copy the whole folder save_pretrained() wrote")
            if folder is not None
            else ("the repo", "push the whole folder save_pretrained() wrote (push_to_hub uploads all its files)")
        )
        return (
            f"{where} is incomplete: its {CONFIG_NAME} describes exits (its {CONFIG_KEY!r} entry) but {EXITS_NAME} "
            f"is missing; {fix}."
        )
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
    folder = (Path(rest) if sep and prefix.lower() == "local-dir" else Path(source)).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{source!r} is not an existing folder; use 'hf-hub:org/name' to load from the Hugging Face Hub."
        )
    if revision is not None:
        raise ValueError(
            f"revision={revision!r} was given but {source!r} is a local folder, which has no revisions; load "
            "'hf-hub:org/name' for a Hub revision, or leave revision out to load the folder as it is."
        )
    return _Source(folder=folder)


def _exit_config(hf_config: dict[str, Any], label: str) -> ExitConfig:
    """The `ExitConfig` recorded under config.json's "timm_exits" key, version-checked."""
    if "architecture" not in hf_config:
        raise ExitCheckpointError(label, "architecture", "missing: this is not a timm config.json.")
    _check_timm_fields(hf_config, label)
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
    try:
        return ExitConfig.from_dict(_exit_fields(d))  # without the hashes (see _recorded_hashes), dtype, upstream
    except (TypeError, ValueError) as e:
        raise ExitCheckpointError(label, CONFIG_KEY, f"invalid exit configuration: {e}") from e


def _check_timm_fields(hf_config: dict[str, Any], label: str) -> None:
    """Refuse timm's own fields of config.json that timm.create_model could not read (a damaged file)."""
    architecture = hf_config["architecture"]
    if not isinstance(architecture, str) or not architecture:
        raise ExitCheckpointError(label, "architecture", f"expected a timm model name, got {architecture!r}.")
    for key in ("model_args", "pretrained_cfg"):
        if key in hf_config and not isinstance(hf_config[key], dict):
            raise ExitCheckpointError(label, key, f"expected a JSON object, got {type(hf_config[key]).__name__}.")


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
    measured: bool,
) -> None:
    """Strictly load exits.safetensors into `model`'s heads, gates, final head and costs.

    With `hashes` (from config.json), the file must have its recorded SHA-256 and must have been saved with the
    model.safetensors config.json records; nothing is loaded into `model` unless every check passes. Costs
    config.json records as `measured` are used as loaded but stay measured (`model.config.costs` is None), so
    `reset_classifier` measures them again as it does for the model that was saved.
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
    model.config.costs = None if measured else [float(c) for c in model.exit_costs.tolist()]


def _exit_metadata(meta: dict[str, str], label: str) -> dict[str, Any]:
    """The JSON object that save_pretrained stores in exits.safetensors' header metadata (empty if absent)."""
    raw = meta.get(_META_KEY)
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ExitCheckpointError(label, f"__metadata__.{_META_KEY}", f"not valid JSON ({e}).") from e
    if not isinstance(info, dict):
        raise ExitCheckpointError(label, f"__metadata__.{_META_KEY}", "not a JSON object.")
    return info


# --------------------------------------------------------------------------------------------- load
@dataclass
class _Saved:
    """What a saved folder's config.json says, checked."""

    path: Path
    label: str
    exit_cfg: ExitConfig
    hashes: dict[str, str] | None
    architecture: str
    dtype: torch.dtype | None
    upstream: str | None
    measured: bool
    model_args: dict[str, Any]


def _saved_config(src: Any) -> _Saved:
    """Fetch and check a saved folder's config.json."""
    cfg_path, cfg_label = src.fetch(CONFIG_NAME)
    hf_config = _read_json(cfg_path, cfg_label)
    exit_cfg, hashes = _exit_config(hf_config, cfg_label), _recorded_hashes(hf_config, cfg_label)
    return _Saved(
        cfg_path,
        cfg_label,
        exit_cfg,
        hashes,
        hf_config["architecture"],
        _saved_dtype(hf_config, cfg_label),
        _saved_upstream(hf_config, cfg_label),
        _saved_measured(hf_config, cfg_label),
        hf_config.get("model_args", {}),
    )


def from_pretrained(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> EarlyExitModel:
    """Load a multi-exit model saved by `save_pretrained` / `push_to_hub`.

    The backbone is built by `timm.create_model` from config.json with pretrained=False, then model.safetensors
    is loaded strictly; the exits are rebuilt with `wrap(backbone, config=...)` and exits.safetensors is loaded
    strictly. Both files must have the SHA-256 config.json records, and exits.safetensors must have been saved
    with this model.safetensors (see the module docstring). Hub files go through `hf_hub_download`, so the HF
    cache, revisions and offline mode work as usual. The model comes back in the dtype it was saved in (a
    bfloat16 model as bfloat16), and its backbone's pretrained_cfg names the upstream Hub id the saved one had.

    Args:
        source: "hf-hub:org/name", "hf-hub:org/name@revision", "local-dir:/path" or a folder.
        revision: Hub revision (branch, tag or commit), unless given in `source`; refused for a folder.
        cache_dir: HF cache folder (default: HF_HUB_CACHE).
        token: Hub token for private repos.
        local_files_only: Use the HF cache only.
        device: Device of the returned model.
        dtype: Floating dtype of the returned model; None gives the one config.json records (float32 for a
            folder that records none).
        **model_kwargs: Further `timm.create_model` arguments (e.g. drop_path_rate).

    Returns:
        The `EarlyExitModel`, in eval mode.
    """
    if "pretrained" in model_kwargs:
        raise TypeError("from_pretrained() builds the backbone itself; do not pass pretrained=.")
    src = _parse_source(source, revision, cache_dir, token, local_files_only)
    saved = _saved_config(src)
    cfg_label, architecture, hashes = saved.label, saved.architecture, saved.hashes
    weights_path, weights_label = src.fetch(WEIGHTS_NAME)
    exits_path, exits_label = src.fetch(EXITS_NAME)

    backbone = _create_backbone(saved, model_kwargs)
    tensors, _ = _read_safetensors(weights_path, weights_label)
    _check_tensors(weights_label, tensors, backbone.state_dict(), context=f"architecture {architecture!r}")
    if hashes is not None:
        _check_hash(weights_path, weights_label, hashes[WEIGHTS_NAME], cfg_label)
    backbone.load_state_dict(tensors, strict=True)
    del tensors
    _restore_upstream(backbone, saved.upstream)

    model = _attach(backbone, saved.exit_cfg, cfg_label)
    _load_exit_file(model, exits_path, exits_label, architecture, cfg_label, hashes, weights_label, saved.measured)
    return model.to(device=device, dtype=dtype if dtype is not None else saved.dtype).eval()


def _create_backbone(saved: _Saved, model_kwargs: dict[str, Any]) -> nn.Module:
    """`timm.create_model` of the saved architecture without pretrained weights, its errors naming config.json."""
    import timm

    try:
        return timm.create_model(f"local-dir:{saved.path.parent}", pretrained=False, **model_kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:
        if isinstance(e, RuntimeError) and "Unknown model" in str(e):
            raise ExitCheckpointError(
                saved.label,
                "architecture",
                f"{saved.architecture!r} is not a registered timm model ({e}); import the package that registers "
                "it first.",
            ) from e
        given = f" and the keyword arguments {model_kwargs}" if model_kwargs else ""
        raise ExitCheckpointError(
            saved.label,
            "model_args",
            f"timm could not create {saved.architecture!r} from the model_args {saved.model_args} it records{given} "
            f"({type(e).__name__}: {e}); the file was edited or damaged, or written for another timm version.",
        ) from e


def _restore_upstream(backbone: nn.Module, upstream: str | None) -> None:
    """Put the upstream Hub id a save recorded back into the rebuilt backbone's pretrained_cfg (timm's
    config.json does not keep it), so a card of the loaded model names its base model again."""
    cfg = getattr(backbone, "pretrained_cfg", None)
    if upstream is not None and isinstance(cfg, dict) and not cfg.get("hf_hub_id"):
        cfg["hf_hub_id"] = upstream


def _check_classifier(model: nn.Module, num_classes: int, exits_path: Path, exits_label: str, cfg_label: str) -> None:
    """Refuse a backbone whose classifier cannot be the saved model's final exit, saying how to create it."""
    own = getattr(model, "num_classes", None)
    if not isinstance(own, int):
        return
    entries, _ = _read_header(exits_path, exits_label)
    if any(k.startswith("final_head.") for k in entries):  # the saved model added a final head: a headless backbone
        if own == 0:
            return
        raise ExitCheckpointError(
            cfg_label,
            "num_classes",
            f"the saved model's final exit is a head it added on a backbone without a classifier, but this backbone "
            f"has its own with {own} classes; create it with timm.create_model(name, num_classes=0).",
        )
    if own == num_classes:
        return
    raise ExitCheckpointError(
        cfg_label,
        "num_classes",
        f"the saved model's final exit is the backbone's own classifier with {num_classes} classes, but this "
        f"backbone's has {own}"
        + (" (created with num_classes=0)" if own == 0 else "")
        + f"; create it with timm.create_model(name, num_classes={num_classes}).",
    )


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
        revision: Hub revision, unless given in `source`; refused for a folder.
        cache_dir: HF cache folder.
        token: Hub token for private repos.
        local_files_only: Use the HF cache only.
        check_architecture: Refuse a backbone whose timm architecture differs from the saved one.

    Returns:
        An `EarlyExitModel` wrapping `model`.
    """
    src = _parse_source(source, revision, cache_dir, token, local_files_only)
    saved = _saved_config(src)
    cfg_label, exit_cfg, hashes, architecture = saved.label, saved.exit_cfg, saved.hashes, saved.architecture
    exits_path, exits_label = src.fetch(EXITS_NAME)
    mine = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if check_architecture and mine and mine != architecture:
        raise ExitCheckpointError(
            cfg_label,
            "architecture",
            f"the exits were saved for {architecture!r} but the backbone is {mine!r} "
            "(pass check_architecture=False to attach them anyway).",
        )
    _check_classifier(model, exit_cfg.num_classes, exits_path, exits_label, cfg_label)
    wrapped = _attach(model, exit_cfg, cfg_label)
    weights_label = f"{src.name}/{WEIGHTS_NAME}"
    try:
        _load_exit_file(
            wrapped, exits_path, exits_label, architecture, cfg_label, hashes, weights_label, saved.measured
        )
    except BaseException:
        wrapped.unwrap()  # the backbone leaves a failed load without hooks, as it came
        raise
    wrapped.training = model.training
    for m in (wrapped.branches, wrapped.final_head):
        if m is not None:
            m.train(model.training)
    return wrapped
