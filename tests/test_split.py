"""Splitting a multi-exit model into edge and cloud parts, and exporting the parts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

from timm_exits import predict, wrap
from timm_exits.deploy.export import export, run_onnx
from timm_exits.deploy.serve import EdgeClient
from timm_exits.deploy.split import CloudPart, EdgePart, SplitError, split
from timm_exits.hub.files import _host

# name -> (create_model kwargs, wrap input size); pretrained=False, small inputs where the model allows.
MODELS = {
    "resnet18": ({}, (3, 64, 64)),
    "test_vit": ({}, None),  # its 160 px default
    "test_convnext": ({}, (3, 64, 64)),
    "test_efficientnet": ({}, (3, 64, 64)),
}


def _wrapped(name: str, seed: int = 0):
    torch.manual_seed(seed)
    kwargs, size = MODELS[name]
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return wrap(model, input_size=size).eval()


@pytest.fixture(scope="module")
def models():
    return {name: _wrapped(name) for name in MODELS}


def _images(model, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.config.input_size, generator=g)


def _exit_features(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each exit module's output during a plain backbone forward."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.backbone.named_modules())
    handles = [
        modules[b.name].register_forward_hook(lambda m, i, o, n=b.name: seen.setdefault(n, o.clone()))
        for b in model.branches
    ]
    try:
        with torch.no_grad():
            model.backbone(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("name", list(MODELS))
def test_composition_reproduces_model_at_every_exit(models, name):
    model = models[name]
    x = _images(model)
    with torch.no_grad():
        ref = model(x)
    feats = _exit_features(model, x)
    want_logits = torch.stack(ref.logits, dim=1)
    for k, branch in enumerate(model.branches):
        edge, cloud = split(model, at=k if k % 2 == 0 else branch.name, check=False)  # compared below
        assert isinstance(edge, EdgePart) and isinstance(cloud, CloudPart)
        assert edge.exit_name == branch.name and edge.split_index == k
        with torch.no_grad():
            e = edge(x)
            c = cloud(e.features, e.stats)
        assert e.logits.shape == (3, k + 1, 10) and e.gate_logits.shape == (3, k + 1)
        assert e.stats.shape == (3, 3 * (k + 1))
        assert c.logits.shape == (3, model.num_exits - k - 1, 10)
        assert c.gate_logits.shape == (3, model.num_exits - k - 2)
        torch.testing.assert_close(e.features, feats[branch.name])
        torch.testing.assert_close(torch.cat([e.logits, c.logits], 1), want_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.cat([e.gate_logits, c.gate_logits], 1), ref.gate_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(e.gates, torch.sigmoid(ref.gate_logits[:, : k + 1]))
        torch.testing.assert_close(c.gates[:, -1], torch.ones(3))


def test_a_bf16_model_splits_with_the_default_check_in_its_own_dtype():
    torch.manual_seed(0)
    model = wrap(timm.create_model("resnet18", num_classes=10), input_size=(3, 32, 32)).to(torch.bfloat16).eval()
    edge, cloud = split(model, at=1)  # check=True: the parts are compared with the model on a bf16 batch
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        e = edge(x)
        c = cloud(e.features, e.stats)
    assert e.logits.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat([e.logits, c.logits], 1), torch.stack(ref.logits, dim=1))


def test_split_at_an_example_of_another_size_takes_images_of_that_size(models):
    model = models["resnet18"]  # wrapped at 64 px
    x = _images(model, batch=3)[..., :32, :32]
    for check in (True, False):
        edge, cloud = split(model, at=1, example=x.contiguous(), check=check)
        assert edge.input_size == cloud.input_size == (3, 32, 32) and cloud.feature_shape == (128, 4, 4)
        assert edge.example_inputs(2)[0].shape == (2, 3, 32, 32)
        result = EdgeClient(edge, cloud, "gate", 1.0).run(x)  # every sample through the cloud part
        ref = predict(model, x, "gate", 1.0)
        torch.testing.assert_close(result.logits, ref.logits, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match=r"images of shape \(3, 64, 64\); the split was traced for \(3, 32, 32\)"):
            EdgeClient(edge, cloud, "gate", 1.0).run(_images(model))
    assert split(model, at=1).edge.input_size == (3, 64, 64)  # without an example: the configured size


def test_an_example_the_model_cannot_take_as_it_is_is_a_split_error():
    torch.manual_seed(0)
    model = wrap(timm.create_model("test_resnet", num_classes=10), input_size=(3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    bf16 = r"example is torch.float32 on cpu but the model's parameters are torch.bfloat16 on cpu; convert it with "
    cases = [
        (torch.bfloat16, x, bf16 + r"example.to\('cpu', torch.bfloat16\)"),
        (torch.float32, x.to("meta"), r"example is torch.float32 on meta .* example.to\('cpu', torch.float32\)"),
        (torch.float32, x[:0], r"example must be a non-empty input batch \(B, C, H, W\), got \(0, 3, 32, 32\)"),
        (torch.float32, x.tolist(), "got list"),
    ]
    for dtype, example, match in cases:
        with pytest.raises(SplitError, match=match):
            split(model.to(dtype), at=0, example=example)
    edge, _ = split(model.to(torch.bfloat16), at=0, example=x.to(torch.bfloat16))
    assert edge(x.to(torch.bfloat16)).logits.dtype == torch.bfloat16


def test_split_shares_modules_and_leaves_model_unchanged(models):
    model = models["resnet18"]
    model.train()
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        flags = [m.training for m in model.modules()]
        hooks = sum(len(m._forward_hooks) for m in model.modules())
        edge, cloud = split(model, at="layer2")
        assert edge.net.backbone.layer1 is model.backbone.layer1
        assert getattr(cloud.net.branches, "2") is model.branches[2]
        assert [m.training for m in model.modules()] == flags
        assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert edge.training and cloud.training  # the parts' own flags follow the model's
    finally:
        model.eval()
    x = _images(model)
    with torch.no_grad():
        out = model(x)
        plain = model.backbone(x)
    torch.testing.assert_close(out.final, plain)


@pytest.mark.parametrize(
    ("at", "message"),
    [
        (3, r"at=3 is out of range: the model has 3 early exits \(0='layer1', 1='layer2', 2='layer3'\)"),
        (-1, r"at=-1 is out of range"),
        (7, r"at=7 is out of range"),
        ("layer4", r"'layer4' is not an early exit of this model; split at one of: 0='layer1'"),
        ("layer9", r"'layer9' is not an early exit of this model"),
        (True, r"at=True must be an early-exit index \(int\) or an exit's module name \(str\)"),
        (1.5, r"at=1.5 must be an early-exit index"),
    ],
)
def test_split_point_that_does_not_exist(models, at, message):
    model = models["resnet18"]
    with pytest.raises(SplitError, match=message):
        split(model, at=at)


class _DenseNet(nn.Module):
    """Tiny dense connectivity: layer c reads a and b, so the graph cannot be cut at b."""

    num_classes = 5

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = self.b(a)
        return self.head(self.c(torch.cat([a, b], 1)).mean((2, 3)))


class _DataDependent(_DenseNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        if a.sum() > 0:
            a = a * 2
        return self.head(self.c(torch.cat([a, self.b(a)], 1)).mean((2, 3)))


def test_cut_that_later_layers_bypass_is_refused():
    torch.manual_seed(0)
    model = wrap(_DenseNet(), exits=["a", "b"], input_size=(3, 16, 16)).eval()
    edge, cloud = split(model, at="a")  # a's output is all the rest needs
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        e = edge(x)
        torch.testing.assert_close(cloud(e.features, e.stats).logits[:, -1], model(x).final)
    with pytest.raises(SplitError, match=r"cannot split at 'b'.*cat.*needs a \(call_module 'a'\).*between stages"):
        split(model, at="b")


def test_a_cut_refused_for_sizes_read_from_the_input_shape_says_so():
    torch.manual_seed(0)
    xcit = timm.create_model("xcit_nano_12_p16_224", num_classes=10, img_size=64, depth=4)
    model = wrap(xcit, input_size=(3, 64, 64)).eval()
    with pytest.raises(SplitError, match=r"sizes read from the input's shape .* no cut between those blocks works"):
        split(model, at=0)


class _PairStage(nn.Module):
    """Returns (map, token), as PiT's stages do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, y.mean((2, 3))


class _PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = _PairStage()
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, token = self.pair(x)
        return self.head(torch.cat([self.b(y).mean((2, 3)), token], 1))


def test_an_exit_whose_module_returns_a_tuple_cannot_be_a_cut():
    torch.manual_seed(0)
    model = wrap(_PairNet(), exits=["pair", "b"], input_size=(3, 16, 16)).eval()
    with pytest.raises(SplitError, match=r"\{'pair': 'tuple'\} return a tuple, not one tensor"):
        split(model, at="pair")


def test_untraceable_backbone_is_reported():
    model = wrap(_DataDependent(), exits=["a", "b"], input_size=(3, 16, 16)).eval()
    with pytest.raises(SplitError, match="torch.fx could not trace _DataDependent"):
        split(model, at=0)


def test_split_needs_a_wrapped_model():
    with pytest.raises(TypeError, match="wrapped model"):
        split(nn.Linear(2, 2), at=0)


def test_torch_export_both_parts_dynamic_batch(models, tmp_path):
    model = models["resnet18"]
    edge, cloud = split(model, at=1)
    r = export(edge, path=tmp_path / "edge.pt2", format="torch")
    assert r.max_abs_diff is not None and r.max_abs_diff < 1e-4 and (tmp_path / "edge.pt2").is_file()
    x = _images(model, batch=5)
    with torch.no_grad():
        got = r.program.module()(x)
        e = edge(x)
    assert len(got) == 4  # (logits, gate_logits, stats, features)
    for name, value in zip(("logits", "gate_logits", "stats", "features"), got):
        torch.testing.assert_close(value, getattr(e, name), msg=name)
    rc = export(cloud, format="torch")
    assert rc.output_names == ["logits", "gate_logits"]
    with torch.no_grad():
        cloud_got, cloud_want = rc.program.module()(e.features, e.stats), cloud(e.features, e.stats)
    torch.testing.assert_close(cloud_got[0], cloud_want.logits)
    torch.testing.assert_close(cloud_got[1], cloud_want.gate_logits)
    loaded = torch.export.load(tmp_path / "edge.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x)[0], e.logits)


class _Noisy(nn.Module):
    """A module whose outputs change from call to call: no export of it passes the check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_an_export_that_fails_its_check_leaves_the_earlier_file_as_it_was(tmp_path):
    path = tmp_path / "part.pt2"
    export(nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4), path, format="torch")
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export(_Noisy().eval(), torch.randn(2, 4), path, format="torch")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["part.pt2"]  # no temporary file left beside it
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export(_Noisy().eval(), torch.randn(2, 4), tmp_path / "new.pt2", format="torch")
    assert [p.name for p in tmp_path.iterdir()] == ["part.pt2"]


def test_export_expands_the_home_folder_and_names_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    linear, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    result = export(linear, x, "~/part.pt2", format="torch")
    assert result.path == str(tmp_path / "home" / "part.pt2") and (tmp_path / "home" / "part.pt2").is_file()
    assert not (tmp_path / "~").exists()
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"its folder {missing} does not exist; create it first") as err:
        export(linear, x, missing / "part.pt2", format="torch")
    assert ".export-" not in str(err.value) and not missing.exists()
    with pytest.raises(FileNotFoundError, match="home/new does not exist"):
        export(linear, x, "~/new/part.pt2", format="torch")


@pytest.mark.skipif(os.name != "posix", reason="process ids are checked on POSIX")
def test_an_export_removes_the_work_folders_killed_exports_of_the_same_file_left(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = _host()
    killed = tmp_path / f".part.pt2.export-{ended.pid}-{host}-abcd1234"  # its process is gone
    running = tmp_path / f".part.pt2.export-{os.getpid()}-{host}-efgh5678"  # another export, still running
    elsewhere = tmp_path / f".part.pt2.export-{ended.pid}-otherhost-ijkl9012"  # cannot be checked from here
    other_file = tmp_path / f".other.pt2.export-{ended.pid}-{host}-mnop3456"
    users = tmp_path / ".part.pt2.export-notes"
    for folder in (killed, running, elsewhere, other_file, users):
        folder.mkdir()
        (folder / "part.pt2").write_bytes(b"half written")
    export(nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4), tmp_path / "part.pt2", format="torch")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["part.pt2", running.name, elsewhere.name, other_file.name, users.name])
    assert (running / "part.pt2").read_bytes() == b"half written"


def test_onnx_export_matches_onnxruntime(models, tmp_path):
    model = models["test_convnext"]
    edge, cloud = split(model, at=1)
    re = export(edge, path=tmp_path / "edge.onnx", format="onnx")
    rc = export(cloud, format="onnx")
    assert re.input_names == ["image"] and rc.input_names == ["features", "stats"]
    assert (tmp_path / "edge.onnx").is_file() and isinstance(rc.program, bytes)
    assert re.max_abs_diff < 1e-4 and rc.max_abs_diff < 1e-4
    assert len(repr(rc)) < 1000 and "edge.onnx" in repr(re)  # the repr leaves out the model's bytes
    x = _images(model, batch=5)  # another batch size than the example's: the batch is dynamic
    with torch.no_grad():
        e = edge(x)
        c = cloud(e.features, e.stats)
    logits, gates, stats, features = run_onnx(tmp_path / "edge.onnx", [x])
    torch.testing.assert_close(features, e.features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, e.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gates, e.gate_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats, e.stats, rtol=1e-4, atol=1e-4)
    cl, cg = run_onnx(rc.program, [e.features, e.stats])
    torch.testing.assert_close(cl, c.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cg, c.gate_logits, rtol=1e-4, atol=1e-4)


def test_onnx_check_without_onnxruntime(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install"):
        run_onnx(b"", [torch.zeros(1)])


def test_export_rejects_unknown_format_train_mode_and_a_batch_of_one(models):
    edge, _ = split(models["resnet18"], at=0)
    with pytest.raises(ValueError, match="format"):
        export(edge, format="tflite")
    with pytest.raises(ValueError, match=r"batch >= 2 .*dynamic_batch=False"):
        export(edge, edge.example_inputs(1), format="torch")
    model = _wrapped("resnet18", seed=3).train()
    edge, _ = split(model, at=0, check=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"train mode \(.*BatchNorm2d.*Call \.eval\(\)"):
        export(edge, format="torch")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running statistics unmoved
    assert model.training
    model.eval()  # as the error says: the part's own containers, split in train mode, do not count
    assert export(edge, format="torch").max_abs_diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_export_every_model(models, name, fmt):
    model = models[name]
    for part in split(model, at=len(model.branches) // 2):
        result = export(part, format=fmt)
        assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4


def test_split_leaves_no_attributes_on_the_backbone():
    from conftest import images, make_backbone

    backbone, size = make_backbone("swin_tiny_patch4_window7_224")  # torch.fx stores a tensor constant here
    model = wrap(backbone, input_size=(3, size, size)).eval()
    before = set(vars(model.backbone))
    for _ in range(2):
        edge, cloud = split(model, at=0)
    assert set(vars(model.backbone)) == before
    x = images(2, size)
    with torch.no_grad():
        e = edge(x)
        torch.testing.assert_close(cloud(e.features, e.stats).logits[:, -1], model(x).final, rtol=1e-4, atol=1e-5)
