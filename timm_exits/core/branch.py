"""One early exit: the head that reads a backbone module's output, the gate that decides on it, and the
forward hook through which the backbone's forward reaches both.

The hook does nothing until a forward of `EarlyExitModel` attaches its run state (`_run`): then it hands
the module's output to that run (every exit computed, or the hard path deciding who leaves).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .compiled_exit import CompiledExit
from .config import ExitConfig
from .gates import ExitGate, append_stats
from .heads import ExitHead
from .layout import TokenPool
from .placement import ExitPoint

__all__ = ["ExitBranch"]


class ExitBranch(nn.Module):
    """One early exit: a head reading a backbone module's output and the gate deciding on it."""

    def __init__(
        self, point: ExitPoint, position: int, config: ExitConfig, num_prefix_tokens: int, token_pool: TokenPool
    ) -> None:
        super().__init__()
        self.name = point.name
        self.position = position
        self.head = ExitHead(
            point.layout,
            point.channels,
            config.num_classes,
            kind=config.head,
            hidden=config.head_hidden,
            drop_rate=config.drop_rate,
            num_prefix_tokens=num_prefix_tokens,
            token_pool=token_pool,
        )
        self.gate = ExitGate(
            config.gate,
            position,
            self.head.num_features,
            hidden=config.gate_hidden,
            bias=config.gate_bias,
            detach=config.detach_gate_inputs,
        )
        self._run: Any = None
        self._compiled: CompiledExit | None = None

    def forward(self, x: torch.Tensor, prev_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (logits, gate logit, statistics of exits 0..position) for a branch-point tensor."""
        logits, feats = self.head(x)
        stats = append_stats(prev_stats, logits)
        return logits, self.gate(feats, stats), stats

    def infer(self, x: torch.Tensor, prev_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` for the paths that run without autograd (hard early exit, soft inference):
        through `torch.compile` after `EarlyExitModel.compile_exits()`, else eagerly."""
        compiled = self._compiled
        if compiled is None:
            return self.forward(x, prev_stats)
        if compiled.fn is None:
            compiled.fn = torch.compile(self.forward, **compiled.options)
        return compiled.fn(x, prev_stats)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        run = self._run
        if run is None:
            return None
        return run.on_exit(self, output)

    def extra_repr(self) -> str:
        return f"at={self.name!r}"
