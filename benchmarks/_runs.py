"""A trained run loaded for a benchmark script, refused when its training has not finished.

``policy_frontier.py``, ``time_recommended.py`` and ``plan_split.py --run`` read a run folder's last checkpoint.
As ``timm-exits eval`` does, they refuse a run whose training stopped before its last epoch (``stop_after_steps``,
Ctrl-C) unless ``--unfinished`` asks for that checkpoint as it is; their JSON records the training it holds
(``training``: epochs trained, planned epochs, where it stopped or None).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from _timing import fail

from timm_exits.training.checkpoint import LoadedRun, load_run
from timm_exits.training.run_folder import RunFolderError
from timm_exits.training.run_state import check_finished, training_summary

__all__ = ["add_unfinished_argument", "load_finished_run", "trained"]


def add_unfinished_argument(p: argparse.ArgumentParser) -> None:
    """The ``--unfinished`` flag, as ``timm-exits eval`` has it."""
    p.add_argument(
        "--unfinished",
        action="store_true",
        help="use the last checkpoint of a run whose training has not finished (else such a run is refused)",
    )


def trained(run: LoadedRun) -> dict[str, Any]:
    """The training the run's checkpoint holds: epochs trained, planned epochs, where it stopped (None: finished)."""
    summary = training_summary(run)
    return {k: summary.get(k) for k in ("epochs", "planned_epochs", "unfinished")}


def load_finished_run(folder: str | os.PathLike, unfinished: bool, **kwargs: Any) -> LoadedRun:
    """`load_run`, then a one-line error (exit 2) for a run whose training has not finished unless `unfinished`."""
    run = load_run(folder, **kwargs)
    try:
        check_finished(run, unfinished)
    except RunFolderError as e:
        fail(str(e))
    return run
