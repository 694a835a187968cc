"""Tensor layouts seen at branch points, and pooling that follows the backbone's own convention.

timm backbones emit NCHW maps (CNNs), NHWC maps (Swin, MambaOut, ...) and NLC token sequences
(ViT-style, possibly with prefix/class tokens; Hiera, in its own token order). The layout is detected
from the tensor's shape and the channel count `feature_info` declares (for a block, that of its stage),
never from `model.output_fmt`, which several NHWC models do not set.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal, get_args

import torch
from torch import nn

__all__ = [
    "Layout",
    "LAYOUTS",
    "LAYOUT_RANKS",
    "TokenPool",
    "check_layouts",
    "detect_layout",
    "infer_layout",
    "layouts_by_kind",
    "module_layout",
    "channels_of",
    "pool",
    "Pool",
    "to_nchw",
]

Layout = Literal["NCHW", "NHWC", "NLC", "NC"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
LAYOUT_RANKS: dict[str, int] = {"NCHW": 4, "NHWC": 4, "NLC": 3, "NC": 2}
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


def infer_layout(t: torch.Tensor, num_chs: int | None, grid: tuple[int, int]) -> Layout | None:
    """Layout of a module output that `feature_info` does not describe (a block inside a stage, a module
    named by the caller), or None for a 4-D map that fits NCHW and NHWC alike.

    A 4-D map is read by the channel count of the stage it is in (its blocks keep the stage's width,
    whatever layout the stage itself returns), else by which pair of its axes can be a spatial grid of
    the input (no larger, the input's aspect ratio within rounding).

    Args:
        t: The captured tensor (batch first).
        num_chs: Channel count of the enclosing `feature_info` stage, if any.
        grid: (H, W) of the input.
    """
    if t.ndim != 4:
        return detect_layout(t)
    spatial = [layout for layout in ("NCHW", "NHWC") if _fits_grid(t, layout, grid)]
    by_width = [layout for layout in spatial or ("NCHW", "NHWC") if channels_of(t, layout) == num_chs]
    if len(by_width) == 1:
        return by_width[0]
    return spatial[0] if len(spatial) == 1 else None


def _fits_grid(t: torch.Tensor, layout: Layout, grid: tuple[int, int]) -> bool:
    """Whether `t`'s spatial sizes under `layout` are a downscaled `grid`: no larger, same aspect ratio."""
    h, w = (t.shape[2], t.shape[3]) if layout == "NCHW" else (t.shape[1], t.shape[2])
    return h <= grid[0] and w <= grid[1] and abs(w * grid[0] - h * grid[1]) < grid[0]


def module_layout(
    name: str,
    t: torch.Tensor,
    widths: dict[str, int | None],
    hint: Layout | None,
    kind_hint: Layout | None,
    grid: tuple[int, int],
) -> Layout:
    """Layout of the output `t` of module `name` at an exit.

    A `feature_info` point is read by its declared channel count (`hint`, the majority of the points,
    where that cannot tell); any other module by `infer_layout` with the width of the `feature_info`
    module it is in, or where that cannot tell, as other modules of its class are (`kind_hint`), or else
    as the points are. A map nothing tells is refused.

    Args:
        name: Module name.
        t: Its output.
        widths: {feature_info module: its num_chs}.
        hint: Layout most `feature_info` maps have.
        kind_hint: Layout most maps of other modules of the same class have (`layouts_by_kind`).
        grid: (H, W) of the input.
    """
    if widths.get(name) is not None:
        return detect_layout(t, widths[name], hint)
    layout = infer_layout(t, _enclosing_width(name, widths), grid) or kind_hint or hint
    if layout is None:
        raise ValueError(
            f"exit {name!r}: its output of shape {tuple(t.shape)} reads as NCHW and as NHWC alike (for a "
            f"{grid[0]}x{grid[1]} input), and no other map of the backbone tells which; say which with "
            f"layouts={{{name!r}: 'NCHW'}} or layouts={{{name!r}: 'NHWC'}}."
        )
    return layout


def layouts_by_kind(
    outputs: dict[str, Any], kinds: dict[str, type], widths: dict[str, int | None], grid: tuple[int, int]
) -> dict[type, Layout]:
    """{module class: the layout most 4-D maps of modules of that class outside `feature_info` show where
    `infer_layout` tells it}. Blocks may differ from their stages (swinv2_cr's NHWC blocks in NCHW stages),
    and a model's blocks of one class share a layout (TinyViT's NCHW conv blocks beside NHWC ones)."""
    votes: dict[type, Counter] = {}
    for name, t in outputs.items():
        if widths.get(name) is None and torch.is_tensor(t) and t.ndim == 4:
            layout = infer_layout(t, _enclosing_width(name, widths), grid)
            if layout is not None:
                votes.setdefault(kinds[name], Counter())[layout] += 1
    return {kind: count.most_common(1)[0][0] for kind, count in votes.items()}


def _enclosing_width(name: str, widths: dict[str, int | None]) -> int | None:
    """The channel count of the innermost `feature_info` module that holds module `name`."""
    stages = [s for s, chs in widths.items() if chs is not None and name.startswith(s + ".")]
    return widths[max(stages, key=len)] if stages else None


def check_layouts(layouts: dict[str, str], placed: list[str], outputs: dict[str, Any]) -> None:
    """Refuse `layouts=` keys that name no exit placed, and layouts that are none or do not fit the rank of
    their exit's output."""
    unknown = [n for n in layouts if n not in placed]
    if unknown:
        raise ValueError(
            f"layouts= names {unknown}, which are not among the exits placed {placed}; give layouts only for those."
        )
    for name, layout in layouts.items():
        t = outputs[name]
        if layout not in LAYOUTS:
            raise ValueError(f"layouts[{name!r}]={layout!r} is not a layout; use one of {LAYOUTS}.")
        if t.ndim != LAYOUT_RANKS[layout]:
            fits = " or ".join(k for k, rank in LAYOUT_RANKS.items() if rank == t.ndim)
            raise ValueError(
                f"layouts[{name!r}]={layout!r} needs a {LAYOUT_RANKS[layout]}-D tensor, but {name!r} returns one "
                f"of shape {tuple(t.shape)}" + (f"; give {fits} for it." if fits else ".")
            )


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
