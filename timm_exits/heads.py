"""Exit heads: small classifiers that read a branch-point tensor and predict the classes.

Every head pools the branch-point tensor the way the backbone pools its own features (see
`timm_exits.layout.Pool`) and returns both the logits and the pooled features, which the
"features" gates read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeadKind
from .layout import Layout, Pool, TokenPool, pool, to_nchw

__all__ = ["ExitHead", "FinalHead"]


class ExitHead(nn.Module):
    """Pool -> (norm) -> (hidden layer) -> dropout -> linear.

    Args:
        layout: Layout of the input tensor ("NCHW", "NHWC", "NLC", "NC").
        channels: Channels of the input tensor.
        num_classes: Output classes.
        kind: "linear", "mlp" or "conv".
        hidden: Hidden width for "mlp" and "conv".
        drop_rate: Dropout before the classifier.
        num_prefix_tokens: Prefix tokens of NLC inputs.
        token_pool: "token" or "avg" for NLC inputs (follows the backbone's `global_pool`).
    """

    def __init__(
        self,
        layout: Layout,
        channels: int,
        num_classes: int,
        kind: HeadKind = "linear",
        hidden: int = 256,
        drop_rate: float = 0.0,
        num_prefix_tokens: int = 0,
        token_pool: TokenPool = "avg",
    ) -> None:
        super().__init__()
        self.layout = layout
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens
        if kind == "conv":
            if layout == "NC":
                raise ValueError("head='conv' needs a spatial or token input; this exit is already pooled.")
            self.conv = nn.Sequential(
                nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            )
            self.pool = Pool("NCHW")
            width = hidden
        else:
            self.conv = None
            self.pool = Pool(layout, num_prefix_tokens, token_pool)
            width = channels
        # Transformer branch points carry un-normalised residual streams; normalise after pooling.
        self.norm = nn.LayerNorm(width) if layout in ("NLC", "NHWC") and kind != "conv" else nn.Identity()
        if kind == "mlp":
            self.hidden = nn.Sequential(nn.Linear(width, hidden), nn.GELU())
            width = hidden
        else:
            self.hidden = nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.num_features = width

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (and normalised) features of a branch-point tensor."""
        if self.conv is not None:
            x = self.conv(to_nchw(x, self.layout, self.num_prefix_tokens))
        return self.hidden(self.norm(self.pool(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, pooled features)."""
        feats = self.pooled(x)
        return self.fc(self.drop(feats)), feats

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for inference without autograd, in as few kernels as possible.

        The hard early-exit path runs this between two backbone stages, where every kernel launch
        costs several times what it costs in a warm loop; it calls the same parameters functionally
        instead of going through each submodule's `__call__` (so hooks on the head's submodules do
        not fire here). Heads with a conv layer, and heads in training mode (dropout), use `forward`.
        """
        if self.conv is not None or self.training:
            return self(x)
        feats = pool(x, self.pool.layout, self.pool.num_prefix_tokens, self.pool.token_pool)
        if isinstance(self.norm, nn.LayerNorm):
            feats = F.layer_norm(feats, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        if isinstance(self.hidden, nn.Sequential):
            linear, act = self.hidden
            feats = act(F.linear(feats, linear.weight, linear.bias))
        if isinstance(self.fc, nn.Linear):
            return F.linear(feats, self.fc.weight, self.fc.bias), feats
        return feats, feats

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final linear layer for a new number of classes."""
        device = next(self.parameters(), torch.empty(0)).device
        self.fc = nn.Linear(self.num_features, num_classes).to(device) if num_classes > 0 else nn.Identity()


class FinalHead(nn.Linear):
    """Linear classifier added after a backbone that has none (`num_classes=0`, or a plain feature
    extractor), pooling the backbone's output first when it is an unpooled map or token sequence.

    A subclass of `nn.Linear`, so its state_dict keys are `weight` and `bias` whatever the layout.

    Args:
        in_features: Channels of the backbone's output.
        num_classes: Output classes.
        layout: Layout of the backbone's output ("NC" when it is already pooled).
        num_prefix_tokens: Prefix tokens of an NLC output.
        token_pool: "token" or "avg" for an NLC output.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        layout: Layout = "NC",
        num_prefix_tokens: int = 0,
        token_pool: TokenPool = "avg",
    ) -> None:
        super().__init__(in_features, num_classes)
        self.pool = Pool(layout, num_prefix_tokens, token_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pool(x))

    def reset(self, num_classes: int) -> FinalHead:
        """A new, freshly initialised head with the same pooling for `num_classes` classes."""
        p = self.pool
        return FinalHead(self.in_features, num_classes, p.layout, p.num_prefix_tokens, p.token_pool).to(
            self.weight.device
        )
