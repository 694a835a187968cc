"""Threshold calibration on held-out data.

`collect` runs the full forward (every exit) once over a loader; `simulate` applies a policy's
exit rule to the collected outputs exactly as the hard path would (the first exit whose rule fires);
`calibrate` sweeps one shared threshold and picks the one that meets a target expected cost or a
maximum accuracy drop relative to the final exit. Everything is deterministic for a given loader.

Non-finite values are refused, never averaged in: `collect` raises if an input image or an exit's
output holds NaN or inf, and `calibrate`, `sweep` and `fit_gates` raise on such values in the
collected data, each naming how many samples are affected, at which exit, and the first indices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core._utils import evaluating
from ..core.config import PolicyName
from ..core.gates import early_exit_stats, logit_stats, stats_gate_logits
from ..core.model import EarlyExitModel
from .policies import EXIT_RULES, exit_mask, per_exit

__all__ = ["Collected", "Calibration", "collect", "simulate", "sweep", "calibrate"]


@dataclass
class Collected:
    """Outputs of every exit on a data set: logits (N, E+1, K), gate logits (N, E), labels (N,), costs."""

    logits: torch.Tensor
    gate_logits: torch.Tensor
    labels: torch.Tensor
    costs: torch.Tensor

    def __post_init__(self) -> None:
        self.labels = _class_indices(self.labels)
        rows = (self.logits.shape[0], self.gate_logits.shape[0], self.labels.shape[0])
        if (
            len(set(rows)) > 1
            or self.labels.ndim != 1
            or self.gate_logits.ndim != 2
            or self.gate_logits.shape[1] != self.logits.shape[1] - 1
        ):
            raise ValueError(
                f"logits {tuple(self.logits.shape)}, gate_logits {tuple(self.gate_logits.shape)} and labels "
                f"{tuple(self.labels.shape)} do not describe the same samples: give logits (N, E + 1, K), gate_logits "
                "(N, E) and labels (N,), indexing all three with the same rows."
            )
        k = self.logits.shape[-1]
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= k):
            bad = self.labels[(self.labels < 0) | (self.labels >= k)].unique()[:5].tolist()
            raise ValueError(
                f"labels must be class indices in [0, {k}) for the model's {k} classes; got {bad}. Drop or remap "
                "those samples (e.g. an ignore index such as -100) before collecting."
            )

    @property
    def exit_accuracy(self) -> list[float]:
        """Accuracy of every exit on all samples."""
        return (self.logits.argmax(-1) == self.labels[:, None]).double().mean(0).tolist()


def _class_indices(labels: torch.Tensor) -> torch.Tensor:
    """`labels` as int64 class indices: integer and bool labels are cast, floats only if they hold whole numbers."""
    if labels.is_floating_point():
        whole = torch.isfinite(labels) & (labels == labels.round())
        if not whole.all():
            bad = labels[~whole].unique()[:5].tolist()
            raise ValueError(
                f"labels must be whole class indices; got {labels.dtype} labels with values {bad}. Give one class "
                "index per sample (e.g. targets.argmax(-1) for one-hot or soft targets)."
            )
    return labels.long()


def _require_match(model: EarlyExitModel, data: Collected, where: str) -> None:
    """Refuse data collected from another model: its early exits, classes and exit costs must be the model's."""
    problems = []
    n_early = data.gate_logits.shape[1]
    if n_early != len(model.branches):
        problems.append(f"data has {n_early} early exits; the model has {len(model.branches)}")
    if data.logits.shape[-1] != model.num_classes:
        problems.append(f"data has {data.logits.shape[-1]} classes; the model has {model.num_classes}")
    costs = model.exit_costs.detach().double().cpu()
    if data.costs.shape != costs.shape or not torch.allclose(data.costs.double().cpu(), costs, rtol=1e-5, atol=0):
        problems.append(f"data has exit costs {data.costs.tolist()}; the model has {costs.tolist()}")
    if problems:
        raise ValueError(
            f"{where}: " + "; ".join(problems) + ". The data was collected from another model (or the model's exits "
            "or costs changed since): collect it again with this model, timm_exits.collect(model, loader)."
        )


def _require_current_gates(model: EarlyExitModel, data: Collected, where: str) -> None:
    """Refuse gate logits that the model's "stats" gates no longer give on the collected logits (refitted since)."""
    if model.config.gate != "stats" or not len(model.branches):
        return  # gates that read features cannot be recomputed from the logits
    stats = early_exit_stats(data.logits).to(next(model.branches[0].gate.parameters()).device)
    with torch.no_grad():
        now = stats_gate_logits([b.gate for b in model.branches], stats)
    # rounding of half-precision gates or another batch size moves a gate logit far less than this
    stale = ~torch.isclose(now.float().cpu(), data.gate_logits.float(), rtol=5e-2, atol=5e-2).all(1)
    if stale.any():
        raise ValueError(
            f"{where}: the model's gates give other gate logits than the data holds for {int(stale.sum())} of "
            f"{stale.shape[0]} samples (first: {_first(stale)}); the gates changed since it was collected (e.g. by "
            "fit_gates). Collect again with this model, timm_exits.collect(model, loader), to calibrate the gates."
        )


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


def _first(rows: torch.Tensor, k: int = 5) -> str:
    """The first `k` sample indices of a (N,) bool mask, as text."""
    idx = rows.nonzero().flatten()
    return ", ".join(str(i) for i in idx[:k].tolist()) + (", ..." if idx.numel() > k else "")


def _nonfinite(data: Collected, inputs_ok: torch.Tensor | None = None) -> list[str]:
    """One line per problem: samples with non-finite inputs, logits (per exit) or gate logits (per exit)."""
    ok = bool(torch.isfinite(data.logits).all() and torch.isfinite(data.gate_logits).all())
    ok = ok and bool(torch.isfinite(data.costs).all()) and (inputs_ok is None or bool(inputs_ok.all()))
    if ok:
        return []
    n = data.labels.shape[0]
    last = data.logits.shape[1] - 1
    problems = []
    if inputs_ok is not None and not inputs_ok.all():
        bad = ~inputs_ok
        problems.append(f"{int(bad.sum())} of {n} samples have non-finite input images (first: {_first(bad)})")
    for what, bad in (
        ("logits", ~torch.isfinite(data.logits).all(-1)),  # (N, E + 1)
        ("gate logits", ~torch.isfinite(data.gate_logits)),  # (N, E)
    ):
        for b in range(bad.shape[1]):
            rows = bad[:, b]
            if rows.any():
                name = f"exit {b}" + (" (the final head)" if what == "logits" and b == last else "")
                problems.append(
                    f"{int(rows.sum())} of {n} samples have non-finite {what} at {name} (first: {_first(rows)})"
                )
    if not torch.isfinite(data.costs).all():
        problems.append(f"the exit costs {data.costs.tolist()} are not finite")
    return problems


def _require_finite(data: Collected, where: str, fix: str, inputs_ok: torch.Tensor | None = None) -> None:
    """Raise a ValueError if `data` holds no sample, or naming every non-finite value (exits 0-based, final last)."""
    if data.labels.shape[0] == 0:
        raise ValueError(
            f"{where}: the collected data holds no sample; thresholds and gates need held-out samples. Collect them "
            "with timm_exits.collect(model, loader) (check the row selection if you filtered a Collected)."
        )
    problems = _nonfinite(data, inputs_ok)
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems) + f". {fix}")


_FIX_COLLECTED = (
    "Drop those samples (index logits, gate_logits and labels with the finite rows) or collect again on clean "
    "held-out data; thresholds and gates fitted on NaN or inf would be meaningless."
)


def _images_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The (images, labels) of a loader's batch: a pair or longer tuple (extra items ignored), or a dict with
    "image"/"images" and "label"/"labels"/"target" keys."""
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("image", "images", "input") if k in batch), None)
        y = next((batch[k] for k in ("label", "labels", "target", "targets") if k in batch), None)
    elif isinstance(batch, Sequence) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        x = y = None
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        what = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise TypeError(
            f"a loader batch must be (images, labels[, ...]) tensors or a dict with 'image' and 'label' keys; "
            f"got {what}."
        )
    return x, y


def collect(
    model: EarlyExitModel, loader: Iterable, device: torch.device | str | None = None, max_batches: int | None = None
) -> Collected:
    """Run every exit over `loader` ((images, labels) batches) in eval mode without gradients.

    Args:
        model: The wrapped model.
        loader: (images, labels) batches of held-out data.
        device: Device to run on (default: the model's).
        max_batches: Stop after this many batches.

    Returns:
        The `Collected` outputs of every exit, on the CPU.

    Raises:
        ValueError: If an input image or an exit's logits or gate logits hold NaN or inf (naming how many
            samples, the exit and the first sample indices, in loader order).
    """
    device = torch.device(device) if device is not None else model.exit_costs.device
    logits, gates, labels, inputs_ok = [], [], [], []
    with evaluating(model), torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _images_and_labels(batch)
            x = x.to(device)
            out = model(x)
            logits.append(torch.stack([f.float() for f in out.logits], dim=1).cpu())
            gates.append(out.gate_logits.float().cpu())
            labels.append(y.cpu())
            inputs_ok.append(torch.isfinite(x.reshape(x.shape[0], -1)).all(1).cpu())
    if not logits:
        raise ValueError("the loader yielded no batches; calibration needs held-out data.")
    y = torch.cat(labels)
    if y.ndim != 1:
        raise ValueError("calibration needs class-index labels (N,), not soft targets.")
    data = Collected(torch.cat(logits), torch.cat(gates), y, model.exit_costs.detach().float().cpu())
    ok = torch.cat(inputs_ok)
    fix = (
        "Fix or drop those images in the data set"
        if not ok.all()
        else "The inputs are finite, so the model produces them: load a finite checkpoint, or run in float32 if "
        "half precision overflows"
    )
    _require_finite(data, "collect", fix + "; thresholds and gates fitted on NaN or inf would be meaningless.", ok)
    return data


def simulate(data: Collected, policy: PolicyName, threshold: float | Sequence[float]) -> torch.Tensor:
    """Exit index each sample would take under `policy` (the same rule as the hard path)."""
    if policy not in EXIT_RULES:
        raise ValueError(f"policy {policy!r} has no exit rule; use one of {EXIT_RULES}.")
    thresholds = per_exit(threshold, data.gate_logits.shape[1])
    bad = [t for t in thresholds if not 0.0 <= t <= 1.0]  # NaN fails the comparison too
    if bad:
        raise ValueError(f"thresholds {bad} are outside [0, 1], where every exit rule's scores lie.")
    return _first_exit(data, policy, thresholds, _exit_stats(data, policy))


def _exit_stats(data: Collected, policy: str) -> list[torch.Tensor | None]:
    """Each early exit's (N, 3) `logit_stats`, computed once for the rules that read them (None for "gate")."""
    n_early = data.gate_logits.shape[1]
    if policy == "gate":
        return [None] * n_early
    return [logit_stats(data.logits[:, b]) for b in range(n_early)]


def _first_exit(
    data: Collected, policy: str, thresholds: list[float], stats: list[torch.Tensor | None]
) -> torch.Tensor:
    """(N,) the first early exit whose rule (`exit_mask`) fires, the final exit where none does."""
    n_early = data.gate_logits.shape[1]
    index = torch.full((data.labels.shape[0],), n_early, dtype=torch.long)
    for b in reversed(range(n_early)):
        index[exit_mask(policy, data.logits[:, b], data.gate_logits[:, b], thresholds[b], stats[b])] = b
    return index


def _point(costs: torch.Tensor, correct: torch.Tensor, index: torch.Tensor) -> tuple[float, float]:
    """(expected cost, accuracy) of the exits `index`, given every exit's (N, E + 1) correctness.

    Both are float64 means, so a point that lies exactly on a target (an exit's own cost, an accuracy drop of
    exactly `max_accuracy_drop`) is not pushed past it by float32 rounding.
    """
    acc = float(correct.gather(1, index[:, None]).double().mean())
    return float(costs.double()[index].mean()), acc


def _candidates(data: Collected, policy: str, stats: list[torch.Tensor | None], num: int) -> list[float]:
    """0, 1 and thresholds at `num` quantiles of the policy's scores, each moved off the scores (`_between`)."""
    if policy == "gate":
        scores = torch.sigmoid(data.gate_logits)
    else:
        col = 0 if policy == "confidence" else 1
        scores = torch.stack([st[:, col] for st in stats], 1) if stats else data.gate_logits
    qs = torch.linspace(0, 1, num, dtype=torch.float64)
    values = torch.quantile(scores.flatten().double(), qs).tolist() if scores.numel() else []
    distinct = torch.unique(scores.flatten())  # sorted
    return sorted({0.0, 1.0, *[_between(policy, distinct, min(max(v, 0.0), 1.0)) for v in values]})


def _between(policy: str, scores: torch.Tensor, t: float) -> float:
    """A threshold that lets exactly the scores out that `t` does, halfway between the two distinct scores around it.

    A threshold on a calibration sample's score would let a rounding difference (another batch size, another
    kernel) flip that sample's exit. Where the halfway point rounds onto one of the two scores (in the scores'
    dtype, as the exit rules compare), `t` is kept.

    Args:
        policy: "gate", "confidence" (scores at or above the threshold leave) or "entropy" (at or below).
        scores: The sorted distinct scores of every early exit.
        t: A threshold in [0, 1].

    Returns:
        The threshold: 0 or 1 where every score or none leaves, else a value strictly between two scores.
    """
    if t in (0.0, 1.0):
        return t
    below = int((scores <= t).sum()) if policy == "entropy" else int((scores < t).sum())  # the comparison of `t`
    if below in (0, scores.numel()):  # every score on one side: 0 and 1 let the same scores out
        return 0.0 if below == 0 else 1.0
    lo, hi = float(scores[below - 1]), float(scores[below])
    mid = float(torch.tensor((lo + hi) / 2, dtype=scores.dtype))
    return mid if lo < mid < hi else t


def sweep(data: Collected, policy: PolicyName, num: int = 201) -> list[dict[str, float]]:
    """Cost and accuracy of `policy` over thresholds at `num` quantiles of its scores (plus 0 and 1)."""
    if policy not in EXIT_RULES:
        raise ValueError(f"cannot sweep policy {policy!r}; use one of {EXIT_RULES}.")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num={num!r}: give 1 or more candidate thresholds (the default is 201).")
    _require_finite(data, "sweep", _FIX_COLLECTED)
    stats = _exit_stats(data, policy)  # once: only the comparison depends on the threshold
    correct = data.logits.argmax(-1) == data.labels[:, None]
    curve = []
    for t in _candidates(data, policy, stats, num):
        index = _first_exit(data, policy, [t] * len(stats), stats)
        cost, acc = _point(data.costs, correct, index)
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

    Raises:
        ValueError: If the collected logits, gate logits or costs hold NaN or inf (see `collect`), or if a given
            `Collected` comes from another model (other early exits, classes or exit costs); the model's stored
            policy is then left as it was.
    """
    if (target_cost is None) == (max_accuracy_drop is None):
        raise ValueError("give exactly one of target_cost= or max_accuracy_drop=.")
    if policy not in EXIT_RULES:  # before the loader runs through the model
        raise ValueError(f"cannot calibrate policy {policy!r}; use one of {EXIT_RULES}.")
    for name, value in (("target_cost", target_cost), ("max_accuracy_drop", max_accuracy_drop)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name}={value} is not a finite number.")
    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop={max_accuracy_drop} is negative; give an allowed drop such as 0.01.")
    if isinstance(loader, Collected):
        _require_match(model, loader, "calibrate")
        _require_finite(loader, "calibrate", _FIX_COLLECTED)
        if policy == "gate":
            _require_current_gates(model, loader, "calibrate")
        data = loader
    else:
        data = collect(model, loader)
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
    dist = (torch.bincount(index, minlength=data.logits.shape[1]).double() / index.shape[0]).tolist()
    if apply:
        model.config.policy = policy
        model.config.thresholds = [best["threshold"]] * len(model.branches)
    return Calibration(policy, best["threshold"], best["cost"], best["accuracy"], final_acc, dist, curve)
