"""In-memory array splits (digits, CIFAR): the whole split as one uint8 tensor, each batch gathered and augmented
with tensor ops (`BatchAugment`: ``crop_flip`` or ``rrc``, then normalised), served by `ArrayLoader` without loader
processes. Sample ``i`` of epoch ``e`` is augmented from row ``i`` of the parameters drawn for the whole epoch from
(seed, e), so augmentation does not depend on the number of processes or on where a run was resumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .sampling import ShardSampler, seed_for

__all__ = [
    "AUGMENTS",
    "BatchAugment",
    "ArraySplit",
    "ArrayLoader",
]


# ------------------------------------------------------------------------- in-memory array splits
AUGMENTS = ("auto", "crop_flip", "rrc", "timm")


@dataclass(frozen=True)
class BatchAugment:
    """Training augmentation applied to a whole uint8 batch with tensor ops.

    ``crop_flip``: reflect-pad by ``padding`` pixels, crop a random window of the original size, flip
    horizontally with probability ``hflip``. ``rrc``: random-resized crop (area fraction in ``scale``,
    aspect ratio log-uniform in ``ratio``) resampled to the output size with the evaluation's interpolation
    (``grid_sample``; its bicubic kernel, a = -0.75, is a little sharper than PIL's), then the flip.
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
            offsets = (u[:, :2] * span).floor()
            return torch.cat([offsets, flip.double()[:, None], torch.zeros(count, 1, dtype=u.dtype)], 1)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * u[:, 1])
        h, w = size
        width = torch.sqrt(area * aspect * h / w).clamp(max=1.0)  # fractions of the image's width and height
        height = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
        v = torch.rand(count, 2, generator=g, dtype=torch.float64) * 2 - 1
        sign = 1.0 - 2.0 * flip.double()
        return torch.stack([width * sign, height, v[:, 0] * (1 - width), v[:, 1] * (1 - height)], 1)

    def apply(self, images: torch.Tensor, params: torch.Tensor, out_size: int, mode: str = "bilinear") -> torch.Tensor:
        """Augment a uint8 batch (B, 3, H, W) with its rows of `params`; returns float in [0, 1] at `out_size`,
        resampled with `mode` ("bilinear", "bicubic" or "nearest"; others read as "bilinear"), the interpolation
        the evaluation path resizes with."""
        mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bilinear"
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
            return _resize(out / 255.0, out_size, mode=mode)
        theta = torch.zeros(len(images), 2, 3, dtype=torch.float32)
        theta[:, 0, 0], theta[:, 1, 1] = params[:, 0].float(), params[:, 1].float()
        theta[:, 0, 2], theta[:, 1, 2] = params[:, 2].float(), params[:, 3].float()
        grid = F.affine_grid(theta, [len(images), 3, out_size, out_size], align_corners=False)
        out = F.grid_sample(images.float() / 255.0, grid, mode=mode, padding_mode="border", align_corners=False)
        return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


def _keep_ratio(h: int, w: int, shorter: int) -> tuple[int, int]:
    """(height, width) with the shorter side `shorter` and the aspect ratio kept (torchvision's rounding)."""
    if h <= w:
        return shorter, int(shorter * w / h)
    return int(shorter * h / w), shorter


def _resize(x: torch.Tensor, size: int, crop_pct: float = 1.0, mode: str = "bilinear") -> torch.Tensor:
    """Resize a float batch so its shorter side is size / crop_pct, then centre-crop size x size."""
    scaled = int(math.floor(size / crop_pct))
    target = _keep_ratio(*x.shape[-2:], scaled)
    if x.shape[-2:] != target:
        mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bilinear"
        x = F.interpolate(x, size=target, mode=mode, antialias=mode != "nearest", align_corners=None)
        if mode == "bicubic":
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL's resize (the per-image path) clips the same way
    if target != (size, size):
        top, left = (target[0] - size) // 2, (target[1] - size) // 2
        x = x[..., top : top + size, left : left + size]
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
            x = self.augment.apply(images, self._params[positions], self.size, self.interpolation)
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
        for chunk in order.split(self.batch_size):  # an empty shard (fewer samples than ranks) yields nothing
            if len(chunk) == 0 or (self.sampler.batch_size is not None and len(chunk) < self.batch_size):
                return  # training keeps whole batches only
            yield self.dataset.batch(chunk)
