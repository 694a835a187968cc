"""The compiled exit path: same results as the PyTorch reference, used only where it applies."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from conftest import BACKBONES, images, make_backbone

from timm_exits import predict, wrap
from timm_exits.fused import MAX_ELEMENTS, FusedExits, fused_available, run_fused, run_fused_decide, set_fused
from timm_exits.gates import logit_stats
from timm_exits.placement import probe
from timm_exits.policies import exit_mask

pytestmark = pytest.mark.skipif(not fused_available(), reason="no C compiler: the compiled exit path is off")


def _branch_inputs(model, x):
    """Each exit's branch-point tensor from one forward of the backbone."""
    names = [e.name for e in model.exits]
    return [probe(model.backbone, names, x).outputs[n] for n in names]


def _reference(branch, x, stats):
    previous = set_fused(False)
    try:
        with torch.no_grad():
            return branch.infer(x, stats)
    finally:
        set_fused(previous)


def _randomise(model, seed=0):
    """Exit parameters far from their initialisation, so every layer matters to the result."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.branches.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


CASES = [
    ("resnet18", {}, {}),  # NCHW, linear head, stats gate with a hidden layer
    ("resnet18", {"head": "mlp", "gate": "both"}, {}),  # hidden layer + GELU, stats and features
    ("resnet18", {"gate": "features"}, {}),  # single linear gate on features
    ("resnet18", {"gate_hidden": 0}, {}),  # single linear gate on stats
    ("vit_tiny_patch16_224", {}, {}),  # tokens, class-token pooling, LayerNorm
    ("vit_tiny_patch16_224", {}, {"global_pool": "avg"}),  # tokens, mean over the non-prefix tokens
    ("swin_tiny_patch4_window7_224", {"head": "mlp"}, {}),  # NHWC
    ("convnext_atto", {"gate": "both", "num_classes": 1}, {}),  # one class: fixed statistics
    ("resnet18", {"head": "mlp", "head_hidden": 4200, "gate": "both"}, {}),  # scratch beyond the stack buffer
]


@pytest.mark.parametrize(("name", "wrap_kwargs", "timm_kwargs"), CASES)
def test_fused_equals_reference(name, wrap_kwargs, timm_kwargs):
    m, size = make_backbone(name)
    if timm_kwargs or "num_classes" in wrap_kwargs:
        kwargs = dict(BACKBONES[name][0], **timm_kwargs)
        m = timm.create_model(name, num_classes=wrap_kwargs.get("num_classes", 10), **kwargs)
    wrap_kwargs = {k: v for k, v in wrap_kwargs.items() if k != "num_classes"}
    model = wrap(m, "auto", input_size=(3, size, size), **wrap_kwargs).eval()
    _randomise(model)
    x = images(3, size, seed=1)
    stats_fused = stats_ref = torch.zeros(3, 0)
    with torch.no_grad():
        for branch, feat in zip(model.branches, _branch_inputs(model, x)):
            got = run_fused(branch, feat, stats_fused)
            assert got is not None, f"the kernel should serve {branch.name}"
            want = _reference(branch, feat, stats_ref)
            for a, b in zip(got, want):
                assert a.shape == b.shape and a.dtype == b.dtype
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            stats_fused, stats_ref = got[2], want[2]


def test_fused_reads_strided_inputs():
    """channels_last NCHW tensors and sliced batches are read through their strides."""
    model, size = _wrapped("resnet18")
    _randomise(model)
    x = images(4, size, seed=2)
    with torch.no_grad():
        for branch, feat in zip(model.branches, _branch_inputs(model, x)):
            stats = torch.zeros(2, 0)
            cl = feat.contiguous(memory_format=torch.channels_last)[1:3]
            assert not cl.is_contiguous()
            got = run_fused(branch, cl, stats)
            assert got is not None
            want = _reference(branch, feat[1:3].contiguous(), stats)
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
            break


def _wrapped(name, **kwargs):
    m, size = make_backbone(name)
    return wrap(m, "auto", input_size=(3, size, size), **kwargs).eval(), size


@pytest.mark.parametrize("policy", ["gate", "confidence", "entropy"])
def test_fused_decision_equals_exit_mask(policy):
    model, size = _wrapped("resnet18")
    _randomise(model, seed=3)
    x = images(32, size, seed=4)
    feat = _branch_inputs(model, x)[0]
    branch = model.branches[0]
    with torch.no_grad():
        logits, gate, stats = run_fused(branch, feat, torch.zeros(32, 0))
        values = {"gate": torch.sigmoid(gate), "confidence": stats[:, 0], "entropy": stats[:, 1]}[policy]
        # thresholds at 0, 1, between samples and exactly at samples' values (ties included)
        for t in [0.0, 1.0, *torch.quantile(values, torch.tensor([0.25, 0.5, 0.75])).tolist(), *values[:8].tolist()]:
            out = run_fused_decide(branch, feat, torch.zeros(32, 0), policy, t)
            assert out is not None
            want = exit_mask(policy, logits, gate, t, stats=stats)
            assert torch.equal(out[3], want), (policy, t)
            assert out[4] == int(want.sum())


def test_predict_same_with_and_without_the_kernel():
    model, size = _wrapped("vit_tiny_patch16_224")
    _randomise(model, seed=5)
    x = images(12, size, seed=6)
    with torch.no_grad():
        out = model(x)
    stats = [logit_stats(z) for z in out.logits[:-1]]
    # per-exit thresholds that let about a third of the samples out at each exit
    rules = {
        "gate": [float(torch.sigmoid(out.gate_logits[:, b]).quantile(0.67)) for b in range(len(stats))],
        "confidence": [float(s[:, 0].quantile(0.67)) for s in stats],
        "entropy": [float(s[:, 1].quantile(0.33)) for s in stats],
    }
    for policy, thresholds in rules.items():
        for batch in (1, 12):
            a = predict(model, x[:batch], policy, thresholds)
            previous = set_fused(False)
            b = predict(model, x[:batch], policy, thresholds)
            set_fused(previous)
            assert torch.equal(a.exit_index, b.exit_index)
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
            masked = predict(model, x[:batch], policy, thresholds, batch_shrink=False)
            assert torch.equal(masked.exit_index, a.exit_index)
        assert len(set(a.exit_index.tolist())) > 1, f"the {policy} thresholds should mix exits"


def test_kernel_declines_what_it_does_not_implement():
    model, size = _wrapped("resnet18")
    feat = _branch_inputs(model, images(2, size))[0]
    branch, stats = model.branches[0], torch.zeros(2, 0)
    with torch.no_grad():
        assert run_fused(branch, feat, stats) is not None
        assert run_fused(branch, feat.double(), stats) is None  # float64 input
        big = torch.zeros(MAX_ELEMENTS // feat[0].numel() + 1, *feat.shape[1:])
        assert run_fused(branch, big, torch.zeros(big.shape[0], 0)) is None  # pooling is faster threaded
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert run_fused(branch, feat, stats) is None
        model.train()
        assert run_fused(branch, feat, stats) is None  # dropout in the head
        model.eval()
        assert run_fused(branch, feat.transpose(2, 3), stats) is None  # H and W not one run
    assert run_fused(branch, feat, stats) is None  # autograd on
    with torch.no_grad():
        assert run_fused(branch, feat, torch.zeros(1, 0)) is None  # statistics for another batch
        fc = branch.head.fc
        fc.bias = torch.nn.Parameter(torch.zeros(fc.out_features + 1))  # shapes that do not chain
        assert run_fused(branch, feat, stats) is None
        with pytest.raises(RuntimeError):
            branch.infer(feat, stats)  # the reference says what is wrong
    conv, _ = _wrapped("resnet18", head="conv")
    with torch.no_grad():
        assert run_fused(conv.branches[0], feat, stats) is None


def test_kernel_follows_the_parameters():
    """In-place updates are read directly; replaced modules or tensors rebuild the plan; after a
    dtype change the reference runs."""
    model, size = _wrapped("resnet18")
    x = images(2, size, seed=7)
    feat = _branch_inputs(model, x)[0]
    branch, stats = model.branches[0], torch.zeros(2, 0)

    def check():
        with torch.no_grad():
            got = run_fused(branch, feat, stats)
            assert got is not None
            want = _reference(branch, feat, stats)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
        return got

    before = check()
    _randomise(model, seed=8)  # in place (an optimizer step, load_state_dict)
    assert not torch.allclose(check()[0], before[0])
    model.reset_classifier(7)  # new modules
    assert check()[0].shape == (2, 7)
    branch.gate.mlp[2].weight = torch.nn.Parameter(torch.ones(1, branch.gate.mlp[2].in_features))  # new tensor
    check()
    branch.gate.mlp[2].weight.data = torch.full_like(branch.gate.mlp[2].weight, 2.0)  # new storage
    check()
    model.double()  # float64 parameters: the kernel is float32 only
    with torch.no_grad():
        assert run_fused(branch, feat, stats) is None


def test_deepcopy_and_pickle_after_the_kernel_ran(tmp_path):
    model, size = _wrapped("resnet18")
    x = images(1, size, seed=9)
    first = predict(model, x, "gate", 0.5)
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    with torch.no_grad():
        for p in model.branches.parameters():
            p.zero_()
    again = predict(twin, x, "gate", 0.5)
    assert torch.equal(first.logits, again.logits)
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(predict(loaded, x, "gate", 0.5).logits, first.logits)


_CHILD = textwrap.dedent(
    """
    import torch, timm
    from timm_exits import predict, wrap
    from timm_exits.fused import fused_available
    m = wrap(timm.create_model("resnet18", num_classes=10), "auto").eval()
    p = predict(m, torch.randn(1, 3, 64, 64), "gate", 0.5)
    print(fused_available(), p.logits.shape[-1])
    """
)


def _child(tmp_path, **env):
    full = {**os.environ, "TIMM_EXITS_CACHE": str(tmp_path / "cache"), **env}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_compiled_once_into_the_cache_and_optional(tmp_path):
    assert _child(tmp_path) == ["True", "10"]
    built = sorted((tmp_path / "cache").glob("fused_exit_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _child(tmp_path) == ["True", "10"]  # reused, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp
    # no compiler: the PyTorch path runs, same answer shape
    assert _child(tmp_path / "elsewhere", CC="/nonexistent/cc", PATH="/nonexistent") == ["False", "10"]
    assert _child(tmp_path, TIMM_EXITS_FUSED="0") == ["False", "10"]


def test_prepared_exits_equal_single_calls_and_switch_off():
    """`predict` prepares every exit's call before the backbone runs; each prepared call gives what
    `run_fused_decide` gives, and nothing is prepared where the compiled path may not run."""
    model, size = _wrapped("resnet18")
    _randomise(model, seed=10)
    feats = _branch_inputs(model, images(4, size, seed=11))
    thresholds = [0.3, 0.5, 0.7]
    with torch.no_grad():
        prepared = FusedExits.prepare(list(model.branches), feats[0].device, "confidence", thresholds)
        assert prepared is not None
        stats = torch.zeros(4, 0)
        for b, (branch, feat) in enumerate(zip(model.branches, feats)):
            got = prepared.run(b, feat, stats)
            want = run_fused_decide(branch, feat, stats, "confidence", thresholds[b])
            for u, v in zip(got, want):
                assert torch.equal(u, v) if torch.is_tensor(u) else u == v
            stats = got[2]
        previous = set_fused(False)
        assert FusedExits.prepare(list(model.branches), feats[0].device, "gate", thresholds) is None
        set_fused(previous)
    assert FusedExits.prepare(list(model.branches), feats[0].device, "gate", thresholds) is None  # autograd on
    with torch.no_grad():
        assert FusedExits.prepare(list(model.branches), torch.device("meta"), "gate", thresholds) is None
    conv, _ = _wrapped("resnet18", head="conv")
    with torch.no_grad():
        assert (
            FusedExits.prepare(list(conv.branches), feats[0].device, "gate", thresholds).run(
                0, feats[0], torch.zeros(4, 0)
            )
            is None
        )


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_compiled_and_pytorch_paths_agree_on_every_test_backbone(name):
    """Whatever the kernel serves or declines on each backbone of the test list, the full forward
    without autograd gives the same logits, gate logits and soft output with it on and off."""
    model, size = _wrapped(name)
    _randomise(model, seed=12)
    x = images(2, size, seed=13)
    with torch.no_grad():
        a = model(x)
        previous = set_fused(False)
        b = model(x)
        set_fused(previous)
    for u, v in zip(a.logits, b.logits):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.gate_logits, b.gate_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-4, atol=1e-4)


def test_prefix_tokens_are_skipped_by_the_mean():
    """A ViT with a class token and two register tokens, mean-pooled: the exits must average the
    patch tokens only, in the kernel as in PyTorch."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64, reg_tokens=2, global_pool="avg")
    model = wrap(m, "auto", input_size=(3, 64, 64)).eval()
    assert model.branches[0].head.pool.num_prefix_tokens == 3
    _randomise(model, seed=14)
    feats = _branch_inputs(model, images(2, 64, seed=15))
    with torch.no_grad():
        got = run_fused(model.branches[0], feats[0], torch.zeros(2, 0))
        want = _reference(model.branches[0], feats[0], torch.zeros(2, 0))
        wrong = _reference(model.branches[0], feats[0][:, 1:], torch.zeros(2, 0))  # one prefix token too few
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], wrong[0], atol=1e-3)
