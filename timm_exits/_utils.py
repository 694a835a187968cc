"""Small helpers shared by several modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["evaluating"]


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
