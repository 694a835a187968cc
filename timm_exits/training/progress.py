"""What a training run tells its user while it runs: the log lines, the run's `train.log`, progress bars.

Only rank 0 prints and writes; progress bars (tqdm) are on when stderr is a terminal, or as the recipe's
``progress`` key says.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .distributed import _Dist

__all__ = ["RunLog", "epoch_line", "progress_enabled"]


class RunLog:
    """Print a message (through tqdm while bars are shown) and append it to the run's log file.

    Args:
        path: The run's `train.log`; None on ranks that do not write.
        bars: Whether tqdm bars are on screen, so messages go through `tqdm.write` above them.
    """

    def __init__(self, path: Path | None, bars: bool) -> None:
        self.path = path
        self.bars = bars

    def __call__(self, msg: str) -> None:
        if self.bars:
            from tqdm import tqdm

            tqdm.write(msg)
        else:
            print(msg, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def _distribution_text(shares: Sequence[float]) -> str:
    return ", ".join(f"#{i + 1}: {100 * p:.1f} %" for i, p in enumerate(shares))


def epoch_line(rec: dict[str, Any]) -> str:
    """One line for an epoch's record: training losses, lr, validation accuracy per exit and of the soft
    output, and the gate@0.5 policy's accuracy, cost and exit shares."""
    tr, va = rec["train"], rec["val"]
    parts = [f"loss {tr['loss']:.4f}"]
    for k in ("soft_ce", "exit_ce", "final_ce", "expected_cost"):
        if k in tr:
            parts.append(f"{k} {tr[k]:.4f}")
    if "cost_weight" in tr:
        parts.append(f"lambda {tr['cost_weight']:.3g}")
    accs = "/".join(f"{100 * a:.1f}" for a in va["exit_accuracy"])
    g = va["gate"]
    return (
        f"epoch {rec['epoch']}/{rec['epochs']} [{rec['stage']}] {' '.join(parts)} | lr {rec['lr']:.3g} | "
        f"val exits {accs} % | soft {100 * va['soft_accuracy']:.1f} % | gate@0.5 {100 * g['accuracy']:.1f} % "
        f"at cost {g['expected_cost']:.3f}, exits {_distribution_text(g['exit_distribution'])} | {rec['seconds']:.1f} s"
    )


def progress_enabled(progress: str | bool, d: _Dist) -> bool:
    """Whether this rank shows tqdm bars: rank 0 only; "auto" when stderr is a terminal."""
    if not d.main:
        return False
    return sys.stderr.isatty() if progress == "auto" else bool(progress)
