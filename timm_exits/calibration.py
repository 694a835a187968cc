"""Threshold calibration on held-out data.

`collect` runs the full forward (every exit) once over a loader; `simulate` applies a policy's
exit rule to the collected outputs exactly as the hard path would (the first exit whose rule fires);
`calibrate` sweeps one shared threshold and picks the one that meets a target expected cost or a
maximum accuracy drop relative to the final exit. Everything is deterministic for a given loader.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ._utils import evaluating
from .config import PolicyName
from .model import EarlyExitModel
from .policies import POLICIES, exit_mask

__all__ = ["Collected", "Calibration", "collect", "simulate", "sweep", "calibrate"]


@dataclass
class Collected:
    """Outputs of every exit on a data set: logits (N, E+1, K), gate logits (N, E), labels (N,), costs."""

    logits: torch.Tensor
    gate_logits: torch.Tensor
    labels: torch.Tensor
    costs: torch.Tensor

    @property
    def exit_accuracy(self) -> list[float]:
        """Accuracy of every exit on all samples."""
        return (self.logits.argmax(-1) == self.labels[:, None]).float().mean(0).tolist()


@dataclass
class Calibration:
    """A calibrated policy: its threshold and what it reached on the calibration data."""

    policy: str
    threshold: float
    cost: float
    accuracy: float
    final_accuracy: float
    exit_distribution: list[float]
    curve: list[dict[str, float]] = field(default_factory=list)


def collect(
    model: EarlyExitModel, loader: Iterable, device: torch.device | str | None = None, max_batches: int | None = None
) -> Collected:
    """Run every exit over `loader` ((images, labels) batches) in eval mode without gradients."""
    device = torch.device(device) if device is not None else model.exit_costs.device
    logits, gates, labels = [], [], []
    with evaluating(model), torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            out = model(x.to(device))
            logits.append(torch.stack([f.float() for f in out.logits], dim=1).cpu())
            gates.append(out.gate_logits.float().cpu())
            labels.append(y.cpu())
    if not logits:
        raise ValueError("the loader yielded no batches; calibration needs held-out data.")
    y = torch.cat(labels)
    if y.ndim != 1:
        raise ValueError("calibration needs class-index labels (N,), not soft targets.")
    return Collected(torch.cat(logits), torch.cat(gates), y, model.exit_costs.detach().float().cpu())


def simulate(data: Collected, policy: PolicyName, threshold: float | list[float]) -> torch.Tensor:
    """Exit index each sample would take under `policy` (the same rule as the hard path)."""
    n_early = data.gate_logits.shape[1]
    thresholds = [float(threshold)] * n_early if isinstance(threshold, (int, float)) else list(threshold)
    index = torch.full((data.labels.shape[0],), n_early, dtype=torch.long)
    for b in reversed(range(n_early)):
        index[exit_mask(policy, data.logits[:, b], data.gate_logits[:, b], thresholds[b])] = b
    return index


def _point(data: Collected, index: torch.Tensor) -> tuple[float, float]:
    picked = data.logits[torch.arange(index.shape[0]), index]
    acc = float((picked.argmax(-1) == data.labels).float().mean())
    return float(data.costs[index].mean()), acc


def _candidates(data: Collected, policy: str, num: int) -> list[float]:
    from .gates import logit_stats

    if policy == "gate":
        scores = torch.sigmoid(data.gate_logits)
    else:
        col = 0 if policy == "confidence" else 1
        scores = torch.stack([logit_stats(data.logits[:, b])[:, col] for b in range(data.gate_logits.shape[1])], 1)
    qs = torch.linspace(0, 1, num, dtype=torch.float64)
    values = torch.quantile(scores.flatten().double(), qs).tolist() if scores.numel() else []
    return sorted({0.0, 1.0, *[min(max(v, 0.0), 1.0) for v in values]})


def sweep(data: Collected, policy: PolicyName, num: int = 201) -> list[dict[str, float]]:
    """Cost and accuracy of `policy` over thresholds at `num` quantiles of its scores (plus 0 and 1)."""
    if policy not in POLICIES[1:]:
        raise ValueError(f"cannot sweep policy {policy!r}; use one of {POLICIES[1:]}.")
    curve = []
    for t in _candidates(data, policy, num):
        cost, acc = _point(data, simulate(data, policy, t))
        curve.append({"threshold": t, "cost": cost, "accuracy": acc})
    return curve


def calibrate(
    model: EarlyExitModel,
    loader: Iterable | Collected,
    policy: PolicyName = "gate",
    target_cost: float | None = None,
    max_accuracy_drop: float | None = None,
    apply: bool = True,
    num: int = 201,
) -> Calibration:
    """Choose one threshold for every early exit on held-out data.

    Args:
        model: The wrapped model.
        loader: (images, labels) batches, or the output of `collect`.
        policy: "gate", "confidence" or "entropy".
        target_cost: Best accuracy at an expected cost (fraction of the backbone's FLOPs) no higher
            than this.
        max_accuracy_drop: Lowest cost whose accuracy is at most this much (absolute, e.g. 0.01)
            below the final exit's.
        apply: Store the policy and thresholds on the model (used by `predict` and saved with it).
        num: Number of candidate thresholds.

    Returns:
        A `Calibration` with the threshold, the cost and accuracy reached and the whole sweep.
    """
    if (target_cost is None) == (max_accuracy_drop is None):
        raise ValueError("give exactly one of target_cost= or max_accuracy_drop=.")
    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop={max_accuracy_drop} is negative; give an allowed drop such as 0.01.")
    data = loader if isinstance(loader, Collected) else collect(model, loader)
    curve = sweep(data, policy, num)
    final_acc = data.exit_accuracy[-1]
    if target_cost is not None:
        ok = [p for p in curve if p["cost"] <= target_cost + 1e-12]
        if not ok:
            cheapest = min(curve, key=lambda p: p["cost"])
            raise ValueError(
                f"target_cost={target_cost} cannot be met with policy {policy!r}: the lowest expected cost it "
                f"reaches is {cheapest['cost']:.4f} (threshold {cheapest['threshold']:.4f}, every sample at the "
                "first exit it allows). Raise target_cost or place an earlier exit."
            )
        best = max(ok, key=lambda p: (p["accuracy"], -p["cost"]))
    else:
        floor = final_acc - max_accuracy_drop
        ok = [p for p in curve if p["accuracy"] >= floor - 1e-12]
        if not ok:
            top = max(curve, key=lambda p: p["accuracy"])
            raise ValueError(
                f"max_accuracy_drop={max_accuracy_drop} cannot be met with policy {policy!r}: the final exit reaches "
                f"{final_acc:.4f} and the best threshold {top['threshold']:.4f} reaches {top['accuracy']:.4f}."
            )
        best = min(ok, key=lambda p: (p["cost"], -p["accuracy"]))
    index = simulate(data, policy, best["threshold"])
    dist = (torch.bincount(index, minlength=data.logits.shape[1]).float() / index.shape[0]).tolist()
    if apply:
        model.config.policy = policy
        model.config.thresholds = [best["threshold"]] * len(model.branches)
    return Calibration(policy, best["threshold"], best["cost"], best["accuracy"], final_acc, dist, curve)
