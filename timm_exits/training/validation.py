"""Per-epoch validation of a training run: each exit's accuracy, the soft output's, and the gate@0.5
policy's accuracy, cost and exit shares on the val split, summed over the DDP ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..core.model import EarlyExitModel
from ..inference.calibration import Collected, simulate
from .distributed import _all_sum, _Dist
from .recipe_schema import OptimSection
from .stages import _autocast

__all__: list[str] = []


def _broadcast_buffers(model: torch.nn.Module, d: _Dist) -> None:
    """Give every rank rank 0's buffers (no-op in one process)."""
    if d.world > 1:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


@torch.no_grad()
def _validate_epoch(model: EarlyExitModel, loader: Any, d: _Dist, optim: OptimSection) -> dict[str, Any]:
    """Per-exit and soft accuracy, and the gate@0.5 policy's accuracy / cost / exit shares, summed over ranks.

    Under DDP every rank first takes rank 0's buffers (BatchNorm statistics), which each rank's last step updated
    on its own shard: the numbers are then those of the model rank 0 saves.
    """
    _broadcast_buffers(model, d)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    e = model.num_exits
    # one float64 vector, so that a single all-reduce sums every count over the ranks
    exit_hits, gate_counts, gate_hits = slice(0, e), slice(e, 2 * e), slice(2 * e, 3 * e)
    soft_hits, cost_sum, seen = 3 * e, 3 * e + 1, 3 * e + 2
    sums = torch.zeros(3 * e + 3, dtype=torch.float64)
    costs = model.exit_costs.detach().float().cpu()
    try:
        for x, y in loader:
            x = x.to(d.device, non_blocking=True)
            if optim.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(optim.amp, d.device):
                out = model(x)
            logits = torch.stack([f.float() for f in out.logits], 1).cpu()
            gates = out.gate_logits.float().cpu()
            correct = logits.argmax(-1) == y[:, None]
            index = simulate(Collected(logits, gates, y, costs), "gate", 0.5)
            hit = correct[torch.arange(len(y)), index]
            sums[exit_hits] += correct.sum(0)
            sums[gate_counts] += torch.bincount(index, minlength=e)
            sums[gate_hits] += torch.bincount(index[hit], minlength=e)
            sums[soft_hits] += (out.log_probs.float().argmax(-1).cpu() == y).sum()
            sums[cost_sum] += costs[index].double().sum()
            sums[seen] += len(y)
    finally:
        for m, flag in was:
            m.training = flag
    sums = _all_sum(sums.to(d.device), d).cpu()
    n = max(float(sums[seen]), 1.0)
    return {
        "num_samples": int(sums[seen]),
        "exit_accuracy": (sums[exit_hits] / n).tolist(),
        "soft_accuracy": float(sums[soft_hits] / n),
        "gate": {
            "threshold": 0.5,
            "accuracy": float(sums[gate_hits].sum() / n),
            "expected_cost": float(sums[cost_sum] / n),
            "exit_distribution": (sums[gate_counts] / n).tolist(),
        },
    }
