"""What a served model takes and answers: request specs, size limits and the batched computation.

Two kinds of served model share one protocol (a safetensors payload in, one out):

* a `CloudPart` of `timm_exits.deploy.split`: request `features` (n, *feature_shape) in a floating dtype and
  `stats` (n, stats_dim) float32; answer `logits` (n, m, K) and `gate_logits` (n, m - 1) float32.
* a whole model: request `image` (n, C, H, W), normalised images in a floating dtype or uint8 pixels (0-255,
  normalised on the server with the model's mean and std, a quarter of float32's bytes; each request on its
  own, so pixel and float requests can share a batch); answer `logits` (n, K) float32 and `exit_index` (n,)
  int64. An `EarlyExitModel` runs `timm_exits.predict` (hard early exit over the batch); any other module
  (the plain backbone) runs its forward, every sample at exit 0.

This module needs no Ray: the deployments and the in-process client both use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.model import EarlyExitModel
from ...inference.hard_exit import _nonfinite_rows, predict
from ...inference.policies import EXIT_RULES, resolve_thresholds
from ..split import CloudPart
from .codec import FLOAT_DTYPES, PayloadError, TensorSpec, decode_tensors, describe_specs, peek_tensors

__all__ = ["Served", "served_cloud", "served_model", "decode_request", "run_batch"]

_HEADER_ALLOWANCE = 1 << 16


@dataclass
class Served:
    """A model ready to serve: what it takes, its limits and how to run it.

    Attributes:
        kind: "cloud" (a split's cloud part) or "model" (a whole model).
        module: The module (put it in eval mode; replicas do so on their own copy).
        request: Name -> `TensorSpec` of a request.
        response: Name -> `TensorSpec` of an answer.
        max_request_samples: Most samples one request may hold.
        max_elements: Most decoded elements one request may hold (from the specs and the sample limit).
        max_body_bytes: Most request bytes (float32 at the sample limit plus the header).
        policy: Exit policy of a whole `EarlyExitModel` (None otherwise).
        thresholds: Its thresholds, one per early exit.
        info: Descriptive fields (split point, shapes, the pixels' mean and std) for health checks.
        pixel_norm: (mean, std) per channel that uint8 images are normalised with (None: floats only).
    """

    kind: str
    module: nn.Module
    request: dict[str, TensorSpec]
    response: dict[str, TensorSpec]
    max_request_samples: int
    max_elements: int
    max_body_bytes: int
    policy: str | None = None
    thresholds: list[float] | None = None
    info: dict[str, Any] | None = None
    pixel_norm: tuple[list[float], list[float]] | None = None

    def too_large(self, size: int) -> PayloadError:
        """The 413 error of a request body of `size` bytes over `max_body_bytes`."""
        return PayloadError(
            f"payload of {size} bytes exceeds the limit of {self.max_body_bytes} (max_request_samples="
            f"{self.max_request_samples} samples in float32); send at most {self.max_request_samples} samples per "
            "request.",
            413,
        )

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description: kind, specs, limits, policy and the module's fields."""
        return {
            "kind": self.kind,
            **(self.info or {}),
            "request": describe_specs(self.request),
            "response": describe_specs(self.response),
            "max_request_samples": self.max_request_samples,
            "max_elements": self.max_elements,
            "max_body_bytes": self.max_body_bytes,
            "policy": self.policy,
            "thresholds": self.thresholds,
        }


def _limits(request: Mapping[str, TensorSpec], max_samples: int) -> tuple[int, int]:
    per_sample = sum(math.prod(d for d in s.shape if d is not None) for s in request.values())
    elements = per_sample * max_samples
    return elements, elements * 4 + _HEADER_ALLOWANCE


def _check_samples(max_samples: int) -> None:
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_request_samples={max_samples!r} must be a positive int.")


def served_cloud(cloud: CloudPart, max_request_samples: int = 64) -> Served:
    """Describe a split's cloud part for serving.

    Args:
        cloud: The `CloudPart` (its `feature_shape` recorded by `split`).
        max_request_samples: Most samples one request may hold.

    Returns:
        A `Served` record.
    """
    if not isinstance(cloud, CloudPart):
        raise TypeError(f"expected a CloudPart from timm_exits.deploy.split, got {type(cloud).__name__}.")
    if not cloud.feature_shape:
        raise ValueError("the cloud part has no recorded feature_shape; split the model with check=True.")
    _check_samples(max_request_samples)
    m, k = cloud.num_outputs, cloud.num_classes
    request = {
        "features": TensorSpec((None, *cloud.feature_shape)),
        "stats": TensorSpec((None, cloud.stats_dim), (torch.float32,)),
    }
    response = {
        "logits": TensorSpec((None, m, k), (torch.float32,)),
        "gate_logits": TensorSpec((None, m - 1), (torch.float32,)),
    }
    elements, body = _limits(request, max_request_samples)
    info = {
        "exit_name": cloud.exit_name,
        "split_index": cloud.split_index,
        "feature_shape": list(cloud.feature_shape),
        "stats_dim": cloud.stats_dim,
        "num_outputs": m,
        "num_classes": k,
    }
    return Served("cloud", cloud, request, response, max_request_samples, elements, body, info=info)


def _input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    if input_size is not None:
        return tuple(int(v) for v in input_size)
    if isinstance(model, EarlyExitModel) and model.config.input_size:
        return tuple(model.config.input_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        return tuple(cfg["input_size"])
    raise ValueError("give input_size=(C, H, W): the model records none, and requests are checked against it.")


def _fits(mean: Sequence[float], std: Sequence[float], channels: int) -> bool:
    return len(mean) == channels and len(std) == channels and all(v > 0 for v in std)


def _pixel_norm(
    model: nn.Module, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[list[float], list[float]] | None:
    """The (mean, std) uint8 pixels are normalised with: given, else the backbone's timm pretrained_cfg when it
    fits the channels (a 1-channel model keeps ImageNet's three values there: it takes float images only)."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (per channel, for pixels scaled to [0, 1]) or neither.")
    if mean is None or std is None:
        cfg = getattr(getattr(model, "backbone", model), "pretrained_cfg", None) or {}
        if cfg.get("mean") is None or cfg.get("std") is None:
            return None
        m, s = [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]
        return (m, s) if _fits(m, s, channels) else None
    m, s = [float(v) for v in mean], [float(v) for v in std]
    if not _fits(m, s, channels):
        raise ValueError(f"mean={m} and std={s} need one value per channel ({channels}), std > 0.")
    return m, s


def served_model(
    model: nn.Module,
    policy: str | None = None,
    threshold: float | Sequence[float] | None = None,
    *,
    input_size: Sequence[int] | None = None,
    num_classes: int | None = None,
    max_request_samples: int = 64,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Served:
    """Describe a whole model for serving: hard early exit for an `EarlyExitModel`, else its forward.

    Args:
        model: An `EarlyExitModel` or a plain classifier (e.g. the unwrapped timm backbone).
        policy: Exit policy ("gate", "confidence", "entropy"); default: the model's stored policy.
        threshold: One value or one per early exit; default as `timm_exits.predict`.
        input_size: (C, H, W) of a request's images; default: the model's configured input size.
        num_classes: Classes of a plain model (default: its `num_classes` attribute).
        max_request_samples: Most samples one request may hold.
        mean: Per-channel mean that uint8 pixel requests are normalised with (``(x / 255 - mean) / std``);
            default: the backbone's timm ``pretrained_cfg`` (the one `save_pretrained` records). A model
            that records none, or values of another channel count, takes float images only.
        std: Per-channel standard deviation, given with `mean`.

    Returns:
        A `Served` record.
    """
    _check_samples(max_request_samples)
    size = _input_size(model, input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size={size} must be (C, H, W) with positive sizes.")
    norm = _pixel_norm(model, size[0], mean, std)
    policy_name, thresholds = None, None
    if isinstance(model, EarlyExitModel):
        policy_name = policy or model.config.policy
        if policy_name not in EXIT_RULES:
            raise ValueError(f"policy {policy_name!r} has no hard early exit; use one of {EXIT_RULES}.")
        thresholds = resolve_thresholds(model, policy_name, threshold)
        k = model.num_classes
        info: dict[str, Any] = {"num_exits": model.num_exits, "num_classes": k, "input_size": list(size)}
    else:
        if policy is not None or threshold is not None:
            raise ValueError("policy and threshold apply to an EarlyExitModel only.")
        k = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        if not k:
            raise ValueError("give num_classes: the model has no num_classes attribute.")
        info = {"num_exits": 1, "num_classes": k, "input_size": list(size)}
    info["pixels"] = {"mean": norm[0], "std": norm[1]} if norm else None
    request = {"image": TensorSpec((None, *size), FLOAT_DTYPES + ((torch.uint8,) if norm else ()))}
    response = {
        "logits": TensorSpec((None, k), (torch.float32,)),
        "exit_index": TensorSpec((None,), (torch.int64,)),
    }
    elements, body = _limits(request, max_request_samples)
    return Served(
        "model", model, request, response, max_request_samples, elements, body, policy_name, thresholds, info, norm
    )


def _param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters(), torch.empty(0))


def _dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype the module's inputs are cast to before its forward."""
    p = _param(module)
    return p.dtype if p.is_floating_point() else torch.float32


def _image(served: Served, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One request's images on `device`, uint8 pixels normalised to float32: before they join a batch, where
    torch.cat would turn them into floats still scaled 0-255."""
    x = x.to(device)
    if x.dtype != torch.uint8:
        return x
    if served.pixel_norm is None:
        raise PayloadError(_no_pixel_norm(served))
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in served.pixel_norm)
    return (x.float() / 255.0 - mean) / std


def _no_pixel_norm(served: Served) -> str:
    channels = served.request["image"].shape[1]
    return (
        f"uint8 pixels, but this server has no mean and std to normalise them with ({channels} channels): send "
        "normalised float images, or serve the model with mean=[...] and std=[...] (one value per channel)."
    )


def _forward(served: Served, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p, dtype = _param(served.module), _dtype(served.module)
    with torch.inference_mode():
        if served.kind == "cloud":
            out = served.module(inputs["features"].to(p.device, dtype), inputs["stats"].to(p.device).float())
            return {"logits": out.logits.float(), "gate_logits": out.gate_logits.float()}
        x = inputs["image"].to(p.device, dtype)
        if served.policy is not None:
            pred = predict(served.module, x, served.policy, served.thresholds)
            return {"logits": pred.logits.float(), "exit_index": pred.exit_index.long()}
        logits = served.module(x).float()
        return {"logits": logits, "exit_index": torch.zeros(x.shape[0], dtype=torch.long, device=logits.device)}


def _check_header(served: Served, body: bytes) -> None:
    """Refuse from the header alone a request over the sample limit, or uint8 pixels the server cannot normalise."""
    declared = peek_tensors(body)
    for name, spec in served.request.items():
        if name not in declared or None not in spec.shape:
            continue
        dtype, shape = declared[name]
        axis = spec.shape.index(None)
        n = shape[axis] if len(shape) > axis else 0
        if n > served.max_request_samples:
            m = served.max_request_samples
            raise PayloadError(
                f"payload holds {n} samples; the limit is max_request_samples={m} per request: send at most {m} "
                "samples per request (the clients do so, following the server's max_request_samples).",
                413,
            )
        if served.kind == "model" and dtype == torch.uint8 and served.pixel_norm is None:
            raise PayloadError(_no_pixel_norm(served))


def decode_request(served: Served, body: bytes) -> dict[str, torch.Tensor]:
    """Decode one request and check it against the served model before it joins a batch.

    Args:
        served: The served model.
        body: The request payload.

    Returns:
        Name -> (n, ...) tensor.

    Raises:
        PayloadError: Over the sample or size limit (status 413, the sample count read from the header first);
            malformed, not fitting the specs, uint8 pixels to a model without a mean and std, or images holding
            NaN or inf, in the model's dtype (400: the hard early exit refuses them, and in a batch they would fail
            every request).
    """
    _check_header(served, body)
    if len(body) > served.max_body_bytes:
        raise served.too_large(len(body))
    limits = {"max_elements": served.max_elements, "max_batch": served.max_request_samples}
    tensors = decode_tensors(body, served.request, **limits)
    image = tensors.get("image") if served.kind == "model" else None
    if image is None or not image.is_floating_point():
        return tensors
    # checked as the model gets them: finite values beyond a half-precision model's range turn to inf there
    dtype = _dtype(served.module)
    narrower = torch.finfo(dtype).max < torch.finfo(image.dtype).max
    bad = _nonfinite_rows(image.to(dtype) if narrower else image)
    if bad:
        beyond = f", or values beyond the range of the model's {dtype}" if narrower else ""
        raise PayloadError(
            f"{len(bad)} of {len(image)} images hold NaN or inf{beyond} (first: {bad[:5]}); send finite images."
        )
    return tensors


def run_batch(served: Served, requests: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Run several decoded requests as one batch and split the answers back per request.

    Args:
        served: The served model.
        requests: Decoded requests (each name -> (n_i, ...) tensor, checked against `served.request`).

    Returns:
        One answer per request (name -> (n_i, ...) CPU tensor), in order.
    """
    sizes = [int(next(iter(r.values())).shape[0]) for r in requests]
    if served.kind == "model":
        device = _param(served.module).device
        requests = [{"image": _image(served, r["image"], device)} for r in requests]
    inputs = {k: torch.cat([r[k] for r in requests]) if len(requests) > 1 else requests[0][k] for k in served.request}
    out = {k: v.cpu() for k, v in _forward(served, inputs).items()}
    pieces = {k: v.split(sizes) for k, v in out.items()}
    return [{k: pieces[k][i].contiguous() for k in out} for i in range(len(requests))]
