"""The CIFAR networks registered with timm (`alexnet_cifar`, `vgg13_cifar`) follow timm's model API."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_exits
import timm_exits.training.models  # noqa: F401  (registers the models)

NAMES = ["alexnet_cifar", "vgg13_cifar"]
# (forward_features channels, forward_head(pre_logits=True) width)
WIDTHS = {"alexnet_cifar": (256, 1024), "vgg13_cifar": (512, 512)}


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", NAMES)
def test_num_features_and_head_hidden_size_as_in_timm(name):
    model = timm.create_model(name).eval()
    x = _x()
    feats = model.forward_features(x)
    num_features, hidden = WIDTHS[name]
    assert model.num_features == feats.shape[1] == num_features
    assert model.head_hidden_size == model.forward_head(feats, pre_logits=True).shape[1] == hidden
    model.reset_classifier(5)
    assert model.get_classifier().in_features == hidden and model(x).shape == (2, 5)


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_keeps_dtype_and_mode(name):
    model = timm.create_model(name).to(torch.bfloat16).eval()
    model.reset_classifier(7)
    assert model.get_classifier().weight.dtype == torch.bfloat16
    assert not model.get_classifier().training
    assert model(_x().bfloat16()).shape == (2, 7)


@pytest.mark.parametrize("name", NAMES)
def test_get_classifier_name_only(name):
    model = timm.create_model(name)
    assert model.get_classifier(name_only=True) == model.pretrained_cfg["classifier"] == "head"
    assert model.get_classifier() is model.head


@pytest.mark.parametrize("name", NAMES)
def test_global_pool_empty_returns_the_unpooled_map(name):
    x = _x()
    model = timm.create_model(name, num_classes=0, global_pool="").eval()
    ref = timm.create_model(name).eval()
    ref.load_state_dict(model.state_dict(), strict=False)
    assert torch.equal(model(x), ref.forward_features(x))
    ref.reset_classifier(0, "")
    assert torch.equal(ref(x), ref.forward_features(x))
    ref.reset_classifier(3, "avg")
    assert ref(x).shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes=0"):
        timm.create_model(name, num_classes=10, global_pool="")


@pytest.mark.parametrize("name", NAMES)
def test_set_grad_checkpointing(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = _x().requires_grad_(True)
    plain = model(x)
    (g_plain,) = torch.autograd.grad(plain.sum(), x)
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    ckpt = model(x)
    (g_ckpt,) = torch.autograd.grad(ckpt.sum(), x)
    torch.testing.assert_close(ckpt, plain)
    torch.testing.assert_close(g_ckpt, g_plain)
    inter = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [t.shape[1] for t in inter] == [i["num_chs"] for i in model.feature_info[-2:]]
    model.set_grad_checkpointing(False)
    # the early-exit wrapper turns it off on its backbone (and refuses to turn it on)
    wrapped = timm_exits.wrap(timm.create_model(name), exits="auto")
    wrapped.set_grad_checkpointing(False)
    assert not wrapped.backbone.grad_checkpointing
