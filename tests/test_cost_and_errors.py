"""FLOP-based exit costs (checked against truncated forwards) and the errors for bad placements."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import images, make_alexnet, make_backbone, spread_thresholds
from torch import nn

from timm_exits import predict, wrap
from timm_exits.core.cost import cumulative_flops, module_flops
from timm_exits.core.placement import _folded_scales, block_points


class _Truncated(nn.Module):
    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x):
        return self.model.forward_intermediates(x, indices=[self.index], stop_early=True, intermediates_only=True)[0]


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto"])
def test_cumulative_flops_equal_truncated_forwards(name):
    kwargs = {"img_size": 96} if "vit" in name else {}
    size = 96 if "vit" in name else 64
    m = timm.create_model(name, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    points = [f["module"] for f in m.feature_info]
    marks, total = cumulative_flops(m, x, points)
    assert total == module_flops(m, (x,))
    for i, p in enumerate(points):
        assert marks[p] == module_flops(_Truncated(m, i), (x,)), p


def test_attention_is_counted():
    x = torch.randn(1, 3, 96, 96)
    fused = timm.create_model("vit_tiny_patch16_224", img_size=96, num_classes=10).eval()
    timm.layers.set_fused_attn(False)
    try:
        unfused = timm.create_model("vit_tiny_patch16_224", img_size=96, num_classes=10).eval()
    finally:
        timm.layers.set_fused_attn(True)
    assert not unfused.blocks[0].attn.fused_attn and fused.blocks[0].attn.fused_attn
    # fvcore counts the explicit matmuls of the unfused path; the SDPA handle must give the same total
    assert module_flops(fused, (x,)) == module_flops(unfused, (x,))


def test_gamma_is_backbone_plus_heads_and_gates():
    m = timm.create_model("resnet18", num_classes=10)
    model = wrap(m, input_size=(3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    names = [e.name for e in model.exits]
    marks, total = cumulative_flops(m, x, names)
    spent = 0
    expected = []
    with torch.no_grad():
        feats = {}
        hooks = [
            m.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: feats.__setitem__(n, o)) for n in names
        ]
        m.eval()(x)
        for h in hooks:
            h.remove()
        for b, n in zip(model.branches, names):
            # linear head: C*K MACs; stats gate MLP: (3(b+1))*32 + 32*1 MACs (biases and pooling are not counted)
            c = feats[n].shape[1]
            spent += c * 10 + 3 * (b.position + 1) * 32 + 32
            expected.append((marks[n] + spent) / total)
    expected.append((total + spent) / total)
    torch.testing.assert_close(model.costs.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.unused = nn.Conv2d(8, 8, 3)
        self.shared = nn.ReLU()
        self.b = nn.Conv2d(8, 8, 3)
        self.split = _DictOut()
        self.pair = _PairOut()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.shared(self.a(x))
        x = self.shared(self.b(x))
        x = self.split(x)["x"]
        x, scale = self.pair(x)
        return self.head(x.mean((2, 3))) * scale


class _DictOut(nn.Module):
    def forward(self, x):
        return {"x": x}


class _PairOut(nn.Module):
    """Returns a tuple, like PiT's stages: the exit reads its first tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv(x), x.mean((1, 2, 3))[:, None]


@pytest.mark.parametrize(
    ("exits", "match"),
    [
        (["a", "nope"], "has no module of that name"),
        (["unused"], "never runs"),
        (["shared"], "runs 2 times"),
        (["split"], "returns dict; an exit needs a"),
        (["b", "a"], "out of order"),
        (["a", "a"], "more than once"),
        (["a", 1], "mixes types"),
        ([], "empty"),
        ("everywhere", "not understood"),
        ("auto", "no `feature_info`"),
        ([0.5], "no `feature_info`"),
    ],
)
def test_placement_errors_toy(exits, match):
    with pytest.raises(ValueError, match=match):
        wrap(_Toy(), exits, num_classes=4, input_size=(3, 16, 16))


def test_tuple_output_exit_reads_first_tensor_and_shrinks_batch():
    from timm_exits import predict
    from timm_exits.inference.hard_exit import run_assigned

    torch.manual_seed(0)
    model = wrap(_Toy(), ["a", "pair"], num_classes=4, input_size=(3, 16, 16)).eval()
    assert model.exits[1].channels == 8 and model.exits[1].layout == "NCHW"
    x = images(6, 16)
    with torch.no_grad():
        out = model(x)
    index = torch.tensor([0, 1, 2, 2, 1, 0])
    expected = torch.stack([out.logits[int(index[i])][i] for i in range(6)])
    torch.testing.assert_close(run_assigned(model, x, index), expected)
    thresholds = spread_thresholds(model, x, "confidence")  # samples leave at every exit: the batch shrinks
    pred = predict(model, x, "confidence", thresholds)
    assert model._batch_shrink_safe is True and pred.stats.batch_shrink
    # the shrinking hard path returns, for each sample, the logits of the exit it took in the full forward
    torch.testing.assert_close(pred.logits, torch.stack([out.logits[int(e)][n] for n, e in enumerate(pred.exit_index)]))
    fires = torch.stack(
        [torch.softmax(lg, -1).amax(-1) >= t for lg, t in zip(out.logits[:-1], thresholds)]
        + [torch.ones(6, dtype=torch.bool)]
    )
    assert pred.exit_index.tolist() == fires.int().argmax(0).tolist()  # each sample's first exit whose rule fires
    assert sorted(set(pred.exit_index.tolist())) == [0, 1, 2]


class _PixelsFirst(nn.Module):
    """Returns (per-pixel rows, per-image map) like TNT's blocks: the exit must read the per-image map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        return y.flatten(2).transpose(1, 2).reshape(-1, 1, 8), y


class _ToyPixels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.block = _PixelsFirst()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        pixels, y = self.block(self.a(x))
        return self.head(y.mean((2, 3)) + pixels.view(x.shape[0], -1, 8).mean(1))


def test_tuple_output_exit_skips_non_batch_first_tensors():
    torch.manual_seed(0)
    model = wrap(_ToyPixels(), ["block"], num_classes=4, input_size=(3, 12, 12)).eval()
    assert model.exits[0].layout == "NCHW" and model.exits[0].channels == 8
    x = images(5, 12)
    with torch.no_grad():
        out = model(x)
    assert out.logits[0].shape == (5, 4)
    from timm_exits import predict

    threshold = spread_thresholds(model, x, "confidence")[0]  # some samples leave at the exit, some run on
    with pytest.warns(UserWarning, match="cannot drop exited samples"):
        pred = predict(model, x, "confidence", threshold)
    assert not pred.stats.batch_shrink
    index = torch.where(torch.softmax(out.logits[0], -1).max(-1).values >= threshold, 0, 1)
    assert torch.equal(pred.exit_index, index) and sorted(set(index.tolist())) == [0, 1]
    # the masked hard path returns, for each sample, the logits of the exit it took in the full forward
    torch.testing.assert_close(pred.logits, torch.stack([out.logits[int(e)][n] for n, e in enumerate(index)]))


def test_placement_errors_timm():
    m = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match="Did you mean"):
        wrap(m, ["layer_1"], input_size=(3, 64, 64))
    with pytest.raises(ValueError, match="last branch point"):
        wrap(m, ["layer4"], input_size=(3, 64, 64))
    byob = timm.create_model("test_byobnet", num_classes=10)  # its last point is an identity `final_conv`
    with pytest.raises(ValueError, match="last branch point"):
        wrap(byob, ["stages.1", "stages.3"], input_size=(3, 64, 64))
    with pytest.raises(ValueError, match="after the last branch point"):
        wrap(m, ["layer2", "fc"], input_size=(3, 64, 64))
    with pytest.raises(ValueError, match="out of range"):
        wrap(m, [1, 9], input_size=(3, 64, 64))
    with pytest.raises(ValueError, match=r"outside \(0, 1\)"):
        wrap(m, [0.5, 1.5], input_size=(3, 64, 64))
    with pytest.raises(ValueError, match="place two exits"):
        wrap(m, [0.5, 0.51], input_size=(3, 64, 64))
    with pytest.raises(TypeError, match=r"exits=5 is not understood; .*\(one exit: exits=\[5\]\)"):
        wrap(m, 5, input_size=(3, 64, 64))
    ref = [b.name for b in wrap(timm.create_model("resnet18", num_classes=10), [1, 2], input_size=(3, 64, 64)).branches]
    for same in (np.array([1, 2]), torch.tensor([1, 2]), [np.int64(1), np.int64(2)]):  # numpy and torch indices
        fresh = timm.create_model("resnet18", num_classes=10)
        assert [b.name for b in wrap(fresh, same, input_size=(3, 64, 64)).branches] == ref == ["layer1", "layer2"]
    with pytest.raises(ValueError, match="already wrapped"):
        wrap(wrap(m, input_size=(3, 64, 64)))
    assert all(len(mod._forward_hooks) == 1 for mod in [m.layer1, m.layer2, m.layer3])


def test_input_errors():
    model = wrap(make_alexnet(), ["features.2"], input_size=(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="1 channels"):
        model(images(2, 64, channels=1))
    with pytest.raises(ValueError, match="empty batch"):
        model(images(2, 64)[:0])
    backbone = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"shape \(1, 1, 32, 32\) failed \(RuntimeError: .*pass the input_size"):
        wrap(backbone, input_size=(1, 32, 32))
    assert sum(len(m._forward_hooks) for m in backbone.modules()) == 0


def test_feature_info_names_that_miss_the_module_are_mapped():
    """Twins' (and MViTv2's) feature_info says `block.i`; the stages are `blocks.i` (`stages.i`)."""
    torch.manual_seed(0)
    m = timm.create_model(
        "twins_svt_small",
        num_classes=10,
        img_size=64,
        embed_dims=(16, 32, 64, 128),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 4, 8),
        wss=(4, 4, 4, 4),
        sr_ratios=(8, 4, 2, 1),
    )
    assert [f["module"] for f in m.feature_info] == ["block.0", "block.1", "block.2", "block.3"]
    model = wrap(m, "auto", input_size=(3, 64, 64))
    # each stage is a ModuleList that never runs itself: the exit sits on its last block
    assert [e.name for e in model.exits] == ["blocks.0.0", "blocks.1.0", "blocks.2.1"]
    assert [e.layout for e in model.exits] == ["NLC"] * 3
    out = model(torch.randn(2, 3, 64, 64))
    assert len(out.logits) == 4 and all(t.shape == (2, 10) for t in out.logits)
    assert [f["module"] for f in m.feature_info] == ["block.0", "block.1", "block.2", "block.3"], "left untouched"


def test_feature_info_names_one_level_down_are_found():
    """Gemma4 ViT's feature_info says `blocks.i`; the blocks are `encoder.blocks.i`."""
    torch.manual_seed(0)
    m = timm.create_model(
        "gemma4_vit_167m", num_classes=10, img_size=64, embed_dim=64, depth=4, num_heads=2, head_dim=32
    )
    assert m.feature_info[0]["module"] == "blocks.0" and "blocks.0" not in dict(m.named_modules())
    model = wrap(m, "auto", input_size=(3, 64, 64))
    assert [e.name for e in model.exits] == ["encoder.blocks.0", "encoder.blocks.1", "encoder.blocks.2"]
    out = model(torch.randn(2, 3, 64, 64))
    assert all(t.shape == (2, 10) for t in out.logits)


def test_point_whose_tensor_passes_through_the_last_stage_is_kept():
    """CoaT's parallel blocks (its last branch point) return the first scale's tokens untouched, so
    the same tensor object is serial_blocks1's output and the first item of the last point's output;
    serial_blocks1 is still a real branch point (it was dropped as a copy of the final point)."""
    torch.manual_seed(0)
    m = timm.create_model(
        "coat_tiny",
        num_classes=10,
        img_size=64,
        embed_dims=(32, 32, 32, 32),
        serial_depths=(1, 1, 1, 1),
        parallel_depth=1,
        num_heads=8,
    )
    model = wrap(m, "auto", input_size=(3, 64, 64)).eval()
    assert [e.name for e in model.exits] == [f"serial_blocks{i}.0" for i in (1, 2, 3, 4)]
    x = images(3, 64)
    # CoaT's later scales read earlier, full-batch tensors: the one-off check finds the batch cannot
    # shrink mid-network and says so
    with pytest.warns(UserWarning, match="CoaT cannot drop exited samples mid-network.*falls back to masking"):
        pred = predict(model, x, "gate", 0.0)  # everything leaves at the exit: the parallel blocks never run
    assert model._batch_shrink_safe is False
    with torch.no_grad():
        full = model(x)
    assert pred.exit_index.tolist() == [0, 0, 0]
    torch.testing.assert_close(pred.logits, full.logits[0], rtol=1e-4, atol=1e-5)


def test_scales_folded_into_one_module_get_their_own_stages():
    """coat_small's feature_info names `parallel_blocks` for scales 2-4 and its only other point is
    below the cost floor; "auto" finds the serial stages of those scales (they run before the
    parallel blocks), "blocks" lists their blocks, and a feature_info index of a ModuleList stage
    resolves to its last block."""
    torch.manual_seed(0)
    m = timm.create_model("coat_small", num_classes=10, img_size=64)
    info = [f["module"] for f in m.feature_info]
    assert info == ["serial_blocks1", "parallel_blocks", "parallel_blocks", "parallel_blocks"]
    model = wrap(m, "auto", input_size=(3, 64, 64))
    names = ["serial_blocks2.1", "serial_blocks3.1", "serial_blocks4.1"]
    assert [e.name for e in model.exits] == names
    costs = [e.backbone_cost for e in model.exits]
    assert 0.15 <= costs[0] < costs[1] < costs[2] < 1.0
    out = model(images(2, 64))
    out.log_probs.sum().backward()
    assert all(t.shape == (2, 10) for t in out.logits)
    assert all(p.grad is not None for p in model.branches[0].head.parameters())
    backbone = model.unwrap()
    blocks = block_points(backbone)
    assert blocks[:4] == ["serial_blocks1.0", "serial_blocks1.1", "serial_blocks2.0", "serial_blocks2.1"]
    assert blocks.index("serial_blocks4.1") < blocks.index("parallel_blocks.0")
    by_index = wrap(backbone, [0], input_size=(3, 64, 64))
    assert [e.name for e in by_index.exits] == ["serial_blocks1.1"]
    by_index.unwrap()
    explicit = wrap(backbone, names, input_size=(3, 64, 64))
    assert [e.name for e in explicit.exits] == names


def test_folded_scales_inside_a_submodule():
    """The stages that a repeated `feature_info` entry stands for are found under its own parent
    (here `body`), in registration order, and only stage containers count."""

    def stage(c: int) -> nn.Sequential:
        return nn.Sequential(*[nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()) for _ in range(2)])

    body = nn.Module()
    body.stage1, body.stage2, body.norm, body.stage3, body.fused = stage(4), stage(4), nn.Identity(), stage(4), stage(4)
    model = nn.Module()
    model.stem, model.body = nn.Conv2d(3, 4, 3), body
    names = ["body.stage1", "body.fused", "body.fused", "body.fused"]
    assert _folded_scales(model, names) == ["body.stage1", "body.stage2", "body.stage3", "body.fused"]
    assert _folded_scales(model, ["body.stage1", "body.stage2"]) == ["body.stage1", "body.stage2"]
    assert _folded_scales(model, ["stem", "body.fused", "body.fused"]) == ["stem", "body.fused"]


# ------------------------------------------------------------------ prefix tokens, final heads, hooks
def test_exits_before_the_class_token_average_every_token_and_later_ones_read_it():
    torch.manual_seed(0)
    cait = timm.create_model("cait_xxs24_224", num_classes=10, img_size=64, depth=6)
    model = wrap(cait, input_size=(3, 64, 64)).eval()
    assert cait.num_prefix_tokens == 1 and cait.global_pool == "token"
    seen = {}
    handle = cait.get_submodule(model.exits[0].name).register_forward_hook(lambda m, i, o: seen.setdefault("t", o))
    x = images(2, 64)
    with torch.no_grad():
        out = model(x)
    handle.remove()
    tokens = seen["t"]  # (2, 16, C): the 4x4 patch grid, no class token yet
    assert tokens.shape[1] == 16
    head = model.branches[0].head
    assert (head.pool.num_prefix_tokens, head.pool.token_pool) == (0, "avg")
    with torch.no_grad():  # the reference: the mean of all 16 tokens, not the first patch token
        ref = head.fc(head.norm(tokens.mean(1)))
    torch.testing.assert_close(out.logits[0], ref, rtol=1e-4, atol=1e-5)
    assert wrap(
        timm.create_model("cait_xxs24_224", num_classes=10, img_size=64, depth=6), head="conv", input_size=(3, 64, 64)
    )(x).logits[0].shape == (2, 10)  # a 4x4 grid: the conv head works
    vit, size = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=96), 96
    pool = wrap(vit, input_size=(3, size, size)).branches[0].head.pool
    assert (pool.num_prefix_tokens, pool.token_pool) == (1, "token")  # ViT's class token from the start


def test_a_headless_nhwc_backbone_gets_a_final_head_over_its_real_channels():
    torch.manual_seed(0)
    backbone = timm.create_model("test_mambaout", num_classes=0, global_pool="")
    model = wrap(backbone, num_classes=7, input_size=(3, 64, 64)).eval()
    x = images(2, 64)
    with torch.no_grad():
        feats = backbone(x)  # (B, H, W, head_hidden_size)
        logits = model(x).final
        head = model.final_head
        ref = torch.nn.functional.linear(feats.mean((1, 2)), head.weight, head.bias)  # mean over H and W
    assert feats.shape[-1] == backbone.head_hidden_size != backbone.num_features
    assert (head.in_features, head.pool.layout) == (backbone.head_hidden_size, "NHWC")
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)


def test_a_failed_flop_trace_leaves_no_hook_and_says_why():
    from dataclasses import dataclass

    @dataclass
    class Out:
        logits: torch.Tensor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return Out(self.fc(self.features(x).mean((2, 3))))

    net = Net()
    with pytest.raises(ValueError, match=r"fvcore could not trace Net to measure its FLOPs .*costs=\[\.\.\.\]"):
        wrap(net, exits=["features.1"], input_size=(3, 16, 16))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()) == 0


@pytest.mark.parametrize(
    ("name", "kwargs"), [("test_convnext", {}), ("test_vit", {}), ("resnet18", {"num_classes": 10})]
)
def test_features_only_models_are_refused_clearly(name, kwargs):
    """A features_only model is refused whether or not num_classes is given, whatever its feature class."""
    m = timm.create_model(name, features_only=True)
    with pytest.raises(ValueError, match=r"features_only model returns a list of maps and cannot be wrapped"):
        wrap(m, **kwargs)
    assert sum(len(x._forward_hooks) for x in m.modules()) == 0


def test_wrap_and_reset_classifier_check_what_they_are_given():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"thresholds=\[0.9\] must hold one value per early exit; the exits placed"):
        wrap(timm.create_model("resnet18", num_classes=10), input_size=(3, 32, 32), thresholds=[0.9])
    with pytest.raises(ValueError, match=r"features_only model returns a list of maps and cannot be wrapped"):
        wrap(timm.create_model("resnet18", features_only=True), num_classes=10, input_size=(3, 32, 32))
    hiera = timm.create_model("hiera_tiny_224", num_classes=10, embed_dim=32, num_heads=1, stages=(1, 1, 2, 1))
    with pytest.raises(ValueError, match=r"head='conv' needs a spatial grid; Hiera's tokens are in mask-unit order"):
        wrap(hiera, head="conv")
    model = wrap(timm.create_model("resnet18", num_classes=10), input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r"num_classes=0: every exit predicts classes"):
        model.reset_classifier(0)
    model.reset_classifier(1000)  # measured costs are measured again: the classifiers' FLOPs changed
    fresh = wrap(timm.create_model("resnet18", num_classes=1000), input_size=(3, 32, 32))
    assert model.exit_costs.tolist() == fresh.exit_costs.tolist() and model.config.costs is None
    assert model(images(2, 32)).final.shape == (2, 1000)
    given = wrap(timm.create_model("resnet18", num_classes=10), input_size=(3, 32, 32), costs=[0.3, 0.5, 0.8, 1.0])
    given.reset_classifier(5)
    assert given.exit_costs.tolist() == pytest.approx([0.3, 0.5, 0.8, 1.0]) and given.config.costs == [
        0.3,
        0.5,
        0.8,
        1.0,
    ]


# ------------------------------------------------------------------ blocks: what a block is, and its layout
class _Unit(nn.Sequential):
    def __init__(self, c: int = 8):
        super().__init__(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())


class _OneOrMany(nn.Module):
    """Three repeated composite children, wired one after another ("chain") or as the parts of one block."""

    def __init__(self, wiring: str):
        super().__init__()
        self.wiring, self.a, self.b, self.c = wiring, _Unit(), _Unit(), _Unit()

    def forward(self, x):
        if self.wiring == "chain":
            return self.c(self.b(self.a(x)))
        if self.wiring == "parallel":  # Inception's branches
            return self.a(x) + self.b(x) + self.c(x)
        if self.wiring == "residual":  # Mixer's and ReXNet's sub-layers
            x = x + self.a(x)
            x = x + self.b(x)
            return x + self.c(x)
        return torch.cat([x, self.c(self.b(self.a(x)))], 1)[:, :8]  # a chain whose output the stage reworks


class _StagedNet(nn.Module):
    def __init__(self, wiring: str):
        super().__init__()
        self.stem, self.s1, self.s2 = nn.Conv2d(3, 8, 3, padding=1), _OneOrMany(wiring), nn.Sequential(_Unit(), _Unit())
        self.head = nn.Linear(8, 4)
        self.feature_info = [{"module": m, "num_chs": 8, "reduction": 1} for m in ("stem", "s1", "s2")]

    def forward(self, x):
        return self.head(self.s2(self.s1(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize(
    ("wiring", "s1_points"),
    [("chain", ["s1.a", "s1.b", "s1.c"]), ("parallel", ["s1"]), ("residual", ["s1"]), ("reworked", ["s1"])],
)
def test_block_points_descend_only_into_stages_whose_children_run_one_after_another(wiring, s1_points):
    torch.manual_seed(0)
    assert block_points(_StagedNet(wiring)) == ["stem", *s1_points, "s2.0", "s2.1"]


def test_blocks_of_real_models_are_whole_blocks():
    """A Mixer block, an Inception mixed block and a ReXNet bottleneck are one point each (not their token
    MLP, branches or convs); RegNet's stages are chains of blocks, one point per block."""
    torch.manual_seed(0)
    mixer = timm.models.mlp_mixer.MlpMixer(num_classes=4, img_size=64, patch_size=16, num_blocks=4, embed_dim=32)
    model = wrap(mixer, "blocks", input_size=(3, 64, 64))
    assert [e.name for e in model.exits] == [f["module"] for f in mixer.feature_info][:-1]
    assert [(e.layout, e.channels) for e in model.exits] == [("NLC", 32)] * 3
    inception = timm.create_model("inception_v3", num_classes=4)
    assert block_points(inception, images(1, 80)) == [f["module"] for f in inception.feature_info]
    rexnet = timm.create_model("rexnet_100", num_classes=4)
    bottlenecks = [n for n, m in rexnet.named_modules() if type(m).__name__ == "LinearBottleneck"]
    assert block_points(rexnet, images(1, 32)) == bottlenecks
    regnet = timm.create_model("regnetx_002", num_classes=4)
    assert [n for n in block_points(regnet, images(1, 32)) if n.startswith("s4")] == [
        f"s4.{n}" for n, _ in regnet.s4.named_children()
    ]


def test_blocks_keep_their_own_layout_inside_stages_that_return_another():
    """swinv2_cr's stages return NCHW maps, their blocks NHWC ones: a block exit takes its stage's width
    and pools over the block's own spatial axes; one whose map fits both layouts follows its class."""
    torch.manual_seed(0)
    m = timm.create_model(
        "swinv2_cr_tiny_224", num_classes=4, img_size=(64, 64), embed_dim=24, depths=(1, 2, 2, 1),
        num_heads=(1, 1, 2, 2), window_size=4,
    )  # fmt: skip
    widths = {f["module"]: f["num_chs"] for f in m.feature_info}
    model = wrap(m, "blocks", input_size=(3, 64, 64)).eval()
    assert len(model.exits) == 6
    seen = {}
    hooks = [
        m.get_submodule(e.name).register_forward_hook(lambda _m, _i, o, n=e.name: seen.__setitem__(n, o))
        for e in model.exits
    ]
    with torch.no_grad():
        model(images(2, 64))
    for h in hooks:
        h.remove()
    for e, branch in zip(model.exits, model.branches):
        width = widths[e.name.rpartition(".blocks.")[0]]
        assert (e.layout, e.channels, seen[e.name].shape[-1]) == ("NHWC", width, width)
        torch.testing.assert_close(branch.head.pool(seen[e.name]), seen[e.name].mean((1, 2)))
    narrow = timm.create_model(
        "swinv2_cr_tiny_224", num_classes=4, img_size=(64, 64), embed_dim=16, depths=(1, 2, 2, 1),
        num_heads=(1, 1, 2, 2), window_size=4,
    )  # fmt: skip
    # stages.0.blocks.0 returns 16 channels on a 16 x 16 grid in a stage of 16: read as its class's other blocks
    model = wrap(narrow, "blocks", input_size=(3, 64, 64))
    assert [(e.name, e.layout, e.channels) for e in model.exits][:2] == [
        ("stages.0.blocks.0", "NHWC", 16), ("stages.1.blocks.0", "NHWC", 32)
    ]  # fmt: skip


def test_a_square_map_of_another_width_than_its_stage_is_read_as_the_backbones_maps():
    """densenet121 at growth rate 8: a dense layer adds 8 channels on an 8 x 8 grid, which neither its
    block's width (128) nor its sizes tell apart; densenet's maps are NCHW, and so is the layer read."""
    m, size = make_backbone("densenet121")
    model = wrap(m, ["features.denseblock2.denselayer3"], input_size=(3, size, size))
    assert [(e.layout, e.channels) for e in model.exits] == [("NCHW", 8)]
    seen = {}
    hook = m.features.denseblock2.denselayer3.register_forward_hook(lambda _m, _i, o: seen.__setitem__("o", o))
    with torch.no_grad():
        model.eval()(images(2, size))
    hook.remove()
    assert seen["o"].shape == (2, 8, 8, 8)
    torch.testing.assert_close(model.branches[0].head.pool(seen["o"]), seen["o"].mean((2, 3)))


class _Maps(nn.Module):
    """No feature_info: `square` returns (B, 8, 8, 8) for a 16 x 16 input, `nhwc` (B, 8, 8, 12)."""

    def __init__(self):
        super().__init__()
        self.square, self.nhwc, self.head = nn.Conv2d(3, 8, 3, 2, 1), nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x):
        x = self.nhwc(self.square(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


def test_a_map_without_a_channel_count_is_read_by_its_spatial_sizes_or_refused():
    model = wrap(_Maps(), ["nhwc"], num_classes=4, input_size=(3, 16, 16))
    assert [(e.layout, e.channels) for e in model.exits] == [("NHWC", 12)]
    model.unwrap()
    both = r"exit 'square': its output of shape \(1, 8, 8, 8\) reads as NCHW and as NHWC alike .*layouts=\{'square'"
    with pytest.raises(ValueError, match=both):
        wrap(_Maps(), ["square", "nhwc"], num_classes=4, input_size=(3, 16, 16))
    model = wrap(_Maps(), ["square", "nhwc"], num_classes=4, input_size=(3, 16, 16), layouts={"square": "NCHW"})
    assert [(e.layout, e.channels) for e in model.exits] == [("NCHW", 8), ("NHWC", 12)]
