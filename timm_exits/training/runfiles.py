"""The files a run folder holds: which ones timm-exits wrote, atomic writes, and staged groups of writes.

Every file the tool writes into a run folder is listed in its manifest, ``.timm-exits-manifest.json``
(paths relative to the folder). ``--overwrite`` deletes only those files, so anything else a user keeps in
the folder (notes, their own plots or weights) stays where it is. Writes are atomic: a temporary file in
the same folder, then `os.replace`. A command that writes several files (``eval``: report, plots, saved
model) writes them all into a staging folder first and moves them into place only once all of them exist,
so a command that fails leaves the run folder as it was.

Temporaries (the staging folder, a checkpoint or file being written) are named after the process writing them and
its host. A command killed before it removes them (``kill -9``, a lost node) leaves them behind; the next command
that writes in the folder removes them once their process no longer runs (another host's, and those of an older
name without the host, once they are an hour old). They never count as a user's files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from ..hub.files import _host, _process_gone

__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "atomic_write_text",
    "is_temporary",
    "read_manifest",
    "record",
    "remove_recorded",
    "remove_stale_temporaries",
    "Staging",
]

MANIFEST_NAME = ".timm-exits-manifest.json"
LOCK_NAME = ".timm-exits-lock"  # the file a training process holds a lock on (`run_folder.run_lock`)

# The temporaries the tool writes in a run folder, named after the process and host writing them: a staging
# folder, a private folder a checkpoint is written in (safetensors puts a temporary file of its own next to its
# target, so the target is in a folder named after the process), and a file `atomic_write_text` is writing.
_TEMP_FOLDER = re.compile(r"\.timm-exits-(?:staging|checkpoint)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9._]*)")
_TEMP_FILE = re.compile(r"\.timm-exits-write-(?P<pid>\d+)-(?P<host>[A-Za-z0-9._]*)-.+")
# The same as earlier versions named them, without the host (so judged by age): a staging folder, and
# ".<name>.tmp-<pid>" next to each file written through a temporary.
_OLD_WRITTEN = ("checkpoint.safetensors", "checkpoint.json", "run.json", "recipe.yaml", "metrics.jsonl", MANIFEST_NAME)
_OLD_TEMP_FOLDER = re.compile(r"\.timm-exits-staging-(?P<pid>\d+)")
_OLD_TEMP_FILE = re.compile(rf"\.(?:{'|'.join(map(re.escape, _OLD_WRITTEN))})\.tmp-(?P<pid>\d+)")

_TEMP_MAX_AGE_S = 3600.0  # a temporary whose process cannot be checked is left alone this long


def _private_name(kind: str) -> str:
    """Name of this process's temporary folder of `kind` ("staging", "checkpoint") in a run folder."""
    return f".timm-exits-{kind}-{os.getpid()}-{_host()}"


def is_temporary(rel: str | os.PathLike) -> bool:
    """Whether run-folder path `rel` is (or lies in) a temporary the tool names after its process.

    Args:
        rel: A path relative to the run folder.

    Returns:
        True for staging and checkpoint folders and everything in them, files being written, and the lock file.
    """
    parts = Path(rel).parts
    if parts == (LOCK_NAME,):
        return True
    return bool(parts) and _temp_match(parts[0], folder=len(parts) > 1) is not None


def _temp_match(name: str, folder: bool | None) -> re.Match[str] | None:
    """The match of `name` against the temporaries' names: folders' (folder True), files' (False) or both (None)."""
    patterns = []
    if folder is not False:
        patterns += [_TEMP_FOLDER, _OLD_TEMP_FOLDER]
    if folder is not True:
        patterns += [_TEMP_FILE, _OLD_TEMP_FILE]
    return next((m for m in (p.fullmatch(name) for p in patterns) if m is not None), None)


def _newest_mtime(path: Path) -> float:
    """The latest modification time of `path` and, for a folder, of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for sub in path.rglob("*"):
            newest = max(newest, sub.lstat().st_mtime)
    return newest


def _is_stale(path: Path, match: re.Match[str]) -> bool:
    """Whether the process that wrote temporary `path` is gone: on this host, whether it no longer runs; for
    another host's, or a name without the host, whether nothing in it changed for an hour."""
    host = match.groupdict().get("host")
    gone = None if host is None else _process_gone(match["pid"], host)
    if gone is not None:
        return gone
    try:
        return time.time() - _newest_mtime(path) > _TEMP_MAX_AGE_S
    except OSError:
        return False


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Remove the temporaries that commands killed before cleaning up (``kill -9``) left in `run_dir`.

    Only the names the tool writes count (`is_temporary`), and only when their process is gone (`_is_stale`).

    Args:
        run_dir: The run folder (a missing folder holds nothing).

    Returns:
        The names removed.
    """
    try:
        entries = sorted(Path(run_dir).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for path in entries:
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            continue
        match = _temp_match(path.name, folder=path.is_dir())
        if match is None or not _is_stale(path, match):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`.

    Args:
        path: Destination; its folder is created if needed.
        text: UTF-8 text to write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".timm-exits-write-{os.getpid()}-{_host()}-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this; its first error is the one to see
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

    A command records the files it writes before it writes them, so this first removes the temporaries that
    killed commands left in the folder (`remove_stale_temporaries`).

    Args:
        run_dir: The run folder (created if needed).
        paths: Files the tool writes or has written there.
    """
    remove_stale_temporaries(run_dir)
    files = set(read_manifest(run_dir) or [])
    new = {_relative(run_dir, p) for p in paths}
    if new <= files and (run_dir / MANIFEST_NAME).is_file():
        return
    payload = {"note": "files written by timm-exits; --overwrite deletes only these", "files": sorted(files | new)}
    atomic_write_text(run_dir / MANIFEST_NAME, json.dumps(payload, indent=1) + "\n")


def remove_recorded(run_dir: Path, fallback: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Delete the files the manifest lists (and the manifest), then the folders left empty by that, and the
    temporaries killed commands left (`remove_stale_temporaries`).

    Args:
        run_dir: The run folder.
        fallback: Relative paths taken as the tool's when the folder has no manifest (a run written
            before manifests existed).

    Returns:
        (relative paths deleted, relative paths of the files left in place because the tool did not write them;
        temporaries of commands still running are the tool's, so they are in neither list).
    """
    listed = read_manifest(run_dir)
    remove_stale_temporaries(run_dir)
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
    kept = sorted(
        rel
        for rel in (p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
        if not is_temporary(rel)
    )
    return removed, kept


class Staging:
    """A group of files written into a staging folder, moved into the run folder together on `commit`.

    Use as a context manager: leaving it without `commit` (an error) deletes the staging folder and
    leaves the run folder untouched. Entering it first removes the staging folders (and other temporaries)
    of killed commands (`remove_stale_temporaries`).

    Args:
        run_dir: The run folder the files are meant for.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / _private_name("staging")

    def __enter__(self) -> Staging:
        remove_stale_temporaries(self.run_dir)
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

        A saved model's ``config.json`` moves after its weights (whose hashes it records) and ``report.json``
        moves last, so a commit cut short keeps the earlier report and a model folder that loads or is refused
        whole.

        Returns:
            The relative paths moved into place, in the order they were moved.
        """
        rels = sorted(
            (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()),
            key=lambda rel: (rel == "report.json", Path(rel).name == "config.json", rel),
        )
        record(self.run_dir, rels)
        for rel in rels:
            dest = self.run_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.root / rel, dest)
        return rels
