"""The soft-conditional output and expected cost (Scardapane et al., ICASSP 2020, eqs. 1 and 2).

With exits b = 1..B, classifiers f_b, gates g_b and g_B = 1:

    y_b = g_b * softmax(f_b) + (1 - g_b) * y_{b+1},      C_b = g_b * gamma_b + (1 - g_b) * C_{b+1}

Unrolled, both are mixtures over exits with weights pi_b = g_b * prod_{j<b} (1 - g_j), the
probability that a sample leaves at exit b. Everything here is computed in log space and float32:
log pi_b from `logsigmoid` of the gate logits, and log y_1 = logsumexp_b(log pi_b + log_softmax f_b),
so confident gates (logits of +-100) and bf16/fp16 autocast give neither NaN nor inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["exit_log_probs", "soft_log_output", "expected_cost", "gates_with_final"]


def exit_log_probs(gate_logits: torch.Tensor) -> torch.Tensor:
    """Log-probability of leaving at each exit.

    Args:
        gate_logits: (B, B_exits - 1) logits of the gates of the early exits.

    Returns:
        (B, B_exits) tensor of log pi_b; the last column is for the final exit, whose gate is 1.
    """
    z = gate_logits.float()
    log_stay = F.logsigmoid(-z)
    zeros = z.new_zeros(z.shape[0], 1)
    before = torch.cat([zeros, torch.cumsum(log_stay, dim=1)], dim=1)
    return before + torch.cat([F.logsigmoid(z), zeros], dim=1)


def soft_log_output(exit_logits: Sequence[torch.Tensor], log_pi: torch.Tensor) -> torch.Tensor:
    """Log of the first soft output y_1.

    Args:
        exit_logits: Logits of every exit, the final exit last, each (B, K).
        log_pi: (B, B_exits) output of `exit_log_probs`.

    Returns:
        (B, K) log-probabilities of the soft-conditional ensemble.
    """
    if len(exit_logits) != log_pi.shape[-1]:
        raise ValueError(
            f"got the logits of {len(exit_logits)} exits but log_pi of shape {tuple(log_pi.shape)}, one column per "
            "exit; give one (B, K) logits tensor per column (exit_log_probs gives B_exits columns for B_exits - 1 "
            "gate logits)."
        )
    logp = torch.stack([F.log_softmax(f.float(), dim=-1) for f in exit_logits], dim=1)
    return torch.logsumexp(logp + log_pi.unsqueeze(-1), dim=1)


def expected_cost(log_pi: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Per-sample expected cost C_1 = sum_b pi_b * gamma_b.

    Args:
        log_pi: (B, B_exits) output of `exit_log_probs`.
        costs: (B_exits,) per-exit costs gamma_b.

    Returns:
        (B,) expected cost of each sample.
    """
    if costs.ndim != 1 or costs.shape[0] != log_pi.shape[-1]:
        raise ValueError(
            f"costs of shape {tuple(costs.shape)} for log_pi of shape {tuple(log_pi.shape)}; give one cost per "
            f"exit, the final exit last: a ({log_pi.shape[-1]},) tensor."
        )
    return (log_pi.exp() * costs.to(log_pi)).sum(dim=1)


def gates_with_final(gate_logits: torch.Tensor) -> torch.Tensor:
    """(B, E) gate logits -> (B, E + 1) gate values, the final exit's fixed to 1."""
    g = torch.sigmoid(gate_logits.float())
    return torch.cat([g, g.new_ones(g.shape[0], 1)], dim=1)
