"""Ray Serve deployments of a split's cloud part or of a whole multi-exit model.

`cloud_app(cloud)` and `model_app(model)` return Ray Serve applications for `serve.run`. Each
replica batches the requests it receives with `@serve.batch`, counting samples (not requests)
against `max_batch_size`, and runs the batch in one forward: for a whole `EarlyExitModel` that is
`timm_exits.predict`, so hard early exit applies over the batched requests.

HTTP protocol (at the application's route prefix):

* `POST`: a safetensors payload (`timm_exits.deploy.serve.codec`); answered 200 with a safetensors payload.
  A request without Content-Length gets 411, one over the body limit 413 (before its body is read),
  one whose body does not arrive within `body_timeout_s` 408, one that does not fit the served model
  (names, dtypes, every dimension, element count checked from the header before decoding) 400 or
  413, all with a JSON `{"error": ...}` message; a failure of the model itself 500, without a trace.
* `GET`: a JSON description (specs, limits, split point, policy; the answering replica's batch counts,
  pid and peak memory).

Handles (`serve.get_app_handle(name)`) call `infer(body) -> bytes` and `describe()` directly.
Ray is imported when an application is built or a replica starts, so `timm_exits` imports without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..split import CloudPart
from .codec import PayloadError, encode_tensors
from .parts import Served, decode_request, run_batch, served_cloud, served_model

__all__ = ["ServedReplica", "cloud_app", "model_app", "start_http"]

_log = logging.getLogger("ray.serve")


def _ray_serve() -> Any:
    try:
        from ray import serve
    except ImportError as e:
        raise ImportError("serving needs Ray Serve: pip install 'timm-exits[serve]' (or 'ray[serve]').") from e
    return serve


def _count_samples(items: Sequence[Mapping[str, torch.Tensor]]) -> int:
    return sum(int(next(iter(t.values())).shape[0]) for t in items)


def _json_response(status: int, obj: Any) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(obj).encode(), status_code=status, media_type="application/json")


async def _read_body(request: Any, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(f"request body exceeds its Content-Length or the limit of {limit} bytes.", 413)
        chunks.append(chunk)
    return b"".join(chunks)


class ServedReplica:
    """A Ray Serve replica of a `Served` model (built by `cloud_app` / `model_app`).

    Args:
        served: The served model (`served_cloud` or `served_model`).
        max_batch_size: Most samples run in one batch.
        batch_wait_timeout_s: Longest wait for a batch to fill after its first request.
        body_timeout_s: Longest wait for a request's body.
        torch_threads: `torch.set_num_threads` in the replica (None: leave Ray's setting).
    """

    def __init__(
        self,
        served: Served,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        body_timeout_s: float,
        torch_threads: int | None = None,
    ) -> None:
        serve = _ray_serve()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        served.module.eval()  # this replica's own copy
        self.served = served
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.body_timeout_s = body_timeout_s
        self.counts = {"batches": 0, "batched_samples": 0, "largest_batch": 0}
        self._batched = serve.batch(
            max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s, batch_size_fn=_count_samples
        )(self._run)

    async def _run(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        n = _count_samples(items)
        self.counts["batches"] += 1
        self.counts["batched_samples"] += n
        self.counts["largest_batch"] = max(self.counts["largest_batch"], n)
        # off the event loop, so requests keep arriving (and queue for the next batch) while this one runs
        return await asyncio.to_thread(run_batch, self.served, items)

    async def infer(self, body: bytes) -> bytes:
        """Decode a request (bounded and checked before decoding), run it batched, encode the answer.

        Raises:
            PayloadError: The request is malformed or does not fit the served model.
        """
        answer = await self._batched(decode_request(self.served, body))
        return encode_tensors(answer)

    def describe(self) -> dict[str, Any]:
        """The served model's description, batching settings and counts, this replica's pid and peak memory."""
        return {
            "status": "ok",
            **self.served.describe(),
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            **self.counts,
            "pid": os.getpid(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    async def __call__(self, request: Any) -> Any:
        """HTTP entry point: POST runs a payload, GET describes (see the module docstring)."""
        from starlette.responses import Response

        if request.method == "GET":
            return _json_response(200, self.describe())
        if request.method != "POST":
            return _json_response(405, {"error": f"method {request.method} not allowed; use POST or GET."})
        length = request.headers.get("content-length", "")
        if not length.isdigit():
            return _json_response(411, {"error": "a Content-Length header is required."})
        if int(length) > self.served.max_body_bytes:
            return _json_response(413, {"error": str(self.served.too_large(int(length)))})
        try:
            body = await asyncio.wait_for(_read_body(request, int(length)), self.body_timeout_s)
            answer = await self.infer(body)
        except PayloadError as e:
            return _json_response(e.status, {"error": str(e)})
        except asyncio.TimeoutError:
            return _json_response(408, {"error": f"the request body did not arrive within {self.body_timeout_s} s."})
        except Exception as e:  # the model failed: log the trace here, answer without it
            _log.exception("timm_exits replica failed on a request")
            return _json_response(500, {"error": f"the model failed ({type(e).__name__})."})
        return Response(answer, media_type="application/octet-stream")


def _app(
    served: Served,
    name: str,
    max_batch_size: int,
    batch_wait_timeout_s: float,
    num_replicas: int,
    ray_actor_options: Mapping[str, Any] | None,
    max_ongoing_requests: int | None,
    body_timeout_s: float,
    torch_threads: int | None,
) -> Any:
    serve = _ray_serve()
    if max_batch_size < 1 or batch_wait_timeout_s < 0 or body_timeout_s <= 0:
        raise ValueError("max_batch_size must be >= 1, batch_wait_timeout_s >= 0 and body_timeout_s > 0.")
    if served.max_request_samples > max_batch_size:
        raise ValueError(
            f"max_request_samples={served.max_request_samples} exceeds max_batch_size={max_batch_size}: a request "
            "must fit in one batch."
        )
    deployment = serve.deployment(ServedReplica).options(
        name=name,
        num_replicas=num_replicas,
        ray_actor_options=dict(ray_actor_options or {"num_cpus": 1}),
        max_ongoing_requests=max_ongoing_requests or 2 * max_batch_size,
    )
    return deployment.bind(served, max_batch_size, batch_wait_timeout_s, body_timeout_s, torch_threads)


def cloud_app(
    cloud: CloudPart,
    *,
    name: str = "cloud",
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.005,
    max_request_samples: int | None = None,
    num_replicas: int = 1,
    ray_actor_options: Mapping[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
    body_timeout_s: float = 10.0,
    torch_threads: int | None = None,
) -> Any:
    """A Ray Serve application running a split's cloud part on the samples the edge did not answer.

    Args:
        cloud: The `CloudPart` of `timm_exits.deploy.split` (pickled to the replicas).
        name: Deployment name.
        max_batch_size: Most samples per batch (requests are batched until this many samples).
        batch_wait_timeout_s: Longest wait for a batch to fill.
        max_request_samples: Most samples per request (default and maximum: `max_batch_size`).
        num_replicas: Replicas (an int, or "auto" for Ray's autoscaling).
        ray_actor_options: Resources per replica (default {"num_cpus": 1}; e.g. {"num_gpus": 1}).
        max_ongoing_requests: Requests a replica takes at once (default: 2 * max_batch_size).
        body_timeout_s: Longest wait for a request's body.
        torch_threads: Threads per replica for torch (None: Ray's default, the replica's CPUs).

    Returns:
        An application for `serve.run(app, name=..., route_prefix=...)`.
    """
    served = served_cloud(cloud, max_request_samples or max_batch_size)
    return _app(
        served,
        name,
        max_batch_size,
        batch_wait_timeout_s,
        num_replicas,
        ray_actor_options,
        max_ongoing_requests,
        body_timeout_s,
        torch_threads,
    )


def model_app(
    model: nn.Module,
    policy: str | None = None,
    threshold: float | Sequence[float] | None = None,
    *,
    input_size: Sequence[int] | None = None,
    num_classes: int | None = None,
    name: str = "model",
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.005,
    max_request_samples: int | None = None,
    num_replicas: int = 1,
    ray_actor_options: Mapping[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
    body_timeout_s: float = 10.0,
    torch_threads: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Any:
    """A Ray Serve application running a whole model: hard early exit over each batch of requests.

    Args:
        model: An `EarlyExitModel` (served with `predict`) or a plain classifier (its forward).
        policy: Exit policy of an `EarlyExitModel`; default: its stored policy.
        threshold: One value or one per early exit; default as `timm_exits.predict`.
        input_size: (C, H, W) of the requests' images; default: the model's configured size.
        num_classes: Classes of a plain model without a `num_classes` attribute.
        name, max_batch_size, batch_wait_timeout_s, max_request_samples, num_replicas, ray_actor_options,
        max_ongoing_requests, body_timeout_s, torch_threads: As `cloud_app`.
        mean, std: What uint8 pixel requests are normalised with; default: the backbone's pretrained_cfg
            (`timm_exits.deploy.serve.served_model`).

    Returns:
        An application for `serve.run(app, name=..., route_prefix=...)`.
    """
    served = served_model(
        model,
        policy,
        threshold,
        input_size=input_size,
        num_classes=num_classes,
        max_request_samples=max_request_samples or max_batch_size,
        mean=mean,
        std=std,
    )
    return _app(
        served,
        name,
        max_batch_size,
        batch_wait_timeout_s,
        num_replicas,
        ray_actor_options,
        max_ongoing_requests,
        body_timeout_s,
        torch_threads,
    )


def start_http(
    host: str = "127.0.0.1", port: int = 8000, request_timeout_s: float = 30.0, keep_alive_timeout_s: int = 5
) -> None:
    """Start Serve's HTTP proxy on `host:port` with an end-to-end request timeout (Ray must be initialised).

    Args:
        host: Interface to bind; 127.0.0.1 keeps it local, 0.0.0.0 serves other machines.
        port: Port.
        request_timeout_s: Longest time a request may take end to end before the proxy answers an error.
        keep_alive_timeout_s: How long an idle keep-alive connection stays open.
    """
    serve = _ray_serve()
    serve.start(
        http_options={
            "host": host,
            "port": port,
            "request_timeout_s": request_timeout_s,
            "keep_alive_timeout_s": keep_alive_timeout_s,
        }
    )
