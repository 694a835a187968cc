"""Data for the training recipes: data sets, held-out splits, timm transforms, samplers and mixup.

Data sets (`dataset:` in a recipe):

* ``digits``: scikit-learn's bundled 8x8 grey digits (1797 images, no download), turned into RGB
  images that the transforms upscale to ``img_size``; split with a fixed seed into train / val /
  test. The offline default.
* ``cifar10`` / ``cifar100``: torchvision's CIFAR classes under ``data_dir`` (``download: true``
  fetches them), or a local copy in the same layout, as ``data_dir/<name>/{train,test}.npz`` (arrays
  ``x`` uint8 N x 32 x 32 x 3 and ``y``) or as ``data_dir/<name>/{train,test}/<class>/<image>`` trees.
* ``cinic10``: the CINIC-10 folder tree (``train/``, ``valid/``, ``test/``); ``valid`` is the
  calibration split.
* ``imagefolder``: any ``data_dir/{train,val|valid|validation,test}/<class>/<image>`` tree; splits
  that are missing are held out of ``train`` with a fixed seed. With ``val/`` but no ``test/`` (the
  ImageNet layout), ``val/`` is the test split and the calibration split is held out of ``train``.

Every data set yields three splits: ``train``, ``val`` (held out for threshold calibration and the
per-epoch logs, never trained on) and ``test``.

Two data paths (``augment:``). Array data sets (digits, CIFAR) are held in memory as one uint8
tensor, and each batch is gathered and augmented with tensor ops (`ArraySplit`, `BatchAugment`):
``crop_flip`` (reflect-pad, random crop, flip) or ``rrc`` (random-resized crop, flip), then
normalised (`timm_exits.training.augment`); no loader processes, so the data path keeps up with the
model. Folder trees, and ``augment: timm``, go image by image through timm's transforms
(``resolve_data_config``, ``create_transform``, auto-augment, random erasing). Mixup / cutmix come
from timm's ``Mixup`` on either path (soft targets, which every loss of timm-exits accepts).

Randomness does not depend on the number of processes or on where a run was resumed: sample ``i``
of epoch ``e`` is augmented from (seed, e, i) (in memory: row ``i`` of the parameters drawn for the
whole epoch from (seed, e); `timm_exits.training.augment`), and `ShardSampler` orders each
epoch from (seed, e) and gives rank ``r`` of ``W`` every ``W``-th index, so ``W`` processes with
batch ``B / W`` see exactly the batches one process with batch ``B`` sees.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .augment import AUGMENTS, ArrayLoader, ArraySplit, BatchAugment
from .recipe_schema import DataSection
from .recipe_types import RecipeError
from .sampling import ShardSampler, seed_for

__all__ = [
    "DATASETS",
    "DataError",
    "DataSplits",
    "RawSplits",
    "SplitDataset",
    "resolve_augment",
    "load_splits",
    "build_transforms",
    "build_datasets",
    "make_loader",
    "make_mixup",
]

DATASETS = ("digits", "cifar10", "cifar100", "cinic10", "imagefolder")

_VAL_DIRS = ("val", "valid", "validation")

_TEST_DIRS = ("test",)

_RESTORE_HINT = (
    "put a local copy there (torchvision's cifar-10-batches-py / cifar-100-python folder, <name>/{train,test}.npz "
    "or <name>/{train,test}/<class>/ image trees) and pass --data-dir DATA, or set download: true to fetch it"
)


# ------------------------------------------------------------------------------------------ raw data
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
        return _ArrayImages(z["x"], z["y"])


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
            classes = [str(c) for c in z[key]] if key in z else [str(i) for i in range(int(z["y"].max()) + 1)]
    elif folder.is_dir():
        raw = _folder_tree(spec, root / name, what=name)
        bases = {id(ds): ds for ds, _ in (raw.train, raw.val, raw.test)}  # train/ may back several splits
        decoded = {key: _decoded(ds) for key, ds in bases.items()}
        return RawSplits(*((decoded[id(ds)], idx) for ds, idx in (raw.train, raw.val, raw.test)), raw.classes)
    else:
        raise _missing(name, root, [root / tv_dir, npz, folder], _RESTORE_HINT)
    keep, val = _holdout(_targets(train), spec.val_split, spec.split_seed, "val_split")
    return RawSplits((train, keep), (train, val), (test, list(range(len(test)))), classes)


def _decoded(folder: Dataset) -> _ArrayImages:
    """Decode every image of a folder data set of equal-sized images (CIFAR image trees) into memory."""
    images = [np.asarray(folder[i][0]) for i in range(len(folder))]
    if len({im.shape for im in images}) > 1:
        raise DataError(f"{getattr(folder, 'root', folder)}: images of different sizes cannot be held as one array.")
    return _ArrayImages(np.stack(images), _targets(folder))


def _find_dir(root: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _folder_tree(spec: DataSection, root: Path, what: str) -> RawSplits:
    """train/ [val|valid|validation/] [test/] ImageFolder tree; missing splits are held out of train."""
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise FileNotFoundError(
            f"{what}: data_dir={str(root)!r} does not exist; pass --data-dir pointing at a folder with "
            "train/ (and optionally val/ and test/) subfolders of class folders."
        )
    if not (root / "train").is_dir():
        raise _missing(f"{what} train split", root, [root / "train"], "the tree must hold train/<class>/<image>")
    train = ImageFolder(str(root / "train"))
    val_dir, test_dir = _find_dir(root, _VAL_DIRS), _find_dir(root, _TEST_DIRS)
    if test_dir is None and val_dir is not None:  # the usual ImageNet-style layout: val is the test set
        test_dir, val_dir = val_dir, None
    parts: dict[str, tuple[Dataset, list[int]]] = {}
    pool = list(range(len(train)))
    labels = train.targets
    for split, folder, size, salt in (("test", test_dir, spec.test_split, 0), ("val", val_dir, spec.val_split, 1)):
        if folder is not None:
            ds = ImageFolder(str(folder))
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


# ------------------------------------------------------------------------------------ transforms
def build_transforms(spec: DataSection, model: torch.nn.Module | None = None) -> tuple[Callable, Callable, dict]:
    """timm train and eval transforms for a recipe.

    Mean / std / interpolation follow the backbone's pretrained config (``resolve_data_config``);
    the input size is the recipe's ``img_size``; ``crop_pct`` 1.0 resizes the whole image (right for
    images no larger than the input, such as 32-px CIFAR shown to a 224-px backbone).

    Args:
        spec: The recipe's data section.
        model: The (wrapped) backbone whose pretrained config gives mean / std / interpolation, or None.

    Returns:
        (train transform, eval transform, resolved data config).
    """
    from timm.data import create_transform, resolve_data_config

    size = int(spec.img_size)
    args = {"input_size": (3, size, size), "crop_pct": float(spec.crop_pct)}
    if spec.interpolation:
        args["interpolation"] = spec.interpolation
    backbone = getattr(model, "backbone", model)
    if backbone is not None and getattr(backbone, "pretrained_cfg", None):
        data_cfg = resolve_data_config(args, model=backbone)
    else:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        data_cfg = {"interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, **args}
    data_cfg["input_size"] = (3, size, size)
    data_cfg["crop_pct"] = float(spec.crop_pct)
    common = {k: data_cfg[k] for k in ("input_size", "interpolation", "mean", "std")}
    train_tf = create_transform(
        **common,
        is_training=True,
        scale=tuple(spec.crop_scale),
        ratio=tuple(spec.crop_ratio),
        hflip=float(spec.hflip),
        color_jitter=float(spec.color_jitter or 0.0),
        auto_augment=spec.auto_augment,
        re_prob=float(spec.re_prob),
    )
    eval_tf = create_transform(**common, is_training=False, crop_pct=data_cfg["crop_pct"])
    return train_tf, eval_tf, {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_cfg.items()}


class SplitDataset(Dataset):
    """One split: indices into a base data set, a transform, and per-sample seeded augmentation.

    Args:
        base: Data set yielding (PIL image, label).
        indices: The samples of this split.
        transform: Applied to each image.
        seed: Seed of the augmentation; sample ``i`` of epoch ``e`` uses ``seed_for(seed, e, i)``.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable, seed: int = 0):
        self.base = base
        self.indices = list(indices)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of this epoch (call before creating the loader's iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> list[int]:
        """Labels of this split, in order."""
        t = _targets(self.base)
        return [t[i] for i in self.indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[self.indices[i]]
        s = seed_for(self.seed, self.epoch, i)
        # timm's crops and auto-augment draw from `random`, RandAugment's and AugMix's magnitudes and weights
        # from numpy, torchvision's flips from torch (the CPU generator only: any CUDA generator is left alone)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.default_generator.manual_seed(s)
        return self.transform(img), int(label)


def _subset(indices: list[int], limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= len(indices):
        return indices
    rng = np.random.default_rng(seed)
    return sorted(indices[i] for i in rng.permutation(len(indices))[: int(limit)])


@dataclass
class DataSplits:
    """Transformed train / val / test splits of a recipe's data set."""

    train: SplitDataset | ArraySplit
    val: SplitDataset | ArraySplit
    test: SplitDataset | ArraySplit
    classes: list[str]
    data_config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolve_augment(spec: DataSection, raw: RawSplits) -> str:
    """The augmentation a recipe gets on its data: ``crop_flip`` / ``rrc`` (in memory) or ``timm`` (per image).

    ``auto`` picks ``rrc`` for array data sets (digits, CIFAR in any of its layouts) and ``timm`` when
    the data is a folder tree or the recipe asks for augmentations only timm's transforms have.

    Args:
        spec: The recipe's data section.
        raw: The loaded splits (`load_splits`).

    Returns:
        "crop_flip", "rrc" or "timm"; a combination that cannot work raises a ValueError that says why.
    """
    in_memory = all(isinstance(ds, _ArrayImages) for ds, _ in (raw.train, raw.val, raw.test))
    per_image = [k for k in ("auto_augment", "color_jitter", "re_prob") if getattr(spec, k)]
    kind = spec.augment
    if kind == "auto":
        return "timm" if per_image or not in_memory else "rrc"
    if kind in ("crop_flip", "rrc"):
        if not in_memory:
            raise DataError(
                f"augment: {kind} works on array data sets held in memory (digits, cifar10, cifar100); "
                f"{spec.dataset!r} is read image by image: use augment: timm (or auto)."
            )
        if per_image:
            raise DataError(
                f"{', '.join(per_image)} need timm's per-image transforms; set augment: timm to use them, or "
                f"leave them unset with augment: {kind}."
            )
    elif kind != "timm":
        raise DataError(f"unknown augment {kind!r}; choose one of {AUGMENTS}.")
    return kind


def build_datasets(
    spec: DataSection, model: torch.nn.Module | None = None, raw: RawSplits | None = None, *, seed: int
) -> DataSplits:
    """Load a recipe's data set and wrap its splits for training (augmented) and evaluation.

    Array data sets are held in memory as one uint8 tensor and augmented per batch (`ArraySplit`);
    folder trees, and recipes with ``augment: timm``, go through timm's per-image transforms.

    Args:
        spec: The recipe's data section (``recipe.data``).
        model: The (wrapped) backbone, whose pretrained config gives mean / std / interpolation.
        raw: Splits already loaded by `load_splits` (loaded here if None).
        seed: The recipe's ``seed``: of the sample subsets and the augmentation.

    Returns:
        A `DataSplits`.
    """
    raw = raw if raw is not None else load_splits(spec)
    kind = resolve_augment(spec, raw)
    train_tf, eval_tf, data_cfg = build_transforms(spec, model)
    seed = int(seed)
    lim_train, lim_eval = spec.max_train_samples, spec.max_eval_samples
    picks = (
        (raw.train, _subset(raw.train[1], lim_train, seed), train_tf, True),
        # the held-out subsets follow split_seed, so runs of different seeds are judged on the same images
        (raw.val, _subset(raw.val[1], lim_eval, spec.split_seed + 1), eval_tf, False),
        (raw.test, _subset(raw.test[1], lim_eval, spec.split_seed + 2), eval_tf, False),
    )
    if kind == "timm":
        splits = [SplitDataset(base, idx, tf, seed) for (base, _), idx, tf, _ in picks]
    else:
        augment = BatchAugment(
            kind,
            padding=int(spec.crop_padding),
            hflip=float(spec.hflip),
            scale=tuple(spec.crop_scale),
            ratio=tuple(spec.crop_ratio),
        )
        tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        splits = []
        for (base, _), idx, _, is_train in picks:
            if id(base) not in tensors:
                tensors[id(base)] = (base.tensor(), torch.as_tensor(base.targets, dtype=torch.long))
            images, labels = tensors[id(base)]
            splits.append(ArraySplit(images, labels, idx, data_cfg, augment if is_train else None, seed))
    for split, ds in zip(("train", "val", "test"), splits):
        if len(ds) == 0:
            raise DataError(f"the {split} split of {spec.dataset!r} is empty.")
    return DataSplits(*splits, raw.classes, data_cfg)


def make_loader(
    dataset: SplitDataset | ArraySplit,
    batch_size: int,
    *,
    train: bool,
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over a `ShardSampler`.

    Args:
        dataset: The split.
        batch_size: Per-rank batch size.
        train: Shuffle and keep whole batches only (training) or every sample in order (evaluation).
        num_replicas: World size.
        rank: This process's rank.
        seed: Seed of the shuffling.
        num_workers: Loader worker processes (per-image data only; array splits batch in the main process).
        pin_memory: Pin host memory (GPU training).

    Returns:
        The loader (an `ArrayLoader` for array splits); call ``loader.sampler.set_epoch(epoch, start_batch)`` and
        ``dataset.set_epoch(epoch)`` before each epoch.
    """
    sampler = ShardSampler(
        len(dataset), num_replicas, rank, shuffle=train, seed=seed, batch_size=batch_size if train else None
    )
    if isinstance(dataset, ArraySplit):
        return ArrayLoader(dataset, batch_size, sampler)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=train,
        persistent_workers=False,
    )


def make_mixup(spec: DataSection, num_classes: int, label_smoothing: float = 0.0) -> Callable | None:
    """timm ``Mixup`` for the data section's mixup / cutmix alphas, or None when both are 0.

    Args:
        spec: The recipe's data section.
        num_classes: Classes of the data set.
        label_smoothing: The loss's label smoothing (``recipe.method.label_smoothing``), folded into the mixed
            targets.

    Returns:
        The ``Mixup`` callable ``(x, y) -> (x, soft targets)``, or None.
    """
    if not (spec.mixup or spec.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=float(spec.mixup),
        cutmix_alpha=float(spec.cutmix),
        prob=float(spec.mixup_prob),
        label_smoothing=float(label_smoothing),
        num_classes=num_classes,
    )
