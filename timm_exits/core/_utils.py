"""Small helpers shared by several modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["default_input_size", "evaluating", "feature_tensor", "take_rows"]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode and restore every submodule's own train/eval flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def feature_tensor(output: Any, batch: int | None = None) -> torch.Tensor | None:
    """The feature tensor of a module's output: the output itself, or the first batch-first tensor of
    a tuple/list output (PiT stages return `(tokens_map, cls_tokens)`, TNT blocks
    `(pixel_tokens, patch_tokens)` whose pixel tokens have batch * patches rows); None if none fits."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        for t in output:
            if torch.is_tensor(t) and t.ndim >= 2 and (batch is None or t.shape[0] == batch):
                return t
    return None


def take_rows(output: Any, rows: torch.Tensor, batch: int) -> Any:
    """Keep the rows `rows` (an index tensor) of a module output whose batch size is `batch`: of the
    tensor, or of every batch-first tensor of a tuple/list. Index tensors need no host sync on CUDA."""
    if torch.is_tensor(output):
        return output.index_select(0, rows)
    return type(output)(
        t.index_select(0, rows) if torch.is_tensor(t) and t.ndim and t.shape[0] == batch else t for t in output
    )


def default_input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, int, int]:
    """The (C, H, W) input size: `input_size` checked, else the model's pretrained_cfg (with its own `in_chans`
    and ViT `patch_embed.img_size` when it has them), else (3, 224, 224)."""
    if input_size is not None:
        size = tuple(int(v) for v in input_size)
        if len(size) != 3:
            raise ValueError(f"input_size must be (C, H, W), got {input_size}")
        return size  # type: ignore[return-value]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(int(v) for v in cfg["input_size"]) if cfg.get("input_size") else (3, 224, 224)
    # timm keeps the pretrained_cfg's size for a model created with in_chans=... or img_size=...
    chans = getattr(model, "in_chans", None)
    grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(chans, int) and chans > 0:
        size = (chans, *size[1:])
    if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid):
        size = (size[0], *grid)
    return size  # type: ignore[return-value]
