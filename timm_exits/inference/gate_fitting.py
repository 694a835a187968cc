"""Fit the exit gates on frozen exits and held-out data.

Gates trained jointly with the exits see training data, on which the final exit is nearly always
right; they learn to defer everything to it (measured on CIFAR-10 and digits: such gates
lose to a plain max-softmax threshold on their own exits). Fitting the gates afterwards on
held-out outputs of the frozen exits fixes that. Three objectives, each a per-exit target:

* "no_gain" (default): each gate learns P(going on to the final exit gains nothing | statistics of
  exits 1..b) = 1 - P(exit b is wrong and the final exit is right), with binary cross-entropy.
  Unlike a confidence threshold it also lets out early the hard samples that no later exit gets
  right, which spends the budget where it changes answers (on the CIFAR-10 ResNet-18 runs of
  README.md it beats max-softmax by 0.8 to 2 points at 35-45 % of the cost).
* "correct": each gate learns P(exit b's prediction is right | ...): a learned generalisation of
  max-softmax that also reads entropy, margin and the earlier exits; it ties with max-softmax.
* "soft": the paper's objective  -log sum_b pi_b p_b(y) + cost_weight * sum_b pi_b gamma_b.
  It weighs log-likelihood, not accuracy: a final exit far more confident than an exit that is
  also right pulls every gate shut, so its gates rank samples poorly for a threshold.

Only the gate MLPs are trained, full batch, deterministically. "stats" gates read only the exits'
confidence statistics, so this needs no further pass over the backbone. The gates are fitted on copies
and written into the model only if every fitted parameter is finite; non-finite collected data is
refused before fitting (see `timm_exits.inference.calibration`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.gates import ExitGate, early_exit_stats, stats_gate_logits
from ..core.model import EarlyExitModel
from ..core.soft import exit_log_probs
from .calibration import _FIX_COLLECTED, Collected, _first, _require_finite, _require_match

__all__ = ["GATE_OBJECTIVES", "GateFit", "fit_gates"]

GATE_OBJECTIVES = ("no_gain", "correct", "soft")


@dataclass
class GateFit:
    """Loss and expected cost of the gates before and after fitting (on the data they were fitted on).

    "Before" is the gates the fit starts from: the re-initialised ones with ``reset=True`` (the default),
    the model's own otherwise.
    """

    loss_before: float
    loss_after: float
    cost_before: float
    cost_after: float
    steps: int


def _objective(
    gates: list[ExitGate],
    stats: torch.Tensor,
    logp_y: torch.Tensor,
    target: torch.Tensor,
    costs: torch.Tensor,
    lam: float,
    objective: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    gate_logits = stats_gate_logits(gates, stats).float()
    log_pi = exit_log_probs(gate_logits)
    cost = (log_pi.exp() * costs).sum(1).mean()
    if objective != "soft":
        return F.binary_cross_entropy_with_logits(gate_logits, target), cost
    nll = -torch.logsumexp(log_pi + logp_y, dim=1).mean()
    return nll + lam * cost, cost


def fit_gates(
    model: EarlyExitModel,
    data: Collected,
    *,
    cost_weight: float = 0.1,
    steps: int = 500,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    reset: bool = True,
    seed: int = 0,
    objective: str = "no_gain",
) -> GateFit:
    """Train only the gates, on collected outputs of the frozen exits (see the module docstring).

    Args:
        model: A wrapped model with gate="stats".
        data: `timm_exits.collect(model, held_out_loader)`: never the training data.
        cost_weight: lambda of the expected-cost term.
        steps: Full-batch Adam steps.
        lr: Learning rate.
        weight_decay: L2 on the gate weights.
        reset: Re-initialise the gates first (their joint-training weights learned to defer).
        seed: Seed of the re-initialisation.
        objective: "no_gain": each gate learns the probability that going on to the final exit
            would not fix its exit's answer; "correct": the probability that its exit is right;
            "soft": the paper's soft-conditional objective with `cost_weight` (module docstring).

    Returns:
        A `GateFit` with the objective and expected cost before and after.

    Raises:
        ValueError: If `data` comes from another model (other early exits, classes or exit costs), holds NaN or
            inf (naming how many samples, the exit and the first indices), or if the fit diverges to non-finite
            gate parameters; the model's gates are then left exactly as they were.
    """
    if model.config.gate != "stats":
        raise ValueError(
            f"fit_gates trains gates on cached exit statistics; this model has gate={model.config.gate!r}. "
            "Wrap with gate='stats' or train the gates in the recipes' joint stage."
        )
    if objective not in GATE_OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {GATE_OBJECTIVES}.")
    _require_match(model, data, "fit_gates")
    _require_finite(data, "fit_gates", _FIX_COLLECTED)
    device = model.exit_costs.device
    logits = data.logits.to(device).float()
    labels = data.labels.to(device)
    stats = early_exit_stats(logits)
    logp_y = F.log_softmax(logits, dim=-1).gather(-1, labels[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]
    _require_finite_stats(stats, logp_y if objective == "soft" else None)
    correct = (logits.argmax(-1) == labels[:, None]).float()  # every exit, the final one last
    if objective == "no_gain":  # 0 only where this exit is wrong and the final exit is right
        target = 1.0 - (1.0 - correct[:, :-1]) * correct[:, -1:]
    else:
        target = correct[:, :-1]
    costs = model.exit_costs.detach().float()
    args = (stats, logp_y, target, costs, cost_weight, objective)
    # fitted apart in float32 (half precision rounds Adam's eps to 0), written back only if finite
    gates = [copy.deepcopy(b.gate).float() for b in model.branches]
    params = [p for g in gates for p in g.parameters()]
    if reset:
        gen = torch.Generator().manual_seed(seed)
        bias = model.config.gate_bias
        with torch.no_grad():
            for g in gates:
                layers = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
                for layer in layers:
                    bound = 1.0 / layer.in_features**0.5
                    # drawn on the CPU generator, then copied: the same start on every device
                    layer.weight.copy_(torch.empty(layer.weight.shape).uniform_(-bound, bound, generator=gen))
                    layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=gen))
                layers[-1].bias.fill_(bias)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        with torch.no_grad():
            before, cost_before = _objective(gates, *args)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss, _ = _objective(gates, *args)
            loss.backward()
            opt.step()
        with torch.no_grad():
            after, cost_after = _objective(gates, *args)
    _require_finite_fit(model, gates, float(after), steps, lr)
    with torch.no_grad():
        for b, g in zip(model.branches, gates):
            for mine, fitted in zip(b.gate.state_dict(keep_vars=True).values(), g.state_dict().values()):
                mine.copy_(fitted)
    return GateFit(float(before), float(after), float(cost_before), float(cost_after), steps)


def _require_finite_stats(stats: torch.Tensor, logp_y: torch.Tensor | None) -> None:
    """Refuse statistics (and log-likelihoods) that finite logits can still overflow to NaN or inf."""
    bad = ~torch.isfinite(stats).all(1)
    if logp_y is not None:
        bad |= ~torch.isfinite(logp_y).all(1)
    if bad.any():
        raise ValueError(
            f"fit_gates: {int(bad.sum())} of {bad.shape[0]} samples have non-finite exit statistics or label "
            f"log-probabilities (first: {_first(bad)}); their logits are finite but too large to normalise. "
            f"{_FIX_COLLECTED}"
        )


def _require_finite_fit(model: EarlyExitModel, gates: list[ExitGate], loss: float, steps: int, lr: float) -> None:
    """Refuse fitted gates with a NaN or inf parameter before any is written into the model."""
    bad = [
        f"exit {i} ({b.name!r})"
        for i, (b, g) in enumerate(zip(model.branches, gates))
        if not all(bool(torch.isfinite(p).all()) for p in g.parameters())
    ]
    if bad:
        raise ValueError(
            f"fit_gates diverged: after {steps} steps (lr={lr}) the fitted gates of {', '.join(bad)} have non-finite "
            f"parameters (final loss {loss}); the model's gates were left unchanged. Fit again with a lower lr=."
        )
