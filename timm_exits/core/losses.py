"""Training objectives for multi-exit models.

* `SoftConditionalLoss`: the paper's objective, cross-entropy of the first soft output y_1 plus
  `cost_weight` times the batch-mean expected cost, plus (by default) deep supervision of every
  exit. Taken literally (`exit_weight=0`) the objective collapses onto the first exit: with g_1
  near 1 the later exits get almost no gradient and stay at chance; the sum of the per-exit
  cross-entropies beside it (B-Net's signal) prevents that.
* `BranchyNetLoss`: weighted sum of per-exit cross-entropies (B-Net).
* `FinalExitLoss`: cross-entropy of the backbone's own head (the plain baseline).

All accept hard labels (B,) or soft targets (B, K) such as mixup/cutmix produce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model import ExitOutput

__all__ = ["cross_entropy", "SoftConditionalLoss", "BranchyNetLoss", "FinalExitLoss", "EXIT_REDUCTIONS"]

EXIT_REDUCTIONS: tuple[str, ...] = ("sum", "mean")


def _targets(target: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """`target` checked against (B, K) outputs: float soft targets (B, K) as they are, class indices (B,) of
    any integer dtype as int64, refused outside [0, K) (one host sync)."""
    if target.ndim == outputs.ndim:
        if target.shape != outputs.shape or not target.is_floating_point():
            raise ValueError(
                f"targets of shape {tuple(target.shape)} ({target.dtype}) do not match outputs "
                f"{tuple(outputs.shape)}; give class indices (B,) or float soft targets (B, K)"
                + (" (for (B, 1) labels: target.squeeze(1))." if target.shape[-1] == 1 else ".")
            )
        return target
    if target.ndim != 1 or target.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"targets of shape {tuple(target.shape)} do not match outputs {tuple(outputs.shape)}; give class "
            "indices (B,) or soft targets (B, K)."
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"class indices must be integers, got {target.dtype}; give them as int64 (target.long()).")
    target = target.long()
    k = outputs.shape[-1]
    if target.numel():
        low, high = torch.stack(target.aminmax()).tolist()
        if low < 0 or high >= k:
            raise ValueError(
                f"class indices must be in [0, {k}) for {k} classes, got labels from {low} to {high}; "
                "leave unlabelled samples (e.g. -100) out of the batch."
            )
    return target


def _nll(log_probs: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of log-probabilities against targets already checked by `_targets`."""
    log_probs = log_probs.float()
    if target.ndim == log_probs.ndim:
        return -(target.to(log_probs) * log_probs).sum(-1).mean()
    return F.nll_loss(log_probs, target) if label_smoothing == 0 else _smoothed(log_probs, target, label_smoothing)


def _ce(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """`cross_entropy` for targets already checked by `_targets` (a loss checks them once for all its exits)."""
    return _nll(F.log_softmax(logits.float(), dim=-1), target, label_smoothing)


def _smoothed(log_probs: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    nll = -log_probs.gather(1, target[:, None]).squeeze(1)
    return ((1 - eps) * nll - eps * log_probs.mean(-1)).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy that accepts class indices or soft targets (float32 internally)."""
    return _ce(logits, _targets(target, logits), _smoothing(label_smoothing))


def _smoothing(value: float) -> float:
    """`label_smoothing` as a float, refused outside [0, 1] (beyond them the loss rewards wrong classes)."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"label_smoothing={value!r} must be in [0, 1].")
    return float(value)


def _weight(name: str, value: float) -> float:
    """A loss term's weight as a float, refused unless finite and non-negative."""
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{name}={value!r} must be a finite, non-negative number.")
    return float(value)


class SoftConditionalLoss(nn.Module):
    """CE(y_1, target) + cost_weight * mean(C_1) + exit_weight * sum_b CE(f_b, target) (or mean_b).

    Args:
        cost_weight: lambda, the weight of the expected cost. Training recipes warm it up from 0;
            set the attribute to change it during training.
        exit_weight: Weight of the deep supervision term, every exit's CE (final exit included), so
            each exit gets B-Net's gradient. 0 gives the paper's loss taken literally, which collapses
            onto the first exit.
        exit_reduction: How the exits' CEs are combined: "sum" (B-Net's signal, the default) or "mean"
            (the sum divided by the number of exits, so the term's weight does not grow with the exits).
        label_smoothing: Label smoothing for hard labels.
    """

    def __init__(
        self,
        cost_weight: float = 0.1,
        exit_weight: float = 1.0,
        label_smoothing: float = 0.0,
        exit_reduction: str = "sum",
    ) -> None:
        super().__init__()
        if exit_reduction not in EXIT_REDUCTIONS:
            raise ValueError(f"exit_reduction must be one of {', '.join(EXIT_REDUCTIONS)}, got {exit_reduction!r}.")
        self.cost_weight = _weight("cost_weight", cost_weight)
        self.exit_weight = _weight("exit_weight", exit_weight)
        self.exit_reduction = exit_reduction
        self.label_smoothing = _smoothing(label_smoothing)
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, out: ExitOutput, target: torch.Tensor) -> torch.Tensor:
        target = _targets(target, out.log_probs)
        soft = _nll(out.log_probs, target, self.label_smoothing)
        cost = out.expected_cost.mean()
        loss = soft + self.cost_weight * cost
        parts = {"soft_ce": soft.detach(), "expected_cost": cost.detach()}
        if self.exit_weight:
            per_exit = torch.stack([_ce(f, target, self.label_smoothing) for f in out.logits])
            exits = per_exit.sum() if self.exit_reduction == "sum" else per_exit.mean()
            loss = loss + self.exit_weight * exits
            parts["exit_ce"] = exits.detach()
        self.last = parts
        return loss


class BranchyNetLoss(nn.Module):
    """Weighted sum of per-exit cross-entropies (BranchyNet's joint loss).

    Args:
        weights: One weight per exit (final exit last); None gives 1 for every exit.
        label_smoothing: Label smoothing for hard labels.
    """

    def __init__(self, weights: Sequence[float] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.weights = None if weights is None else [_weight(f"weights[{i}]", w) for i, w in enumerate(weights)]
        self.label_smoothing = _smoothing(label_smoothing)
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, out: ExitOutput, target: torch.Tensor) -> torch.Tensor:
        weights = self.weights or [1.0] * len(out.logits)
        if len(weights) != len(out.logits):
            raise ValueError(f"BranchyNetLoss has {len(weights)} weights but the model has {len(out.logits)} exits.")
        target = _targets(target, out.final)
        losses = [_ce(f, target, self.label_smoothing) for f in out.logits]
        self.last = {f"ce_{i}": loss.detach() for i, loss in enumerate(losses)}
        return sum(w * loss for w, loss in zip(weights, losses))


class FinalExitLoss(nn.Module):
    """Cross-entropy of the final exit only: plain fine-tuning of the backbone."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = _smoothing(label_smoothing)
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, out: ExitOutput, target: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(out.final, target, self.label_smoothing)
        self.last = {"final_ce": loss.detach()}
        return loss
