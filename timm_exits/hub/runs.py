"""Publish a training run: `push_run` uploads the model a run saved (``<run>/model``) with its report."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from .files import REPORT_NAME, _read_json
from .load import from_pretrained
from .save import push_to_hub

__all__ = [
    "push_run",
]


def push_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Any:
    """Push a training run folder: `run_dir/model/` (from save_pretrained) with its report.

    The model is loaded back strictly (so what is pushed is what loads) and its card is regenerated from the
    report saved with it (`model/report.json`), else the run's `report.json` (a folder saved before models kept
    their report); without either the card has no numbers.

    Args:
        run_dir: The run folder (``~`` expanded).
        repo_id: "org/name" on the Hub.
        private: Create the repo as private (ignored if it exists).
        revision: Branch to commit to (default: main).
        commit_message: Message of the commit (default names the run folder).
        token: Hub token.
        endpoint: Hub endpoint.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.
    """
    run = Path(run_dir).expanduser()
    model_dir = run / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such folder; a run folder holds model/ (from save_pretrained).")
    # the report saved with the model describes it; the run's own can be newer (`eval --no-save`)
    report_path = next((p for p in (model_dir / REPORT_NAME, run / REPORT_NAME) if p.is_file()), None)
    report = None
    if report_path is not None:
        report = _read_json(report_path, str(report_path))
    else:
        warnings.warn(f"{run / REPORT_NAME} not found: the model card will state no results.", stacklevel=2)
    model = from_pretrained(model_dir)
    return push_to_hub(
        model,
        repo_id,
        report,
        private=private,
        revision=revision,
        commit_message=commit_message or f"Upload run {run.resolve().name} (timm-exits)",
        token=token,
        endpoint=endpoint,
    )
