"""Shared fixtures: small but real backbones, built with pretrained=False at small input sizes."""

from __future__ import annotations

import os

import pytest
import timm
import torch
import torchvision

# One thread: the suite is many small ops, and 2-thread OpenMP collapses when the cores are shared.
torch.set_num_threads(int(os.environ.get("TIMM_EXITS_TEST_THREADS", "1")))


@pytest.hookimpl(wrapper=True, optionalhook=True)  # a hook of pytest-xdist, which may be absent
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: pytest-xdist's count (the cores this process may run on), at most 4: each worker imports
    torch and builds its own models. PYTEST_XDIST_AUTO_NUM_WORKERS, when set, is taken as it is."""
    count = yield
    return count if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") else min(count, 4)


# name -> (timm kwargs, input size). Each keeps its architecture (and layout) but runs fast on 2 cores.
BACKBONES: dict[str, tuple[dict, int]] = {
    "resnet18": ({}, 64),
    "vgg13": ({"mlp_ratio": 0.125}, 64),
    "mobilenetv3_small_100": ({}, 64),
    "convnext_atto": ({}, 64),
    "vit_tiny_patch16_224": ({"img_size": 96}, 96),
    "swin_tiny_patch4_window7_224": ({"embed_dim": 32, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8)}, 224),
    "levit_128s": ({"img_size": 128}, 128),
    "regnetx_002": ({}, 64),
    "densenet121": ({"growth_rate": 8}, 64),
    "test_mambaout": ({}, 64),
}


def make_backbone(name: str, num_classes: int = 10, seed: int = 0) -> tuple[torch.nn.Module, int]:
    """Build a backbone of the test list with fixed weights; returns (model, input size)."""
    torch.manual_seed(seed)
    kwargs, size = BACKBONES[name]
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs), size


def make_alexnet(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """torchvision's AlexNet (no feature_info): exits must be given by module name."""
    torch.manual_seed(seed)
    return torchvision.models.alexnet(weights=None, num_classes=num_classes)


def images(batch: int, size: int, seed: int = 1, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g)


def spread_thresholds(model, x: torch.Tensor, policy: str) -> list[float]:
    """Per-exit thresholds that send some samples out at every exit, away from any sample's score."""
    from timm_exits.core.gates import logit_stats

    with torch.no_grad():
        out = model(x)
    thresholds = []
    for j in range(len(model.branches)):
        if policy == "gate":
            scores = torch.sigmoid(out.gate_logits[:, j])
        else:
            scores = logit_stats(out.logits[j])[:, 0 if policy == "confidence" else 1]
        v = scores.sort().values
        lo, hi = len(v) // 4, 3 * len(v) // 4
        i = max(range(lo, hi), key=lambda i: v[i + 1] - v[i])  # widest gap near the middle
        thresholds.append(float((v[i] + v[i + 1]) / 2))
    return thresholds
