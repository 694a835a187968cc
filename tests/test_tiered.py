"""Tiered inference: payload codec, HTTP cloud server, edge runner, compression cost and split planning."""

from __future__ import annotations

import http.client
import json
import math

import pytest
import timm
import torch
from safetensors.torch import save as st_save
from torch import nn

from timm_exits import predict, wrap
from timm_exits.planning import LinkModel, plan_split
from timm_exits.split import CloudOutput, split
from timm_exits.tiered import (
    CLOUD_PATH,
    COMPRESSIONS,
    CloudResponseError,
    CloudServer,
    CloudUnavailableError,
    EdgeRunner,
    PayloadError,
    decode_tensors,
    encode_tensors,
    measure_compression,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return wrap(timm.create_model("resnet18", pretrained=False, num_classes=10), input_size=(3, 64, 64)).eval()


@pytest.fixture(scope="module")
def parts(model):
    return split(model, at="layer2")


@pytest.fixture(scope="module")
def batch():
    return torch.randn(24, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _spread_thresholds(model, x: torch.Tensor, policy: str) -> list[float]:
    """Per-exit thresholds that send some samples out at every exit, away from any sample's score."""
    with torch.no_grad():
        out = model(x)
    thresholds = []
    for j in range(len(model.branches)):
        if policy == "gate":
            scores = torch.sigmoid(out.gate_logits[:, j])
        else:
            from timm_exits.gates import logit_stats

            scores = logit_stats(out.logits[j])[:, 0 if policy == "confidence" else 1]
        v = scores.sort().values
        lo, hi = len(v) // 4, 3 * len(v) // 4
        i = max(range(lo, hi), key=lambda i: v[i + 1] - v[i])  # widest gap near the middle
        thresholds.append(float((v[i] + v[i + 1]) / 2))
    return thresholds


# ------------------------------------------------------------------------------------- codec
def test_codec_round_trips():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 16, 5, 5, generator=g) * torch.linspace(0.1, 10, 16)[None, :, None, None]
    stats = torch.rand(4, 6, generator=g)
    ids = torch.arange(4)
    for c in COMPRESSIONS:
        body = encode_tensors({"features": feats, "stats": stats, "ids": ids}, c, only=("features",))
        out = decode_tensors(body)
        assert out["features"].dtype == torch.float32 and out["features"].shape == feats.shape
        assert torch.equal(out["stats"], stats) and torch.equal(out["ids"], ids)
        err = (out["features"] - feats).abs()
        if c == "none":
            assert torch.equal(out["features"], feats)
        elif c == "fp16":
            assert bool((err <= feats.abs() * 2**-11 + 1e-7).all())  # fp16 rounding: half an ulp
        elif c == "int8":
            assert float(err.max()) <= float(feats.max() - feats.min()) / 255 / 2 + 1e-5
        else:  # per channel: each channel's error is bounded by its own range
            span = feats.amax((0, 2, 3)) - feats.amin((0, 2, 3))
            assert bool((err.amax((0, 2, 3)) <= span / 255 / 2 + 1e-5).all())
    sizes = {c: len(encode_tensors({"features": feats}, c)) for c in COMPRESSIONS}
    assert sizes["fp16"] < sizes["none"] * 0.6 and sizes["int8"] < sizes["none"] * 0.35
    with pytest.raises(ValueError, match="compression"):
        encode_tensors({"features": feats}, "int4")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a payload at all",
        (10**9).to_bytes(8, "little") + b"{}",
        (2).to_bytes(8, "little") + b"[]",
        st_save({"x": torch.zeros(2)})[:-3],
        st_save({"x": torch.zeros(2)}, metadata={"timm_exits.codec": json.dumps({"x": {"mode": "zip"}})}),
    ],
)
def test_codec_rejects_bad_payloads(data):
    with pytest.raises(PayloadError):
        decode_tensors(data)


# ------------------------------------------------------------------------------ server / runner
@pytest.mark.parametrize("policy", ["gate", "confidence", "entropy"])
def test_tiered_run_over_http_matches_predict(model, parts, batch, policy):
    edge, cloud = parts
    thresholds = _spread_thresholds(model, batch, policy)
    ref = predict(model, batch, policy, thresholds)
    with CloudServer(cloud) as server:
        assert server.url.startswith("http://127.0.0.1:")
        runner = EdgeRunner(edge, server.url, policy, thresholds)
        assert runner.check_server()["exit_name"] == "layer2"
        result = runner.run(batch)
        assert server.stats["requests"] == 1
    assert torch.equal(result.exit_index, ref.exit_index)
    torch.testing.assert_close(result.logits, ref.logits, rtol=1e-4, atol=1e-5)
    counts = torch.bincount(result.exit_index, minlength=model.num_exits)
    assert counts[:2].sum() > 0 and counts[2:].sum() > 0  # some left on the edge, some went to the cloud
    assert torch.equal(result.on_edge, result.exit_index <= edge.split_index)
    n_sent = int((~result.on_edge).sum())
    assert result.offloaded == n_sent and result.requests == 1 and not result.fallback.any()
    assert result.bytes_sent > n_sent * 128 * 8 * 8 * 4  # float32 features of the offloaded samples + header
    assert result.bytes_received > 0
    assert result.latency_s.shape == (24,) and bool((result.latency_s > 0).all())
    assert bool((result.latency_s[~result.on_edge] >= result.latency_s[result.on_edge].max()).all())
    summary = result.summary()
    assert summary["exit_counts"] == counts.tolist() and summary["bytes_sent"] == result.bytes_sent


def test_all_exit_on_edge_sends_nothing(parts, batch):
    edge, cloud = parts
    result = EdgeRunner(edge, "http://127.0.0.1:9", "gate", 0.0).run(batch)  # nothing listens on port 9
    assert result.requests == 0 and result.bytes_sent == 0 and bool((result.exit_index == 0).all())


def test_compressed_run_stays_close(model, parts, batch):
    edge, cloud = parts
    thresholds = _spread_thresholds(model, batch, "gate")
    ref = predict(model, batch, "gate", thresholds)
    with CloudServer(cloud) as server:
        sizes = {}
        for c in ("fp16", "int8-channel"):
            result = EdgeRunner(edge, server.url, "gate", thresholds, compression=c).run(batch)
            sizes[c] = result.bytes_sent
            agree = float((result.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean())
            assert agree >= 0.9
            assert float((result.logits - ref.logits).abs().max()) < 0.5
    assert sizes["int8-channel"] < sizes["fp16"]


def test_measure_compression(parts, batch):
    edge, cloud = parts
    labels = torch.randint(0, 10, (24,))
    rows = measure_compression(edge, cloud, [(batch[:12], labels[:12]), (batch[12:], labels[12:])])
    by = {r["compression"]: r for r in rows}
    assert set(by) == set(COMPRESSIONS)
    assert by["none"]["max_abs_logit_diff"] == 0 and by["none"]["final_agreement"] == 1.0
    assert 1.9 < by["fp16"]["ratio"] < 2.1 and 3.5 < by["int8"]["ratio"] < 4.1
    assert by["fp16"]["max_abs_logit_diff"] < by["int8"]["max_abs_logit_diff"] < 1.0
    for r in rows:
        assert 0.0 <= r["final_agreement"] <= 1.0 and 0.0 <= r["final_accuracy"] <= 1.0


# ------------------------------------------------------------------------------------ failures
def _post(url: str, body: bytes) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", CLOUD_PATH, body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_server_answers_400_to_bad_payloads(parts):
    edge, cloud = parts
    with CloudServer(cloud) as server:
        status, msg = _post(server.url, b"garbage")
        assert status == 400 and "safetensors" in msg["error"]
        wrong = encode_tensors({"features": torch.zeros(2, 64, 8, 8), "stats": torch.zeros(2, 6)})
        status, msg = _post(server.url, wrong)
        assert status == 400 and "do not fit" in msg["error"]
        status, msg = _post(server.url, encode_tensors({"features": torch.zeros(2, 128, 8, 8)}))
        assert status == 400 and "stats" in msg["error"]
        assert server.stats["bad_requests"] == 3 and server.stats["requests"] == 0
        runner = EdgeRunner(edge, server.url)
        with pytest.raises(CloudResponseError, match="400.*safetensors"):
            runner.client.post(b"garbage")


def test_server_down_raises_or_falls_back(parts, batch):
    edge, cloud = parts
    server = CloudServer(cloud).start()
    url = server.url
    server.stop()
    with pytest.raises(CloudUnavailableError, match="unreachable"):
        EdgeRunner(edge, url, "gate", 0.5, timeout=5).run(batch)
    result = EdgeRunner(edge, url, "gate", 0.5, fallback="local", timeout=5).run(batch)
    with torch.no_grad():
        local = edge(batch)
    assert bool(result.fallback.all()) and bool(result.on_edge.all()) and "unreachable" in result.error
    assert bool((result.exit_index == edge.split_index).all())
    torch.testing.assert_close(result.logits, local.logits[:, -1])


class _WrongShape(nn.Module):
    """A 'cloud' that answers with the wrong number of exits and classes."""

    def forward(self, features: torch.Tensor, stats: torch.Tensor) -> CloudOutput:
        return CloudOutput(torch.zeros(features.shape[0], 1, 3), torch.zeros(features.shape[0], 0))


def test_wrong_shape_answer_is_caught(parts, batch):
    edge, _ = parts
    with CloudServer(_WrongShape()) as server:
        with pytest.raises(CloudResponseError, match=r"expected \(24, 2, 10\)"):
            EdgeRunner(edge, server.url, "gate", 1.0).run(batch)
        result = EdgeRunner(edge, server.url, "gate", 1.0, fallback="local").run(batch)
    assert bool(result.fallback.all()) and "expected" in result.error


def test_runner_rejects_bad_options(parts):
    edge, cloud = parts
    with pytest.raises(ValueError, match="policy"):
        EdgeRunner(edge, cloud, policy="soft")
    with pytest.raises(ValueError, match="compression"):
        EdgeRunner(edge, cloud, compression="zip")
    with pytest.raises(ValueError, match="fallback"):
        EdgeRunner(edge, cloud, fallback="retry")
    with pytest.raises(ValueError, match="thresholds"):
        EdgeRunner(edge, cloud, "gate", [0.5, 0.5])
    with pytest.raises(TypeError, match="EdgePart"):
        EdgeRunner(cloud, cloud)


# ------------------------------------------------------------------------------------ planning
def test_link_model():
    link = LinkModel(uplink_mbps=8, downlink_mbps=80, rtt_ms=20)
    assert math.isclose(link.transfer_ms(1000, 1000), 20 + 1.0 + 0.1)
    with pytest.raises(ValueError):
        LinkModel(uplink_mbps=0)


def test_plan_split(model, batch, tmp_path):
    labels = torch.randint(0, 10, (24,), generator=torch.Generator().manual_seed(5))
    loader = [(batch[:12], labels[:12]), (batch[12:], labels[12:])]
    thresholds = _spread_thresholds(model, batch, "gate")
    plan = plan_split(model, loader, uplink_mbps=10, rtt_ms=40, threshold=thresholds, repeats=2)
    names = [r["split"] for r in plan.rows]
    assert names == ["device", "layer1", "layer2", "layer3", "cloud"]
    ref = predict(model, batch, "gate", thresholds)
    exited = torch.bincount(ref.exit_index, minlength=model.num_exits).tolist()
    acc = float((ref.logits.argmax(-1) == labels).float().mean())
    for k, row in enumerate(plan.rows[1:-1]):
        assert math.isclose(row["p_offload"], sum(exited[k + 1 :]) / 24)
        assert math.isclose(row["latency_ms"], row["edge_ms"] + row["transfer_ms"] + row["cloud_ms"])
        link = 40 + row["payload_bytes"] * 8e-3 / 10 + row["response_bytes"] * 8e-3 / 10
        assert math.isclose(row["transfer_ms"], row["p_offload"] * link)
        assert math.isclose(row["accuracy"], acc)
        assert row["bytes_per_request"] == pytest.approx(row["p_offload"] * row["payload_bytes"])
    assert plan.rows[2]["payload_bytes"] > 128 * 8 * 8 * 4
    assert plan.best["latency_ms"] == min(r["latency_ms"] for r in plan.rows)
    assert plan.best_split["kind"] == "split"
    md = plan.to_markdown()
    assert "| layer2 |" in md.replace("**", "") and f"Recommended: **{plan.best['split']}**" in md
    png = plan.plot(tmp_path / "plan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.loads(plan.to_json())

    # same compute numbers, other links: too slow to send anything -> nothing offloaded; a device far
    # too slow -> everything is
    measured = plan.params["measured_ms"]
    slow = plan_split(model, loader, uplink_mbps=1e-3, threshold=thresholds, timings=measured)
    assert slow.params["measured_ms"] == measured and slow.params["timings_reused"]
    assert [r["edge_ms"] for r in slow.rows] == [r["edge_ms"] for r in plan.rows]
    assert slow.best["p_offload"] == 0
    weak = plan_split(model, loader, 1000, 1, device_speed=1e-4, threshold=thresholds, timings=measured)
    assert weak.best["split"] == "cloud"
    with pytest.raises(ValueError, match="min_accuracy"):
        plan_split(model, loader, threshold=thresholds, min_accuracy=1.01, timings=measured)
    with pytest.raises(ValueError, match="timings"):
        plan_split(model, loader, threshold=thresholds, timings={"edge": [1.0], "cloud": [1.0], "full_forward": 2})


def test_plan_split_with_compression(model, batch):
    labels = torch.randint(0, 10, (24,), generator=torch.Generator().manual_seed(5))
    loader = [(batch, labels)]
    thresholds = _spread_thresholds(model, batch, "gate")
    plain = plan_split(model, loader, threshold=thresholds, repeats=1)
    packed = plan_split(model, loader, threshold=thresholds, compression="int8", repeats=1)
    for a, b in zip(plain.rows[1:-1], packed.rows[1:-1]):
        assert b["payload_bytes"] < a["payload_bytes"] / 3
        assert 0.0 <= b["agreement"] <= 1.0
    with pytest.raises(ValueError, match="policy"):
        plan_split(model, loader, policy="soft")
