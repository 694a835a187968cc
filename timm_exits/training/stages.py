"""Training stages and their optimisation: what each stage trains (a frozen-backbone stage, then joint
training), the method's loss, the optimizer and the learning-rate schedule (`OneCycle` or timm's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.losses import BranchyNetLoss, FinalExitLoss, SoftConditionalLoss
from ..core.model import EarlyExitModel

__all__ = [
    "OneCycle",
]


def _make_loss(recipe: Mapping[str, Any], mixup: bool) -> nn.Module:
    smoothing = 0.0 if mixup else recipe["label_smoothing"]  # timm Mixup folds smoothing into its targets
    if recipe["method"] == "baseline":
        return FinalExitLoss(label_smoothing=smoothing)
    if recipe["method"] == "branchynet":
        return BranchyNetLoss(weights=recipe["branchynet_weights"], label_smoothing=smoothing)
    return SoftConditionalLoss(cost_weight=0.0, exit_weight=recipe["exit_weight"], label_smoothing=smoothing)


@dataclass
class _Stage:
    name: str  # "frozen" | "joint"
    epochs: int
    lr: float


def _stages(recipe: Mapping[str, Any]) -> list[_Stage]:
    stages = []
    if recipe["frozen_epochs"]:
        stages.append(_Stage("frozen", recipe["frozen_epochs"], recipe["frozen_lr"] or recipe["lr"]))
    if recipe["epochs"]:
        stages.append(_Stage("joint", recipe["epochs"], recipe["lr"]))
    return stages


def _configure_stage(model: EarlyExitModel, recipe: Mapping[str, Any], stage: _Stage) -> int:
    """Set requires_grad for the stage and method; return the number of trainable parameters."""
    method = recipe["method"]
    model.requires_grad_(False)
    if stage.name == "joint":
        model.backbone.requires_grad_(True)
        if model.final_head is not None:
            model.final_head.requires_grad_(True)
    else:
        for p in model.exit_parameters():
            p.requires_grad_(True)
        if recipe["frozen_train_classifier"] and model.final_head is None:
            model.backbone.get_classifier().requires_grad_(True)
    if method == "baseline":
        model.branches.requires_grad_(False)
    else:
        for b in model.branches:
            b.head.requires_grad_(True)
            b.gate.requires_grad_(method == "soft")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _set_modes(model: EarlyExitModel, stage: _Stage) -> None:
    model.train()
    if stage.name == "frozen":
        model.backbone.eval()  # frozen BatchNorm statistics and no backbone dropout


class OneCycle:
    """One-cycle learning rate, a pure function of the update number (so a resumed run matches).

    Linear warm-up from ``lr / div`` to ``lr`` over ``warmup_updates``, then cosine annealing to
    ``lr / (div * final_div)`` at ``total_updates``; momentum stays fixed.

    Args:
        optimizer: Its param groups' current ``lr`` is the peak.
        total_updates: Updates of the whole schedule.
        warmup_updates: Updates of the warm-up.
        div: Peak over initial learning rate.
        final_div: Initial over final learning rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_updates: int,
        warmup_updates: float,
        div: float = 25.0,
        final_div: float = 1.0e4,
    ) -> None:
        self.optimizer = optimizer
        self.peaks = [float(g["lr"]) for g in optimizer.param_groups]
        self.total, self.warmup = max(int(total_updates), 1), max(float(warmup_updates), 0.0)
        self.div, self.final_div = float(div), float(final_div)

    def factor(self, num_updates: int) -> float:
        """Learning rate over the peak after `num_updates` updates."""
        start, end = 1.0 / self.div, 1.0 / (self.div * self.final_div)
        if num_updates < self.warmup:
            return start + (1.0 - start) * num_updates / self.warmup
        span = max(self.total - self.warmup, 1.0)
        t = min(max((num_updates - self.warmup) / span, 0.0), 1.0)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))

    def step_update(self, num_updates: int) -> None:
        """Set every param group's learning rate for update `num_updates`."""
        f = self.factor(num_updates)
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            group["lr"] = peak * f


def _make_optimizer(model: EarlyExitModel, recipe: Mapping[str, Any], stage: _Stage, steps_per_epoch: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    kwargs: dict[str, Any] = {}
    if recipe["opt"].lower() in ("sgd", "momentum", "nesterov"):
        kwargs["momentum"] = recipe["momentum"]
    opt = create_optimizer_v2(model, opt=recipe["opt"], lr=stage.lr, weight_decay=recipe["weight_decay"], **kwargs)
    if recipe["sched"] in (None, "none", "const", "constant"):
        return opt, None
    if recipe["sched"] == "onecycle":
        return opt, OneCycle(opt, stage.epochs * steps_per_epoch, recipe["warmup_epochs"] * steps_per_epoch)
    sched, _ = create_scheduler_v2(
        opt,
        sched=recipe["sched"],
        num_epochs=stage.epochs,
        warmup_epochs=int(round(recipe["warmup_epochs"])),
        warmup_lr=recipe["warmup_lr"],
        min_lr=recipe["min_lr"],
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return opt, sched
