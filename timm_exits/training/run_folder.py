"""The run folder of a training run: whether a new run, a resumed run or ``--overwrite`` may use it, and the
files that identify the run (``run.json`` with the recipe's fingerprint, ``recipe.yaml``).

A folder holding another run, or any run without ``resume`` / ``overwrite``, is an error; ``--overwrite``
deletes only the files timm-exits wrote (its manifest, `timm_exits.training.runfiles`). One training
process at a time writes in a run folder (`run_lock`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .._version import __version__
from .checkpoint import CHECKPOINT_NAME
from .recipe import Recipe, _diff, _fingerprint, _identity
from .runfiles import LOCK_NAME, MANIFEST_NAME, atomic_write_text, is_temporary, read_manifest, record, remove_recorded

__all__ = [
    "RunFolderError",
    "run_lock",
]


class RunFolderError(RuntimeError):
    """The output folder cannot be used for this run without the user's say-so."""


# -------------------------------------------------------------------------------------- run folder
# Every path a run writes; taken as the tool's in a run folder written before manifests existed.
_OWN_FILES = (
    "run.json",
    "recipe.yaml",
    CHECKPOINT_NAME,
    "checkpoint.json",
    "train.log",
    "metrics.jsonl",
    "report.json",
    "report.md",
    "plots/gate_histograms.png",
    "plots/accuracy_vs_cost.png",
    "plots/exit_distribution.png",
    "model/config.json",
    "model/model.safetensors",
    "model/exits.safetensors",
    "model/README.md",
    "model/report.json",
)

_TRAIN_FILES = _OWN_FILES[:6]


def _run_info(run_dir: Path) -> dict | None:
    """The `run.json` of a timm-exits run in `run_dir`; None when there is none, or when the file there is
    not one (not JSON, or without the recipe's fingerprint and identity), so that it is never taken for
    a run."""
    info = run_dir / "run.json"
    if not info.is_file():
        return None
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "fingerprint" in data and "identity" in data else None


def _own_files(run_dir: Path) -> list[str]:
    """Relative paths timm-exits wrote in `run_dir`: its manifest, else the fixed names of an older run."""
    try:
        listed = read_manifest(run_dir)
    except ValueError as e:
        raise RunFolderError(str(e)) from e
    if listed is not None:
        return listed
    return list(_OWN_FILES) if _run_info(run_dir) is not None else []


def _clear_run(run_dir: Path) -> tuple[list[str], list[str]]:
    """Delete the files timm-exits wrote in `run_dir`; return (deleted, files of others left in place)."""
    return remove_recorded(run_dir, _own_files(run_dir))


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` (created if missing) while a run writes in it.

    A second process that trains into the same folder gets a `RunFolderError` instead of mixing its files
    with the first one's; the lock (``flock`` on the file ``.timm-exits-lock``, POSIX only) goes with the
    process, however it ends. A folder this call created is removed again if nothing was written in it.

    Args:
        run_dir: The run folder.
    """
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output {run_dir} exists and is not a folder.")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # a file: network file systems lock files opened for writing
    refused = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            refused = not _same_file(fd, lock)  # its holder removed it as it finished: a new one is in use
        except BlockingIOError:
            refused = True
        except OSError:  # a file system without locks (e.g. Lustre without -o flock): train without one
            pass
        if refused:
            raise RunFolderError(
                f"another timm-exits process is training in {run_dir}; nothing was written. Wait for it to end (or "
                "stop it), or choose another --output."
            )
        yield
    finally:
        if not refused:
            with contextlib.suppress(OSError):
                lock.unlink()  # while still holding it
        os.close(fd)
        if created and not refused:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # the folder this call made, if nothing was written in it


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _inputs_inside(run_dir: Path, recipe: Recipe, deleted: set[str]) -> None:
    """Refuse an ``init_checkpoint`` or ``weights`` that lies among the files ``--overwrite`` deletes."""
    root = run_dir.resolve()
    for key, value in (("init_checkpoint", recipe.model.init_checkpoint), ("weights", recipe.model.weights)):
        if not value or value.startswith("hf-hub:"):
            continue
        path = Path(value.removeprefix("local-dir:")).expanduser().resolve()
        inside = path == root or (path.is_relative_to(root) and path.relative_to(root).as_posix() in deleted)
        if inside or (path.is_dir() and path.is_relative_to(root)):
            raise RunFolderError(
                f"{key}={value} lies in {run_dir}, whose run --overwrite would delete before training from it; "
                "nothing was written. Copy it out of the folder first, or choose another --output."
            )


def _prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """Check the output folder without changing it.

    Returns:
        (resume from its checkpoint, delete the files of the run it holds before writing the new one).
    """
    if resume and overwrite:
        raise RunFolderError("pass either resume or overwrite, not both.")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output {run_dir} exists and is not a folder.")
    files = (p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    entries = sorted(rel for rel in files if not is_temporary(rel))
    old = _run_info(run_dir)
    if resume and old is None:
        raise RunFolderError(
            f"--resume: {run_dir} holds no timm-exits run (no run.json written by timm-exits), so there is nothing "
            "to resume; nothing was written. Give the --output of the run to continue, or leave out --resume to "
            "start a new run."
        )
    if not entries:
        return False, False
    own = set(_own_files(run_dir)) | {MANIFEST_NAME}
    others = [e for e in entries if e not in own]
    if old is None:
        if not overwrite:
            raise RunFolderError(
                f"output folder {run_dir} is not empty and holds no timm-exits run (no run.json written by "
                f"timm-exits); nothing was written. Choose a new --output, or pass --overwrite to write the run "
                f"there next to its {len(others)} file(s), which are left in place."
            )
    else:
        changes = _diff(old.get("identity", {}), _identity(recipe))
        if not overwrite:
            if changes:
                raise RunFolderError(
                    f"output folder {run_dir} holds a different run (recipe differs: {'; '.join(changes[:8])}); "
                    "nothing was overwritten. Choose a new --output, or pass --overwrite to replace that run (only "
                    "the files timm-exits wrote are deleted)."
                )
            if not resume:
                raise RunFolderError(
                    f"output folder {run_dir} already holds this run; nothing was overwritten. Pass --resume to "
                    "continue it from its last checkpoint, or --overwrite to start it again (only the files "
                    "timm-exits wrote are deleted)."
                )
            if not (run_dir / CHECKPOINT_NAME).is_file():
                raise RunFolderError(
                    f"--resume: {run_dir / CHECKPOINT_NAME} is missing, so the run cannot continue where it stopped; "
                    "nothing was written. Restore the checkpoint, or pass --overwrite to train the run again from "
                    "step 0."
                )
            return True, False
    clash = sorted(set(others) & set(_OWN_FILES))
    if clash:
        raise RunFolderError(
            f"output folder {run_dir} holds files timm-exits did not write at paths a run writes: {clash}; nothing "
            "was written. Move them away, or choose a new --output."
        )
    _inputs_inside(run_dir, recipe, own)
    return False, True


def _write_run_files(run_dir: Path, recipe: Recipe, classes: list[str], world: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record(run_dir, _TRAIN_FILES)
    info = run_dir / "run.json"
    if not info.is_file():
        payload = {
            "fingerprint": _fingerprint(recipe),
            "identity": _identity(recipe),
            "classes": classes,
            "num_classes": len(classes),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timm_exits_version": __version__,
            "world_size": world,
        }
        atomic_write_text(info, json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml(flat=True))  # flat keys, as older run folders hold


def _default_output(recipe: Recipe) -> Path:
    name = recipe.name or recipe.model.model
    method = recipe.method.method
    return Path("runs") / (name if method in name else f"{name}-{method}")
