"""Training stages and their optimisation: what each stage trains (a frozen-backbone stage, then joint
training), the method's loss, the optimizer and the learning-rate schedule (`OneCycle` or timm's).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.losses import BranchyNetLoss, FinalExitLoss, SoftConditionalLoss
from ..core.model import EarlyExitModel
from .recipe_schema import MethodSection, OptimSection

__all__ = [
    "OneCycle",
]


def _make_loss(method: MethodSection, mixup: bool) -> nn.Module:
    """The method's loss (`method.cost_weight` is warmed up by the trainer: it starts at 0 here)."""
    smoothing = 0.0 if mixup else method.label_smoothing  # timm Mixup folds smoothing into its targets
    if method.method == "baseline":
        return FinalExitLoss(label_smoothing=smoothing)
    if method.method == "branchynet":
        return BranchyNetLoss(weights=method.branchynet_weights, label_smoothing=smoothing)
    return SoftConditionalLoss(
        cost_weight=0.0,
        exit_weight=method.exit_weight,
        exit_reduction=method.exit_reduction,
        label_smoothing=smoothing,
    )


@dataclass
class _Stage:
    name: str  # "frozen" | "joint"
    epochs: int
    lr: float
    train_classifier: bool = True  # frozen stage: also train the backbone's own classifier


def _stages(optim: OptimSection) -> list[_Stage]:
    stages = []
    if optim.frozen_epochs:
        lr = optim.frozen_lr or optim.lr
        stages.append(_Stage("frozen", optim.frozen_epochs, lr, optim.frozen_train_classifier))
    if optim.epochs:
        stages.append(_Stage("joint", optim.epochs, optim.lr))
    return stages


def _configure_stage(model: EarlyExitModel, method: str, stage: _Stage) -> int:
    """Set requires_grad for the stage and method (``recipe.method.method``); return the trainable parameters."""
    model.requires_grad_(False)
    if stage.name == "joint":
        model.backbone.requires_grad_(True)
        if model.final_head is not None:
            model.final_head.requires_grad_(True)
    else:
        for p in model.exit_parameters():
            p.requires_grad_(True)
        if stage.train_classifier and model.final_head is None:
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
    ``lr / (div * final_div)`` at ``total_updates``, one past the last update (number ``total_updates - 1``,
    which runs a little above it); momentum stays fixed.

    Args:
        optimizer: Its param groups' current ``lr`` (times their ``lr_scale``: timm's layer decay) is the peak.
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
        self.peaks = [float(g["lr"]) * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
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


_CONSTANT = (None, "none", "const", "constant")


def _stage_warmup(optim: OptimSection, stage: _Stage) -> float:
    """Warm-up epochs of `stage`: the recipe's ``warmup_epochs``, at most half the stage (timm's schedules: whole
    epochs), so every stage reaches its peak and anneals."""
    if optim.sched == "onecycle":
        return min(optim.warmup_epochs, stage.epochs / 2)
    return min(int(round(optim.warmup_epochs)), stage.epochs // 2)


def _warmup_note(optim: OptimSection, stage: _Stage) -> str | None:
    """The training log's line when `stage` warms up for less than ``warmup_epochs`` (None: it does not)."""
    warmup = _stage_warmup(optim, stage)
    if optim.sched in _CONSTANT or warmup >= optim.warmup_epochs:
        return None
    return (
        f"stage {stage.name}: warm-up capped at {warmup:g} epoch(s), half the stage's {stage.epochs} "
        f"(warmup_epochs {optim.warmup_epochs:g})"
    )


def _make_optimizer(model: EarlyExitModel, optim: OptimSection, stage: _Stage, steps_per_epoch: int):
    """The stage's optimizer and learning-rate schedule (None: a constant rate) from the optim section."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    # timm hands momentum to the optimizers that have one (sgd, rmsprop, lars, ...) and drops it for the others
    opt = create_optimizer_v2(
        model,
        opt=optim.opt,
        lr=stage.lr,
        weight_decay=optim.weight_decay,
        momentum=optim.momentum,
        layer_decay=optim.layer_decay,
    )
    if optim.sched in _CONSTANT:
        for group in opt.param_groups:  # timm's schedulers apply lr_scale (layer decay); a constant rate has none
            group["lr"] *= group.get("lr_scale", 1.0)
        return opt, None
    warmup = _stage_warmup(optim, stage)
    if optim.sched == "onecycle":
        return opt, OneCycle(opt, stage.epochs * steps_per_epoch, warmup * steps_per_epoch)
    sched, _ = create_scheduler_v2(
        opt,
        sched=optim.sched,
        num_epochs=stage.epochs,
        warmup_epochs=int(warmup),
        warmup_lr=optim.warmup_lr,
        min_lr=optim.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return opt, sched


def _schedule_lr(opt: torch.optim.Optimizer) -> float:
    """The schedule's current learning rate: a param group's rate without its ``lr_scale`` (timm's layer decay),
    i.e. the rate of the top layer group, whichever group comes first."""
    group = opt.param_groups[0]
    return float(group["lr"]) / group.get("lr_scale", 1.0)


def _autocast(amp: str | None, device: torch.device) -> contextlib.AbstractContextManager:
    """The recipe's mixed precision (``amp``: "bf16", "fp16" or None) for a forward on `device`."""
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
