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
  that are missing are held out of ``train`` with a fixed seed.

Every data set yields three splits: ``train``, ``val`` (held out for threshold calibration and the
per-epoch logs, never trained on) and ``test``.

Two data paths (``augment:``). Array data sets (digits, CIFAR) are held in memory as one uint8
tensor, and each batch is gathered and augmented with tensor ops (`ArraySplit`, `BatchAugment`):
``crop_flip`` (reflect-pad, random crop, flip) or ``rrc`` (random-resized crop, flip), then
normalised; no loader processes, so the data path keeps up with the model. Folder trees, and
``augment: timm``, go image by image through timm's transforms (``resolve_data_config``,
``create_transform``, auto-augment, random erasing). Mixup / cutmix come from timm's ``Mixup`` on
either path (soft targets, which every loss of timm-exits accepts).

Randomness does not depend on the number of processes or on where a run was resumed: sample ``i``
of epoch ``e`` is augmented from (seed, e, i) (in memory: row ``i`` of the parameters drawn for the
whole epoch from (seed, e)), and `ShardSampler` orders each
epoch from (seed, e) and gives rank ``r`` of ``W`` every ``W``-th index, so ``W`` processes with
batch ``B / W`` see exactly the batches one process with batch ``B`` sees.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DATASETS",
    "DataSplits",
    "AUGMENTS",
    "SplitDataset",
    "ArraySplit",
    "ArrayLoader",
    "BatchAugment",
    "ShardSampler",
    "resolve_augment",
    "load_splits",
    "build_transforms",
    "build_datasets",
    "make_loader",
    "make_mixup",
    "seed_for",
]

DATASETS = ("digits", "cifar10", "cifar100", "cinic10", "imagefolder")
_VAL_DIRS = ("val", "valid", "validation")
_TEST_DIRS = ("test",)
_RESTORE_HINT = (
    "put a local copy there (torchvision's cifar-10-batches-py / cifar-100-python folder, <name>/{train,test}.npz "
    "or <name>/{train,test}/<class>/ image trees) and pass --data-dir DATA, or set download: true to fetch it"
)


def seed_for(*parts: int) -> int:
    """A 31-bit seed mixed from integers (e.g. seed, epoch, sample index); the same on every platform."""
    h = 0x345678
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFF)) * 0x100000001B3 % (1 << 61)
        h ^= h >> 29
    return h % (1 << 31)


# ------------------------------------------------------------------------------------------ raw data
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
class _Raw:
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


def _holdout(labels: Sequence[int], size: float | int, seed: int) -> tuple[list[int], list[int]]:
    """Split range(len(labels)) into (kept, held out), stratified by label, with a fixed seed."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    count = int(size) if size >= 1 else int(round(float(size) * n))
    if count <= 0:
        raise ValueError(f"the held-out split would be empty (size={size} of {n} samples); raise val_split.")
    if count >= n:
        raise ValueError(f"cannot hold out {count} of {n} samples; lower val_split / test_split.")
    idx = np.arange(n)
    counts = np.bincount(np.asarray(labels))
    stratify = labels if counts[counts > 0].min() >= 2 and count >= len(counts[counts > 0]) else None
    kept, held = train_test_split(idx, test_size=count, random_state=seed, stratify=stratify)
    return sorted(int(i) for i in kept), sorted(int(i) for i in held)


def _digits(cfg: dict[str, Any]) -> _Raw:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    base = _ArrayImages(images, d.target)
    labels = base.targets
    pool, test = _holdout(labels, cfg["test_split"], cfg["split_seed"])
    keep, val = _holdout([labels[i] for i in pool], cfg["val_split"], cfg["split_seed"] + 1)
    train = [pool[i] for i in keep]
    val = [pool[i] for i in val]
    return _Raw((base, train), (base, val), (base, test), [str(c) for c in d.target_names])


def _missing(what: str, root: Path, looked: Sequence[Path], hint: str) -> FileNotFoundError:
    where = ", ".join(str(p) for p in looked)
    return FileNotFoundError(f"{what} not found under data_dir={str(root)!r} (looked for {where}); {hint}.")


def _npz_split(path: Path) -> _ArrayImages:
    with np.load(path) as z:
        return _ArrayImages(z["x"], z["y"])


def _cifar(cfg: dict[str, Any], name: str) -> _Raw:
    import torchvision

    root = Path(cfg["data_dir"] or "data").expanduser()
    tv_cls, tv_dir = {
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py"),
        "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python"),
    }[name]
    npz = root / name / "train.npz"
    folder = root / name / "train"
    if (root / tv_dir).is_dir() or cfg["download"]:
        try:
            train = tv_cls(str(root), train=True, download=bool(cfg["download"]))
            test = tv_cls(str(root), train=False, download=bool(cfg["download"]))
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
        raw = _folder_tree(cfg, root / name, what=name)
        decoded = {id(ds): _decoded(ds) for ds, _ in (raw.train, raw.val, raw.test)}
        return _Raw(*((decoded[id(ds)], idx) for ds, idx in (raw.train, raw.val, raw.test)), raw.classes)
    else:
        raise _missing(name, root, [root / tv_dir, npz, folder], _RESTORE_HINT)
    keep, val = _holdout(_targets(train), cfg["val_split"], cfg["split_seed"])
    return _Raw((train, keep), (train, val), (test, list(range(len(test)))), classes)


def _decoded(folder: Dataset) -> _ArrayImages:
    """Decode every image of a folder data set of equal-sized images (CIFAR image trees) into memory."""
    images = [np.asarray(folder[i][0]) for i in range(len(folder))]
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"{getattr(folder, 'root', folder)}: images of different sizes cannot be held as one array.")
    return _ArrayImages(np.stack(images), _targets(folder))


def _find_dir(root: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _folder_tree(cfg: dict[str, Any], root: Path, what: str) -> _Raw:
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
    for split, folder, size, salt in (("test", test_dir, cfg["test_split"], 0), ("val", val_dir, cfg["val_split"], 1)):
        if folder is not None:
            ds = ImageFolder(str(folder))
            if ds.classes != train.classes:
                raise ValueError(f"{folder} has classes {ds.classes[:5]}... but train/ has {train.classes[:5]}...")
            parts[split] = (ds, list(range(len(ds))))
        else:
            keep, held = _holdout([labels[i] for i in pool], size, cfg["split_seed"] + salt)
            parts[split] = (train, [pool[i] for i in held])
            pool = [pool[i] for i in keep]
    return _Raw((train, pool), parts["val"], parts["test"], list(train.classes))


def load_splits(cfg: dict[str, Any]) -> _Raw:
    """Load the untransformed train / val / test splits a recipe asks for.

    Args:
        cfg: The recipe (keys dataset, data_dir, download, val_split, test_split, split_seed).

    Returns:
        The splits as (base data set, indices) pairs plus the class names.
    """
    name = cfg["dataset"]
    if name == "digits":
        return _digits(cfg)
    if name in ("cifar10", "cifar100"):
        return _cifar(cfg, name)
    if name in ("cinic10", "imagefolder"):
        if not cfg["data_dir"]:
            raise FileNotFoundError(f"dataset {name!r} needs data_dir (pass --data-dir or set data_dir: ...).")
        root = Path(cfg["data_dir"]).expanduser()
        if name == "cinic10" and not root.is_dir():
            raise FileNotFoundError(
                f"CINIC-10 not found: data_dir={str(root)!r} does not exist. Download and extract CINIC-10 "
                "(train/, valid/, test/ class folders) and pass --data-dir."
            )
        return _folder_tree(cfg, root, what=name)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}.")


# ------------------------------------------------------------------------------------ transforms
def build_transforms(cfg: dict[str, Any], model: torch.nn.Module | None = None) -> tuple[Callable, Callable, dict]:
    """timm train and eval transforms for a recipe.

    Mean / std / interpolation follow the backbone's pretrained config (``resolve_data_config``);
    the input size is the recipe's ``img_size``; ``crop_pct`` 1.0 resizes the whole image (right for
    images no larger than the input, such as 32-px CIFAR shown to a 224-px backbone).

    Returns:
        (train transform, eval transform, resolved data config).
    """
    from timm.data import create_transform, resolve_data_config

    size = int(cfg["img_size"])
    args = {"input_size": (3, size, size), "crop_pct": float(cfg["crop_pct"])}
    if cfg["interpolation"]:
        args["interpolation"] = cfg["interpolation"]
    backbone = getattr(model, "backbone", model)
    if backbone is not None and getattr(backbone, "pretrained_cfg", None):
        data_cfg = resolve_data_config(args, model=backbone)
    else:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        data_cfg = {"interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, **args}
    data_cfg["input_size"] = (3, size, size)
    data_cfg["crop_pct"] = float(cfg["crop_pct"])
    common = {k: data_cfg[k] for k in ("input_size", "interpolation", "mean", "std")}
    train_tf = create_transform(
        **common,
        is_training=True,
        scale=tuple(cfg["crop_scale"]),
        ratio=tuple(cfg["crop_ratio"]),
        hflip=float(cfg["hflip"]),
        color_jitter=float(cfg["color_jitter"] or 0.0),
        auto_augment=cfg["auto_augment"],
        re_prob=float(cfg["re_prob"]),
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
        random.seed(s)  # timm's crops and auto-augment draw from `random`, torchvision's flips from torch
        torch.default_generator.manual_seed(s)  # the CPU generator only: leaves any CUDA generator alone
        return self.transform(img), int(label)


# ------------------------------------------------------------------------- in-memory array splits
AUGMENTS = ("auto", "crop_flip", "rrc", "timm")


@dataclass(frozen=True)
class BatchAugment:
    """Training augmentation applied to a whole uint8 batch with tensor ops.

    ``crop_flip``: reflect-pad by ``padding`` pixels, crop a random window of the original size, flip
    horizontally with probability ``hflip``. ``rrc``: random-resized crop (area fraction in ``scale``,
    aspect ratio log-uniform in ``ratio``) resampled bilinearly to the output size, then the flip.
    The parameters of split position ``i`` in epoch ``e`` come from one generator seeded with
    (seed, e), so they do not depend on the batch size, the rank or where a run was resumed.
    """

    kind: str = "crop_flip"  # crop_flip | rrc
    padding: int = 4
    hflip: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)

    def params(self, count: int, size: tuple[int, int], seed: int, epoch: int) -> torch.Tensor:
        """(count, 4) float64 parameters: crop_flip (dy, dx, flip, 0), rrc (width, height, cx, cy) x flip sign."""
        g = torch.Generator().manual_seed(seed_for(seed, epoch, 0xA06))
        u = torch.rand(count, 4, generator=g, dtype=torch.float64)
        flip = u[:, 3] < self.hflip
        if self.kind == "crop_flip":
            span = 2 * self.padding + 1
            return torch.stack([(u[:, 0] * span).floor(), (u[:, 1] * span).floor(), flip.double(), u[:, 2] * 0], 1)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * u[:, 1])
        h, w = size
        width = torch.sqrt(area * aspect * h / w).clamp(max=1.0)  # fractions of the image's width and height
        height = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
        v = torch.rand(count, 2, generator=g, dtype=torch.float64) * 2 - 1
        sign = 1.0 - 2.0 * flip.double()
        return torch.stack([width * sign, height, v[:, 0] * (1 - width), v[:, 1] * (1 - height)], 1)

    def apply(self, images: torch.Tensor, params: torch.Tensor, out_size: int) -> torch.Tensor:
        """Augment a uint8 batch (B, 3, H, W) with its rows of `params`; returns float in [0, 1] at `out_size`."""
        if self.kind == "crop_flip":
            b, _, h, w = images.shape
            p = self.padding
            padded = F.pad(images.float(), (p, p, p, p), mode="reflect") if p else images.float()
            dy, dx = params[:, 0].long(), params[:, 1].long()
            rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
            flip = params[:, 2].bool()
            cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
            out = padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
            return _resize(out / 255.0, out_size)
        theta = torch.zeros(len(images), 2, 3, dtype=torch.float32)
        theta[:, 0, 0], theta[:, 1, 1] = params[:, 0].float(), params[:, 1].float()
        theta[:, 0, 2], theta[:, 1, 2] = params[:, 2].float(), params[:, 3].float()
        grid = F.affine_grid(theta, [len(images), 3, out_size, out_size], align_corners=False)
        out = F.grid_sample(images.float() / 255.0, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out


def _resize(x: torch.Tensor, size: int, crop_pct: float = 1.0, mode: str = "bilinear") -> torch.Tensor:
    """Resize a float batch so its shorter side is size / crop_pct, then centre-crop size x size."""
    scaled = int(math.floor(size / crop_pct))
    if x.shape[-2:] != (scaled, scaled):
        mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bilinear"
        x = F.interpolate(x, size=(scaled, scaled), mode=mode, antialias=mode != "nearest", align_corners=None)
    if scaled != size:
        top = (scaled - size) // 2
        x = x[..., top : top + size, top : top + size]
    return x


class ArraySplit:
    """One split of an in-memory uint8 image tensor, batched and augmented with tensor ops.

    Args:
        images: All images of the base data set, uint8 (N, 3, H, W).
        labels: Their labels (N,).
        indices: The samples of this split.
        data_config: Resolved preprocessing (input_size, mean, std, interpolation, crop_pct).
        augment: Training augmentation, or None (evaluation: resize and normalise only).
        seed: Seed of the augmentation.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: Sequence[int],
        data_config: dict[str, Any],
        augment: BatchAugment | None = None,
        seed: int = 0,
    ) -> None:
        self.images = images
        self.labels = labels
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.augment = augment
        self.seed = int(seed)
        self.size = int(data_config["input_size"][-1])
        self.crop_pct = float(data_config.get("crop_pct", 1.0))
        self.interpolation = str(data_config.get("interpolation", "bilinear"))
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.epoch = 0
        self._params: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of this epoch."""
        self.epoch, self._params = int(epoch), None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> list[int]:
        """Labels of this split, in order."""
        return self.labels[self.indices].tolist()

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float, normalised) and labels of the split positions `positions`."""
        rows = self.indices[positions]
        images = self.images[rows]
        if self.augment is None:
            x = _resize(images.float() / 255.0, self.size, self.crop_pct, self.interpolation)
        else:
            if self._params is None:
                self._params = self.augment.params(len(self), tuple(self.images.shape[-2:]), self.seed, self.epoch)
            x = self.augment.apply(images, self._params[positions], self.size)
        return ((x - self.mean) / self.std).contiguous(), self.labels[rows]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(torch.tensor([i]))
        return x[0], int(y[0])


class ArrayLoader:
    """Batches of an `ArraySplit` in the order of a `ShardSampler` (the DataLoader of array data sets)."""

    def __init__(self, dataset: ArraySplit, batch_size: int, sampler: ShardSampler) -> None:
        self.dataset, self.batch_size, self.sampler = dataset, int(batch_size), sampler

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        for chunk in order.split(self.batch_size):
            if self.sampler.batch_size is not None and len(chunk) < self.batch_size:
                return  # training keeps whole batches only
            yield self.dataset.batch(chunk)


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


def resolve_augment(cfg: dict[str, Any], raw: _Raw) -> str:
    """The augmentation a recipe gets on its data: ``crop_flip`` / ``rrc`` (in memory) or ``timm`` (per image).

    ``auto`` picks ``rrc`` for array data sets (digits, CIFAR in any of its layouts) and ``timm`` when
    the data is a folder tree or the recipe asks for augmentations only timm's transforms have.
    """
    in_memory = all(isinstance(ds, _ArrayImages) for ds, _ in (raw.train, raw.val, raw.test))
    per_image = [k for k in ("auto_augment", "color_jitter", "re_prob") if cfg.get(k)]
    kind = cfg.get("augment", "auto")
    if kind == "auto":
        return "timm" if per_image or not in_memory else "rrc"
    if kind in ("crop_flip", "rrc"):
        if not in_memory:
            raise ValueError(
                f"augment: {kind} works on array data sets held in memory (digits, cifar10, cifar100); "
                f"{cfg['dataset']!r} is read image by image: use augment: timm (or auto)."
            )
        if per_image:
            raise ValueError(
                f"{', '.join(per_image)} need timm's per-image transforms; set augment: timm to use them, or "
                f"leave them unset with augment: {kind}."
            )
    elif kind != "timm":
        raise ValueError(f"unknown augment {kind!r}; choose one of {AUGMENTS}.")
    return kind


def build_datasets(cfg: dict[str, Any], model: torch.nn.Module | None = None, raw: _Raw | None = None) -> DataSplits:
    """Load a recipe's data set and wrap its splits for training (augmented) and evaluation.

    Array data sets are held in memory as one uint8 tensor and augmented per batch (`ArraySplit`);
    folder trees, and recipes with ``augment: timm``, go through timm's per-image transforms.

    Args:
        cfg: The recipe.
        model: The (wrapped) backbone, whose pretrained config gives mean / std / interpolation.
        raw: Splits already loaded by `load_splits` (loaded here if None).

    Returns:
        A `DataSplits`.
    """
    raw = raw if raw is not None else load_splits(cfg)
    kind = resolve_augment(cfg, raw)
    train_tf, eval_tf, data_cfg = build_transforms(cfg, model)
    seed = int(cfg["seed"])
    lim_train, lim_eval = cfg["max_train_samples"], cfg["max_eval_samples"]
    picks = (
        (raw.train, _subset(raw.train[1], lim_train, seed), train_tf, True),
        (raw.val, _subset(raw.val[1], lim_eval, seed + 1), eval_tf, False),
        (raw.test, _subset(raw.test[1], lim_eval, seed + 2), eval_tf, False),
    )
    if kind == "timm":
        splits = [SplitDataset(base, idx, tf, seed) for (base, _), idx, tf, _ in picks]
    else:
        augment = BatchAugment(
            kind,
            padding=int(cfg.get("crop_padding", 4)),
            hflip=float(cfg["hflip"]),
            scale=tuple(cfg["crop_scale"]),
            ratio=tuple(cfg["crop_ratio"]),
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
            raise ValueError(f"the {split} split of {cfg['dataset']!r} is empty.")
    return DataSplits(*splits, raw.classes, data_cfg)


# -------------------------------------------------------------------------------------- sampling
class ShardSampler(Sampler[int]):
    """Epoch order from (seed, epoch), sharded over ranks so that W ranks see one process's batches.

    Training (``batch_size`` given): the order is truncated to whole global batches of
    ``batch_size * num_replicas`` and rank ``r`` takes positions ``r, r + W, ...``; ``start_batch``
    skips batches already done in this epoch (resume). Evaluation (``batch_size`` None): rank ``r``
    takes every ``W``-th sample, no padding, so every sample is counted once.

    Args:
        length: Size of the data set.
        num_replicas: World size W.
        rank: This process's rank.
        shuffle: Shuffle each epoch.
        seed: Seed of the order.
        batch_size: Per-rank batch size (training), or None (evaluation).
    """

    def __init__(
        self,
        length: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        self.length = int(length)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.batch_size = batch_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and the first batch to yield."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches per epoch (training)."""
        if self.batch_size is None:
            raise ValueError("batches_per_epoch is defined for training samplers (batch_size given) only.")
        return self.length // (self.batch_size * self.num_replicas)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator()
        g.manual_seed(seed_for(self.seed, self.epoch, 0x5EED))
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.batch_size is None:
            return iter(order[self.rank :: self.num_replicas])
        usable = self.batches_per_epoch * self.batch_size * self.num_replicas
        mine = order[self.rank : usable : self.num_replicas]
        return iter(mine[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        if self.batch_size is None:
            return len(range(self.rank, self.length, self.num_replicas))
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


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


def make_mixup(cfg: dict[str, Any], num_classes: int) -> Callable | None:
    """timm ``Mixup`` for the recipe's mixup / cutmix alphas (label smoothing folded in), or None."""
    if not (cfg["mixup"] or cfg["cutmix"]):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=float(cfg["mixup"]),
        cutmix_alpha=float(cfg["cutmix"]),
        prob=float(cfg["mixup_prob"]),
        label_smoothing=float(cfg["label_smoothing"]),
        num_classes=num_classes,
    )
