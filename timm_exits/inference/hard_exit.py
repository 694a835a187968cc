"""Hard early exit: a forward that really stops computing for the samples that leave.

In the hard path the exit hooks raise `_AllExited` once no sample is left (the backbone stops
there: at batch 1 nothing after the exit runs), and otherwise return the rows that stay
(`index_select`), so the rest of the backbone runs on those samples only; deciding an exit costs one
host sync on CUDA. Results are scattered back in input order. For
backbones whose later stages read earlier tensors (the batch cannot shrink mid-network), a one-off
check detects it and the model falls back to masking: finished samples keep flowing through the
backbone, but the forward still stops when every sample has exited. The exit rules themselves are
`timm_exits.inference.policies`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..core._utils import evaluating, feature_tensor, take_rows
from ..core.config import PolicyName
from ..core.gates import NUM_STATS
from .policies import _check_policy, exit_mask, resolve_thresholds

if TYPE_CHECKING:  # annotations only: model.predict imports this module
    from ..core.model import EarlyExitModel, ExitBranch

__all__ = ["Prediction", "PredictionStats", "predict", "run_assigned"]


@dataclass
class PredictionStats:
    """Aggregate statistics of one `predict` call.

    Attributes:
        counts: Samples that left at each exit (final exit last).
        expected_cost: Mean gamma of the exits taken (fraction of the plain backbone's FLOPs).
        exit_accuracy: Accuracy of the samples that left at each exit (None where none did), when
            labels were given.
        accuracy: Overall accuracy, when labels were given.
        batch_shrink: Whether exited samples were removed from the batch mid-network.
        nonfinite: Indices of the samples whose input held NaN or inf (only with `allow_nonfinite=True`):
            they ran through the whole network and are counted at the final exit.
    """

    counts: list[int]
    expected_cost: float
    exit_accuracy: list[float | None] | None = None
    accuracy: float | None = None
    batch_shrink: bool = True
    nonfinite: list[int] = field(default_factory=list)

    @property
    def distribution(self) -> list[float]:
        """Fraction of samples per exit."""
        n = max(sum(self.counts), 1)
        return [c / n for c in self.counts]


@dataclass
class Prediction:
    """Result of hard early-exit inference.

    Attributes:
        logits: (B, K) float32 logits of the exit each sample left at (for "soft": the log of the
            soft-conditional output).
        exit_index: (B,) 0-based exit taken by each sample; `num_exits - 1` is the backbone's head.
        stats: Aggregate statistics.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    stats: PredictionStats


class _AllExited(Exception):
    """Raised from an exit hook when no sample is left: stops the backbone's forward."""


# decide(exit position, this exit's (B, 3) stats, gate logits, original rows of the samples still running) -> mask
# (a plain bool may stand for the mask of a single sample)
Decide = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | bool"]


class _HardRun:
    """State of one hard early-exit forward (see the module docstring)."""

    def __init__(
        self,
        batch: int,
        num_exits: int,
        device: torch.device,
        decide: Decide,
        shrink: bool,
    ):
        self.decide = decide
        self.shrink = shrink
        self.alive = torch.arange(batch, device=device)
        self.done = None if shrink else torch.zeros(batch, dtype=torch.bool, device=device)
        self.stats = torch.zeros(batch, 0, device=device)
        self.exit_index = torch.full((batch,), num_exits - 1, dtype=torch.long, device=device)
        self.n_done = 0
        self.logits: torch.Tensor | None = None

    def _write(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        if self.logits is None:
            self.logits = logits.new_zeros(self.exit_index.shape[0], logits.shape[-1], dtype=torch.float32)
        self.logits.index_copy_(0, rows, logits.float())

    def on_exit(self, branch: ExitBranch, output: Any) -> Any:
        batch = self.alive.shape[0]
        x = feature_tensor(output, batch)
        logits, gate_logit, stats = branch.infer(x, self.stats)
        leave = self.decide(branch.position, stats[:, -NUM_STATS:], gate_logit, self.alive)
        if not self.shrink:
            leave = leave & ~self.done
        # The one host sync of this exit: how many leave fixes every shape below. The rest uses
        # index tensors (index_select / index_fill), which, unlike boolean masks, need no sync on CUDA.
        n_leave = int(leave.sum()) if batch > 1 else int(leave)
        if n_leave == 0:
            self.stats = stats
            return None
        if self.shrink and n_leave == batch:  # every sample left (always so at batch 1): stop here
            if self.n_done == 0:  # nobody left before: rows are still in input order
                self.logits = logits.float()
                self.exit_index.fill_(branch.position)
            else:
                self._write(self.alive, logits)
                self.exit_index.index_fill_(0, self.alive, branch.position)
            raise _AllExited
        order = torch.argsort(leave.logical_not().to(torch.uint8), stable=True)  # leaving rows first, in order
        leaving = order[:n_leave]
        rows = self.alive.index_select(0, leaving)
        self._write(rows, logits.index_select(0, leaving))
        self.exit_index.index_fill_(0, rows, branch.position)
        self.n_done += n_leave
        if not self.shrink:
            self.stats = stats
            self.done.index_fill_(0, leaving, True)
            if self.n_done == batch:
                raise _AllExited
            return None
        keep = order[n_leave:]
        self.alive = self.alive.index_select(0, keep)
        self.stats = stats.index_select(0, keep)
        return take_rows(output, keep, batch)

    def finish(self, final_logits: torch.Tensor) -> None:
        if self.shrink and self.n_done == 0:  # no sample left early: rows are in input order
            self.logits = final_logits.float()
        elif self.shrink:
            self._write(self.alive, final_logits)
        else:
            rest = ~self.done
            self._write(self.alive[rest], final_logits[rest])


def run_assigned(
    model: EarlyExitModel, x: torch.Tensor, exit_index: torch.Tensor, batch_shrink: bool = True
) -> torch.Tensor:
    """Hard early exit with each sample's exit fixed in advance (benchmarks and tests of the mechanism).

    Runs exactly the code path of `predict`, with the policy's decision replaced by `exit_index`.

    Args:
        model: A wrapped model, in the mode it should run in.
        x: (B, C, H, W) batch.
        exit_index: (B,) exit of each sample, 0 to `model.num_exits - 1`.
        batch_shrink: Remove exited samples from the batch mid-network (as `predict`).

    Returns:
        (B, K) logits of the assigned exits.
    """
    assigned = exit_index.to(x.device)
    target = int(assigned[0]) if x.shape[0] == 1 and batch_shrink else None

    def decide(pos: int, stats: torch.Tensor, gate: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | bool:
        if target is not None:  # batch 1: a plain bool, no kernel
            return pos == target
        return assigned[rows] == pos

    with torch.no_grad():
        return _run_hard(model, x, decide, batch_shrink).logits


def _run_hard(model: EarlyExitModel, x: torch.Tensor, decide: Decide, shrink: bool) -> _HardRun:
    run = _HardRun(x.shape[0], model.num_exits, x.device, decide, shrink)
    try:
        with model._attached(run):
            out = model.backbone(x)
        run.finish(model.final_logits(out))
    except _AllExited:
        pass
    return run


def _check_batch_shrink(model: EarlyExitModel, x: torch.Tensor) -> bool:
    """Check once whether dropping a sample at each exit leaves the other samples' results unchanged.

    The check runs in eval mode (train-mode BatchNorm mixes the samples by design, and would update its
    running statistics); every module's own mode is restored afterwards. Finite inputs whose outputs overflow
    to NaN or inf cannot show either answer: such a call masks, and nothing is stored or said.
    """
    if model._batch_shrink_safe is not None:
        return model._batch_shrink_safe
    pair = x[:2]
    never: Decide = lambda pos, stats, gate, rows: torch.zeros_like(rows, dtype=torch.bool)  # noqa: E731
    reason = ""
    # The property is structural, so it is checked in float32: under bf16 autocast, kernels picked per
    # batch size round differently and would hide it behind noise.
    no_autocast = torch.autocast(device_type=x.device.type, enabled=False)
    # a half-precision model rounds differently per batch size on some kernels; a structural change
    # (a later stage reading the full batch) moves results far more than this
    tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-3
    with no_autocast, evaluating(model):  # outside the try: a bad input raises here and nothing is cached
        ref = _run_hard(model, pair, never, shrink=False).logits
    if not bool(torch.isfinite(ref).all()):  # NaN never equals NaN: this input cannot tell, so mask this call
        return False
    try:
        for b in range(len(model.branches)):

            def first_leaves(pos: int, stats: torch.Tensor, gate: torch.Tensor, rows: torch.Tensor, b: int = b):
                return (rows == 0) & (pos == b)

            with no_autocast, evaluating(model):
                got = _run_hard(model, pair, first_leaves, shrink=True).logits
            if not bool(torch.isfinite(got).all()):
                return False
            if not torch.allclose(got[1], ref[1], rtol=tol, atol=tol / 10):
                reason = f"results change when a sample leaves at exit {b} ({model.branches[b].name!r})"
                break
    except Exception as e:  # a later stage indexing an earlier, full-batch tensor fails here
        reason = f"{type(e).__name__}: {e}"
    safe = not reason
    if not safe:
        warnings.warn(
            f"{type(model.backbone).__name__} cannot drop exited samples mid-network ({reason}); hard early "
            "exit falls back to masking: exited samples keep running until every sample has exited.",
            stacklevel=3,
        )
    model._batch_shrink_safe = safe
    return safe


def _summarise(
    model: EarlyExitModel, exit_index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None, shrink: bool
) -> PredictionStats:
    # one device-to-host copy; counting in Python avoids two more kernels on the small batches that
    # dominate latency-bound inference
    taken = Counter(exit_index.tolist())
    counts = [taken.get(b, 0) for b in range(model.num_exits)]
    cost = sum(c * g for c, g in zip(counts, model.exit_costs.tolist())) / max(sum(counts), 1)
    stats = PredictionStats(counts=counts, expected_cost=cost, batch_shrink=shrink)
    if labels is not None:
        correct = logits.argmax(-1) == labels.to(logits.device)
        stats.accuracy = float(correct.float().mean())
        stats.exit_accuracy = [
            float(correct[exit_index == b].float().mean()) if counts[b] else None for b in range(model.num_exits)
        ]
    return stats


def predict(
    model: EarlyExitModel,
    x: torch.Tensor,
    policy: PolicyName | None = None,
    threshold: float | Sequence[float] | None = None,
    labels: torch.Tensor | None = None,
    batch_shrink: bool | None = None,
    allow_nonfinite: bool = False,
) -> Prediction:
    """Hard early-exit inference.

    Args:
        model: A wrapped model (use `model.eval()` first; dropout/BatchNorm follow the model's mode).
        x: (B, C, H, W) batch.
        policy: "gate", "confidence", "entropy" or "soft"; default: the model's stored policy.
        threshold: One value for every early exit or one per early exit; default: the calibrated
            thresholds stored on the model for this policy, else `DEFAULT_THRESHOLDS[policy]`.
        labels: Optional (B,) labels for per-exit accuracy in the stats.
        batch_shrink: Remove exited samples from the batch mid-network. None checks once whether
            the backbone allows it (see the module docstring; a batch whose outputs overflow to NaN or
            inf masks and leaves the check to a later call).
        allow_nonfinite: What to do with samples whose input holds NaN or inf. False (default): raise a
            ValueError naming them. True: run them through the whole network in eval mode, never letting
            them exit early, return their final-exit logits (for "soft", the soft output; NaN as a rule)
            and list them in `stats.nonfinite`; the other samples get exactly what they would get without
            them, and the model's state (BatchNorm running statistics included) is as it would be without them.

    Returns:
        A `Prediction` with logits, per-sample exit index and stats, in input order.

    Raises:
        TypeError: If `x` holds integer images (e.g. uint8 pixels): convert and normalise them first.
        ValueError: If `x`, `labels`, `policy` or `threshold` is malformed, or `x` holds NaN or inf without
            `allow_nonfinite=True`.
    """
    policy = policy or model.config.policy
    _check_policy(policy)
    if policy == "soft" and threshold is not None:
        resolve_thresholds(model, policy, threshold)  # raises: the soft output takes no threshold
    model.check_input(x)
    if labels is not None and tuple(labels.shape) != (x.shape[0],):
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} for a batch of {x.shape[0]}: give one class index per sample, "
            "shape (B,) (e.g. labels.flatten())."
        )
    if not _all_finite(x):  # the one check on the hot path; the rows are found only here
        return _predict_nonfinite(model, x, policy, threshold, labels, batch_shrink, allow_nonfinite)
    with torch.no_grad():
        if policy == "soft":
            out = model(x)
            logits = out.log_probs
            exit_index = torch.full((x.shape[0],), model.num_exits - 1, dtype=torch.long, device=x.device)
            return Prediction(logits, exit_index, _summarise(model, exit_index, logits, labels, False))
        thresholds = resolve_thresholds(model, policy, threshold)
        if batch_shrink is None:
            batch_shrink = x.shape[0] == 1 or _check_batch_shrink(model, x)

        def decide(pos: int, stats: torch.Tensor, gate_logit: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return exit_mask(policy, None, gate_logit, thresholds[pos], stats=stats)

        run = _run_hard(model, x, decide, shrink=batch_shrink)
    return Prediction(run.logits, run.exit_index, _summarise(model, run.exit_index, run.logits, labels, batch_shrink))


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element of `x` is finite.

    A NaN or inf element makes the float32 sum NaN or inf, so a finite sum proves the batch finite for the
    price of one reduction (an elementwise check allocates a mask as large as the input and costs about ten
    times more); only a non-finite sum, or finite values large enough to overflow it, pays for the exact check.
    """
    return bool(torch.isfinite(x.sum(dtype=torch.float32))) or bool(torch.isfinite(x).all())


def _nonfinite_rows(x: torch.Tensor) -> list[int]:
    """Indices of the samples of a (B, ...) batch that hold NaN or inf ([] after one reduction when none do)."""
    if _all_finite(x):
        return []
    return (~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).nonzero().flatten().tolist()


def _predict_nonfinite(
    model: EarlyExitModel,
    x: torch.Tensor,
    policy: str,
    threshold: float | Sequence[float] | None,
    labels: torch.Tensor | None,
    batch_shrink: bool | None,
    allow: bool,
) -> Prediction:
    """`predict` for a batch with NaN or inf inputs: refuse it, or run those samples through the whole network."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    rows = bad.nonzero().flatten()
    n = x.shape[0]
    if not allow:
        first = ", ".join(str(i) for i in rows[:5].tolist()) + (", ..." if rows.numel() > 5 else "")
        raise ValueError(
            f"{rows.numel()} of {n} input samples hold NaN or inf (first: {first}); their exit decisions would be "
            "meaningless. Fix or drop those samples, or pass allow_nonfinite=True to run them through the whole "
            "network and have them listed in Prediction.stats.nonfinite."
        )
    if policy != "soft":
        resolve_thresholds(model, policy, threshold)  # the same errors as a finite batch gets
    with torch.no_grad(), evaluating(model):  # train-mode BatchNorm would take NaN into its running statistics
        out = model(x[rows])
    bad_logits = (out.log_probs if policy == "soft" else out.final).float()
    logits = bad_logits.new_zeros(n, bad_logits.shape[-1])
    exit_index = torch.full((n,), model.num_exits - 1, dtype=torch.long, device=x.device)
    logits[rows] = bad_logits
    good_rows = (~bad).nonzero().flatten()
    shrink = False
    if good_rows.numel():
        good = predict(model, x[good_rows], policy, threshold, batch_shrink=batch_shrink)
        logits[good_rows] = good.logits
        exit_index[good_rows] = good.exit_index
        shrink = good.stats.batch_shrink
    stats = _summarise(model, exit_index, logits, labels, shrink)
    stats.nonfinite = rows.tolist()
    return Prediction(logits, exit_index, stats)
