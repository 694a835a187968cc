"""A local Ray instance with Serve's HTTP proxy on loopback, for the benchmark scripts."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["local_serve"]

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_serve(num_cpus: int = 2, request_timeout_s: float = 60.0) -> Iterator[str]:
    """Start Ray (this machine only, 127.0.0.1) and Serve's HTTP proxy on a free port; yield its base URL.

    Replicas import this checkout's `timm_exits`; Serve and Ray are shut down on exit.
    """
    import ray
    from ray import serve

    from timm_exits.deploy.serve import start_http

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    try:
        port = _free_port()
        start_http("127.0.0.1", port, request_timeout_s=request_timeout_s)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
