"""What a run's checkpoint holds: whether its training finished (`check_finished`: `timm-exits eval` refuses an
unfinished run unless asked), and the summary of its training that the report shows (`training_summary`).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .run_folder import RunFolderError

if TYPE_CHECKING:
    from .checkpoint import LoadedRun

__all__ = ["check_finished", "training_summary"]


def check_finished(run: LoadedRun, unfinished: bool) -> None:
    """Refuse a run whose training has not finished, unless `unfinished` asks to evaluate its checkpoint as it is."""
    stopped = _stopped_at(run.meta, _planned(run))
    if stopped is None or unfinished:
        return
    again = f"timm-exits train -c {run.run_dir / 'recipe.yaml'} --output {run.run_dir} --resume"
    if run.recipe.runtime.stop_after_steps:
        again += " stop_after_steps=null"
    raise RunFolderError(
        f"{run.run_dir} holds an unfinished run (training stopped after {stopped}); nothing was written. Continue "
        f"it with `{again}`, or pass --unfinished to evaluate its last checkpoint as it is."
    )


def _planned(run: LoadedRun) -> int:
    """The epochs the run's recipe plans, frozen stage included."""
    return run.recipe.optim.frozen_epochs + run.recipe.optim.epochs


def _stopped_at(meta: Mapping[str, Any], planned: int) -> str | None:
    """Where the training of an unfinished run stopped (``"1 of 3 epochs, step 4"``); None when it finished."""
    position = meta.get("position") or {}
    if position.get("done", True):
        return None
    epochs = len(meta.get("history", []))
    into = f" and {position['batch']} steps of the next" if position.get("batch") else ""
    return f"{epochs} of {planned} epochs{into}, step {position.get('step', 0)}"


def training_summary(run: LoadedRun) -> dict[str, Any]:
    """The training the run's checkpoint holds: the epochs trained of those planned, its steps and times."""
    meta, planned = run.meta, _planned(run)
    history = list(meta.get("history", []))
    stopped = _stopped_at(meta, planned)
    if not history and stopped is None:
        return {}
    seconds = [float(h.get("seconds", 0.0)) for h in history]
    last = history[-1] if history else None
    return {
        "epochs": len(history),
        "planned_epochs": planned,
        "unfinished": stopped,
        "steps": (meta.get("position") or {}).get("step", last and last.get("step")),
        "seconds": sum(seconds),
        "median_epoch_seconds": statistics.median(seconds) if seconds else None,
        "runtimes": _runtimes(history),
        "last_epoch": last,
    }


def _runtimes(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each machine and thread count the epochs ran on, in order, with how many epochs each (empty for
    runs that did not record it)."""
    out: list[dict[str, Any]] = []
    for h in history:
        where = h.get("runtime")
        if not where:
            continue
        if out and {k: v for k, v in out[-1].items() if k != "epochs"} == where:
            out[-1]["epochs"] += 1
        else:
            out.append({**where, "epochs": 1})
    return out
