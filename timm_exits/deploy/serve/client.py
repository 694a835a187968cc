"""Clients of the served models: the edge side of a split, and a whole served model.

* `EdgeClient` runs the `EdgePart` on a batch, applies the exit policy (`exit_mask`, exactly the rule
  of `timm_exits.predict`) at exits 0..k, sends the intermediate tensor of the samples that did not
  exit (optionally compressed, in requests of at most `max_request_samples`, lowered to the server's own
  limit), applies the policy to the remaining exits the cloud returns and gives every answer back in
  input order, recording bytes, per-sample latency and where each sample left. If the cloud fails,
  `fallback="local"` answers those samples with the edge's own last exit instead of raising.
* `ModelClient` sends images to a whole served model and returns its logits and exit indices.

The cloud is reached by URL (Ray Serve's HTTP proxy; a timeout on every connection), by a Ray Serve
`DeploymentHandle` (inside the cluster), or, for measurements, in-process through the same codec
(a `CloudPart`). `measure_compression` reports what each payload codec costs in accuracy.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn

from ...inference.hard_exit import _nonfinite_rows
from ...inference.policies import EXIT_RULES, exit_mask, resolve_thresholds
from ..split import CloudPart, EdgePart
from .codec import COMPRESSIONS, PayloadError, TensorSpec, decode_tensors, encode_tensors
from .parts import Served, _check_samples, decode_request, run_batch, served_cloud

__all__ = [
    "CloudError",
    "CloudUnavailableError",
    "CloudResponseError",
    "EdgeResult",
    "EdgeClient",
    "ModelClient",
    "measure_compression",
]


class CloudError(RuntimeError):
    """The served model could not produce an answer."""


class CloudUnavailableError(CloudError):
    """The server could not be reached (refused, timed out, connection dropped)."""


class CloudResponseError(CloudError):
    """The server answered with an error status or a response of the wrong form.

    Attributes:
        status: The HTTP status, when there was one.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# -------------------------------------------------------------------------------- transports
class _Http:
    """POST / GET to a Ray Serve route over HTTP, one connection per call, with a timeout."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"URL {url!r} must look like http://host:port/route.")
        self.url = url
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = parts.path or "/"
        self.timeout = timeout

    def _request(self, method: str, body: bytes | None = None) -> bytes:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
            conn.request(method, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise CloudUnavailableError(f"{self.url} unreachable: {type(e).__name__}: {e}") from e
        finally:
            conn.close()
        if resp.status != 200:
            try:
                message = json.loads(data).get("error", "")
            except (ValueError, AttributeError):
                message = data[:200].decode("utf-8", "replace")
            raise CloudResponseError(f"{self.url} answered {resp.status} {resp.reason}: {message}", resp.status)
        return data

    def post(self, body: bytes) -> bytes:
        return self._request("POST", body)

    def describe(self) -> dict[str, Any]:
        data = self._request("GET")
        try:
            info = json.loads(data)
        except (ValueError, RecursionError):  # not UTF-8 or not JSON
            info = None
        if not isinstance(info, dict):
            raise CloudResponseError(
                f"{self.url} answered GET with {data[:80]!r}, not a JSON object describing a served model; is this "
                "the URL of a cloud_app or model_app?"
            )
        return info


class _Handle:
    """Calls a Ray Serve `DeploymentHandle` of a `ServedReplica`, with a timeout on every call."""

    def __init__(self, handle: Any, timeout: float) -> None:
        self.handle = handle
        self.timeout = timeout

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.handle, method).remote(*args).result(timeout_s=self.timeout)
        except TimeoutError as e:
            raise CloudUnavailableError(f"the deployment did not answer within {self.timeout} s.") from e
        except Exception as e:  # Ray wraps the replica's exception (PayloadError, a dead actor, ...)
            cause = getattr(e, "cause", None) or e
            status = getattr(cause, "status", None)
            raise CloudResponseError(f"the deployment failed: {type(cause).__name__}: {cause}", status) from e

    def post(self, body: bytes) -> bytes:
        return self._call("infer", body)

    def describe(self) -> dict[str, Any]:
        return self._call("describe")


class _Local:
    """Runs a served model in-process through the same codec and checks (no network)."""

    def __init__(self, served: Served) -> None:
        self.served = served

    def post(self, body: bytes) -> bytes:
        try:
            tensors = decode_request(self.served, body)
        except PayloadError as e:
            raise CloudResponseError(f"the payload was rejected: {e}", e.status) from e
        return encode_tensors(run_batch(self.served, [tensors])[0])

    def describe(self) -> dict[str, Any]:
        return {"status": "ok", **self.served.describe()}


def _transport(target: Any, timeout: float, max_request_samples: int) -> _Http | _Handle | _Local:
    if isinstance(target, str):
        return _Http(target, timeout)
    if isinstance(target, CloudPart):
        return _Local(served_cloud(target, max_request_samples))
    if hasattr(target, "infer") and hasattr(target, "options"):
        return _Handle(target, timeout)
    raise TypeError(f"cannot reach a served model through a {type(target).__name__}; give a URL or a handle.")


def _decode_answer(data: bytes, specs: Mapping[str, TensorSpec], n: int) -> dict[str, torch.Tensor]:
    try:
        out = decode_tensors(data, specs, max_batch=n)
    except PayloadError as e:
        raise CloudResponseError(f"the answer does not fit the request ({e}); is this the right model?") from e
    got = int(next(iter(out.values())).shape[0])
    if got != n:
        raise CloudResponseError(f"the answer holds {got} samples for a request of {n}.")
    return out


def _check_images(x: torch.Tensor, who: str, input_size: Sequence[int] = ()) -> None:
    """Refuse what the model would refuse, before any compute or transfer: not a non-empty (B, C, H, W) batch,
    another size than the one the part was traced for, or images holding NaN or inf."""
    if not torch.is_tensor(x):
        raise TypeError(f"{who} takes an image tensor, got {type(x).__name__}.")
    if x.ndim != 4 or x.shape[0] == 0:
        what = "empty batch" if x.ndim and x.shape[0] == 0 else "not a (B, C, H, W) image batch"
        fix = " Add the batch dimension with x.unsqueeze(0)." if x.ndim == 3 else ""
        raise ValueError(f"{what} (shape {tuple(x.shape)}): {who} needs at least one (C, H, W) image.{fix}")
    if input_size and tuple(x.shape[1:]) != tuple(input_size):
        raise ValueError(
            f"images of shape {tuple(x.shape[1:])}; the split was traced for {tuple(input_size)}: resize them, or "
            "wrap and split the model at this size."
        )
    bad = _nonfinite_rows(x) if x.is_floating_point() else []
    if bad:
        raise ValueError(f"{len(bad)} of {x.shape[0]} images hold NaN or inf (first: {bad[:5]}); fix or drop them.")


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _request_limit(info: Mapping[str, Any], own: int) -> int:
    """Samples per request: the client's own limit, lowered to the server's `max_request_samples`."""
    limit = info.get("max_request_samples")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
        return min(own, limit)
    return own


# ------------------------------------------------------------------------------------- edge
@dataclass
class EdgeResult:
    """Result of one `EdgeClient.run`.

    Attributes:
        logits: (B, K) float32 logits of the exit each sample left at, in input order.
        exit_index: (B,) exit taken (0-based; `num_exits - 1` is the final head).
        on_edge: (B,) True where the answer came from the edge (early exit or fallback).
        fallback: (B,) True where the cloud was needed but failed and the edge's exit-k answer was used.
        latency_s: (B,) seconds from the start of the call until each sample's answer was known.
        bytes_sent: Request bytes sent to the cloud (payload only, HTTP headers excluded).
        bytes_received: Response bytes received.
        requests: Requests sent (0 when every sample left on the edge).
        timings: Seconds spent in "edge", "encode", "cloud" (round trips incl. server) and "decode".
        error: The cloud error that triggered the fallback, if any.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    on_edge: torch.Tensor
    fallback: torch.Tensor
    latency_s: torch.Tensor
    bytes_sent: int = 0
    bytes_received: int = 0
    requests: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def offloaded(self) -> int:
        """Samples sent to the cloud."""
        return int((~self.on_edge | self.fallback).sum())

    def summary(self) -> dict[str, Any]:
        """JSON-friendly aggregate numbers."""
        return {
            "samples": int(self.exit_index.shape[0]),
            "offloaded": self.offloaded,
            "fallback": int(self.fallback.sum()),
            "exit_counts": torch.bincount(self.exit_index).tolist(),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_sent_per_offloaded": self.bytes_sent / max(self.offloaded, 1),
            "requests": self.requests,
            "latency_ms_mean": float(self.latency_s.mean()) * 1e3,
            "latency_ms_max": float(self.latency_s.max()) * 1e3,
            "timings_ms": {k: v * 1e3 for k, v in self.timings.items()},
            "error": self.error,
        }


def _edge_thresholds(edge: EdgePart, policy: str, threshold: Any) -> list[float]:
    # resolve_thresholds reads only the number of early exits and the stored calibration.
    shim = SimpleNamespace(branches=[None] * edge.num_early_exits, config=edge.config)
    return resolve_thresholds(shim, policy, threshold)  # type: ignore[arg-type]


class EdgeClient:
    """Runs the edge part locally and sends the samples that did not exit to the served cloud part.

    Args:
        edge: The `EdgePart` (put the model in eval mode first).
        cloud: The cloud application's URL (http://host:port/route), a Ray Serve `DeploymentHandle` to
            it, or, to run in-process through the same codec, the `CloudPart`.
        policy: "gate", "confidence" or "entropy".
        threshold: One value or one per early exit; default: the calibration the model held when it was
            split (the edge part keeps a copy of its config; split again after calibrating), else
            `DEFAULT_THRESHOLDS[policy]` (as `timm_exits.predict`).
        compression: How `features` travel: "none", "fp16", "int8" or "int8-channel".
        fallback: "raise" (default) or "local": when the cloud fails, answer the samples it should
            have handled with the edge's last exit (exit k) and record the error.
        timeout: Seconds to wait for the server on every connection.
        max_request_samples: Most samples per request (larger sets are sent in parts); lowered to the server's
            own `max_request_samples`, asked once before the first request.
    """

    def __init__(
        self,
        edge: EdgePart,
        cloud: str | CloudPart | Any,
        policy: str = "gate",
        threshold: float | Sequence[float] | None = None,
        compression: str = "none",
        fallback: str = "raise",
        timeout: float = 30.0,
        max_request_samples: int = 32,
    ) -> None:
        if not isinstance(edge, EdgePart):
            raise TypeError(f"edge must be an EdgePart from timm_exits.deploy.split, got {type(edge).__name__}.")
        if policy not in EXIT_RULES:
            raise ValueError(f"policy {policy!r} has no exit rule; use one of {EXIT_RULES}.")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r}; use one of {COMPRESSIONS}.")
        if fallback not in ("raise", "local"):
            raise ValueError(f"fallback={fallback!r}; use 'raise' or 'local'.")
        _check_samples(max_request_samples)
        self.edge = edge
        self.policy = policy
        self.thresholds = _edge_thresholds(edge, policy, threshold)
        self.compression = compression
        self.fallback = fallback
        self.max_request_samples = max_request_samples
        self.transport = _transport(cloud, timeout, max_request_samples)
        self._limit: int | None = None
        m = edge.num_early_exits - edge.split_index
        self.response_specs = {
            "logits": TensorSpec((None, m, edge.num_classes), (torch.float32,)),
            "gate_logits": TensorSpec((None, m - 1), (torch.float32,)),
        }

    def check_server(self) -> dict[str, Any]:
        """Ask the server what it serves; raise `CloudResponseError` unless it is this edge part's cloud part."""
        info = self.transport.describe()
        self._limit = _request_limit(info, self.max_request_samples)
        e = self.edge
        want = {"kind": "cloud", "exit_name": e.exit_name, "split_index": e.split_index, "num_classes": e.num_classes}
        wrong = {k: (info.get(k), v) for k, v in want.items() if info.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: server {a!r} vs edge {b!r}" for k, (a, b) in wrong.items())
            raise CloudResponseError(f"the server runs a different model or split ({detail}).")
        return info

    def _decide(self, logits: torch.Tensor, gates: torch.Tensor, first: int, alive: torch.Tensor, out: dict) -> None:
        for j in range(gates.shape[1]):
            leave = exit_mask(self.policy, logits[:, j], gates[:, j], self.thresholds[first + j]) & alive
            out["logits"][leave] = logits[leave, j].float()
            out["exit"][leave] = first + j
            alive &= ~leave

    def _send(self, features: torch.Tensor, stats: torch.Tensor, result: EdgeResult) -> tuple[torch.Tensor, ...]:
        """Send the offloaded rows in requests the server takes; (logits, gate_logits)."""
        if self._limit is None:
            self._limit = _request_limit(self.transport.describe(), self.max_request_samples)
        logits, gates = [], []
        for part in _chunks(features.shape[0], self._limit):
            t0 = time.perf_counter()
            body = encode_tensors(
                {"features": features[part], "stats": stats[part]},
                self.compression,
                only=("features",),
                channel_axis=self.edge.channel_axis,
            )
            t1 = time.perf_counter()
            result.bytes_sent += len(body)
            result.requests += 1
            answer = self.transport.post(body)
            t2 = time.perf_counter()
            result.bytes_received += len(answer)
            out = _decode_answer(answer, self.response_specs, part.stop - part.start)
            logits.append(out["logits"])
            gates.append(out["gate_logits"])
            result.timings["encode"] += t1 - t0
            result.timings["cloud"] += t2 - t1
            result.timings["decode"] += time.perf_counter() - t2
        return torch.cat(logits), torch.cat(gates)

    def run(self, x: torch.Tensor) -> EdgeResult:
        """Classify a batch: edge part here, the samples that do not exit early on the cloud.

        Returns:
            An `EdgeResult` (logits and exit index in input order, bytes, latencies).

        Raises:
            CloudError: The cloud failed and `fallback="raise"`.
        """
        _check_images(x, "EdgeClient.run", self.edge.input_size)
        e = self.edge
        start = time.perf_counter()
        with torch.inference_mode():
            edge_out = e(x)
        b = x.shape[0]
        device = edge_out.logits.device
        out = {
            "logits": torch.zeros(b, e.num_classes, dtype=torch.float32, device=device),
            "exit": torch.full((b,), e.num_early_exits, dtype=torch.long, device=device),
        }
        alive = torch.ones(b, dtype=torch.bool, device=device)
        self._decide(edge_out.logits, edge_out.gate_logits, 0, alive, out)
        t_edge = time.perf_counter() - start
        latency = torch.full((b,), t_edge, dtype=torch.float64)
        result = EdgeResult(
            logits=out["logits"],
            exit_index=out["exit"],
            on_edge=~alive.cpu(),
            fallback=torch.zeros(b, dtype=torch.bool),
            latency_s=latency,
            timings={"edge": t_edge, "encode": 0.0, "cloud": 0.0, "decode": 0.0},
        )
        rows = alive.nonzero().squeeze(1)
        if rows.numel() == 0:
            return result
        try:
            cloud_logits, cloud_gates = self._send(edge_out.features[rows], edge_out.stats[rows], result)
        except CloudError as err:
            if self.fallback != "local":
                raise
            out["logits"][rows] = edge_out.logits[rows, -1].float()
            out["exit"][rows] = e.split_index
            result.fallback[rows.cpu()] = True
            result.on_edge[rows.cpu()] = True
            result.error = str(err)
            latency[rows.cpu()] = time.perf_counter() - start
            return result
        n = rows.numel()
        sub = {
            "logits": torch.zeros(n, e.num_classes, dtype=torch.float32, device=device),
            "exit": torch.full((n,), e.num_early_exits, dtype=torch.long, device=device),
        }
        sub_alive = torch.ones(n, dtype=torch.bool, device=device)
        cloud_logits = cloud_logits.to(device)
        self._decide(cloud_logits[:, :-1], cloud_gates.to(device), e.split_index + 1, sub_alive, sub)
        sub["logits"][sub_alive] = cloud_logits[sub_alive, -1].float()
        out["logits"][rows] = sub["logits"]
        out["exit"][rows] = sub["exit"]
        latency[rows.cpu()] = time.perf_counter() - start
        return result


# ------------------------------------------------------------------------------------ model
class ModelClient:
    """Sends image batches to a whole served model (`model_app`) and returns its answers in input order.

    Args:
        target: The application's URL (http://host:port/route) or a Ray Serve `DeploymentHandle`.
        timeout: Seconds to wait for the server on every connection.
        max_request_samples: Most samples per request (larger batches are sent in parts); lowered to the server's
            own `max_request_samples`.
    """

    def __init__(self, target: str | Any, timeout: float = 30.0, max_request_samples: int = 32) -> None:
        if isinstance(target, nn.Module):
            raise TypeError("ModelClient reaches a served model; call timm_exits.predict for a local one.")
        _check_samples(max_request_samples)
        self.transport = _transport(target, timeout, max_request_samples)
        self.max_request_samples = max_request_samples
        self._specs: dict[str, TensorSpec] | None = None
        self._limit = max_request_samples

    def describe(self) -> dict[str, Any]:
        """What the server serves (its GET answer)."""
        return self.transport.describe()

    def _response_specs(self) -> dict[str, TensorSpec]:
        if self._specs is None:
            info = self.describe()
            if info.get("kind") != "model":
                raise CloudResponseError(f"the server runs a {info.get('kind')!r} application, not a whole model.")
            k = info.get("num_classes")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise CloudResponseError(f"the server describes num_classes={k!r}; expected a positive int.")
            self._limit = _request_limit(info, self.max_request_samples)
            self._specs = {
                "logits": TensorSpec((None, k), (torch.float32,)),
                "exit_index": TensorSpec((None,), (torch.int64,)),
            }
        return self._specs

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify a (B, C, H, W) batch on the server: normalised float images, or uint8 pixels (0-255) that a
        server whose model records a mean and std normalises itself (a quarter of float32's bytes).

        Returns:
            (logits (B, K) float32, exit_index (B,) int64), in input order.

        Raises:
            CloudError: The server could not be reached or did not answer correctly.
        """
        _check_images(x, "ModelClient.predict")
        specs = self._response_specs()
        logits, index = [], []
        for part in _chunks(x.shape[0], self._limit):
            answer = self.transport.post(encode_tensors({"image": x[part]}))
            out = _decode_answer(answer, specs, part.stop - part.start)
            logits.append(out["logits"])
            index.append(out["exit_index"])
        return torch.cat(logits), torch.cat(index)


# ------------------------------------------------------------------------------- compression
def _param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters(), torch.empty(0))


def measure_compression(
    edge: EdgePart,
    cloud: CloudPart,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, ...]],
    compressions: Sequence[str] = COMPRESSIONS,
    max_batches: int | None = None,
) -> list[dict[str, Any]]:
    """What compressing the intermediate tensor costs, against the uncompressed cloud outputs.

    Every sample's features go through the codec (no exit policy), so this measures the cloud part
    on all samples.

    Args:
        edge: The edge part.
        cloud: The matching cloud part.
        batches: Image batches, or (images, labels, ...) tuples (labels add accuracies).
        compressions: Codecs to compare.
        max_batches: Stop after this many batches.

    Returns:
        One dict per codec: bytes per sample, compression ratio, agreement of the final exit's
        predictions (and of every cloud exit's) with the uncompressed run, max abs logit difference,
        and the final exit's accuracy when labels were given.
    """
    for c in compressions:
        if c not in COMPRESSIONS:
            raise ValueError(f"compression={c!r}; use one of {COMPRESSIONS}.")
    acc: dict[str, dict[str, float]] = {
        c: {"bytes": 0.0, "agree_final": 0.0, "agree_all": 0.0, "max_abs": 0.0, "correct": 0.0} for c in compressions
    }
    raw_bytes = 0
    n = 0
    labelled = True
    with torch.inference_mode():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x, y = (batch, None) if torch.is_tensor(batch) else (batch[0], batch[1] if len(batch) > 1 else None)
            labelled = labelled and y is not None
            e = edge(x.to(_param(edge).device))
            ref = cloud(e.features, e.stats).logits.float()
            raw_bytes += len(encode_tensors({"features": e.features, "stats": e.stats}))
            for c in compressions:
                body = encode_tensors(
                    {"features": e.features, "stats": e.stats}, c, only=("features",), channel_axis=edge.channel_axis
                )
                dec = decode_tensors(body)
                got = cloud(dec["features"].to(e.features), dec["stats"].to(e.stats)).logits.float()
                a = acc[c]
                a["bytes"] += len(body)
                a["agree_final"] += float((got[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).sum())
                a["agree_all"] += float((got.argmax(-1) == ref.argmax(-1)).float().mean(1).sum())
                a["max_abs"] = max(a["max_abs"], float((got - ref).abs().max()))
                if y is not None:
                    a["correct"] += float((got[:, -1].argmax(-1).cpu() == y.cpu()).sum())
            n += x.shape[0]
    if n == 0:
        raise ValueError("no batches to measure.")
    rows = []
    for c in compressions:
        a = acc[c]
        row: dict[str, Any] = {
            "compression": c,
            "bytes_per_sample": a["bytes"] / n,
            "ratio": raw_bytes / a["bytes"],
            "final_agreement": a["agree_final"] / n,
            "exit_agreement": a["agree_all"] / n,
            "max_abs_logit_diff": a["max_abs"],
        }
        if labelled:
            row["final_accuracy"] = a["correct"] / n
        rows.append(row)
    return rows
