"""Serving on a real local Ray instance: answers equal `predict`, concurrency, bad payloads, a killed replica.

One Ray instance for the module (2 CPUs, Ray's own ports and Serve's HTTP proxy on 127.0.0.1), shut
down at the end. Every request loop is bounded in count and time, and every connection has a timeout.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import ray
import timm
import torch
from conftest import spread_thresholds
from ray import serve

import timm_exits
from timm_exits import predict, split, wrap
from timm_exits.deploy.serve import (
    CloudError,
    CloudResponseError,
    EdgeClient,
    ModelClient,
    cloud_app,
    encode_tensors,
    model_app,
    start_http,
)
from timm_exits.deploy.serve.codec import _META_KEY

SIZE = 64
MAX_BATCH = 8
APP_OPTIONS = {"ray_actor_options": {"num_cpus": 0.25}, "torch_threads": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PROXY_READY = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"


@pytest.fixture(scope="module")
def port():
    root = str(Path(timm_exits.__file__).resolve().parents[1])  # replicas import this checkout's package
    # Serve kills an HTTP proxy not ready within 5 s, which a busy 2-core machine can miss; the raylet and
    # the Serve controller inherit this process's environment
    os.environ.setdefault(_PROXY_READY, "60")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1", _PROXY_READY: os.environ[_PROXY_READY]}},
    )
    try:
        p = _free_port()
        start_http("127.0.0.1", p, request_timeout_s=60)
        yield p
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return wrap(timm.create_model("test_resnet", num_classes=10), input_size=(3, SIZE, SIZE)).eval()


@pytest.fixture(scope="module")
def parts(model):
    return split(model, at="layer1")


@pytest.fixture(scope="module")
def batch():
    return torch.randn(24, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def thresholds(model, batch):
    return spread_thresholds(model, batch, "gate")


@pytest.fixture(scope="module")
def apps(port, model, parts, thresholds):
    """The cloud part at /cloud and the whole model with hard early exit at /exits, batching up to 8 samples."""
    opts = {**APP_OPTIONS, "max_batch_size": MAX_BATCH, "batch_wait_timeout_s": 0.2, "body_timeout_s": 2.0}
    serve.run(cloud_app(parts.cloud, **opts), name="cloud", route_prefix="/cloud")
    serve.run(model_app(model, "gate", thresholds, **opts), name="exits", route_prefix="/exits")
    base = f"http://127.0.0.1:{port}"
    return {"cloud": f"{base}/cloud", "exits": f"{base}/exits"}


def _get(url: str) -> dict:
    host, rest = url.removeprefix("http://").split("/", 1)
    name, p = host.split(":")
    conn = http.client.HTTPConnection(name, int(p), timeout=30)
    try:
        conn.request("GET", "/" + rest)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _post(port: int, path: str, body: bytes = b"", headers: dict | None = None, send: bytes | None = None):
    """POST with explicit headers; `send` (if given) is written instead of `body` (a short or chunked body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", path)
        hdrs = {"Content-Length": str(len(body))} if headers is None else headers
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(body if send is None else send)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("policy", ["gate", "confidence", "entropy"])
def test_split_over_ray_serve_matches_predict(apps, model, parts, batch, policy):
    th = spread_thresholds(model, batch, policy)
    ref = predict(model, batch, policy, th)
    client = EdgeClient(parts.edge, apps["cloud"], policy, th, timeout=30, max_request_samples=MAX_BATCH)
    assert client.check_server()["exit_name"] == "layer1"
    result = client.run(batch)
    assert torch.equal(result.exit_index, ref.exit_index)
    torch.testing.assert_close(result.logits, ref.logits, rtol=1e-4, atol=1e-5)
    counts = torch.bincount(result.exit_index, minlength=model.num_exits)
    assert counts[:2].sum() > 0 and counts[2:].sum() > 0  # some answered on the edge, some by the cloud
    n_sent = int((~result.on_edge).sum())
    assert result.requests == -(-n_sent // MAX_BATCH) and not result.fallback.any()


def test_split_through_a_deployment_handle(apps, model, parts, batch, thresholds):
    ref = predict(model, batch, "gate", thresholds)
    client = EdgeClient(
        parts.edge, serve.get_app_handle("cloud"), "gate", thresholds, timeout=30, max_request_samples=8
    )
    result = client.run(batch)
    assert torch.equal(result.exit_index, ref.exit_index)
    torch.testing.assert_close(result.logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_whole_model_hard_exit_matches_predict(apps, model, batch, thresholds):
    ref = predict(model, batch, "gate", thresholds)
    client = ModelClient(apps["exits"], timeout=30, max_request_samples=MAX_BATCH)
    assert client.describe()["policy"] == "gate"
    logits, exit_index = client.predict(batch)
    assert torch.equal(exit_index, ref.exit_index)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert len(set(exit_index.tolist())) > 1  # a real exit mix, not one exit for all


# --------------------------------------------------------------------------------- concurrency
def test_concurrent_clients_are_batched_and_answered_in_order(apps, model, parts, batch, thresholds):
    clients = 8
    before = _get(apps["exits"])
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients, timeout=30)

    def work(i: int) -> None:
        x = batch[3 * i : 3 * i + 3]
        try:
            barrier.wait()
            whole = ModelClient(apps["exits"], timeout=30).predict(x[:1])
            tiered = EdgeClient(parts.edge, apps["cloud"], "gate", thresholds, timeout=30).run(x)
            results[i] = (whole, tiered)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    for i, ((logits, exit_index), tiered) in results.items():
        x = batch[3 * i : 3 * i + 3]
        ref = predict(model, x, "gate", thresholds)
        assert torch.equal(exit_index, ref.exit_index[:1])
        torch.testing.assert_close(logits, ref.logits[:1], rtol=1e-4, atol=1e-5)
        assert torch.equal(tiered.exit_index, ref.exit_index)
        torch.testing.assert_close(tiered.logits, ref.logits, rtol=1e-4, atol=1e-5)
    after = _get(apps["exits"])
    assert after["batched_samples"] - before["batched_samples"] == clients
    assert after["batches"] - before["batches"] < clients  # requests of one sample were run together


# -------------------------------------------------------------------------------- bad payloads
def _bomb(c: int, h: int, w: int, n: int = 8000) -> bytes:
    """~130 KB of codes (n, 1, h, 1), a (1, c, 1, w) scale: 'q * scale + offset' would broadcast to n*c*h*w floats."""
    from safetensors.torch import save

    codec = {"features": {"mode": "int8", "dtype": "float32"}, "stats": {"mode": "none", "dtype": "float32"}}
    return save(
        {
            "features/q": torch.zeros(n, 1, h, 1, dtype=torch.uint8),
            "features/scale": torch.ones(1, c, 1, w),
            "features/offset": torch.zeros(1),
            "stats": torch.zeros(1, 6),
        },
        metadata={_META_KEY: json.dumps(codec)},
    )


def test_bad_payloads_get_4xx_with_a_short_message(apps, port, parts):
    feat, sd = tuple(parts.cloud.feature_shape), parts.cloud.stats_dim
    assert feat == (32, 16, 16) and sd == 6
    good = {"features": torch.randn(2, *feat), "stats": torch.rand(2, sd)}
    cases = [
        (b"garbage", 400, "too short"),
        (b"x" * 64, 400, "does not fit"),
        (encode_tensors({**good, "features": torch.randn(2, 16, 8, 8)}), 400, "expected (n, 32, 16, 16)"),
        (encode_tensors({**good, "features": good["features"].double()}), 400, "dtype float64"),
        (encode_tensors({**good, "stats": torch.rand(2, 9)}), 400, "expected (n, 6)"),
        (encode_tensors({"features": good["features"]}), 400, "missing ['stats']"),
        (
            encode_tensors({"features": torch.randn(9, *feat), "stats": torch.rand(9, sd)}),
            413,
            "holds 9 samples; the limit is max_request_samples=8",
        ),
        (_bomb(*feat), 400, "one per channel"),
    ]
    rss_before = _get(apps["cloud"])["peak_rss_bytes"]
    for body, status, message in cases:
        got, data = _post(port, "/cloud", body)
        reply = json.loads(data)
        assert (got, message in reply["error"]) == (status, True), (got, reply)
        assert "Traceback" not in reply["error"] and len(reply["error"]) < 300
    assert _get(apps["cloud"])["peak_rss_bytes"] - rss_before < 64 << 20  # the bomb was refused before decoding

    status, data = _post(port, "/cloud", headers={"Content-Length": str(1 << 40)})  # refused before its body
    assert status == 413 and "exceeds the limit" in json.loads(data)["error"]
    start = time.monotonic()
    status, data = _post(port, "/cloud", headers={"Content-Length": "1000"}, send=b"x" * 10)  # stalls
    assert status == 408 and "did not arrive" in json.loads(data)["error"] and time.monotonic() - start < 30
    chunked = {"Transfer-Encoding": "chunked"}
    status, data = _post(port, "/cloud", headers=chunked, send=b"5\r\nhello\r\n0\r\n\r\n")
    assert status == 411 and "Content-Length" in json.loads(data)["error"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("PUT", "/cloud", body=b"")
        assert conn.getresponse().status == 405
    finally:
        conn.close()
    with pytest.raises(CloudResponseError, match="400"):
        EdgeClient(parts.edge, apps["cloud"], "gate", 1.0).transport.post(b"garbage")


# ------------------------------------------------------------------------------- replica killed
@pytest.mark.slow
def test_replica_killed_under_load(port, model, parts, batch, thresholds):
    opts = {**APP_OPTIONS, "max_batch_size": MAX_BATCH, "batch_wait_timeout_s": 0.01}
    serve.run(cloud_app(parts.cloud, name="cloud2", num_replicas=2, **opts), name="kill", route_prefix="/kill")
    handle = serve.get_app_handle("kill")
    pids: set[int] = set()
    for _ in range(40):  # bounded: the router spreads calls over both replicas
        pids.add(handle.describe.remote().result(timeout_s=30)["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2
    url = f"http://127.0.0.1:{port}/kill"
    x = batch[:8]
    ref = predict(model, x, "gate", thresholds)
    outcomes: list[tuple[float, str]] = []
    wrong: list[int] = []
    stop = time.monotonic() + 90

    def work() -> None:
        client = EdgeClient(parts.edge, url, "gate", thresholds, timeout=30)
        for _ in range(60):
            if time.monotonic() > stop:
                return
            try:
                r = client.run(x)
            except CloudError as e:
                outcomes.append((time.monotonic(), f"error: {e}"))
                continue
            ok = torch.equal(r.exit_index, ref.exit_index) and torch.allclose(r.logits, ref.logits, 1e-4, 1e-5)
            if not ok:
                wrong.append(1)
            outcomes.append((time.monotonic(), "ok"))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    while sum(o == "ok" for _, o in outcomes) < 8 and time.monotonic() < stop:
        time.sleep(0.05)
    victim = min(pids)
    killed_at = time.monotonic()  # taken before the kill: an error that races the kill still counts as after it
    os.kill(victim, signal.SIGKILL)  # a replica process this test's Ray instance started
    for t in threads:
        t.join(timeout=150)
    assert not any(t.is_alive() for t in threads)  # no request hung
    assert not wrong  # no request got a wrong answer
    assert any(o == "ok" and at > killed_at for at, o in outcomes)  # the other replica kept serving
    assert all(o == "ok" for at, o in outcomes if at < killed_at)  # errors only once a replica was killed
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Serve replaces the dead replica
        seen = {handle.describe.remote().result(timeout_s=30)["pid"] for _ in range(8)}
        if len(seen - {victim}) == 2 or (len(seen | pids) > 2 and victim not in seen):
            break
        time.sleep(1)
    fresh = seen - pids
    assert victim not in seen and fresh, (seen, pids)
    r = EdgeClient(parts.edge, url, "gate", thresholds, timeout=30).run(x)
    assert torch.equal(r.exit_index, ref.exit_index)
    serve.delete("kill")
