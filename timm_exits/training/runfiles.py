"""The files a run folder holds: which ones timm-exits wrote, atomic writes, and staged groups of writes.

Every file the tool writes into a run folder is listed in its manifest, ``.timm-exits-manifest.json``
(paths relative to the folder). ``--overwrite`` deletes only those files, so anything else a user keeps in
the folder (notes, their own plots or weights) stays where it is. Writes are atomic: a temporary file in
the same folder, then `os.replace`. A command that writes several files (``eval``: report, plots, saved
model) writes them all into a staging folder first and moves them into place only once all of them exist,
so a command that fails leaves the run folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

__all__ = ["MANIFEST_NAME", "atomic_write_text", "read_manifest", "record", "remove_recorded", "Staging"]

MANIFEST_NAME = ".timm-exits-manifest.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`.

    Args:
        path: Destination; its folder is created if needed.
        text: UTF-8 text to write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(run_dir: Path) -> list[str] | None:
    """The relative paths the manifest of `run_dir` lists, or None when the folder has no manifest.

    Args:
        run_dir: The run folder.

    Returns:
        Sorted relative paths (POSIX form), or None.
    """
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TypeError
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not a timm-exits manifest (expected {{'files': [relative paths]}}); it was left as it is. "
            "Remove it by hand if it is not needed."
        ) from e
    outside = [f for f in files if not _inside(f)]
    if outside:
        raise ValueError(
            f"{path} lists paths outside its folder ({outside[:3]}), which timm-exits never writes; nothing was "
            "deleted. Remove the manifest, or those entries, by hand."
        )
    return sorted(files)


def _inside(rel: str) -> bool:
    p = Path(rel)
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts


def _relative(run_dir: Path, path: str | os.PathLike) -> str:
    p = Path(path)
    rel = p.relative_to(run_dir) if p.is_absolute() else p
    if not _inside(rel.as_posix()):
        raise ValueError(f"{path} is not inside the run folder {run_dir}.")
    return rel.as_posix()


def record(run_dir: Path, paths: Iterable[str | os.PathLike]) -> None:
    """Add `paths` (relative to `run_dir`, or absolute inside it) to the run folder's manifest.

    Args:
        run_dir: The run folder (created if needed).
        paths: Files the tool writes or has written there.
    """
    files = set(read_manifest(run_dir) or [])
    new = {_relative(run_dir, p) for p in paths}
    if new <= files and (run_dir / MANIFEST_NAME).is_file():
        return
    payload = {"note": "files written by timm-exits; --overwrite deletes only these", "files": sorted(files | new)}
    atomic_write_text(run_dir / MANIFEST_NAME, json.dumps(payload, indent=1) + "\n")


def remove_recorded(run_dir: Path, fallback: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Delete the files the manifest lists (and the manifest), then the folders left empty by that.

    Args:
        run_dir: The run folder.
        fallback: Relative paths taken as the tool's when the folder has no manifest (a run written
            before manifests existed).

    Returns:
        (relative paths deleted, relative paths of the files left in place because the tool did not write them).
    """
    listed = read_manifest(run_dir)
    own = list(fallback) if listed is None else listed
    removed = []
    for rel in own:
        path = run_dir / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(rel)
    (run_dir / MANIFEST_NAME).unlink(missing_ok=True)
    parents = sorted({(run_dir / rel).parent for rel in own}, key=lambda p: len(p.parts), reverse=True)
    for folder in parents:
        while folder != run_dir and folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    kept = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    return removed, kept


class Staging:
    """A group of files written into a staging folder, moved into the run folder together on `commit`.

    Use as a context manager: leaving it without `commit` (an error) deletes the staging folder and
    leaves the run folder untouched.

    Args:
        run_dir: The run folder the files are meant for.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / f".timm-exits-staging-{os.getpid()}"

    def __enter__(self) -> Staging:
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def path(self, rel: str) -> Path:
        """The staging path of run-folder path `rel` (its folder created)."""
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def final(self, staged: Path) -> Path:
        """The run-folder path a staged file will have."""
        return self.run_dir / Path(staged).relative_to(self.root)

    def commit(self) -> list[str]:
        """Move every staged file into the run folder (each by `os.replace`) and record them in the manifest.

        Returns:
            The relative paths moved into place.
        """
        rels = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        record(self.run_dir, rels)
        for rel in rels:
            dest = self.run_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.root / rel, dest)
        return rels
