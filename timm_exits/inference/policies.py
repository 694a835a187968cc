"""Exit policies: the rule that decides, at each early exit b, which samples leave, and its thresholds.

* "gate":       sigmoid(gate logit) >= threshold (the paper's hard gating; 0.5 by default);
* "confidence": max softmax >= threshold (Shallow-Deep Networks);
* "entropy":    entropy / log(K) <= threshold (BranchyNet, normalised so thresholds lie in [0, 1]);
* "soft":       no early exit; the soft-conditional ensemble of every exit (the paper's option 1).

The conservative end of each scale lets no sample leave: threshold 1 for "gate" and "confidence", 0 for
"entropy", even where float32 saturates (a max softmax of exactly 1.0, an entropy of exactly 0).

`timm_exits.inference.hard_exit` applies them in a forward that really stops computing; `calibration`
applies them to collected logits.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, get_args

import torch

from ..core.config import PolicyName
from ..core.gates import logit_stats

if TYPE_CHECKING:
    from ..core.model import EarlyExitModel

__all__ = ["POLICIES", "EXIT_RULES", "DEFAULT_THRESHOLDS", "exit_mask", "per_exit", "resolve_thresholds"]

POLICIES: tuple[str, ...] = get_args(PolicyName)
EXIT_RULES: tuple[str, ...] = ("gate", "confidence", "entropy")  # the policies that exit early, by threshold
DEFAULT_THRESHOLDS = {"gate": 0.5, "confidence": 0.9, "entropy": 0.2}


def exit_mask(
    policy: PolicyName,
    logits: torch.Tensor | None,
    gate_logit: torch.Tensor,
    threshold: float,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (B,) mask of the samples that leave at this exit under `policy`.

    Args:
        policy: "gate", "confidence" or "entropy".
        logits: (B, K) logits of this exit (not needed when `stats` is given).
        gate_logit: (B,) gate logits of this exit.
        threshold: The exit's threshold (1 for "gate" and "confidence", 0 for "entropy": nobody leaves).
        stats: (B, 3) `logit_stats(logits)` when already computed.
    """
    if policy == "gate":
        score = torch.sigmoid(gate_logit.float())
        return score >= threshold if threshold < 1.0 else torch.zeros_like(score, dtype=torch.bool)
    if policy not in ("confidence", "entropy"):
        raise ValueError(f"policy {policy!r} has no exit rule; use one of {EXIT_RULES}")
    stats = logit_stats(logits) if stats is None else stats
    if policy == "confidence":
        return stats[:, 0] >= threshold if threshold < 1.0 else torch.zeros_like(stats[:, 0], dtype=torch.bool)
    return stats[:, 1] <= threshold if threshold > 0.0 else torch.zeros_like(stats[:, 1], dtype=torch.bool)


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}.")


def per_exit(threshold: float | Sequence[float], n_early: int) -> list[float]:
    """`threshold` as one float per early exit.

    Args:
        threshold: One number for every early exit (Python, numpy or 0-d torch), or one per early exit (a
            sequence, tensor or array).
        n_early: The number of early exits.

    Returns:
        `n_early` floats; a wrong count raises a ValueError that says so.
    """
    if isinstance(threshold, (str, bytes)):
        raise TypeError(f"threshold {threshold!r} is text; give a number or one number per early exit.")
    if hasattr(threshold, "tolist"):  # torch tensors, numpy arrays and numpy scalars, 0-d included
        threshold = threshold.tolist()
    values = [float(threshold)] * n_early if isinstance(threshold, numbers.Real) else [float(t) for t in threshold]
    if len(values) != n_early:
        raise ValueError(
            f"got {len(values)} thresholds for {n_early} early exits; give one number for all or one per early "
            "exit (the final exit takes every remaining sample and has none)."
        )
    return values


def resolve_thresholds(
    model: EarlyExitModel, policy: PolicyName, threshold: float | Sequence[float] | None
) -> list[float]:
    """One threshold per early exit.

    Args:
        model: The wrapped model (its number of early exits and stored calibration are read).
        policy: "gate", "confidence" or "entropy".
        threshold: One number for every early exit, one per early exit (a sequence, tensor or array), or
            None: the model's calibrated thresholds when stored for this policy, else `DEFAULT_THRESHOLDS`.

    Returns:
        One float in [0, 1] per early exit; a wrong count or value raises a ValueError that says so.
    """
    if policy not in EXIT_RULES:
        raise ValueError(
            f"policy {policy!r} takes no thresholds"
            + (" (it averages every exit)" if policy == "soft" else "")
            + f"; thresholds belong to {EXIT_RULES}."
        )
    n = len(model.branches)
    if threshold is None:
        stored = model.config.thresholds
        threshold = stored if stored is not None and model.config.policy == policy else DEFAULT_THRESHOLDS[policy]
    values = per_exit(threshold, n)
    bad = [t for t in values if not 0.0 <= t <= 1.0]  # NaN fails the comparison too
    if bad:
        what = {"gate": "gate values", "confidence": "max-softmax values", "entropy": "normalised entropies"}[policy]
        raise ValueError(f"thresholds {bad} are outside [0, 1]; {policy!r} compares {what}, which lie in [0, 1].")
    return values
