"""Tensor layouts seen at branch points, and pooling that follows the backbone's own convention.

timm backbones emit NCHW maps (CNNs), NHWC maps (Swin, MambaOut, ...) and NLC token sequences
(ViT-style, possibly with prefix/class tokens; Hiera, in its own token order). The layout is detected
from the tensor's shape and the channel count `feature_info` declares, never from `model.output_fmt`,
which several NHWC models do not set.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

__all__ = ["Layout", "LAYOUTS", "TokenPool", "detect_layout", "channels_of", "pool", "Pool", "to_nchw"]

Layout = Literal["NCHW", "NHWC", "NLC", "NC"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
# "token": the first (class) token, "avg": the mean of the tokens after the prefix
TokenPool = Literal["token", "avg"]


def detect_layout(t: torch.Tensor, num_chs: int | None = None, hint: Layout | None = None) -> Layout:
    """Guess the layout of a branch-point tensor.

    Args:
        t: The captured tensor (batch first).
        num_chs: Channel count declared by `feature_info`, if known.
        hint: Layout to prefer for ambiguous 4-D tensors (the model's other branch points).

    Returns:
        One of "NCHW", "NHWC", "NLC", "NC".
    """
    if t.ndim == 2:
        return "NC"
    if t.ndim == 3:
        return "NLC"
    if t.ndim != 4:
        raise ValueError(f"cannot attach an exit to a {t.ndim}-D tensor of shape {tuple(t.shape)}")
    if num_chs is not None:
        first, last = t.shape[1] == num_chs, t.shape[-1] == num_chs
        if first and not last:
            return "NCHW"
        if last and not first:
            return "NHWC"
    return hint if hint in ("NCHW", "NHWC") else "NCHW"


def channels_of(t: torch.Tensor, layout: Layout) -> int:
    """Channel count of `t` under `layout`."""
    return int(t.shape[1] if layout == "NCHW" else t.shape[-1])


def to_nchw(x: torch.Tensor, layout: Layout, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Return a spatial NCHW view of `x`; tokens must form a square grid after the prefix."""
    if layout == "NCHW":
        return x
    if layout == "NHWC":
        return x.permute(0, 3, 1, 2)
    if layout == "NLC":
        tokens = x[:, num_prefix_tokens:]
        n = int(tokens.shape[1])
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{n} patch tokens do not form a square grid; use head='linear' or head='mlp' for this exit."
            )
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    raise ValueError(f"layout {layout!r} has no spatial form")


def pool(x: torch.Tensor, layout: Layout, num_prefix_tokens: int = 0, token_pool: TokenPool = "avg") -> torch.Tensor:
    """Pool a branch-point tensor to (B, C); see `Pool` (this is its forward, without the module call)."""
    if layout == "NCHW":
        return x.mean(dim=(2, 3))
    if layout == "NHWC":
        return x.mean(dim=(1, 2))
    if layout == "NLC":
        if token_pool == "token":
            return x[:, 0]
        return x[:, num_prefix_tokens:].mean(dim=1)
    return x


class Pool(nn.Module):
    """Global pooling for one layout: spatial mean, or token pooling like the backbone's head.

    Args:
        layout: One of `LAYOUTS`.
        num_prefix_tokens: Class/register tokens at the start of a token sequence.
        token_pool: "token" takes the first token, "avg" averages the non-prefix tokens.
    """

    def __init__(self, layout: Layout, num_prefix_tokens: int = 0, token_pool: TokenPool = "avg") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
        self.layout = layout
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.token_pool = "token" if token_pool == "token" and num_prefix_tokens > 0 else "avg"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool(x, self.layout, self.num_prefix_tokens, self.token_pool)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, token_pool={self.token_pool}, prefix={self.num_prefix_tokens}"
