"""Exit gates: small modules that decide, per sample, how much weight an exit gets.

A gate returns a logit; the exit weight is `sigmoid(logit)` (the soft-conditional recursion works on
`logsigmoid` of it for numerical safety). Measured on CIFAR-10, gates that see only
pooled features lose to a plain max-softmax threshold on their own exits, while gates that also see
the confidence statistics of their exit (and the earlier ones) do not, so "stats" is the default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import GateKind

__all__ = ["NUM_STATS", "logit_stats", "append_stats", "early_exit_stats", "stats_gate_logits", "ExitGate"]

NUM_STATS = 3


def logit_stats(logits: torch.Tensor) -> torch.Tensor:
    """Confidence statistics of one exit: max softmax, normalised entropy, top-2 margin.

    Args:
        logits: (B, K) logits.

    Returns:
        (B, 3) float32 tensor, each column in [0, 1].
    """
    return append_stats(logits.new_zeros(logits.shape[0], 0, dtype=torch.float32), logits)


def append_stats(prev: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """`logit_stats(logits)` appended to the statistics of the earlier exits, in one concatenation.

    Args:
        prev: (B, 3 * b) float32 statistics of the exits before this one.
        logits: (B, K) logits of this exit.

    Returns:
        (B, 3 * (b + 1)) float32 tensor.
    """
    k = logits.shape[-1]
    if k == 1:  # one class: certain, no entropy
        one = logits.new_ones(logits.shape[0], 1, dtype=torch.float32)
        return torch.cat([prev, one, one.new_zeros(one.shape), one], dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    # a class of probability 0 (a -inf logit) adds 0 to the entropy, not 0 * -inf = NaN, and no NaN gradient
    plogp = p * logp.masked_fill(p == 0, 0.0)
    # rounding can put a uniform output's entropy a hair above 1 (K = 7 gives 1.0000001); the column is in [0, 1]
    entropy = plogp.sum(-1, keepdim=True).mul_(-1.0 / math.log(k)).clamp_(0.0, 1.0)
    top2 = p.topk(2, dim=-1).values
    pmax = top2[:, :1]
    return torch.cat([prev, pmax, entropy, pmax - top2[:, 1:]], dim=-1)


def early_exit_stats(logits: torch.Tensor) -> torch.Tensor:
    """The statistics stats gates read, from stored outputs.

    Args:
        logits: (N, E + 1, K) logits of every exit, the final one last.

    Returns:
        (N, 3 * E) float32 statistics of the E early exits, in exit order.
    """
    return torch.cat([logit_stats(logits[:, b]) for b in range(logits.shape[1] - 1)], dim=1)


def stats_gate_logits(gates: Sequence[nn.Module], stats: torch.Tensor) -> torch.Tensor:
    """(N, E) logits of stats gates, gate b reading the statistics of exits 0..b (`early_exit_stats`)."""
    return torch.stack([g(None, stats[:, : NUM_STATS * (b + 1)]) for b, g in enumerate(gates)], dim=1)


class ExitGate(nn.Module):
    """Gate of one exit: an MLP over confidence statistics and/or pooled features.

    Args:
        kind: "stats", "features" or "both".
        position: 0-based index of the exit; "stats" gates read the statistics of exits 0..position.
        feature_dim: Width of the pooled features (used by "features" and "both").
        hidden: Hidden width; 0 makes the gate a single linear layer. A "features" gate is always a single
            linear layer (the pooled features are already wide), whatever `hidden` says.
        bias: Initial bias of the output logit (negative: the gate starts closed).
        detach: Stop gradients from the gate into the exit head and the backbone.
    """

    def __init__(
        self,
        kind: GateKind,
        position: int,
        feature_dim: int,
        hidden: int = 32,
        bias: float = -2.0,
        detach: bool = True,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.detach = detach
        in_dim = 0
        if kind in ("stats", "both"):
            in_dim += NUM_STATS * (position + 1)
        if kind in ("features", "both"):
            in_dim += feature_dim
        if kind == "features" or hidden <= 0:
            self.mlp = nn.Linear(in_dim, 1)
            out = self.mlp
        else:
            self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
            out = self.mlp[-1]
        nn.init.constant_(out.bias, bias)

    def forward(self, features: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """Return the gate logit, shape (B,).

        The MLP's layers are applied to their parameters directly rather than through `__call__`
        (see `ExitHead.forward` for why).

        Args:
            features: (B, D) pooled features of this exit.
            stats: (B, 3 * (position + 1)) statistics of this exit and the earlier ones.
        """
        if self.kind == "stats":
            z = stats
        elif self.kind == "features":
            z = features
        else:
            z = torch.cat([stats, features.float()], dim=-1)
        if self.detach:
            z = z.detach()
        mlp = self.mlp
        if isinstance(mlp, nn.Linear):
            return F.linear(z.to(mlp.weight.dtype), mlp.weight, mlp.bias).squeeze(-1)
        first, act, last = mlp
        h = act(F.linear(z.to(first.weight.dtype), first.weight, first.bias))
        return F.linear(h, last.weight, last.bias).squeeze(-1)
