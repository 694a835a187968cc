"""Payload codec: tensors as safetensors bytes, optionally compressed, bounded before decoding.

`encode_tensors` stores named tensors with safetensors; floating tensors can travel as fp16 or as
8-bit affine codes with a per-tensor or per-channel scale and offset ("fp16", "int8",
"int8-channel"), recorded in the payload's metadata. A tensor its codec would not give back finite
(NaN or inf in 8-bit codes, finite values beyond float16's range in "fp16") is refused.

`decode_tensors` reads only the header before it allocates anything: every entry's dtype, shape and
byte range are checked against the payload, the quantisation parameters must have the shape of the
codes or broadcast to it without growing it, and the decoded element count (computed from the
header) is checked against `max_elements`. With `specs`, the names, dtypes and every dimension are
checked against what the receiver takes (e.g. a cloud part's feature shape and statistics width),
the batch dimension shared by all tensors and at most `max_batch`. Failures raise `PayloadError`
with a short message and an HTTP status (400, or 413 for payloads over a size limit).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

__all__ = [
    "COMPRESSIONS",
    "FLOAT_DTYPES",
    "PayloadError",
    "TensorSpec",
    "encode_tensors",
    "decode_tensors",
    "peek_tensors",
    "describe_specs",
]

COMPRESSIONS = ("none", "fp16", "int8", "int8-channel")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_META_KEY = "timm_exits.codec"
_MAX_HEADER = 1 << 16
_MAX_NDIM = 8
# safetensors dtype code -> (torch dtype, bytes per element)
_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_BY_NAME = {str(dt).removeprefix("torch."): dt for dt, _ in _ST_DTYPES.values()}


class PayloadError(ValueError):
    """A payload is malformed or does not fit what the receiver takes.

    Attributes:
        status: The HTTP status a server answers with (400, or 413 for a payload over a size limit).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver takes under one name.

    Attributes:
        shape: Sizes per dimension; None marks the batch dimension (shared by every tensor of a payload).
        dtypes: Accepted dtypes of the decoded tensor.
    """

    shape: tuple[int | None, ...]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES


# ------------------------------------------------------------------------------------- encode
def _quantise(name: str, t: torch.Tensor, axis: int | None) -> dict[str, torch.Tensor]:
    x = t.detach().float()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(
            f"{name!r} holds {bad} NaN or inf values; 8-bit codes cannot carry them (one would turn every value "
            "sharing its scale into NaN). Send it with compression 'none' or 'fp16', or fix the values."
        )
    if axis is None:
        lo, hi = x.amin(), x.amax()
    else:
        axis = axis % x.ndim
        dims = tuple(d for d in range(x.ndim) if d != axis)
        lo = x.amin(dim=dims, keepdim=True) if dims else x
        hi = x.amax(dim=dims, keepdim=True) if dims else x
    scale = (hi - lo) / 255.0
    if not torch.isfinite(scale).all():
        raise ValueError(
            f"{name!r} spans a range wider than float32 ({float(lo.min()):.3g} to {float(hi.max()):.3g}); 8-bit "
            "codes of it would decode to NaN. Send it with compression 'none'."
        )
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((x - lo) / scale).round_().clamp_(0, 255).to(torch.uint8)  # keeps the input's memory layout
    return {"q": q.contiguous(), "scale": scale.contiguous(), "offset": lo.contiguous()}


def _half(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` as float16; refused where a finite value would become inf (NaN and inf themselves travel as they are)."""
    h = t.half().contiguous()
    overflow = torch.isinf(h) & torch.isfinite(t)
    if overflow.any():
        largest = float(t[overflow].abs().max())
        raise ValueError(
            f"{name!r} holds {int(overflow.sum())} finite values beyond float16's range (largest |x| {largest:.3g} > "
            f"{torch.finfo(torch.float16).max:.0f}), which fp16 would turn into inf. Send it with compression "
            "'none' or 'int8-channel'."
        )
    return h


def encode_tensors(
    tensors: Mapping[str, torch.Tensor],
    compression: str = "none",
    only: Collection[str] | None = None,
    channel_axis: int = 1,
) -> bytes:
    """Serialise tensors to safetensors bytes, optionally compressing floating tensors.

    Args:
        tensors: Name -> tensor (names must not contain '/').
        compression: "none", "fp16", "int8" (per-tensor affine uint8 codes) or "int8-channel"
            (a scale and offset per index of `channel_axis`).
        only: Names to compress (default: every floating tensor); the others are stored as they are.
        channel_axis: Channel axis for "int8-channel".

    Returns:
        The payload bytes.

    Raises:
        ValueError: A tensor to compress holds values its codec would not give back finite: NaN or inf for the
            8-bit codes, finite values beyond float16's range for "fp16".
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}; use one of {COMPRESSIONS}.")
    out: dict[str, torch.Tensor] = {}
    codec: dict[str, dict[str, str]] = {}
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a tensor.")
        if "/" in name:
            raise ValueError(f"tensor name {name!r} contains '/', which the codec reserves.")
        t = t.detach().cpu()
        if t.dtype not in _BY_NAME.values():
            raise TypeError(
                f"{name!r} has dtype {t.dtype}, which payloads do not carry; convert it to one of "
                f"{sorted(_BY_NAME)} first."
            )
        mode = compression if (t.is_floating_point() and (only is None or name in only)) else "none"
        if t.numel() == 0:
            mode = "none"  # nothing to compress, and no range to quantise over
        if mode == "int8-channel" and t.ndim == 0:
            mode = "int8"
        if mode == "int8-channel" and not -t.ndim <= channel_axis < t.ndim:
            raise ValueError(
                f"channel_axis={channel_axis} is out of range for {name!r} of shape {tuple(t.shape)}; give an "
                f"axis in [{-t.ndim}, {t.ndim - 1}]."
            )
        codec[name] = {"mode": mode, "dtype": str(t.dtype).removeprefix("torch.")}
        if mode == "none":
            out[name] = t.contiguous()
        elif mode == "fp16":
            out[name] = _half(name, t)
        else:
            parts = _quantise(name, t, channel_axis if mode == "int8-channel" else None)
            for key, value in parts.items():
                out[f"{name}/{key}"] = value
    return _st_save(out, metadata={_META_KEY: json.dumps(codec), "format": "pt"})


# ------------------------------------------------------------------------------------- header
@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Planned:
    mode: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _header(data: bytes) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and check the safetensors header: dtypes, shapes and byte ranges against the payload."""
    if len(data) < 8:
        raise PayloadError(f"payload of {len(data)} bytes is too short to be safetensors.")
    n = int.from_bytes(data[:8], "little")
    if n > min(_MAX_HEADER, len(data) - 8):
        raise PayloadError(f"payload header length {n} does not fit the {len(data)}-byte payload; not safetensors.")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # nesting too deep to parse
        raise PayloadError(f"payload header is not JSON: {type(e).__name__}: {e}") from e
    if not isinstance(header, dict):
        raise PayloadError("payload header is not a JSON object; not safetensors.")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PayloadError("payload metadata must map names to strings.")
    size = len(data) - 8 - n
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise PayloadError(f"header entry {name!r} is not an object.")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if code not in _ST_DTYPES:
            raise PayloadError(f"tensor {name!r} has unsupported dtype {code!r}.")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise PayloadError(f"tensor {name!r} has an invalid shape {shape!r}.")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise PayloadError(f"tensor {name!r} has invalid data_offsets {offsets!r}.")
        dtype, itemsize = _ST_DTYPES[code]
        begin, end = offsets
        if not 0 <= begin <= end <= size or end - begin != math.prod(shape) * itemsize:
            raise PayloadError(
                f"tensor {name!r} ({code} {shape}) does not match its byte range {offsets} in a {size}-byte body."
            )
        entries[name] = _Entry(dtype, tuple(shape))
    return entries, meta


def _broadcasts_into(param: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether a quantisation parameter broadcasts to `shape` without making anything bigger than it."""
    if len(param) == 0:
        return True
    return len(param) == len(shape) and all(p in (1, s) for p, s in zip(param, shape))


def _plan(entries: Mapping[str, _Entry], meta: Mapping[str, str]) -> dict[str, _Planned]:
    """What each decoded tensor will be (mode, dtype, shape), from the header alone."""
    if _META_KEY not in meta:
        if any("/" in k for k in entries):
            raise PayloadError("payload has quantised parts but no codec metadata.")
        return {k: _Planned("none", e.dtype, e.shape) for k, e in entries.items()}
    try:
        codec = json.loads(meta[_META_KEY])
    except (json.JSONDecodeError, RecursionError) as e:
        raise PayloadError(f"payload codec metadata is not JSON: {type(e).__name__}: {e}") from e
    if not isinstance(codec, dict):
        raise PayloadError("payload codec metadata is not a JSON object.")
    planned: dict[str, _Planned] = {}
    used: set[str] = set()
    for name, info in codec.items():
        if not isinstance(info, dict):
            raise PayloadError(f"codec entry {name!r} is not an object.")
        mode = info.get("mode", "none")
        dtype = _BY_NAME.get(str(info.get("dtype", "float32")))
        if dtype is None:
            raise PayloadError(f"tensor {name!r} has unknown dtype {info.get('dtype')!r}.")
        if mode in ("none", "fp16"):
            entry = entries.get(name)
            if entry is None:
                raise PayloadError(f"payload lists {name!r} but does not contain it.")
            if mode == "fp16" and (entry.dtype != torch.float16 or not dtype.is_floating_point):
                raise PayloadError(f"fp16 tensor {name!r} is stored as {entry.dtype} for {dtype}.")
            if mode == "none" and entry.dtype != dtype:
                raise PayloadError(
                    f"tensor {name!r} is stored as {entry.dtype} but its codec metadata says {dtype}; send the "
                    "payload as encode_tensors writes it."
                )
            planned[name] = _Planned(mode, dtype, entry.shape)
            used.add(name)
        elif mode in ("int8", "int8-channel"):
            keys = [f"{name}/{k}" for k in ("q", "scale", "offset")]
            missing = [k for k in keys if k not in entries]
            if missing:
                raise PayloadError(f"quantised tensor {name!r} lacks {missing}.")
            q, scale, offset = (entries[k] for k in keys)
            if q.dtype != torch.uint8 or scale.dtype != torch.float32 or offset.dtype != torch.float32:
                raise PayloadError(f"quantised tensor {name!r} needs uint8 codes and float32 scale and offset.")
            if not (_broadcasts_into(scale.shape, q.shape) and _broadcasts_into(offset.shape, q.shape)):
                raise PayloadError(
                    f"quantised tensor {name!r}: scale {list(scale.shape)} and offset {list(offset.shape)} must "
                    f"have one entry or one per channel of the codes {list(q.shape)}."
                )
            if not dtype.is_floating_point:
                raise PayloadError(f"quantised tensor {name!r} cannot decode to {dtype}.")
            planned[name] = _Planned(mode, dtype, q.shape)
            used.update(keys)
        else:
            raise PayloadError(f"tensor {name!r} uses unknown compression {mode!r}.")
    extra = sorted(set(entries) - used)
    if extra:
        raise PayloadError(f"payload holds tensors the codec metadata does not list: {extra[:4]}.")
    return planned


def _check_specs(planned: Mapping[str, _Planned], specs: Mapping[str, TensorSpec], max_batch: int | None) -> None:
    missing, extra = sorted(set(specs) - set(planned)), sorted(set(planned) - set(specs))
    if missing or extra:
        raise PayloadError(f"payload must hold exactly {sorted(specs)}; missing {missing}, unexpected {extra}.")
    batch: int | None = None
    for name, spec in specs.items():
        p = planned[name]
        if p.dtype not in spec.dtypes:
            allowed = [str(d).removeprefix("torch.") for d in spec.dtypes]
            raise PayloadError(f"{name!r} has dtype {str(p.dtype).removeprefix('torch.')}; expected one of {allowed}.")
        want = "(" + ", ".join("n" if d is None else str(d) for d in spec.shape) + ")"
        if len(p.shape) != len(spec.shape) or any(w is not None and g != w for g, w in zip(p.shape, spec.shape)):
            raise PayloadError(f"{name!r} has shape {list(p.shape)}; expected {want}.")
        for g, w in zip(p.shape, spec.shape):
            if w is None:
                if batch is not None and g != batch:
                    raise PayloadError(f"tensors disagree on the batch size ({batch} vs {g} in {name!r}).")
                batch = g
    if batch is not None:
        if batch == 0:
            raise PayloadError("payload holds 0 samples.")
        if max_batch is not None and batch > max_batch:
            raise PayloadError(f"payload holds {batch} samples; the limit per request is {max_batch}.", 413)


def decode_tensors(
    data: bytes,
    specs: Mapping[str, TensorSpec] | None = None,
    *,
    max_elements: int | None = None,
    max_batch: int | None = None,
) -> dict[str, torch.Tensor]:
    """Check a payload of `encode_tensors` from its header, then decode it (to each tensor's original dtype).

    Args:
        data: The payload bytes.
        specs: Name -> `TensorSpec` the payload must hold exactly (None: any names and shapes).
        max_elements: Largest total element count of the decoded tensors.
        max_batch: Largest batch size (the dimension marked None in `specs`).

    Returns:
        Name -> decoded tensor.

    Raises:
        PayloadError: The bytes are not a valid payload or do not fit `specs` and the limits; nothing
            of the payload's declared size has been allocated then.
    """
    data = bytes(data)
    entries, meta = _header(data)
    planned = _plan(entries, meta)
    if specs is not None:
        _check_specs(planned, specs, max_batch)
    total = sum(math.prod(p.shape) for p in planned.values())
    if max_elements is not None and total > max_elements:
        raise PayloadError(f"payload decodes to {total} elements; the limit is {max_elements}.", 413)
    try:
        raw = _st_load(data)
    except Exception as e:  # safetensors raises its own error type for malformed data
        raise PayloadError(f"payload is not valid safetensors: {e}") from e
    out: dict[str, torch.Tensor] = {}
    for name, p in planned.items():
        if p.mode in ("none", "fp16"):
            out[name] = raw[name].to(p.dtype)
        else:
            q, scale, offset = (raw[f"{name}/{k}"] for k in ("q", "scale", "offset"))
            out[name] = torch.addcmul(offset, q.float(), scale).to(p.dtype)
    return out


def peek_tensors(data: bytes) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What a payload of `encode_tensors` decodes to, read from its header alone (nothing is decoded).

    Args:
        data: The payload bytes.

    Returns:
        Name -> (decoded dtype, shape).

    Raises:
        PayloadError: The header is malformed or does not match the payload.
    """
    planned = _plan(*_header(data if isinstance(data, bytes) else bytes(data)))
    return {name: (p.dtype, p.shape) for name, p in planned.items()}


def describe_specs(specs: Mapping[str, TensorSpec]) -> dict[str, Any]:
    """JSON-friendly form of specs: name -> {"shape": [None for the batch, ...], "dtypes": [...]}."""
    return {
        k: {"shape": list(s.shape), "dtypes": [str(d).removeprefix("torch.") for d in s.dtypes]}
        for k, s in specs.items()
    }
