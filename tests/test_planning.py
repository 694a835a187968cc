"""Split planning: link model, expected latency per split point, compression in the plan."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from conftest import spread_thresholds as _spread_thresholds

from timm_exits import predict, wrap
from timm_exits.deploy import planning
from timm_exits.deploy.planning import LinkModel, SplitPlan, plan_split
from timm_exits.deploy.serve import EdgeClient
from timm_exits.deploy.split import split


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return wrap(timm.create_model("resnet18", pretrained=False, num_classes=10), input_size=(3, 64, 64)).eval()


@pytest.fixture(scope="module")
def batch():
    return torch.randn(24, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_link_model():
    link = LinkModel(uplink_mbps=8, downlink_mbps=80, rtt_ms=20)
    assert math.isclose(link.transfer_ms(1000, 1000), 20 + 1.0 + 0.1)
    with pytest.raises(ValueError, match="needs positive bandwidths"):
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
    assert json.loads(plan.to_json())["rows"] == plan.rows

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
    with pytest.raises(ValueError, match=r"timings give 1 edge / 1 cloud times for 3 split points"):
        plan_split(model, loader, threshold=thresholds, timings={"edge": [1.0], "cloud": [1.0], "full_forward": 2})


def test_plan_split_with_compression(model, batch):
    labels = torch.randint(0, 10, (24,), generator=torch.Generator().manual_seed(5))
    loader = [(batch, labels)]
    thresholds = _spread_thresholds(model, batch, "gate")
    plain = plan_split(model, loader, threshold=thresholds, repeats=1)
    packed = plan_split(model, loader, threshold=thresholds, compression="int8", repeats=1)
    uncompressed = predict(model, batch, "gate", thresholds).logits.argmax(-1)
    for k, (a, b) in enumerate(zip(plain.rows[1:-1], packed.rows[1:-1])):
        assert b["payload_bytes"] < a["payload_bytes"] / 3
        assert 0.0 <= b["agreement"] <= 1.0
        # predictions that agree with the uncompressed ones are equally right: accuracy moves by at most the rest
        assert abs(b["accuracy"] - a["accuracy"]) <= 1.0 - b["agreement"] + 1e-6
        # the row's numbers are those of the split run through the int8 codec, recomputed here
        parts = split(model, k)
        got = EdgeClient(parts.edge, parts.cloud, "gate", thresholds, compression="int8").run(batch).logits.argmax(-1)
        assert b["accuracy"] == int((got == labels).sum()) / 24
        assert b["agreement"] == int((got == uncompressed).sum()) / 24
        assert b["agreement"] == 1.0  # int8 moves these logits by ~2e-4, far below their top-2 margins
        assert a["agreement"] == 1.0 and a["accuracy"] == pytest.approx(int((uncompressed == labels).sum()) / 24)
    with pytest.raises(ValueError, match="policy"):
        plan_split(model, loader, policy="soft")


def _labels(n: int) -> torch.Tensor:
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(5))


def test_plan_split_takes_the_batch_forms_collect_takes(model, batch):
    x, y = batch[:8], _labels(8)
    timings = {"edge": [1.0, 2.0, 3.0], "cloud": [3.0, 2.0, 1.0], "full_forward": 4.0}
    plans = [
        plan_split(model, loader, threshold=0.5, compression="int8", timings=timings)
        for loader in ([(x, y)], [{"image": x, "label": y}], [(x, y, torch.arange(8))], [[x, y, "paths"]])
    ]
    for plan in plans[1:]:
        assert plan.rows == plans[0].rows
    with pytest.raises(TypeError, match="a loader batch must be"):
        plan_split(model, [x], threshold=0.5, timings=timings)


def test_plan_split_at_another_image_size_than_the_wrap_and_mixed_sizes(model, batch, monkeypatch):
    small = torch.nn.functional.interpolate(batch[:8], size=(32, 32))  # the model was wrapped at 64 px
    for compression in ("none", "int8"):
        plan = plan_split(model, [(small, _labels(8))], threshold=0.5, compression=compression, repeats=1)
        assert plan.params["input_size"] == [3, 32, 32]
        assert [r["feature_shape"] for r in plan.rows[1:-1]] == [[64, 8, 8], [128, 4, 4], [256, 2, 2]]

    def no_split(*args, **kwargs):
        raise AssertionError("split before the loader was checked")

    monkeypatch.setattr(planning, "split", no_split)
    mixed = [(small, _labels(8)), (batch[:8], _labels(8))]
    with pytest.raises(ValueError, match=r"images of shape \(3, 64, 64\) after \(3, 32, 32\); .*compression='none'"):
        plan_split(model, mixed, threshold=0.5, compression="int8", repeats=1)


def test_plot_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    row = {"split": "device", "edge_ms": 1.0, "transfer_ms": 0.0, "cloud_ms": 0.0, "bytes_per_request": 0.0}
    params = {"uplink_mbps": 10, "rtt_ms": 40, "device_speed": 0.2, "server_speed": 1.0, "compression": "none"}
    png = SplitPlan([row], row, None, params).plot("~/plots/plan.png")
    assert png == tmp_path / "home" / "plots" / "plan.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize(
    "link",
    [
        {"uplink_mbps": math.nan},
        {"downlink_mbps": math.inf},
        {"rtt_ms": math.nan},
        {"rtt_ms": math.inf},
    ],
    ids=["nan-uplink", "inf-downlink", "nan-rtt", "inf-rtt"],
)
def test_link_model_refuses_nan_and_infinity(link):
    """NaN passed the `<= 0` checks and the plan recommended a row whose expected latency was NaN."""
    with pytest.raises(ValueError, match=r"needs positive bandwidths and a non-negative RTT \(finite numbers"):
        LinkModel(**link)


def _unread_loader():
    raise AssertionError("the loader was read before the inputs were checked")
    yield


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"uplink_mbps": math.nan}, "needs positive bandwidths"),
        ({"device_speed": math.nan}, r"device_speed=nan, server_speed=1.0: both must be positive finite numbers"),
        ({"server_speed": math.inf}, r"device_speed=0.2, server_speed=inf: both must be positive finite numbers"),
        (
            {"timings": {"edge": [math.nan, 1.0, 1.0], "cloud": [1.0, 1.0, 1.0], "full_forward": 2.0}},
            r"timings must be positive finite numbers of ms \(not NaN or infinity\)",
        ),
        (
            {"timings": {"edge": [1.0, 1.0, 1.0], "cloud": [1.0, 1.0, 1.0], "full_forward": math.inf}},
            r"timings must be positive finite numbers of ms",
        ),
        ({"repeats": 0}, r"repeats=0: give 1 or more timed runs per part"),
    ],
    ids=["nan-link", "nan-device-speed", "inf-server-speed", "nan-edge-timing", "inf-full-timing", "no-repeats"],
)
def test_plan_split_refuses_non_finite_inputs_before_reading_the_loader(model, kwargs, message):
    """NaN speeds and timings gave a plan of NaN latencies whose first row ("device") was recommended."""
    with pytest.raises(ValueError, match=message):
        plan_split(model, _unread_loader(), threshold=0.5, **kwargs)
