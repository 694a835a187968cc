"""Payload codec and its bounds, served-model specs, and the edge client in-process (no Ray needed)."""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import resource
import threading
from collections.abc import Callable, Iterator

import pytest
import timm
import torch
from conftest import spread_thresholds
from safetensors.torch import save as st_save

from timm_exits import predict, wrap
from timm_exits.deploy.serve import (
    COMPRESSIONS,
    CloudResponseError,
    CloudUnavailableError,
    EdgeClient,
    ModelClient,
    PayloadError,
    TensorSpec,
    decode_request,
    decode_tensors,
    encode_tensors,
    measure_compression,
    run_batch,
    served_cloud,
    served_model,
)
from timm_exits.deploy.split import split


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


def _raw(entries: dict, body: bytes = b"", meta: dict | None = None) -> bytes:
    """A hand-built safetensors payload: header entries as given, then `body`."""
    header = dict(entries)
    if meta is not None:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + body


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


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_codec_payload_does_not_depend_on_memory_layout_and_takes_empty_tensors(compression):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 8, 4, 4, generator=g)
    for layout in (feats.to(memory_format=torch.channels_last), feats.transpose(2, 3).contiguous().transpose(2, 3)):
        assert not layout.is_contiguous()
        got, ref = (decode_tensors(encode_tensors({"f": t}, compression))["f"] for t in (layout, feats))
        assert torch.equal(got, ref)
    empty = decode_tensors(encode_tensors({"f": feats[:0]}, compression))["f"]
    assert empty.shape == (0, 8, 4, 4) and empty.dtype == torch.float32


def test_codec_refuses_at_encoding_a_dtype_it_cannot_decode():
    with pytest.raises(TypeError, match=r"'f' has dtype torch.complex64, which payloads do not carry"):
        encode_tensors({"f": torch.zeros(2, dtype=torch.complex64)})


def test_codec_refuses_values_it_would_not_give_back_finite():
    big = torch.tensor([[1.0, 7e4, -1e5]])
    with pytest.raises(ValueError, match=r"'f' holds 2 finite values beyond float16's range \(largest \|x\| 1e\+05"):
        encode_tensors({"f": big}, "fp16")
    with pytest.raises(ValueError, match="beyond float16's range"):
        encode_tensors({"f": big.bfloat16()}, "fp16")
    assert decode_tensors(encode_tensors({"f": big}, "int8"))["f"].isfinite().all()  # coarse, but finite
    edge = torch.tensor([65504.0, -65504.0, float("inf"), float("nan")])  # float16's largest; inf and NaN as they are
    got = decode_tensors(encode_tensors({"f": edge}, "fp16"))["f"]
    assert torch.equal(got[:3], edge[:3]) and got[3].isnan()
    for mode in ("int8", "int8-channel"):
        for bad in (float("inf"), float("nan")):
            x = torch.tensor([[0.0, 1.0], [2.0, bad]])
            with pytest.raises(ValueError, match=r"'f' holds 1 NaN or inf values; 8-bit codes cannot carry them"):
                encode_tensors({"f": x}, mode)
    with pytest.raises(ValueError, match="spans a range wider than float32"):
        encode_tensors({"f": torch.tensor([-3e38, 3e38])}, "int8")
    assert torch.equal(decode_tensors(encode_tensors({"f": edge}))["f"][:3], edge[:3])  # uncompressed: as it is


def test_codec_refuses_a_channel_axis_outside_the_tensor():
    with pytest.raises(ValueError, match=r"channel_axis=4 is out of range for 'f' of shape \(2, 3\); .*\[-2, 1\]"):
        encode_tensors({"f": torch.ones(2, 3)}, "int8-channel", channel_axis=4)
    per_last = decode_tensors(encode_tensors({"f": torch.ones(2, 3)}, "int8-channel", channel_axis=-1))["f"]
    assert torch.equal(per_last, torch.ones(2, 3))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (b"not a payload at all", "does not fit"),
        ((10**9).to_bytes(8, "little") + b"{}", "does not fit"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        pytest.param((60000).to_bytes(8, "little") + b"[" * 60000, "not JSON: RecursionError", id="deep-header"),
        pytest.param(
            st_save({"x": torch.zeros(2)}, metadata={"timm_exits.codec": "[" * 60000}),
            "RecursionError",
            id="deep-codec",
        ),
        (st_save({"x": torch.zeros(2)})[:-3], "byte range"),
        (st_save({"x": torch.zeros(2)}, metadata={"timm_exits.codec": json.dumps({"x": {"mode": "zip"}})}), "zip"),
        (_raw({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "shape"),
        (_raw({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype"),
        (_raw({"x": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
        (st_save({"x/q": torch.zeros(2, dtype=torch.uint8)}), "metadata"),
        (
            st_save({"x": torch.zeros(2)}, metadata={"timm_exits.codec": json.dumps({"x": {"mode": "none"}, "y": {}})}),
            "does not contain",
        ),
        (
            st_save({"x": torch.zeros(2), "y": torch.zeros(1)}, metadata={"timm_exits.codec": '{"x": {}}'}),
            "does not list",
        ),
        pytest.param(
            st_save(
                {"image": torch.full((1, 3, 2, 2), 200, dtype=torch.uint8)},
                metadata={"timm_exits.codec": json.dumps({"image": {"mode": "none", "dtype": "float32"}})},
            ),
            "stored as torch.uint8 but its codec metadata says torch.float32",
            id="stored-dtype-differs-from-metadata",
        ),
    ],
)
def test_codec_rejects_bad_payloads(data, match):
    with pytest.raises(PayloadError, match=match) as info:
        decode_tensors(data)
    assert info.value.status == 400


def _broadcast_bomb(n: int = 9000, m: int = 9000) -> bytes:
    """Codes (n, 1) with a (1, m) scale: 'q * scale + offset' would broadcast to n * m floats."""
    codec = json.dumps({"features": {"mode": "int8", "dtype": "float32"}})
    return st_save(
        {
            "features/q": torch.zeros(n, 1, dtype=torch.uint8),
            "features/scale": torch.ones(1, m),
            "features/offset": torch.zeros(1),
        },
        metadata={"timm_exits.codec": codec},
    )


def test_codec_refuses_to_broadcast_beyond_the_codes():
    bomb = _broadcast_bomb()
    assert len(bomb) < 64_000  # a small request that would decode to 9000 * 9000 floats (324 MB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PayloadError, match="one per channel"):
        decode_tensors(bomb)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 64 * 1024  # peak memory did not grow by anything near the broadcast size


def test_codec_bounds_elements_and_checks_specs():
    specs = {"features": TensorSpec((None, 8, 4, 4)), "stats": TensorSpec((None, 6), (torch.float32,))}
    good = {"features": torch.randn(3, 8, 4, 4), "stats": torch.rand(3, 6)}
    out = decode_tensors(encode_tensors(good, "int8-channel", only=("features",)), specs, max_batch=3)
    assert out["features"].shape == (3, 8, 4, 4) and torch.equal(out["stats"], good["stats"])
    body = encode_tensors(good)
    with pytest.raises(PayloadError, match="limit is 100") as info:
        decode_tensors(body, specs, max_elements=100)
    assert info.value.status == 413
    with pytest.raises(PayloadError, match="limit per request is 2") as info:
        decode_tensors(body, specs, max_batch=2)
    assert info.value.status == 413
    cases = [
        (
            {"features": torch.randn(3, 8, 4, 5), "stats": torch.rand(3, 6)},
            r"shape \[3, 8, 4, 5\]; expected \(n, 8, 4, 4\)",
        ),
        ({"features": torch.randn(3, 8, 4, 4), "stats": torch.rand(3, 7)}, r"expected \(n, 6\)"),
        ({"features": torch.randn(3, 8, 4, 4), "stats": torch.rand(2, 6)}, "batch size"),
        ({"features": torch.randn(3, 8, 4, 4), "stats": torch.rand(3, 6).double()}, "dtype float64"),
        ({"features": torch.zeros(3, 8, 4, 4, dtype=torch.int64), "stats": torch.rand(3, 6)}, "dtype int64"),
        ({"features": torch.randn(3, 8, 4, 4)}, "missing"),
        ({**good, "extra": torch.zeros(1)}, "unexpected"),
        ({"features": torch.randn(0, 8, 4, 4), "stats": torch.rand(0, 6)}, "0 samples"),
    ]
    for tensors, match in cases:
        with pytest.raises(PayloadError, match=match):
            decode_tensors(encode_tensors(tensors), specs)


# ------------------------------------------------------------------------------- served specs
def test_served_specs_follow_the_parts(model, parts):
    edge, cloud = parts
    s = served_cloud(cloud, max_request_samples=4)
    assert s.request["features"].shape == (None, 128, 8, 8) and s.request["stats"].shape == (None, 6)
    assert s.response["logits"].shape == (None, 2, 10) and s.max_elements == 4 * (128 * 64 + 6)
    assert s.describe()["exit_name"] == "layer2"
    m = served_model(model, "gate", 0.5)
    assert m.request["image"].shape == (None, 3, 64, 64) and m.thresholds == [0.5] * 3
    x = torch.randn(5, 3, 64, 64)
    answers = run_batch(m, [{"image": x[:2]}, {"image": x[2:]}])
    ref = predict(model, x, "gate", 0.5)
    assert [a["logits"].shape[0] for a in answers] == [2, 3]
    assert torch.equal(torch.cat([a["exit_index"] for a in answers]), ref.exit_index)
    with pytest.raises(ValueError, match="input_size"):
        served_model(torch.nn.Linear(3, 2), num_classes=2)
    with pytest.raises(ValueError, match="policy"):
        served_model(model, "soft")
    with pytest.raises(TypeError, match="CloudPart"):
        served_cloud(edge)


def test_pixel_and_float_requests_batched_together_get_their_own_answers(model, batch):
    pixels = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    cfg = model.backbone.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    images = {"pixels": pixels, "float": batch[:2], "half": batch[2:4].half()}
    as_float = {"pixels": (pixels.float() / 255 - mean) / std, "float": batch[:2], "half": batch[2:4].half().float()}
    s = served_model(model, "confidence", 0.6)
    for order in (["pixels", "float", "half"], ["float", "pixels"], ["half", "pixels", "float"]):
        requests = [decode_request(s, encode_tensors({"image": images[k]})) for k in order]
        answers = run_batch(s, requests)
        ref = predict(model, torch.cat([as_float[k] for k in order]), "confidence", 0.6)
        torch.testing.assert_close(torch.cat([a["logits"] for a in answers]), ref.logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(torch.cat([a["exit_index"] for a in answers]), ref.exit_index)


def test_a_model_whose_pretrained_mean_has_other_channels_is_served_float_images_only():
    torch.manual_seed(0)
    gray = wrap(timm.create_model("test_resnet", num_classes=10, in_chans=1), input_size=(1, 32, 32)).eval()
    assert len(gray.backbone.pretrained_cfg["mean"]) == 3  # timm keeps ImageNet's three values
    x = torch.randn(2, 1, 32, 32)
    for target, kwargs in ((gray, {}), (gray.backbone, {"input_size": (1, 32, 32)})):
        s = served_model(target, **kwargs)
        assert s.describe()["pixels"] is None and torch.uint8 not in s.request["image"].dtypes
        (answer,) = run_batch(s, [decode_request(s, encode_tensors({"image": x}))])
        with torch.no_grad():
            want = predict(gray, x).logits if target is gray else target(x)
        torch.testing.assert_close(answer["logits"], want, rtol=1e-5, atol=1e-6)
        with pytest.raises(PayloadError, match=r"uint8 pixels, but this server has no mean and std .*mean=") as err:
            decode_request(s, encode_tensors({"image": torch.zeros(2, 1, 32, 32, dtype=torch.uint8)}))
        assert err.value.status == 400
    with pytest.raises(ValueError, match=r"need one value per channel \(1\)"):  # values given are still checked
        served_model(gray, mean=[0.5] * 3, std=[0.25] * 3)
    own = served_model(gray, mean=[0.5], std=[0.25])
    pixels = torch.full((2, 1, 32, 32), 191, dtype=torch.uint8)
    (answer,) = run_batch(own, [decode_request(own, encode_tensors({"image": pixels}))])
    torch.testing.assert_close(answer["logits"], predict(gray, (pixels.float() / 255 - 0.5) / 0.25).logits)


def test_a_request_over_the_sample_limit_is_told_so_whatever_its_size_in_bytes(model, parts):
    s = served_model(model, "gate", 0.5, max_request_samples=8)
    with torch.no_grad():
        e = parts.edge(torch.randn(32, 3, 64, 64))
    bodies = [encode_tensors({"image": torch.zeros(32, 3, 64, 64, dtype=dt)}) for dt in (torch.float32, torch.uint8)]
    sc = served_cloud(parts.cloud, max_request_samples=8)
    cloud = [encode_tensors({"features": e.features, "stats": e.stats}, c, only=("features",)) for c in COMPRESSIONS]
    for served, body in [(s, b) for b in bodies] + [(sc, b) for b in cloud]:
        with pytest.raises(PayloadError, match=r"holds 32 samples; the limit is max_request_samples=8") as err:
            decode_request(served, body)
        assert err.value.status == 413
    one = encode_tensors({"image": torch.zeros(1, 3, 64, 64)})
    with pytest.raises(PayloadError, match=r"exceeds the limit of \d+ \(max_request_samples=8 samples") as err:
        decode_request(s, one + b"\0" * s.max_body_bytes)  # within the sample limit, over the byte limit
    assert err.value.status == 413


# ------------------------------------------------------------------------------- HTTP clients
@contextlib.contextmanager
def _http_stub(get: Callable[[], bytes], post: Callable[[bytes], tuple[int, bytes]] | None = None) -> Iterator[str]:
    """A plain HTTP server in a thread (no Ray): GET answers `get()`, POST answers `post(body)` (status, body)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(200, get())

        def do_POST(self) -> None:
            assert post is not None
            self._answer(*post(self.rfile.read(int(self.headers["Content-Length"]))))

        def _answer(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/app"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _serving(served, sizes: list[int]) -> dict:
    """`_http_stub` arguments answering as a replica of `served` does, recording each request's sample count."""

    def post(body: bytes) -> tuple[int, bytes]:
        try:
            tensors = decode_request(served, body)
        except PayloadError as e:
            return e.status, json.dumps({"error": str(e)}).encode()
        sizes.append(int(next(iter(tensors.values())).shape[0]))
        return 200, encode_tensors(run_batch(served, [tensors])[0])

    return {"get": lambda: json.dumps({"status": "ok", **served.describe()}).encode(), "post": post}


def test_clients_send_at_most_the_servers_max_request_samples(model, parts, batch):
    sizes: list[int] = []
    with _http_stub(**_serving(served_model(model, "gate", 0.5, max_request_samples=8), sizes)) as url:
        logits, exit_index = ModelClient(url, timeout=30).predict(batch[:20])  # its own limit: 32 per request
    ref = predict(model, batch[:20], "gate", 0.5)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(exit_index, ref.exit_index) and sizes == [8, 8, 4]
    sizes.clear()
    with _http_stub(**_serving(served_cloud(parts.cloud, max_request_samples=8), sizes)) as url:
        result = EdgeClient(parts.edge, url, "gate", 1.0, timeout=30).run(batch[:20])  # all 20 go to the cloud
    ref = predict(model, batch[:20], "gate", 1.0)
    torch.testing.assert_close(result.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert sizes == [8, 8, 4] and result.requests == 3
    sizes.clear()
    with _http_stub(**_serving(served_cloud(parts.cloud, max_request_samples=8), sizes)) as url:
        EdgeClient(parts.edge, url, "gate", 1.0, timeout=30, max_request_samples=3).run(batch[:7])
    assert sizes == [3, 3, 1]  # a lower limit of the client's own stays


@pytest.mark.parametrize("answer", [b"<!DOCTYPE HTML><html>listing</html>", b"[1, 2]", b"\xff\xfe", b'"ok"'])
def test_a_get_answer_that_is_not_a_json_object_is_a_cloud_response_error(parts, answer):
    with _http_stub(lambda: answer) as url:
        for call in (
            lambda: EdgeClient(parts.edge, url, "gate", 0.5, timeout=30).check_server(),
            lambda: ModelClient(url, timeout=30).predict(torch.randn(1, 3, 64, 64)),
        ):
            with pytest.raises(CloudResponseError, match=r"answered GET with .*not a JSON object"):
                call()
    described = json.dumps({"kind": "model", "num_classes": "10"}).encode()
    with (
        _http_stub(lambda: described) as url,
        pytest.raises(CloudResponseError, match=r"num_classes='10'; expected a positive int"),
    ):
        ModelClient(url, timeout=30).predict(torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------------ edge client, in-process
@pytest.mark.parametrize("policy", ["gate", "confidence", "entropy"])
def test_edge_client_in_process_matches_predict(model, parts, batch, policy):
    edge, cloud = parts
    thresholds = spread_thresholds(model, batch, policy)
    ref = predict(model, batch, policy, thresholds)
    result = EdgeClient(edge, cloud, policy, thresholds, max_request_samples=5).run(batch)
    assert torch.equal(result.exit_index, ref.exit_index)
    torch.testing.assert_close(result.logits, ref.logits, rtol=1e-4, atol=1e-5)
    counts = torch.bincount(result.exit_index, minlength=model.num_exits)
    assert counts[:2].sum() > 0 and counts[2:].sum() > 0  # some left on the edge, some went to the cloud
    n_sent = int((~result.on_edge).sum())
    assert result.offloaded == n_sent and result.requests == -(-n_sent // 5)  # in requests of at most 5
    assert result.bytes_sent > n_sent * 128 * 8 * 8 * 4
    assert bool((result.latency_s[~result.on_edge] >= result.latency_s[result.on_edge].max()).all())
    assert result.summary()["exit_counts"] == counts.tolist()


def test_all_exit_on_edge_sends_nothing(parts, batch):
    edge, _ = parts
    result = EdgeClient(edge, "http://127.0.0.1:9/cloud", "gate", 0.0).run(batch)  # nothing listens on port 9
    assert result.requests == 0 and result.bytes_sent == 0 and bool((result.exit_index == 0).all())


def test_compressed_run_stays_close(model, parts, batch):
    edge, cloud = parts
    thresholds = spread_thresholds(model, batch, "gate")
    ref = predict(model, batch, "gate", thresholds)
    sizes = {}
    for c in ("fp16", "int8-channel"):
        result = EdgeClient(edge, cloud, "gate", thresholds, compression=c).run(batch)
        sizes[c] = result.bytes_sent
        assert float((result.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean()) >= 0.9
        assert float((result.logits - ref.logits).abs().max()) < 0.5
    assert sizes["int8-channel"] < sizes["fp16"]


def test_measure_compression(parts, batch):
    edge, cloud = parts
    with torch.no_grad():
        e = edge(batch)
        final = cloud(e.features, e.stats).logits[:, -1].argmax(-1)
    # labels: the final exit's own predictions with the first 6 changed, so the final exit is right on 18 of 24
    labels = final.clone()
    labels[:6] = (labels[:6] + 1) % 10
    rows = measure_compression(edge, cloud, [(batch[:12], labels[:12]), (batch[12:], labels[12:])])
    by = {r["compression"]: r for r in rows}
    assert set(by) == set(COMPRESSIONS)
    assert by["none"]["max_abs_logit_diff"] == 0 and by["none"]["final_agreement"] == 1.0
    assert by["none"]["exit_agreement"] == 1.0
    assert 1.9 < by["fp16"]["ratio"] < 2.1 and 3.5 < by["int8"]["ratio"] < 4.1
    assert by["fp16"]["max_abs_logit_diff"] < by["int8"]["max_abs_logit_diff"] < 1.0
    # fp16 moves the logits by ~2e-5, far below the final exit's smallest top-2 margin (~1e-3): same answers
    assert by["fp16"]["final_agreement"] == by["fp16"]["exit_agreement"] == 1.0
    for c in ("none", "fp16"):
        assert by[c]["final_accuracy"] == pytest.approx(18 / 24)
    for r in rows:
        assert 0.0 <= r["final_agreement"] <= 1.0 and 0.0 <= r["exit_agreement"] <= 1.0
        # predictions that agree with the uncompressed ones are equally right: accuracy moves by at most the rest
        assert abs(r["final_accuracy"] - 18 / 24) <= 1.0 - r["final_agreement"] + 1e-9


def test_server_down_raises_or_falls_back(parts, batch):
    edge, _ = parts
    url = "http://127.0.0.1:9/cloud"  # discard port: connection refused
    with pytest.raises(CloudUnavailableError, match="unreachable"):
        EdgeClient(edge, url, "gate", 0.5, timeout=5).run(batch)
    result = EdgeClient(edge, url, "gate", 0.5, fallback="local", timeout=5).run(batch)
    with torch.no_grad():
        local = edge(batch)
    assert bool(result.fallback.all()) and bool(result.on_edge.all()) and "unreachable" in result.error
    assert bool((result.exit_index == edge.split_index).all())
    torch.testing.assert_close(result.logits, local.logits[:, -1])


def test_other_split_is_refused(model, parts, batch):
    edge, _ = parts
    other = split(model, at="layer1").cloud
    client = EdgeClient(edge, other, "gate", 1.0)
    with pytest.raises(CloudResponseError, match="different model or split"):
        client.check_server()
    with pytest.raises(CloudResponseError, match=r"expected \(n, 64, 16, 16\)"):
        client.run(batch)


def test_client_rejects_bad_options(parts):
    edge, cloud = parts
    with pytest.raises(ValueError, match="policy"):
        EdgeClient(edge, cloud, policy="soft")
    with pytest.raises(ValueError, match="compression"):
        EdgeClient(edge, cloud, compression="zip")
    with pytest.raises(ValueError, match="fallback"):
        EdgeClient(edge, cloud, fallback="retry")
    with pytest.raises(ValueError, match="thresholds"):
        EdgeClient(edge, cloud, "gate", [0.5, 0.5])
    with pytest.raises(TypeError, match="EdgePart"):
        EdgeClient(cloud, cloud)
    with pytest.raises(ValueError, match="http://host"):
        EdgeClient(edge, "ftp://x")
    with pytest.raises(TypeError, match="URL or a handle"):
        EdgeClient(edge, 42)
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 3, 32, 32\)\)"):
        EdgeClient(edge, cloud).run(torch.zeros(0, 3, 32, 32))
    for bad in (0, 2.5, True, "8"):
        with pytest.raises(ValueError, match=rf"max_request_samples={bad!r} must be a positive int"):
            EdgeClient(edge, "http://host:1/edge", max_request_samples=bad)
        with pytest.raises(ValueError, match=rf"max_request_samples={bad!r} must be a positive int"):
            ModelClient("http://host:1/model", max_request_samples=bad)


def test_plain_model_is_served_by_its_forward():
    torch.manual_seed(0)
    plain = timm.create_model("test_resnet", num_classes=10).eval()
    s = served_model(plain, input_size=(3, 32, 32))
    assert s.policy is None and s.request["image"].shape == (None, 3, 32, 32)
    x = torch.randn(3, 3, 32, 32)
    (answer,) = run_batch(s, [{"image": x}])
    with torch.no_grad():
        torch.testing.assert_close(answer["logits"], plain(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(answer["exit_index"], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="EarlyExitModel only"):
        served_model(plain, "gate", input_size=(3, 32, 32))


def test_uint8_pixels_are_normalised_on_the_server_with_the_models_mean_and_std(model):
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    cfg = model.backbone.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    normalised = (pixels.double() / 255 - mean.double()) / std.double()  # the reference, in float64
    s = served_model(model, "confidence", 0.6)
    assert s.request["image"].dtypes[-1] == torch.uint8 and s.describe()["pixels"]["std"] == list(cfg["std"])
    (answer,) = run_batch(s, [decode_tensors(encode_tensors({"image": pixels}), s.request)])
    ref = predict(model, normalised.float(), "confidence", 0.6)
    torch.testing.assert_close(answer["logits"], ref.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(answer["exit_index"], ref.exit_index)
    assert len(encode_tensors({"image": pixels})) < len(encode_tensors({"image": normalised.float()})) / 3.9
    # the caller's own normalisation, and a model that records none: float images only, uint8 refused
    own = served_model(model, "confidence", 0.6, mean=[0.5] * 3, std=[0.25] * 3)
    (answer,) = run_batch(own, [{"image": pixels}])
    ref = predict(model, (pixels.float() / 255 - 0.5) / 0.25, "confidence", 0.6)
    torch.testing.assert_close(answer["logits"], ref.logits, rtol=1e-4, atol=1e-5)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    bare = served_model(plain, input_size=(3, 2, 2), num_classes=2)
    assert bare.describe()["pixels"] is None
    with pytest.raises(PayloadError, match=r"'image' has dtype uint8; expected one of \['float32'"):
        decode_tensors(encode_tensors({"image": torch.zeros(1, 3, 2, 2, dtype=torch.uint8)}), bare.request)
    with pytest.raises(ValueError, match="give both mean and std"):
        served_model(model, mean=[0.5] * 3)
    with pytest.raises(ValueError, match=r"need one value per channel \(3\), std > 0"):
        served_model(model, mean=[0.5] * 3, std=[0.0] * 3)


def test_images_the_model_would_refuse_are_refused_before_any_compute_or_transfer(model, parts):
    edge, cloud = parts
    client = EdgeClient(edge, cloud)
    x = torch.randn(3, 3, 64, 64)
    nan = x.clone()
    nan[1, 0, 0, 0] = float("nan")
    cases = [
        (x[0], r"not a \(B, C, H, W\) image batch \(shape \(3, 64, 64\)\).*x.unsqueeze\(0\)"),
        (x[:, :1], r"images of shape \(1, 64, 64\); the split was traced for \(3, 64, 64\)"),
        (torch.randn(2, 3, 32, 32), r"images of shape \(3, 32, 32\); the split was traced for \(3, 64, 64\)"),
        (nan, r"1 of 3 images hold NaN or inf \(first: \[1\]\)"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            client.run(bad)
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 3, 64, 64\)\): ModelClient.predict"):
        ModelClient("http://127.0.0.1:9/none").predict(x[:0])  # refused before any connection
    # on the server: a request with a NaN image is refused alone (400), never run in a batch with others
    served = served_model(model, "gate", 0.5)
    with pytest.raises(PayloadError, match=r"1 of 3 images hold NaN or inf \(first: \[1\]\)") as err:
        decode_request(served, encode_tensors({"image": nan}))
    assert err.value.status == 400
    assert torch.equal(decode_request(served, encode_tensors({"image": x}))["image"], x)
    with pytest.raises(PayloadError, match="holds 3 samples; the limit is max_request_samples=1") as err:
        decode_request(served_model(model, "gate", 0.5, max_request_samples=1), encode_tensors({"image": x}))
    assert err.value.status == 413


def test_images_that_overflow_a_half_precision_model_are_refused_alone(model, batch):
    half = copy.deepcopy(model).half()
    served = served_model(half, "confidence", 0.6)
    big = batch[:2].clone()
    big[1] *= 1e5  # finite in float32, inf once cast to the model's float16
    with pytest.raises(
        PayloadError, match=r"1 of 2 images hold NaN or inf, or values beyond .*float16 \(first: \[1\]\)"
    ) as err:
        decode_request(served, encode_tensors({"image": big}))
    assert err.value.status == 400
    # what passes the check runs in a batch with the others
    requests = [decode_request(served, encode_tensors({"image": x})) for x in (batch[2:3], batch[3:6].half())]
    answers = run_batch(served, requests)
    ref = predict(half, torch.cat([batch[2:3], batch[3:6]]).half(), "confidence", 0.6)
    torch.testing.assert_close(torch.cat([a["logits"] for a in answers]), ref.logits)
    assert torch.equal(torch.cat([a["exit_index"] for a in answers]), ref.exit_index)
