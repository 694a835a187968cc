"""Tiered inference: the edge part runs on the device, the cloud part behind an HTTP server.

Reference implementation of a two-tier deployment of a split model (`timm_exits.split`):

* `CloudServer` serves a `CloudPart` with the standard library's `ThreadingHTTPServer` (default
  127.0.0.1, a free port). `POST /v1/cloud` takes a safetensors payload with `features` and
  `stats` and answers a safetensors payload with `logits` (n, m, K) and `gate_logits` (n, m - 1);
  `GET /v1/health` describes the part. A payload that does not parse or has the wrong shapes is
  answered 400 with a JSON `{"error": ...}` message; a failure of the model itself 500.
* `EdgeRunner` runs the `EdgePart` on a batch, applies the exit policy (`exit_mask`, exactly the
  rule of `timm_exits.predict`) at exits 0..k, sends the intermediate tensor of the samples that did
  not exit (optionally compressed), applies the policy to the remaining exits the cloud returns and
  records bytes sent and received, per-sample latency and where each sample left. If the cloud is
  down or answers nonsense, `fallback="local"` returns the edge's own answer (exit k) for those
  samples instead of raising.
* The payload codec (`encode_tensors` / `decode_tensors`) stores tensors with safetensors; floating
  tensors can be sent as fp16 or as 8-bit affine codes with a per-tensor or per-channel scale and
  offset ("fp16", "int8", "int8-channel"). `measure_compression` reports what each costs in
  accuracy against the uncompressed cloud outputs.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from .policies import POLICIES, exit_mask, resolve_thresholds
from .split import CloudOutput, CloudPart, EdgePart

__all__ = [
    "COMPRESSIONS",
    "CLOUD_PATH",
    "HEALTH_PATH",
    "PayloadError",
    "TieredError",
    "CloudUnavailableError",
    "CloudResponseError",
    "encode_tensors",
    "decode_tensors",
    "CloudServer",
    "TieredResult",
    "EdgeRunner",
    "measure_compression",
]

COMPRESSIONS = ("none", "fp16", "int8", "int8-channel")
CLOUD_PATH = "/v1/cloud"
HEALTH_PATH = "/v1/health"
_META_KEY = "timm_exits.codec"
_MAX_HEADER = 1 << 20


class PayloadError(ValueError):
    """A payload is not a valid timm-exits safetensors payload (or lacks what the receiver needs)."""


class TieredError(RuntimeError):
    """The cloud tier could not produce an answer."""


class CloudUnavailableError(TieredError):
    """The cloud server could not be reached (refused, timed out, connection dropped)."""


class CloudResponseError(TieredError):
    """The cloud server answered with an error status or a response of the wrong form."""


# ------------------------------------------------------------------------------------- codec
def _quantise(t: torch.Tensor, axis: int | None) -> dict[str, torch.Tensor]:
    x = t.detach().float()
    if axis is None:
        lo, hi = x.amin(), x.amax()
    else:
        axis = axis % x.ndim
        dims = tuple(d for d in range(x.ndim) if d != axis)
        lo = x.amin(dim=dims, keepdim=True) if dims else x
        hi = x.amax(dim=dims, keepdim=True) if dims else x
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((x - lo) / scale).round_().clamp_(0, 255).to(torch.uint8)
    return {"q": q, "scale": scale.contiguous(), "offset": lo.contiguous()}


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
        mode = compression if (t.is_floating_point() and (only is None or name in only)) else "none"
        if mode == "int8-channel" and t.ndim == 0:
            mode = "int8"
        codec[name] = {"mode": mode, "dtype": str(t.dtype).removeprefix("torch.")}
        if mode == "none":
            out[name] = t.contiguous()
        elif mode == "fp16":
            out[name] = t.half().contiguous()
        else:
            parts = _quantise(t, channel_axis if mode == "int8-channel" else None)
            for key, value in parts.items():
                out[f"{name}/{key}"] = value
    return _st_save(out, metadata={_META_KEY: json.dumps(codec), "format": "pt"})


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise PayloadError(f"payload of {len(data)} bytes is too short to be safetensors.")
    n = int.from_bytes(data[:8], "little")
    if n > min(_MAX_HEADER, len(data) - 8):
        raise PayloadError(f"payload header length {n} does not fit the {len(data)}-byte payload; not safetensors.")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError(f"payload header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise PayloadError("payload header is not a JSON object.")
    return header


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Parse a payload of `encode_tensors` and undo its compression (to each tensor's original dtype).

    Raises:
        PayloadError: The bytes are not a valid payload.
    """
    data = bytes(data)
    header = _header(data)
    meta = header.get("__metadata__") or {}
    try:
        raw = _st_load(data)
    except Exception as e:  # safetensors raises its own error type for malformed data
        raise PayloadError(f"payload is not valid safetensors: {e}") from e
    try:
        codec = json.loads(meta[_META_KEY]) if _META_KEY in meta else {k: {"mode": "none"} for k in raw}
    except json.JSONDecodeError as e:
        raise PayloadError(f"payload codec metadata is not JSON: {e}") from e
    out: dict[str, torch.Tensor] = {}
    for name, info in codec.items():
        mode = info.get("mode", "none")
        dtype = getattr(torch, str(info.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise PayloadError(f"tensor {name!r} has unknown dtype {info.get('dtype')!r}.")
        if mode in ("none", "fp16"):
            if name not in raw:
                raise PayloadError(f"payload lists {name!r} but does not contain it.")
            out[name] = raw[name].to(dtype)
        elif mode in ("int8", "int8-channel"):
            try:
                q, scale, offset = (raw[f"{name}/{k}"] for k in ("q", "scale", "offset"))
                out[name] = (q.float() * scale.float() + offset.float()).to(dtype)
            except (KeyError, RuntimeError) as e:
                raise PayloadError(f"quantised tensor {name!r} is incomplete or inconsistent: {e}") from e
        else:
            raise PayloadError(f"tensor {name!r} uses unknown compression {mode!r}.")
    return out


# ------------------------------------------------------------------------------------ server
def _param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters(), torch.empty(0))


def _check_request(cloud: nn.Module, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [k for k in ("features", "stats") if k not in tensors]
    if missing:
        raise PayloadError(f"payload lacks {missing}; send 'features' and 'stats'.")
    features, stats = tensors["features"], tensors["stats"]
    if stats.ndim != 2 or features.ndim < 2 or features.shape[0] != stats.shape[0]:
        raise PayloadError(
            f"features {tuple(features.shape)} and stats {tuple(stats.shape)} must share the batch dimension, "
            "stats being (n, 3 * exits so far)."
        )
    if features.shape[0] == 0:
        raise PayloadError("payload holds 0 samples.")
    want = tuple(getattr(cloud, "feature_shape", ()) or ())
    if want:
        axis = getattr(cloud, "channel_axis", 1)
        c = axis - 1 if axis > 0 else axis  # the channel axis within the per-sample shape
        got = tuple(features.shape[1:])
        if len(got) != len(want) or got[c] != want[c]:
            raise PayloadError(
                f"features of shape {tuple(features.shape)} do not fit this cloud part, which takes (n, *{want}) "
                f"(the output of {getattr(cloud, 'exit_name', 'the split exit')!r})."
            )
    stats_dim = getattr(cloud, "stats_dim", None)
    if stats_dim is not None and stats.shape[1] != stats_dim:
        raise PayloadError(f"stats has {stats.shape[1]} columns; this cloud part expects {stats_dim}.")
    return features, stats


def _serve(cloud: nn.Module, body: bytes, lock: threading.Lock) -> bytes:
    """Decode a request, run the cloud part, encode the answer (PayloadError for bad requests)."""
    features, stats = _check_request(cloud, decode_tensors(body))
    p = _param(cloud)
    features = features.to(device=p.device, dtype=p.dtype if p.is_floating_point() else features.dtype)
    with lock, torch.inference_mode():
        out = cloud(features, stats.to(p.device).float())
    logits, gate_logits = out[0], out[1]
    return encode_tensors({"logits": logits.float(), "gate_logits": gate_logits.float()})


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines on stderr."""

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, json.dumps({"error": message}).encode(), "application/json")

    def do_GET(self) -> None:
        if self.path != HEALTH_PATH:
            self._error(404, f"unknown path {self.path!r}; POST {CLOUD_PATH} or GET {HEALTH_PATH}.")
            return
        self._reply(200, json.dumps(self.server.app.describe()).encode(), "application/json")

    def do_POST(self) -> None:
        app = self.server.app
        if self.path != CLOUD_PATH:
            self._error(404, f"unknown path {self.path!r}; POST {CLOUD_PATH}.")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(411, "a Content-Length header is required.")
            return
        n = int(length)
        if n > app.max_body_bytes:
            self.close_connection = True
            self._error(413, f"payload of {n} bytes exceeds the server's limit of {app.max_body_bytes}.")
            return
        body = self.rfile.read(n)
        try:
            answer = _serve(app.cloud, body, app.lock)
        except PayloadError as e:
            app.count("bad_requests")
            self._error(400, str(e))
            return
        except Exception as e:  # the model itself failed: report it instead of dropping the connection
            app.count("errors")
            self._error(500, f"{type(e).__name__}: {e}")
            return
        app.count("requests")
        app.count("bytes_received", len(body))
        self._reply(200, answer, "application/octet-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: CloudServer


class CloudServer:
    """HTTP server running a cloud part; a context manager that starts and stops it.

    Args:
        cloud: A `CloudPart` (or any module mapping (features, stats) to (logits, gate_logits)).
        host: Interface to bind; 127.0.0.1 by default (local only).
        port: Port; 0 picks a free one.
        max_body_bytes: Largest accepted request body.
    """

    def __init__(
        self, cloud: nn.Module, host: str = "127.0.0.1", port: int = 0, max_body_bytes: int = 256 << 20
    ) -> None:
        self.cloud = cloud
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.lock = threading.Lock()
        self.stats: dict[str, int] = {"requests": 0, "bad_requests": 0, "errors": 0, "bytes_received": 0}
        self._stats_lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def describe(self) -> dict[str, Any]:
        """What `GET /v1/health` returns: the part's split point and tensor shapes."""
        c = self.cloud
        return {
            "status": "ok",
            "exit_name": getattr(c, "exit_name", None),
            "split_index": getattr(c, "split_index", None),
            "feature_shape": list(getattr(c, "feature_shape", ()) or ()),
            "stats_dim": getattr(c, "stats_dim", None),
            "num_outputs": getattr(c, "num_outputs", None),
            "num_classes": getattr(c, "num_classes", None),
        }

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:54321."""
        if self._httpd is None:
            raise RuntimeError("the server is not running; call start() or use it as a context manager.")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> CloudServer:
        """Bind and serve in a background thread."""
        if self._httpd is not None:
            return self
        httpd = _Server((self.host, self.port), _Handler)
        httpd.app = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> CloudServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------------------------------ client
class _HttpClient:
    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"cloud URL {url!r} must look like http://host:port.")
        self.url = url
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
            conn.request(method, self.prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise CloudUnavailableError(f"cloud server {self.url} unreachable: {type(e).__name__}: {e}") from e
        finally:
            conn.close()
        if resp.status != 200:
            try:
                message = json.loads(data).get("error", "")
            except (ValueError, AttributeError):
                message = data[:200].decode("utf-8", "replace")
            raise CloudResponseError(f"cloud server {self.url} answered {resp.status} {resp.reason}: {message}")
        return data

    def post(self, body: bytes) -> bytes:
        return self._request("POST", CLOUD_PATH, body)

    def health(self) -> dict[str, Any]:
        return json.loads(self._request("GET", HEALTH_PATH))


class _LocalClient:
    """Runs the cloud part in-process through the same codec (no network)."""

    def __init__(self, cloud: nn.Module) -> None:
        self.cloud = cloud
        self.lock = threading.Lock()

    def post(self, body: bytes) -> bytes:
        try:
            return _serve(self.cloud, body, self.lock)
        except PayloadError as e:
            raise CloudResponseError(f"the cloud part rejected the payload: {e}") from e

    def health(self) -> dict[str, Any]:
        return CloudServer(self.cloud).describe()


@dataclass
class TieredResult:
    """Result of one `EdgeRunner.run`.

    Attributes:
        logits: (B, K) float32 logits of the exit each sample left at.
        exit_index: (B,) exit taken (0-based; `num_exits - 1` is the final head).
        on_edge: (B,) True where the answer came from the edge (early exit or fallback).
        fallback: (B,) True where the cloud was needed but failed and the edge's exit-k answer was used.
        latency_s: (B,) seconds from the start of the call until each sample's answer was known.
        bytes_sent: Request bytes sent to the cloud (payload only, HTTP headers excluded).
        bytes_received: Response bytes received.
        requests: Requests sent (0 when every sample left on the edge).
        timings: Seconds spent in "edge", "encode", "cloud" (round trip incl. server) and "decode".
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
        n = self.exit_index.shape[0]
        return {
            "samples": n,
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


def _thresholds(edge: EdgePart, policy: str, threshold: Any) -> list[float]:
    # resolve_thresholds reads only the number of early exits and the stored calibration.
    shim = SimpleNamespace(branches=[None] * edge.num_early_exits, config=edge.config)
    return resolve_thresholds(shim, policy, threshold)  # type: ignore[arg-type]


class EdgeRunner:
    """Runs the edge part locally and the rest on a cloud server, applying an exit policy.

    Args:
        edge: The `EdgePart` (put the model in eval mode first).
        cloud: The server's base URL (http://host:port) or, for an in-process run through the same
            codec, a `CloudPart`.
        policy: "gate", "confidence" or "entropy".
        threshold: One value or one per early exit; default: the model's stored calibration, else
            `DEFAULT_THRESHOLDS[policy]` (as `timm_exits.predict`).
        compression: How `features` travel: "none", "fp16", "int8" or "int8-channel".
        fallback: "raise" (default) or "local": when the cloud fails, answer the samples it should
            have handled with the edge's last exit (exit k) and record the error.
        timeout: Seconds to wait for the server.
    """

    def __init__(
        self,
        edge: EdgePart,
        cloud: str | CloudPart | nn.Module,
        policy: str = "gate",
        threshold: float | Sequence[float] | None = None,
        compression: str = "none",
        fallback: str = "raise",
        timeout: float = 30.0,
    ) -> None:
        if not isinstance(edge, EdgePart):
            raise TypeError(f"edge must be an EdgePart from timm_exits.split, got {type(edge).__name__}.")
        if policy not in POLICIES[1:]:
            raise ValueError(f"policy {policy!r} has no exit rule; use one of {POLICIES[1:]}.")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r}; use one of {COMPRESSIONS}.")
        if fallback not in ("raise", "local"):
            raise ValueError(f"fallback={fallback!r}; use 'raise' or 'local'.")
        self.edge = edge
        self.policy = policy
        self.thresholds = _thresholds(edge, policy, threshold)
        self.compression = compression
        self.fallback = fallback
        self.client = _HttpClient(cloud, timeout) if isinstance(cloud, str) else _LocalClient(cloud)

    def check_server(self) -> dict[str, Any]:
        """Ask the server what it serves and raise `CloudResponseError` unless it matches this edge part."""
        info = self.client.health()
        e = self.edge
        want = {"exit_name": e.exit_name, "split_index": e.split_index, "num_classes": e.num_classes}
        wrong = {k: (info.get(k), v) for k, v in want.items() if info.get(k) is not None and info.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: server {a!r} vs edge {b!r}" for k, (a, b) in wrong.items())
            raise CloudResponseError(f"the server runs a different split ({detail}).")
        return info

    def _decide(self, logits: torch.Tensor, gates: torch.Tensor, first: int, alive: torch.Tensor, out: dict) -> None:
        for j in range(gates.shape[1]):
            leave = exit_mask(self.policy, logits[:, j], gates[:, j], self.thresholds[first + j]) & alive
            out["logits"][leave] = logits[leave, j].float()
            out["exit"][leave] = first + j
            alive &= ~leave

    def _check_response(self, tensors: Mapping[str, torch.Tensor], n: int) -> CloudOutput:
        e = self.edge
        m = e.num_early_exits - e.split_index
        logits, gates = tensors.get("logits"), tensors.get("gate_logits")
        if logits is None or gates is None:
            raise CloudResponseError(f"the cloud's answer lacks {'logits' if logits is None else 'gate_logits'}.")
        if tuple(logits.shape) != (n, m, e.num_classes) or tuple(gates.shape) != (n, m - 1):
            raise CloudResponseError(
                f"the cloud answered logits {tuple(logits.shape)} and gate_logits {tuple(gates.shape)}; expected "
                f"({n}, {m}, {e.num_classes}) and ({n}, {m - 1}) for {n} samples, the {m} exits after "
                f"{e.exit_name!r} and {e.num_classes} classes. Is the server running this model's cloud part?"
            )
        return CloudOutput(logits, gates)

    def run(self, x: torch.Tensor) -> TieredResult:
        """Classify a batch: edge part here, the samples that do not exit early on the cloud.

        Returns:
            A `TieredResult` (logits and exit index in input order, bytes, latencies).

        Raises:
            TieredError: The cloud failed and `fallback="raise"`.
        """
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
        result = TieredResult(
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
        t0 = time.perf_counter()
        body = encode_tensors(
            {"features": edge_out.features[rows], "stats": edge_out.stats[rows]},
            self.compression,
            only=("features",),
            channel_axis=e.channel_axis,
        )
        t1 = time.perf_counter()
        result.timings["encode"] = t1 - t0
        result.bytes_sent = len(body)
        result.requests = 1
        try:
            answer = self.client.post(body)
            t2 = time.perf_counter()
            result.bytes_received = len(answer)
            try:
                cloud_out = self._check_response(decode_tensors(answer), int(rows.numel()))
            except PayloadError as err:
                raise CloudResponseError(f"the cloud's answer does not parse: {err}") from err
            result.timings["cloud"] = t2 - t1
            result.timings["decode"] = time.perf_counter() - t2
        except TieredError as err:
            if self.fallback != "local":
                raise
            out["logits"][rows] = edge_out.logits[rows, -1].float()
            out["exit"][rows] = e.split_index
            result.fallback[rows.cpu()] = True
            result.on_edge[rows.cpu()] = True
            result.error = str(err)
            result.timings["cloud"] = time.perf_counter() - t1
            latency[rows.cpu()] = time.perf_counter() - start
            return result
        sub = {
            "logits": torch.zeros(rows.numel(), e.num_classes, dtype=torch.float32, device=device),
            "exit": torch.full((rows.numel(),), e.num_early_exits, dtype=torch.long, device=device),
        }
        sub_alive = torch.ones(rows.numel(), dtype=torch.bool, device=device)
        cloud_logits = cloud_out.logits.to(device)
        self._decide(cloud_logits[:, :-1], cloud_out.gate_logits.to(device), e.split_index + 1, sub_alive, sub)
        sub["logits"][sub_alive] = cloud_logits[sub_alive, -1].float()
        out["logits"][rows] = sub["logits"]
        out["exit"][rows] = sub["exit"]
        latency[rows.cpu()] = time.perf_counter() - start
        return result


# ------------------------------------------------------------------------------- compression
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
