"""Serve multi-exit models on Ray Serve: a split's cloud part, or the whole model with hard early exit.

from ray import serve
from timm_exits.deploy.serve import EdgeClient, cloud_app, start_http

edge, cloud = timm_exits.split(model, at=1)
start_http(port=8000)                                    # after ray.init(); Serve's HTTP proxy
serve.run(cloud_app(cloud, max_batch_size=32), name="cloud", route_prefix="/cloud")
result = EdgeClient(edge, "http://127.0.0.1:8000/cloud", "gate", 0.5).run(images)

`codec` (payloads bounded before decoding), `parts` (what a served model takes) and `client` import
without Ray; `cloud_app`, `model_app` and `start_http` import it when called (`pip install
'timm-exits[serve]'`).
"""

from .client import (
    CloudError,
    CloudResponseError,
    CloudUnavailableError,
    EdgeClient,
    EdgeResult,
    ModelClient,
    measure_compression,
)
from .codec import COMPRESSIONS, PayloadError, TensorSpec, decode_tensors, encode_tensors
from .deployments import ServedReplica, cloud_app, model_app, start_http
from .parts import Served, decode_request, run_batch, served_cloud, served_model

__all__ = [
    "COMPRESSIONS",
    "PayloadError",
    "TensorSpec",
    "encode_tensors",
    "decode_tensors",
    "Served",
    "served_cloud",
    "served_model",
    "decode_request",
    "run_batch",
    "CloudError",
    "CloudUnavailableError",
    "CloudResponseError",
    "EdgeResult",
    "EdgeClient",
    "ModelClient",
    "measure_compression",
    "ServedReplica",
    "cloud_app",
    "model_app",
    "start_http",
]
