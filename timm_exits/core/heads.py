"""Exit heads: small classifiers that read a branch-point tensor and predict the classes.

Every head pools the branch-point tensor the way the backbone pools its own features (see
`timm_exits.core.layout.Pool`) and returns both the logits and the pooled features, which the
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, pooled features) of a branch-point tensor.

        The hard early-exit path runs this between two backbone stages, where at batch 1 every call
        is a visible share of an exit's cost; the layers are applied to their parameters directly
        (the submodules hold the parameters and name the state_dict keys) rather than through each
        submodule's `__call__`, so hooks on the head's submodules do not fire.
        """
        if self.conv is not None:
            x = self.conv(to_nchw(x, self.layout, self.num_prefix_tokens))
        feats = pool(x, self.pool.layout, self.pool.num_prefix_tokens, self.pool.token_pool)
        norm = self.norm
        if isinstance(norm, nn.LayerNorm):
            feats = F.layer_norm(feats, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        if isinstance(self.hidden, nn.Sequential):
            linear, act = self.hidden
            feats = act(F.linear(feats, linear.weight, linear.bias))
        out = F.dropout(feats, self.drop.p, training=True) if self.drop.training and self.drop.p > 0 else feats
        if isinstance(self.fc, nn.Linear):
            out = F.linear(out, self.fc.weight, self.fc.bias)
        return out, feats

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final linear layer for a new number of classes."""
        ref = next(self.parameters(), torch.empty(0))  # the new layer takes the head's device and dtype
        fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        self.fc = fc if num_classes > 0 else nn.Identity()


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
            self.weight.device, self.weight.dtype
        )
