"""Wrapping: the backbone stays untouched, exits attach by hooks, and the exits train."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import BACKBONES, images, make_alexnet, make_backbone
from timm.optim import create_optimizer_v2

import timm_exits
from timm_exits import SoftConditionalLoss, wrap


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _train_steps(model, x, y, steps: int = 4) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = SoftConditionalLoss(cost_weight=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(BACKBONES))
def test_wrap_train_unwrap_deepcopy(name):
    backbone, size = make_backbone(name)
    reference = copy.deepcopy(backbone).eval()
    before = _snapshot(backbone)
    model = wrap(backbone, exits="auto", input_size=(3, size, size))
    assert _same_state(before, _snapshot(backbone)), "wrapping changed the backbone"
    assert model.backbone is backbone
    assert len(model.exits) >= 1 and all(e.cost is not None for e in model.exits)

    x, y = images(4, size), torch.arange(4) % 10
    # The backbone's own forward is unchanged while wrapped.
    backbone.eval()
    with torch.no_grad():
        assert torch.equal(backbone(x), reference(x))

    model.train()
    out = model(x)
    assert len(out.logits) == model.num_exits
    assert all(f.shape == (4, 10) for f in out.logits)
    assert out.gate_logits.shape == (4, model.num_exits - 1)
    assert torch.isfinite(out.log_probs).all() and torch.isfinite(out.expected_cost).all()

    losses = _train_steps(model, x, y)
    assert losses[-1] < losses[0], losses

    # deepcopy (timm's EMA) gets its own, working hooks.
    twin = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        a, b = model(x), twin(x)
    for fa, fb in zip(a.logits, b.logits):
        torch.testing.assert_close(fa, fb)
    trained = _snapshot(backbone)
    gone = model.unwrap()
    assert gone is backbone and _hook_count(gone) == 0
    assert _same_state(trained, _snapshot(gone))
    assert _hook_count(twin.backbone) == len(twin.branches)


def test_deepcopy_hooks_write_into_the_copy():
    backbone, size = make_backbone("resnet18")
    model = wrap(backbone, input_size=(3, size, size))
    twin = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = None
    twin(images(2, size)).log_probs.sum().backward()
    assert all(p.grad is None for p in model.parameters()), "the copy's hooks fed the original's exits"
    assert all(p.grad is not None for p in twin.branches.parameters() if p.requires_grad and p.ndim > 1)


def test_unwrap_gives_original_model_bit_for_bit():
    backbone, size = make_backbone("vit_tiny_patch16_224")
    before = _snapshot(backbone)
    original_hooks = _hook_count(backbone)
    model = wrap(backbone, exits="blocks", input_size=(3, size, size))
    assert _hook_count(backbone) == original_hooks + len(model.exits)
    assert model.unwrap() is backbone
    assert _hook_count(backbone) == original_hooks
    assert _same_state(before, _snapshot(backbone))


@pytest.mark.parametrize("costs", [[0.1], [-1.0, 0.5, 0.7, 1.0]])
def test_a_failed_wrap_leaves_the_backbone_without_hooks(costs):
    backbone, size = make_backbone("resnet18")
    before, hooks = _snapshot(backbone), _hook_count(backbone)
    with pytest.raises(ValueError, match="costs"):
        wrap(backbone, costs=costs, input_size=(3, size, size))
    assert _hook_count(backbone) == hooks and _same_state(before, _snapshot(backbone))


@pytest.mark.parametrize("train", [True, False])
def test_the_exits_take_the_backbones_mode_and_leave_its_modules_alone(train):
    backbone, size = make_backbone("resnet18")
    backbone.train(train)
    backbone.layer2.train(not train)  # a mixed mode wrap must keep
    model = wrap(backbone, input_size=(3, size, size), drop_rate=0.5)
    assert model.training == train and all(m.training == train for m in model.branches.modules())
    assert backbone.training == train and backbone.layer2.training == (not train)
    if not train:  # no exit dropout in eval: two forwards agree
        x = images(2, size)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits[0], model(x).logits[0], rtol=0, atol=0)


def test_unwrap_removes_only_its_own_hooks_and_copies_keep_theirs():
    backbone, size = make_backbone("resnet18")
    seen = []
    user = backbone.layer1.register_forward_hook(lambda mod, i, o: seen.append(o.shape[0]))
    model = wrap(backbone, exits=["layer1", "layer2"], input_size=(3, size, size)).eval()
    twin = copy.deepcopy(model)
    x = images(2, size)
    with torch.no_grad():
        ref = twin(x).logits[0]
        model.unwrap()
        assert len(backbone.layer1._forward_hooks) == 1 and len(backbone.layer2._forward_hooks) == 0
        seen.clear()
        backbone(x)
        assert seen == [2], "unwrap removed the user's hook"
        # the copy's hooks live on the copy's modules and survive the original's unwrap
        assert len(twin.backbone.layer1._forward_hooks) == 2 and len(twin.backbone.layer2._forward_hooks) == 1
        torch.testing.assert_close(twin(x).logits[0], ref)
        twin.unwrap()
        assert len(twin.backbone.layer1._forward_hooks) == 1 and len(twin.backbone.layer2._forward_hooks) == 0
    user.remove()


def test_wrap_copies_the_callers_config():
    backbone, size = make_backbone("resnet18")
    saved = wrap(backbone, exits=[1, 2], head="mlp", input_size=(3, size, size)).config
    saved.exits = [1, 2]  # feature_info indices: wrap resolves them to module names
    caller = copy.deepcopy(saved)
    model = wrap(make_backbone("resnet18")[0], config=caller, num_classes=10)
    assert caller == saved and caller.exits == [1, 2] and caller.costs is None
    assert model.config is not caller and model.config.exits == ["layer1", "layer2"]
    assert model.config.head == "mlp"
    model.set_costs([0.3, 0.6, 1.1])
    model.reset_classifier(5)
    assert caller == saved


def test_config_from_older_json_with_empty_extra():
    d = timm_exits.ExitConfig(exits=["layer1"], num_classes=10).to_dict()
    assert "extra" not in d
    assert timm_exits.ExitConfig.from_dict({**d, "extra": {}}) == timm_exits.ExitConfig.from_dict(d)
    with pytest.raises(ValueError, match="unknown exit config keys"):
        timm_exits.ExitConfig.from_dict({**d, "extra": {"a": 1}})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"policy": "bogus"}, r"policy='bogus' is not an exit policy"),
        ({"thresholds": [0.5]}, r"one value in \[0, 1\] per early exit \(3\)"),
        ({"thresholds": [0.5, 0.5, 2.0]}, r"one value in \[0, 1\] per early exit"),
        ({"policy": "soft", "thresholds": [0.5] * 3}, "policy 'soft' takes no thresholds"),
        ({"layouts": {"layer1": "XYZ"}}, r"layouts \{'layer1': 'XYZ'\} are not layouts"),
        ({"input_size": [32, 32]}, r"must be \(C, H, W\)"),
        ({"input_size": "224"}, r"input_size='224' must be \(C, H, W\) with positive integer sizes"),
        ({"exits": "layer1"}, r"exits='layer1' must be a list of module names"),
        ({"num_classes": 10.0}, r"num_classes=10.0 must be an integer of at least 0"),
        ({"head_hidden": -5}, r"head_hidden=-5 must be an integer of at least 1"),
        ({"gate_bias": "-2"}, r"gate_bias='-2' must be a finite number"),
        ({"drop_rate": "0.1"}, r"drop_rate='0.1' must be a number in \[0, 1\]"),
        ({"detach_gate_inputs": "no"}, r"detach_gate_inputs='no' must be True or False"),
        ({"layouts": "NCHW"}, r"layouts='NCHW' must map module names to layouts"),
        ({"thresholds": ["a", "b", "c"]}, r"one value in \[0, 1\] per early exit \(3\)"),
        ({"costs": [0.1, 1.0]}, r"costs=\[0.1, 1.0\] must hold one finite, non-negative value per exit.*\(4\)"),
        ({"costs": "abcd"}, r"costs='abcd' must hold one finite, non-negative value"),
        ({"token_pool": "cls"}, r"token_pool='cls' is not a pooling"),
    ],
)
def test_a_config_that_cannot_work_is_refused_when_built(change, message):
    good = {"exits": ["layer1", "layer2", "layer3"], "num_classes": 10, "policy": "gate", "thresholds": [0.5] * 3}
    timm_exits.ExitConfig.from_dict(good)
    with pytest.raises(ValueError, match=message):
        timm_exits.ExitConfig.from_dict({**good, **change})


def test_numpy_values_in_a_config_become_python_numbers():
    cfg = timm_exits.ExitConfig(
        exits=np.array(["layer1", "layer2", "layer3"]),
        num_classes=np.int64(10),
        gate_bias=np.float32(-1.5),
        thresholds=[np.float32(0.5)] * 3,
        costs=np.array([0.25, 0.5, 0.75, 1.0], dtype=np.float32),
        input_size=np.array([3, 32, 32]),
    )
    assert cfg.thresholds == [0.5] * 3 and cfg.costs == [0.25, 0.5, 0.75, 1.0] and cfg.input_size == (3, 32, 32)
    values = [cfg.num_classes, cfg.gate_bias, *cfg.thresholds, *cfg.costs, *cfg.input_size, *cfg.exits]
    assert {type(v) for v in values} == {int, float, str}
    cfg.thresholds = np.full(3, 0.25, dtype=np.float32)  # set after the config was built
    assert timm_exits.ExitConfig.from_json(cfg.to_json()).thresholds == [0.25] * 3


def test_state_dict_round_trip():
    a, size = make_backbone("resnet18", seed=0)
    b, _ = make_backbone("resnet18", seed=1)
    ma, mb = wrap(a, input_size=(3, size, size)), wrap(b, input_size=(3, size, size))
    mb.load_state_dict(ma.state_dict())
    ma.eval(), mb.eval()
    x = images(3, size)
    with torch.no_grad():
        oa, ob = ma(x), mb(x)
    for fa, fb in zip(oa.logits, ob.logits):
        assert torch.equal(fa, fb)
    assert torch.equal(oa.log_probs, ob.log_probs)
    assert {k for k in ma.state_dict() if k.startswith("backbone.")} == {f"backbone.{k}" for k in a.state_dict()}


def test_alexnet_explicit_exits():
    net = make_alexnet()
    before = _snapshot(net)
    model = wrap(net, exits=["features.2", "features.5", "features.12"], input_size=(3, 96, 96))
    assert [e.name for e in model.exits] == ["features.2", "features.5", "features.12"]
    assert [e.layout for e in model.exits] == ["NCHW"] * 3
    assert [e.channels for e in model.exits] == [64, 192, 256]
    x, y = images(4, 96), torch.arange(4)
    losses = _train_steps(model, x, y)
    assert losses[-1] < losses[0]
    copy.deepcopy(model)(x)
    trained = _snapshot(net)
    assert _hook_count(model.unwrap()) == 0 and _same_state(trained, _snapshot(net))
    assert before.keys() == trained.keys()
    with pytest.raises(ValueError, match="no `feature_info`"):
        wrap(make_alexnet(), exits="auto", input_size=(3, 96, 96))


def test_placement_rules_resnet18():
    m, size = make_backbone("resnet18")
    auto = wrap(m, "auto", input_size=(3, 224, 224))
    # act1 (6.6 % of FLOPs) is below the 15 % stem rule; layer4 is the last branch point.
    assert [e.name for e in auto.exits] == ["layer1", "layer2", "layer3"]
    assert [round(e.backbone_cost, 2) for e in auto.exits] == [0.32, 0.55, 0.77]
    auto.unwrap()
    blocks = wrap(m, "blocks", input_size=(3, 224, 224))
    assert [e.name for e in blocks.exits] == [
        "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0"
    ]  # fmt: skip
    blocks.unwrap()
    idx = wrap(m, [1, 3], input_size=(3, size, size))
    assert [e.name for e in idx.exits] == ["layer1", "layer3"]
    idx.unwrap()
    frac = wrap(m, [0.25, 0.5, 0.75], input_size=(3, 224, 224))
    costs = [e.backbone_cost for e in frac.exits]
    # each fraction lands on the block whose cumulative cost is nearest
    # layer2.1 (0.55) is nearer 0.5 than layer2.0 (0.43)
    assert [e.name for e in frac.exits] == ["layer1.0", "layer2.1", "layer3.1"]
    for target, got in zip([0.25, 0.5, 0.75], costs):
        assert abs(got - target) < 0.08
    frac.unwrap()


def test_a_set_of_exit_names_is_placed_in_run_order():
    """A set has no order of its own (it iterates in hash order): its exits go in the order they run."""
    m = timm.create_model("resnet18")
    names = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0"]
    for request in (set(names), frozenset(names)):
        model = wrap(m, request, input_size=(3, 32, 32))
        assert model.config.exits == names and [e.name for e in model.exits] == names
        model.unwrap()
    assert sum(len(x._forward_hooks) for x in m.modules()) == 0


def test_auto_on_isotropic_vit_keeps_three_exits():
    m, size = make_backbone("vit_tiny_patch16_224")
    model = wrap(m, "auto", input_size=(3, size, size))
    costs = [e.backbone_cost for e in model.exits]
    assert len(costs) == 3 and all(abs(c - t) < 0.06 for c, t in zip(costs, [0.25, 0.5, 0.75]))
    assert all(e.layout == "NLC" for e in model.exits)


def test_layouts_detected():
    swin, s = make_backbone("swin_tiny_patch4_window7_224")
    assert {e.layout for e in wrap(swin, input_size=(3, s, s)).exits} == {"NHWC"}
    mo, s = make_backbone("test_mambaout")
    assert {e.layout for e in wrap(mo, input_size=(3, s, s)).exits} == {"NHWC"}
    r, s = make_backbone("resnet18")
    assert {e.layout for e in wrap(r, input_size=(3, s, s)).exits} == {"NCHW"}


def test_layout_overrides_must_name_an_exit_and_fit_its_tensor():
    r, s = make_backbone("resnet18")
    unknown = r"layouts= names \['layer9'\], which are not among the exits placed \['layer1', 'layer2', 'layer3'\]"
    with pytest.raises(ValueError, match=unknown):
        wrap(r, input_size=(3, s, s), layouts={"layer9": "NHWC"})
    rank = (
        r"layouts\['layer2'\]='NLC' needs a 3-D tensor, but 'layer2' returns one of shape \(1, 128, 8, 8\); give NCHW"
    )
    with pytest.raises(ValueError, match=rank):
        wrap(r, input_size=(3, s, s), layouts={"layer2": "NLC"})
    model = wrap(r, input_size=(3, s, s), layouts={"layer2": "NHWC"})
    assert [(e.layout, e.channels) for e in model.exits] == [("NCHW", 64), ("NHWC", 8), ("NCHW", 256)]
    assert model.config.layouts == {"layer2": "NHWC"} and _hook_count(model.unwrap()) == 0


def test_token_exits_pool_like_the_backbone():
    m, size = make_backbone("vit_tiny_patch16_224")
    model = wrap(m, [0.5], input_size=(3, size, size))
    pool = model.branches[0].head.pool
    assert m.global_pool == "token" and pool.token_pool == "token" and pool.num_prefix_tokens == 1
    t = torch.randn(2, 1 + 36, 192)
    assert torch.equal(pool(t), t[:, 0])
    avg = timm.create_model("vit_tiny_patch16_224", img_size=96, global_pool="avg", num_classes=10)
    model = wrap(avg, [0.5], input_size=(3, 96, 96))
    pool = model.branches[0].head.pool
    assert pool.token_pool == "avg" and model.config.token_pool == "avg"
    torch.testing.assert_close(pool(t), t[:, 1:].mean(1))
    chosen = wrap(model.unwrap(), [0.5], input_size=(3, 96, 96), token_pool="token")  # the config's choice wins
    assert chosen.branches[0].head.pool.token_pool == "token"


def _capture_branch_inputs(model) -> dict[str, torch.Tensor]:
    """Record each exit's branch-point tensor (the backbone module's output) during a forward."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.backbone.named_modules())
    for b in model.branches:
        modules[b.name].register_forward_hook(lambda mod, inp, out, name=b.name: captured.__setitem__(name, out))
    return captured


def _reference_head(head, x: torch.Tensor, kind: str, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled features) of an exit head, recomputed with plain functional ops."""
    if kind == "conv":
        conv, bn = head.conv[0], head.conv[1]
        assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.out_channels == hidden
        x = F.conv2d(x, conv.weight, padding=1)
        x = F.relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps))
    feats = x.mean((2, 3))
    if kind == "mlp":
        linear = head.hidden[0]
        assert isinstance(linear, torch.nn.Linear) and linear.out_features == hidden
        feats = F.gelu(feats @ linear.weight.T + linear.bias)
    return feats @ head.fc.weight.T + head.fc.bias, feats


def _reference_stats(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, -1)
    top2 = p.topk(2, -1).values
    entropy = -(p * p.log()).sum(-1) / math.log(logits.shape[-1])
    return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1]], -1)


@pytest.mark.parametrize("head", ["linear", "mlp", "conv"])
@pytest.mark.parametrize("gate", ["stats", "features", "both"])
def test_head_and_gate_types(head, gate):
    m, size = make_backbone("resnet18")
    model = wrap(m, head=head, gate=gate, input_size=(3, size, size))
    captured = _capture_branch_inputs(model)
    out = model(images(2, size))
    out.log_probs.sum().backward()
    assert all(torch.isfinite(f).all() for f in out.logits)
    # gates start closed (bias -2) so early exits do not take everything at step 0
    assert (out.gates[:, :-1] < 0.5).all() and (out.gates[:, -1] == 1).all()

    # each exit is built as asked: head and gate of the requested kind, with the input widths they read
    hidden = model.config.head_hidden
    model.eval()
    with torch.no_grad():
        out = model(images(2, size))
        stats = []
        for i, b in enumerate(model.branches):
            assert b.head.kind == head and b.gate.kind == gate
            assert (b.head.conv is not None) == (head == "conv")
            assert isinstance(b.head.hidden, torch.nn.Sequential) == (head == "mlp")
            feature_dim = hidden if head in ("mlp", "conv") else b.head.fc.in_features
            assert b.head.num_features == b.head.fc.in_features == feature_dim
            if head == "linear":
                assert feature_dim == captured[b.name].shape[1]
            logits, feats = _reference_head(b.head, captured[b.name], head, hidden)
            torch.testing.assert_close(out.logits[i], logits, rtol=1e-4, atol=1e-5)

            stats.append(_reference_stats(logits))
            z = {"stats": torch.cat(stats, -1), "features": feats}
            z["both"] = torch.cat([z["stats"], feats], -1)
            want_dim = {"stats": 3 * (i + 1), "features": feature_dim, "both": 3 * (i + 1) + feature_dim}[gate]
            layers = [b.gate.mlp] if isinstance(b.gate.mlp, torch.nn.Linear) else list(b.gate.mlp)
            assert layers[0].in_features == z[gate].shape[1] == want_dim
            assert len(layers) == (1 if gate == "features" else 3)  # "features" gates are one linear layer
            h = z[gate]
            for layer in layers:
                h = h @ layer.weight.T + layer.bias if isinstance(layer, torch.nn.Linear) else layer(h)
            torch.testing.assert_close(out.gate_logits[:, i], h.squeeze(-1), rtol=1e-4, atol=1e-5)


def test_conv_head_on_tokens():
    m, size = make_backbone("vit_tiny_patch16_224")
    model = wrap(m, head="conv", input_size=(3, size, size)).eval()
    captured = _capture_branch_inputs(model)
    with torch.no_grad():
        out = model(images(2, size))
    assert out.logits[0].shape == (2, 10)
    prefix = m.num_prefix_tokens
    side = size // 16
    for i, b in enumerate(model.branches):
        tokens = captured[b.name]
        assert tokens.shape == (2, prefix + side * side, 192)
        # the conv head reads the patch tokens as a (192, side, side) map, the prefix tokens dropped
        grid = tokens[:, prefix:].transpose(1, 2).reshape(2, 192, side, side)
        assert b.head.conv[0].in_channels == 192
        logits, _ = _reference_head(b.head, grid, "conv", model.config.head_hidden)
        torch.testing.assert_close(out.logits[i], logits, rtol=1e-4, atol=1e-5)


def test_num_classes_zero_backbone_gets_final_head():
    m = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="num_classes=0"):
        wrap(m, input_size=(3, 64, 64))
    model = wrap(m, num_classes=7, input_size=(3, 64, 64))
    out = model(images(2, 64))
    assert all(f.shape == (2, 7) for f in out.logits)
    assert model.final_head is not None and model.unwrap() is m
    with pytest.raises(ValueError, match="reset_classifier"):
        wrap(timm.create_model("resnet18", num_classes=10), num_classes=5, input_size=(3, 64, 64))


@pytest.mark.parametrize(
    ("name", "kwargs", "layout"),
    [("resnet18", {"global_pool": ""}, "NCHW"), ("vit_tiny_patch16_224", {"global_pool": ""}, "NLC")],
)
def test_unpooled_headless_backbone_gets_pooled_final_head(name, kwargs, layout):
    """A backbone returning an unpooled map or token sequence (num_classes=0, no global pool) gets a
    final head that pools like the backbone would, then classifies; its keys are a Linear's."""
    size = 64 if layout == "NCHW" else 224
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=0, **kwargs).eval()
    x = images(2, size)
    with torch.no_grad():
        unpooled = m(x)
    assert unpooled.ndim == (4 if layout == "NCHW" else 3)
    model = wrap(m, num_classes=5, input_size=(3, size, size)).eval()
    assert model.final_head.pool.layout == layout
    assert set(model.final_head.state_dict()) == {"weight", "bias"}
    pooled = unpooled.mean((2, 3)) if layout == "NCHW" else unpooled[:, m.num_prefix_tokens :].mean(1)
    with torch.no_grad():
        out = model(x)
        pred = model.predict(x, "gate", 1.0)
    ref = pooled @ model.final_head.weight.T + model.final_head.bias
    torch.testing.assert_close(out.logits[-1], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred.logits, ref, rtol=1e-5, atol=1e-5)
    assert 0.0 < float(model.costs[0]) < 1.0 and float(model.costs[-1]) >= 1.0
    model.reset_classifier(3)
    assert model.final_head.pool.layout == layout and model(x).logits[-1].shape == (2, 3)


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("test_resnet", {"in_chans": 1}, (1, 160, 160)),
        ("test_vit", {"in_chans": 1}, (1, 160, 160)),
        ("vit_tiny_patch16_224", {"img_size": (64, 96), "depth": 4}, (3, 64, 96)),
        ("test_vit", {"img_size": (64, 96)}, (3, 64, 96)),
    ],
)
def test_wrap_probes_the_input_the_model_was_created_for(name, kwargs, size):
    """timm leaves pretrained_cfg's input size as it is for in_chans=... or img_size=...: wrap() probes
    and counts FLOPs at the model's own channels and ViT image size, without input_size."""
    torch.manual_seed(0)
    m = timm.create_model(name, **kwargs).eval()
    model = wrap(m).eval()
    assert tuple(model.config.input_size) == size
    x = torch.randn(2, *size)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.logits[-1], m(x))
    assert 0.0 < float(model.costs[0]) < 1.0 and model.unwrap() is m


def test_feature_extractor_gets_pooled_final_head():
    """A plain module that returns a feature map (torchvision AlexNet's `features`) is wrapped with
    explicit exits once num_classes is given; without it the error says so."""
    features = make_alexnet().features
    with pytest.raises(ValueError, match="num_classes=N"):
        wrap(features, ["2", "5"], input_size=(3, 64, 64))
    model = wrap(features, ["2", "5"], num_classes=4, input_size=(3, 64, 64))
    x = images(3, 64)
    out = model(x)
    assert [t.shape for t in out.logits] == [(3, 4)] * 3
    with torch.no_grad():
        ref = model.final_head(features(x))
        torch.testing.assert_close(ref, features(x).mean((2, 3)) @ model.final_head.weight.T + model.final_head.bias)
    SoftConditionalLoss(0.1)(out, torch.tensor([0, 1, 2])).backward()
    assert model.final_head.weight.grad is not None and model.unwrap() is features


def test_timm_conventions_pass_through():
    m, size = make_backbone("vit_tiny_patch16_224")
    model = wrap(m, input_size=(3, size, size))
    assert model.no_weight_decay() == {f"backbone.{n}" for n in m.no_weight_decay()}
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(m.pos_embed) in no_decay and id(m.cls_token) in no_decay
    assert id(model.branches[0].head.fc.weight) not in no_decay
    assert timm.data.resolve_data_config(model=model) == timm.data.resolve_data_config(model=m)
    assert model.pretrained_cfg is m.pretrained_cfg
    model.reset_classifier(5)
    out = model(images(2, size))
    assert all(f.shape == (2, 5) for f in out.logits) and model.config.num_classes == 5
    with pytest.raises(NotImplementedError, match="without their forward hooks"):
        model.set_grad_checkpointing()
    assert not m.grad_checkpointing  # refused before anything was switched on
    model.set_grad_checkpointing(False)


@pytest.mark.parametrize("arch", ["test_vit", "test_resnet", "test_convnext", "alexnet_cifar"])
def test_layer_decay_groups_the_backbone_as_timm_does_and_each_exit_with_its_block(arch):
    from timm.models import group_parameters
    from timm.optim import auto_group_layers

    if arch == "alexnet_cifar":
        import timm_exits.training.models  # noqa: F401  (registers the CIFAR networks)
    m = timm.create_model(arch, num_classes=10)
    plain = (
        group_parameters(m, m.group_matcher(coarse=False), reverse=True)
        if hasattr(m, "group_matcher")
        else auto_group_layers(m)
    )
    model = wrap(m, exits="auto", input_size=(3, 32, 32))
    grouped = group_parameters(model, model.group_matcher(), reverse=True)
    assert {k.removeprefix("backbone."): v for k, v in grouped.items() if k.startswith("backbone.")} == plain
    # reference from the forward order: an exit's group is the deepest among the parameters used up to its module
    fired: list[str] = []
    hooks = [
        mod.register_forward_hook(lambda *_, name=name: fired.append(name)) for name, mod in m.named_modules() if name
    ]
    with torch.no_grad():
        m.eval()(images(2, 32))
    for h in hooks:
        h.remove()
    for i, point in enumerate(model.exits[: len(model.branches)]):
        used = fired[: fired.index(point.name) + 1]
        ref = max(plain[f"{mod}.{n}"] for mod in used for n, _ in m.get_submodule(mod).named_parameters(recurse=False))
        ids = {grouped[n] for n, _ in model.named_parameters() if n.startswith(f"branches.{i}.")}
        assert ids == {ref}, point.name

    opt = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    top = max(plain.values())
    for name, p in model.named_parameters():
        assert scale[id(p)] == pytest.approx(0.5 ** (top - grouped[name])), name


def test_costs_measured_and_overridable():
    m, size = make_backbone("resnet18")
    model = wrap(m, input_size=(3, 224, 224))
    c = model.costs.tolist()
    assert len(c) == model.num_exits and c == sorted(c) and 1.0 <= c[-1] < 1.01
    model.set_costs([0.3, 0.5, 0.7, 1.0])
    assert model.costs.tolist() == pytest.approx([0.3, 0.5, 0.7, 1.0])
    out = model(images(2, size))
    ref = (out.exit_log_probs.exp() * torch.tensor([0.3, 0.5, 0.7, 1.0])).sum(1)
    torch.testing.assert_close(out.expected_cost, ref)
    with pytest.raises(ValueError, match="one per exit"):
        model.set_costs([0.5, 1.0])
    given = wrap(make_backbone("resnet18")[0], costs=[0.2, 0.4, 0.6, 1.0], input_size=(3, size, size))
    assert given.costs.tolist() == pytest.approx([0.2, 0.4, 0.6, 1.0])


def test_module_exports():
    for name in timm_exits.__all__:
        assert hasattr(timm_exits, name), name
