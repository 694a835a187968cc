"""Data for the training recipes: transforms, augmented and evaluation splits, loaders and mixup.

Data sets on disk and their held-out splits come from `timm_exits.training.sources`.

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
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import AUGMENTS, ArrayLoader, ArraySplit, BatchAugment
from .recipe_schema import DataSection
from .recipe_types import RecipeError
from .sampling import ShardSampler, seed_for
from .sources import DATASETS, DataError, RawSplits, _ArrayImages, _targets, load_splits

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
        height, width = raw.train[0].images.shape[1:3]  # type: ignore[attr-defined]
        if kind == "crop_flip" and spec.crop_padding >= min(height, width):
            raise RecipeError(
                f"crop_padding={spec.crop_padding} must be smaller than the {height} x {width} images of "
                f"{spec.dataset!r} (reflect padding mirrors the image's own pixels); lower crop_padding."
            )
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
