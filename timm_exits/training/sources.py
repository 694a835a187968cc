"""Data sets on disk, loaded untransformed into train / val / test splits (`load_splits`).

Data sets (`dataset:` in a recipe):

* ``digits``: scikit-learn's bundled 8x8 grey digits (1797 images, no download), turned into RGB
  images that the transforms upscale to ``img_size``; split with a fixed seed into train / val /
  test. The offline default.
* ``cifar10`` / ``cifar100``: torchvision's CIFAR classes under ``data_dir`` (``download: true``
  fetches them), or a local copy in the same layout, as ``data_dir/<name>/{train,test}.npz`` (arrays
  ``x`` uint8 N x 32 x 32 x 3 and ``y``) or as ``data_dir/<name>/{train,test}/<class>/<image>`` trees
  (``<index>_<name>`` files are read in index order, so every layout holds out the same images).
* ``cinic10``: the CINIC-10 folder tree (``train/``, ``valid/``, ``test/``); ``valid`` is the
  calibration split.
* ``imagefolder``: any ``data_dir/{train,val|valid|validation,test}/<class>/<image>`` tree; splits
  that are missing are held out of ``train`` with a fixed seed. With ``val/`` but no ``test/`` (the
  ImageNet layout), ``val/`` is the test split and the calibration split is held out of ``train``.

Every data set yields three splits: ``train``, ``val`` (held out for threshold calibration and the
per-epoch logs, never trained on) and ``test``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from .recipe_schema import DataSection
from .recipe_types import RecipeError

__all__ = ["DATASETS", "DataError", "RawSplits", "load_splits"]

DATASETS = ("digits", "cifar10", "cifar100", "cinic10", "imagefolder")

_VAL_DIRS = ("val", "valid", "validation")

_TEST_DIRS = ("test",)

_RESTORE_HINT = (
    "put a local copy there (torchvision's cifar-10-batches-py / cifar-100-python folder, <name>/{train,test}.npz "
    "or <name>/{train,test}/<class>/ image trees) and pass --data-dir DATA, or set download: true to fetch it"
)


class DataError(ValueError):
    """A data set's files or layout cannot be used, or an augmentation does not fit the data."""


class _ArrayImages(Dataset):
    """(PIL image, label) pairs from a uint8 array (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]):
        self.images = images
        self.targets = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        img = Image.fromarray(self.images[i])
        return (img if img.mode == "RGB" else img.convert("RGB")), self.targets[i]

    def tensor(self) -> torch.Tensor:
        """All images as one uint8 tensor (N, 3, H, W); grey images are repeated over the channels."""
        x = torch.from_numpy(np.ascontiguousarray(self.images))
        x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous()


@dataclass
class RawSplits:
    """Untransformed splits: a base data set plus index lists into it for each split."""

    train: tuple[Dataset, list[int]]
    val: tuple[Dataset, list[int]]
    test: tuple[Dataset, list[int]]
    classes: list[str]


def _targets(ds: Dataset) -> list[int]:
    t = getattr(ds, "targets", None)
    if t is None:
        t = [int(y) for _, y in ds]  # type: ignore[attr-defined]
    return [int(v) for v in t]


def _holdout(labels: Sequence[int], size: float | int, seed: int, key: str) -> tuple[list[int], list[int]]:
    """Split range(len(labels)) into (kept, held out), stratified by label, with a fixed seed; `key` names
    the recipe key that set `size`, for the errors."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    count = int(size) if size >= 1 else int(round(float(size) * n))
    if count <= 0:
        raise RecipeError(f"the held-out split would be empty ({key}={size} of {n} samples); raise {key}.")
    if count >= n:
        raise RecipeError(f"cannot hold out {count} of {n} samples ({key}={size}); lower {key}.")
    idx = np.arange(n)
    counts = np.bincount(np.asarray(labels))
    classes = len(counts[counts > 0])  # stratifying needs two of each class and a class on each side
    stratify = labels if counts[counts > 0].min() >= 2 and min(count, n - count) >= classes else None
    kept, held = train_test_split(idx, test_size=count, random_state=seed, stratify=stratify)
    return sorted(int(i) for i in kept), sorted(int(i) for i in held)


def _digits(spec: DataSection) -> RawSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    base = _ArrayImages(images, d.target)
    labels = base.targets
    pool, test = _holdout(labels, spec.test_split, spec.split_seed, "test_split")
    keep, val = _holdout([labels[i] for i in pool], spec.val_split, spec.split_seed + 1, "val_split")
    train = [pool[i] for i in keep]
    val = [pool[i] for i in val]
    return RawSplits((base, train), (base, val), (base, test), [str(c) for c in d.target_names])


def _missing(what: str, root: Path, looked: Sequence[Path], hint: str) -> FileNotFoundError:
    where = ", ".join(str(p) for p in looked)
    return FileNotFoundError(f"{what} not found under data_dir={str(root)!r} (looked for {where}); {hint}.")


def _npz_split(path: Path) -> _ArrayImages:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: an npz copy holds train.npz and test.npz side by side ({_RESTORE_HINT})."
        )
    with np.load(path) as z:
        if "x" not in z or "y" not in z:
            raise DataError(f"{path} holds {sorted(z.files)}; an npz split holds arrays 'x' (images) and 'y' (labels).")
        x, y = z["x"], z["y"]
    if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise DataError(
            f"{path}: 'x' is {x.dtype} of shape {tuple(x.shape)}; an npz split holds uint8 pixels (0-255) as "
            "N x H x W x 3 (RGB, channels last) or N x H x W (grey). Convert it, e.g. "
            "(x * 255).round().astype(np.uint8) for floats in [0, 1], x.transpose(0, 2, 3, 1) for N x 3 x H x W."
        )
    y = np.asarray(y)
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)  # Keras-style (N, 1) labels
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: 'y' is {y.dtype} of shape {tuple(y.shape)} for {len(x)} images in 'x'; it must hold one "
            "integer label per image."
        )
    return _ArrayImages(x, y)


_CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


def _check_labels(name: str, where: Path, classes: Sequence[str], *splits: tuple[str, Sequence[int]]) -> None:
    """A CIFAR copy must hold the data set's classes, and every label must name one of them."""
    want = _CIFAR_CLASSES[name]
    if len(classes) != want:
        raise DataError(
            f"{where} holds {len(classes)} classes, but {name} has {want}: point --data-dir at a {name} copy "
            f"(labels 0..{want - 1}), or use dataset: imagefolder for other data."
        )
    for split, labels in splits:
        bad = sorted({int(v) for v in labels if not 0 <= int(v) < want})
        if bad:
            raise DataError(
                f"{where}: the {split} split has labels {bad[:5]} outside 0..{want - 1} ({name} labels count from 0)."
            )


def _cifar(spec: DataSection, name: str) -> RawSplits:
    import torchvision

    root = Path(spec.data_dir or "data").expanduser()
    tv_cls, tv_dir = {
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py"),
        "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python"),
    }[name]
    npz = root / name / "train.npz"
    folder = root / name / "train"
    if (root / tv_dir).is_dir() or spec.download:
        try:
            train = tv_cls(str(root), train=True, download=bool(spec.download))
            test = tv_cls(str(root), train=False, download=bool(spec.download))
        except RuntimeError as e:
            raise FileNotFoundError(f"{name} under {str(root / tv_dir)!r} is incomplete or corrupted ({e}).") from e
        classes = list(train.classes)
        train, test = _ArrayImages(train.data, train.targets), _ArrayImages(test.data, test.targets)
    elif npz.is_file():
        train, test = _npz_split(npz), _npz_split(root / name / "test.npz")
        with np.load(npz) as z:
            key = "label_names" if "label_names" in z else "fine_label_names"
            classes = [str(c) for c in z[key]] if key in z else [str(i) for i in range(max(train.targets) + 1)]
    elif folder.is_dir():
        train, test, classes = _cifar_tree(root / name)
    else:
        raise _missing(name, root, [root / tv_dir, npz, folder], _RESTORE_HINT)
    _check_labels(name, root, classes, ("train", train.targets), ("test", test.targets))
    keep, val = _holdout(_targets(train), spec.val_split, spec.split_seed, "val_split")
    return RawSplits((train, keep), (train, val), (test, list(range(len(test)))), classes)


def _cifar_tree(root: Path) -> tuple[_ArrayImages, _ArrayImages, list[str]]:
    """A CIFAR copy as ``train/<class>/<image>`` and ``test/<class>/<image>`` trees, decoded into memory.

    Files named ``<index>_<name>`` (a tree written from the arrays, row ``index`` to that file) are put back in
    index order, the order of the torchvision and npz copies, so that the held-out split is the same images in
    every layout.
    """
    if not (root / "test").is_dir():
        raise FileNotFoundError(
            f"{root / 'test'} is missing: a CIFAR image tree holds train/ and test/ side by side (restore both "
            "splits); the test accuracy is measured on CIFAR's own test set, never on images held out of train/."
        )
    train, test = ImageFolder(str(root / "train")), ImageFolder(str(root / "test"), allow_empty=True)
    if test.classes != train.classes:
        raise DataError(f"{root / 'test'} and {root / 'train'} must hold the same class folders.")
    return _decoded(train), _decoded(test), list(train.classes)


def _index_order(paths: Sequence[str]) -> list[int]:
    """The positions of `paths` sorted by their ``<index>_`` file-name prefix, when every name has one and the
    prefixes number the files 0..N-1; else the order they came in."""
    prefixes = [Path(p).name.split("_", 1)[0] for p in paths]
    numbered = all(p.isascii() and p.isdecimal() for p in prefixes)
    if not numbered or sorted(int(p) for p in prefixes) != list(range(len(paths))):
        return list(range(len(paths)))
    return sorted(range(len(paths)), key=lambda i: int(prefixes[i]))


def _decoded(folder: Any) -> _ArrayImages:
    """Decode every image of an ImageFolder of equal-sized images (CIFAR image trees) into memory."""
    order = _index_order([path for path, _ in folder.samples])
    images = []
    for i in order:
        try:
            images.append(np.asarray(folder[i][0]))
        except (OSError, ValueError) as e:
            raise DataError(f"{folder.samples[i][0]} cannot be read ({e}); restore or remove that file.") from e
    if len({im.shape for im in images}) > 1:
        raise DataError(f"{folder.root}: images of different sizes cannot be held as one array.")
    return _ArrayImages(np.stack(images), [folder.targets[i] for i in order])


def _visible(root: str, path: str) -> bool:
    """Whether `path` under `root` is an image file with no hidden part (``.DS_Store``, macOS's ``._name.jpg``
    resource forks, ``.ipynb_checkpoints/``)."""
    parts = Path(path).relative_to(root).parts
    return not any(p.startswith(".") for p in parts) and has_file_allowed_extension(path, IMG_EXTENSIONS)


def _load_rgb(path: str) -> Image.Image:
    """An image file as RGB; 16-bit grey (PNG, TIFF) is scaled to 8 bits, not clipped at 255 (all white)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
            x = np.asarray(img).astype(np.float64)
            img = Image.fromarray(np.clip(np.round(x / 257.0), 0, 255).astype(np.uint8))
        return img.convert("RGB")


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder with hidden files and folders left out (a hidden folder is no class) and
    16-bit images read as 8-bit."""

    def __init__(self, path: Path, allow_empty: bool = False):
        valid = functools.partial(_visible, str(path))
        super().__init__(str(path), loader=_load_rgb, is_valid_file=valid, allow_empty=allow_empty)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = [c for c in super().find_classes(directory)[0] if not c.startswith(".")]
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: i for i, c in enumerate(classes)}


def _find_dir(root: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _folder_tree(spec: DataSection, root: Path, what: str) -> RawSplits:
    """train/ [val|valid|validation/] [test/] ImageFolder tree; missing splits are held out of train."""

    if not root.is_dir():
        raise FileNotFoundError(
            f"{what}: data_dir={str(root)!r} does not exist; pass --data-dir pointing at a folder with "
            "train/ (and optionally val/ and test/) subfolders of class folders."
        )
    if not (root / "train").is_dir():
        raise _missing(f"{what} train split", root, [root / "train"], "the tree must hold train/<class>/<image>")
    train = _ImageFolder(root / "train")
    val_dir, test_dir = _find_dir(root, _VAL_DIRS), _find_dir(root, _TEST_DIRS)
    if test_dir is None and val_dir is not None:  # the usual ImageNet-style layout: val is the test set
        test_dir, val_dir = val_dir, None
    parts: dict[str, tuple[Dataset, list[int]]] = {}
    pool = list(range(len(train)))
    labels = train.targets
    for split, folder, size, salt in (("test", test_dir, spec.test_split, 0), ("val", val_dir, spec.val_split, 1)):
        if folder is not None:
            ds = _ImageFolder(folder, allow_empty=True)
            if ds.classes != train.classes:
                missing, extra = (
                    sorted(set(train.classes) - set(ds.classes)),
                    sorted(set(ds.classes) - set(train.classes)),
                )
                raise DataError(
                    f"{folder} and {root / 'train'} must hold the same class folders; {folder.name}/ lacks "
                    f"{missing[:5]} and has {extra[:5]} that train/ lacks (an empty class needs its folder too)."
                )
            parts[split] = (ds, list(range(len(ds))))
        else:
            keep, held = _holdout([labels[i] for i in pool], size, spec.split_seed + salt, f"{split}_split")
            parts[split] = (train, [pool[i] for i in held])
            pool = [pool[i] for i in keep]
    return RawSplits((train, pool), parts["val"], parts["test"], list(train.classes))


def load_splits(spec: DataSection) -> RawSplits:
    """Load the untransformed train / val / test splits a recipe asks for.

    Args:
        spec: The recipe's data section (keys dataset, data_dir, download, val_split, test_split, split_seed).

    Returns:
        The splits as (base data set, indices) pairs plus the class names.
    """
    name = spec.dataset
    if name == "digits":
        return _digits(spec)
    if name in ("cifar10", "cifar100"):
        return _cifar(spec, name)
    if name in ("cinic10", "imagefolder"):
        if not spec.data_dir:
            raise FileNotFoundError(f"dataset {name!r} needs data_dir (pass --data-dir or set data_dir: ...).")
        root = Path(spec.data_dir).expanduser()
        if name == "cinic10" and not root.is_dir():
            raise FileNotFoundError(
                f"CINIC-10 not found: data_dir={str(root)!r} does not exist. Download and extract CINIC-10 "
                "(train/, valid/, test/ class folders) and pass --data-dir."
            )
        return _folder_tree(spec, root, what=name)
    raise DataError(f"unknown dataset {name!r}; choose one of {DATASETS}.")
