"""Small backbones registered with timm for the paper's recipes.

timm has no AlexNet, and torchvision's AlexNet (11x11 stride-4 stem, three 3x3/2 max-pools) cannot
run on 32x32 images at all (its last pool gets a 1x1 map). The paper's AlexNet column is a
CIFAR-sized AlexNet-style network, so `alexnet_cifar` is registered here as an ordinary timm model
(``timm.create_model("alexnet_cifar", num_classes=10)`` once ``timm_exits.training.models`` is imported): five
3x3 convolutions of AlexNet's widths (64, 192, 384, 256, 256) with BatchNorm, max-pools after the
first, second and fifth, and AlexNet's dropout + two-layer classifier (sized down) on a 2x2 pooled
map. Being a timm model, it has ``feature_info`` (so ``exits="auto"`` works), ``pretrained_cfg``,
``reset_classifier``, timm's intermediate-feature API (``forward_intermediates``,
``prune_intermediate_layers``, ``features_only=True``) and saves / loads through timm's Hub format.

`vgg13_cifar` is the CIFAR form of VGG-13 with BatchNorm that the paper's VGG-13 column uses:
timm's ``vgg13_bn`` keeps ImageNet's 7x7 4096-channel pre-logits convolution, which dominates its
cost at 32 px. Here the ten 3x3 convolutions (64, 64, 128, 128, 256, 256, 512, 512, 512, 512),
each followed by BatchNorm and ReLU, form five stages closed by a 2x2 max-pool, and a linear
classifier reads the globally average-pooled 512 channels.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["AlexNetCifar", "VggCifar", "alexnet_cifar", "vgg13_cifar"]


class _Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int, pool: bool, norm: bool) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not norm)]
        if norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


def _check_pool(name: str, global_pool: str, num_classes: int) -> str:
    """timm's pooling argument: "avg", or "" (no pooling, as timm allows it: only without a classifier)."""
    if global_pool not in ("avg", ""):
        raise ValueError(f"{name} pools with 'avg' only, got global_pool={global_pool!r}")
    if not global_pool and num_classes > 0:
        raise ValueError(f"{name}: global_pool='' (no pooling) needs num_classes=0, as in timm")
    return global_pool


class _SmallNet(nn.Module):
    """What the small CIFAR networks share: conv ``stages``, a linear ``head``, timm's classifier API.

    Subclasses build ``stages`` and ``head`` and define ``forward_head``.
    """

    stages: nn.Sequential
    head: nn.Module
    num_features: int  # channels of forward_features' output, as in timm
    head_hidden_size: int  # width the classifier reads (forward_head(pre_logits=True))
    num_classes: int
    global_pool: str
    grad_checkpointing: bool = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "head" if name_only else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier, on the model's device and dtype; ``global_pool=""`` (with 0 classes) unpooled."""
        if global_pool is not None:
            self.global_pool = _check_pool(type(self).__name__, global_pool, num_classes)
        ref = next(self.stages.parameters())
        self.num_classes = num_classes
        self.head = (
            nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediate-feature API: the output of each stage (one per ``feature_info`` entry).

        Args:
            x: Input images.
            indices: Last n stages if an int, every stage if None, else the stage indices to return.
            norm: Unused (no final norm), kept for timm's signature.
            stop_early: Run only the stages up to the last one asked for.
            output_fmt: Only "NCHW".
            intermediates_only: Return the intermediates alone.

        Returns:
            The intermediates, or (the last stage's output, the intermediates).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"{type(self).__name__} returns NCHW features only, got output_fmt={output_fmt!r}")
        take, last = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: last + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last intermediate kept, and the classifier.

        Args:
            indices: As in ``forward_intermediates``.
            prune_norm: Unused (no final norm), kept for timm's signature.
            prune_head: Drop the classifier; it goes anyway when stages go (it reads the last stage).

        Returns:
            The indices of the intermediates kept.
        """
        take, last = feature_take_indices(len(self.stages), indices)
        shortened = last < len(self.stages) - 1
        if shortened:
            self.stages = self.stages[: last + 1]
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
            self._pool_only()
        if shortened or prune_head:
            self.reset_classifier(0)
        return take

    def _pool_only(self) -> None:
        """Make ``forward_head`` a global average pool of the (shortened) stages."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class AlexNetCifar(_SmallNet):
    """AlexNet-style network for small images (see the module docstring).

    Args:
        num_classes: Output classes (0: return pooled features).
        in_chans: Input channels.
        widths: Channels of the five convolutions.
        hidden: Width of the classifier's hidden layer.
        drop_rate: Dropout before each classifier layer (AlexNet: 0.5).
        norm: BatchNorm after each convolution.
        pool_size: Side of the adaptive average pool before the classifier.
        global_pool: Pooling before the classifier: "avg", or "" (with ``num_classes=0``) for the unpooled map.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, ...] = (64, 192, 384, 256, 256),
        hidden: int = 1024,
        drop_rate: float = 0.5,
        norm: bool = True,
        pool_size: int = 2,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.global_pool = _check_pool("AlexNetCifar", global_pool, num_classes)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        pools = (True, True, False, False, True)
        chans = (in_chans, *widths)
        self.stages = nn.Sequential(*[_Stage(chans[i], chans[i + 1], pools[i], norm) for i in range(5)])
        reductions = [2, 4, 4, 4, 8]
        self.feature_info = [
            {"num_chs": widths[i], "reduction": reductions[i], "module": f"stages.{i}"} for i in range(5)
        ]
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.pre_logits = nn.Sequential(
            nn.Flatten(1),
            nn.Dropout(drop_rate),
            nn.Linear(widths[-1] * pool_size * pool_size, hidden),
            nn.ReLU(inplace=True),
        )
        self.num_features, self.head_hidden_size = widths[-1], hidden
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.global_pool:  # timm's num_classes=0, global_pool="": the unpooled map
            return x
        x = self.pre_logits(self.pool(x))
        return x if pre_logits else self.head(self.head_drop(x))

    def _pool_only(self) -> None:
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pre_logits = nn.Flatten(1)


class VggCifar(_SmallNet):
    """VGG with BatchNorm for small images: stages of 3x3 convolutions, each closed by a max-pool.

    Args:
        num_classes: Output classes (0: return pooled features).
        in_chans: Input channels.
        stages: Convolution widths of each stage.
        drop_rate: Dropout before the classifier.
        global_pool: Pooling before the classifier: "avg", or "" (with ``num_classes=0``) for the unpooled map.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        stages: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.global_pool = _check_pool("VggCifar", global_pool, num_classes)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        blocks, cin = [], in_chans
        for widths in stages:
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            blocks.append(nn.Sequential(*layers, nn.MaxPool2d(2)))
        self.stages = nn.Sequential(*blocks)
        self.feature_info = [
            {"num_chs": widths[-1], "reduction": 2 ** (i + 1), "module": f"stages.{i}"}
            for i, widths in enumerate(stages)
        ]
        self.num_features = self.head_hidden_size = cin
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.global_pool:  # timm's num_classes=0, global_pool="": the unpooled map
            return x
        x = x.mean((2, 3))
        return x if pre_logits else self.head(self.head_drop(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "stages.0.0",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# ``features_only=True``: timm's FeatureListNet lifts the stages out of ``stages`` to find them by name.
_FEATURES = {"flatten_sequential": True}

default_cfgs = generate_default_cfgs(
    {"alexnet_cifar.untrained": _cfg(), "vgg13_cifar.untrained": _cfg(first_conv="stages.0.0")}
)


@register_model
def alexnet_cifar(pretrained: bool = False, **kwargs: Any) -> AlexNetCifar:
    """AlexNet-style network for 32x32 images (no pretrained weights)."""
    return build_model_with_cfg(AlexNetCifar, "alexnet_cifar", pretrained, feature_cfg=_FEATURES, **kwargs)


@register_model
def vgg13_cifar(pretrained: bool = False, **kwargs: Any) -> VggCifar:
    """VGG-13 with BatchNorm for 32x32 images (no pretrained weights)."""
    return build_model_with_cfg(VggCifar, "vgg13_cifar", pretrained, feature_cfg=_FEATURES, **kwargs)
