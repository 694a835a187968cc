"""The in-memory data path: per-batch augmentation, sharding, resumption, resizing, and the one-cycle schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from timm_exits.training.augment import ArrayLoader, ArraySplit, BatchAugment
from timm_exits.training.data import build_datasets, load_splits, make_loader
from timm_exits.training.recipe import list_recipes, load_recipe
from timm_exits.training.sources import _holdout
from timm_exits.training.stages import OneCycle

CFG = {"input_size": (3, 6, 6), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "crop_pct": 1.0}


def _images(n: int = 10, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def test_crop_flip_equals_a_numpy_reflect_pad_and_slice():
    images, labels = _images()
    aug = BatchAugment("crop_flip", padding=2, hflip=0.5)
    split = ArraySplit(images, labels, range(10), CFG, aug, seed=5)
    split.set_epoch(3)
    x, y = split.batch(torch.arange(10))
    params = aug.params(10, (6, 6), 5, 3)
    assert set(params[:, 2].tolist()) == {0.0, 1.0}, "both flipped and unflipped samples in this draw"
    for i in range(10):
        padded = np.pad(images[i].numpy(), ((0, 0), (2, 2), (2, 2)), mode="reflect")
        dy, dx = int(params[i, 0]), int(params[i, 1])
        ref = padded[:, dy : dy + 6, dx : dx + 6]
        ref = ref[:, :, ::-1] if params[i, 2] else ref
        np.testing.assert_allclose(x[i].numpy(), ref / 255.0, atol=1e-6)
    assert y.tolist() == labels.tolist()
    assert params[:, :2].min() >= 0 and params[:, :2].max() <= 4


def test_rrc_of_the_whole_image_is_the_image_and_flip_mirrors_it():
    images, labels = _images()
    whole = BatchAugment("rrc", hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    x, _ = ArraySplit(images, labels, range(10), CFG, whole).batch(torch.arange(10))
    torch.testing.assert_close(x, images.float() / 255.0)
    flipped = BatchAugment("rrc", hflip=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    x, _ = ArraySplit(images, labels, range(10), CFG, flipped).batch(torch.arange(10))
    torch.testing.assert_close(x, images.float().flip(-1) / 255.0)
    small = BatchAugment("rrc", scale=(0.1, 0.3))
    params = small.params(1000, (6, 6), 0, 0)
    area = params[:, 0].abs() * params[:, 1]
    assert area.min() >= 0.1 - 1e-9 and area.max() <= 0.3 + 1e-9
    assert (params[:, 2].abs() <= 1 - params[:, 0].abs() + 1e-9).all()


def test_augmentation_depends_on_position_and_epoch_not_on_ranks_or_batches():
    images, labels = _images(40)
    aug = BatchAugment("crop_flip", padding=2)

    def epoch_samples(world: int, batch: int, epoch: int) -> dict[int, torch.Tensor]:
        seen = {}
        for rank in range(world):
            split = ArraySplit(images, labels, range(40), CFG, aug, seed=1)
            loader = make_loader(split, batch, train=True, num_replicas=world, rank=rank, seed=1)
            split.set_epoch(epoch)
            loader.sampler.set_epoch(epoch)
            order = list(loader.sampler)
            xs = torch.cat([x for x, _ in loader])
            seen.update({pos: xs[k] for k, pos in enumerate(order)})
        return seen

    one, two = epoch_samples(1, 8, 2), epoch_samples(2, 4, 2)
    assert sorted(one) == sorted(two) and len(one) == 40
    for pos in one:
        torch.testing.assert_close(one[pos], two[pos])
    other = epoch_samples(1, 8, 3)
    assert any(not torch.equal(one[p], other[p]) for p in one)


def test_resumed_epoch_yields_the_rest_of_the_same_batches():
    images, labels = _images(40)
    split = ArraySplit(images, labels, range(40), CFG, BatchAugment("rrc"), seed=2)
    loader = make_loader(split, 8, train=True, seed=2)
    assert isinstance(loader, ArrayLoader) and len(loader) == 5
    split.set_epoch(1)
    loader.sampler.set_epoch(1)
    full = [x for x, _ in loader]
    split.set_epoch(1)
    loader.sampler.set_epoch(1, start_batch=3)
    rest = [x for x, _ in loader]
    assert len(rest) == 2
    for a, b in zip(full[3:], rest):
        torch.testing.assert_close(a, b)


def test_eval_split_resizes_centre_crops_and_normalises():
    images, labels = _images(4, 8)
    cfg = {"input_size": (3, 4, 4), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 0.5}
    x, _ = ArraySplit(images, labels, range(4), cfg).batch(torch.arange(4))
    ref = images.float()[:, :, 2:6, 2:6] / 255.0  # 8 px = 4 / 0.5: no resampling, a centre crop
    torch.testing.assert_close(x, (ref - 0.5) / 0.25)


def test_array_data_sets_stay_in_memory_and_folder_trees_do_not(tmp_path):
    cfg = load_recipe(None, {"dataset": "digits", "img_size": 24})
    data = build_datasets(cfg.data, seed=cfg.seed)
    assert isinstance(data.train, ArraySplit) and data.train.images.dtype == torch.uint8
    assert data.train.augment.kind == "rrc" and data.val.augment is None
    x, y = next(iter(make_loader(data.val, 16, train=False)))
    assert x.shape == (16, 3, 24, 24) and y.dtype == torch.long
    with pytest.raises(ValueError, match="need timm's per-image transforms"):
        build_datasets(load_recipe(None, {"dataset": "digits", "augment": "crop_flip", "re_prob": 0.25}).data, seed=0)
    auto = load_recipe(None, {"augment": "auto", "re_prob": 0.25}).data
    assert not isinstance(build_datasets(auto, seed=0).train, ArraySplit)
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            from PIL import Image

            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / split / cls / f"{i}.png")
    tree = {"dataset": "imagefolder", "data_dir": str(root), "val_split": 2}
    with pytest.raises(ValueError, match="augment: timm"):
        build_datasets(load_recipe(None, {**tree, "augment": "crop_flip"}).data, seed=0)
    assert not isinstance(build_datasets(load_recipe(None, tree).data, seed=0).train, ArraySplit)
    (root / "train" / "c").mkdir()  # a class the test split lacks
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "c" / "0.png")
    with pytest.raises(ValueError, match=r"test/ lacks \['c'\] and has \[\] that train/ lacks"):
        load_splits(load_recipe(None, tree).data)


def test_an_npz_copy_without_its_test_split_says_what_is_missing(tmp_path):
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "train.npz", x=np.zeros((20, 32, 32, 3), np.uint8), y=np.arange(20) % 10)
    cfg = load_recipe(None, {"dataset": "cifar10", "data_dir": str(tmp_path), "val_split": 10}).data
    with pytest.raises(FileNotFoundError, match=r"test.npz is missing: an npz copy holds train.npz and test.npz"):
        load_splits(cfg)


def test_cifar_image_tree_is_decoded_into_memory(tmp_path, monkeypatch):
    import torchvision.datasets.folder as tv_folder
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = {}
    for split, n in (("train", 2), ("test", 1)):
        for c in range(10):
            d = tmp_path / "cifar10" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:05d}.png")
                pixels[(split, c, i)] = arr
    cfg = load_recipe(None, {"dataset": "cifar10", "data_dir": str(tmp_path), "val_split": 10}).data
    opened: list[str] = []
    pil_loader = tv_folder.pil_loader
    monkeypatch.setattr(tv_folder, "pil_loader", lambda path: opened.append(path) or pil_loader(path))
    data = build_datasets(cfg, raw=load_splits(cfg), seed=0)
    assert len(opened) == len(set(opened)) == 30  # each file read once, though train/ feeds two splits
    assert isinstance(data.test, ArraySplit) and (len(data.train), len(data.val), len(data.test)) == (10, 10, 10)
    first = data.test.images[data.test.indices[0]].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(first, pixels[("test", 0, 0)])


def test_one_cycle_rises_then_anneals_as_a_function_of_the_step():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched = OneCycle(opt, total_updates=100, warmup_updates=15)
    lrs = []
    for step in range(101):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert math.isclose(lrs[0], 0.1 / 25) and math.isclose(lrs[15], 0.1) and math.isclose(lrs[100], 0.1 / 2.5e5)
    assert all(a < b for a, b in zip(lrs[:15], lrs[1:16])) and all(a >= b for a, b in zip(lrs[15:], lrs[16:]))
    sched.step_update(40)
    assert opt.param_groups[0]["lr"] == lrs[40]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"test_split": 0}, r"\(test_split=0\.0 of 1797 samples\); raise test_split"),
        ({"val_split": 0}, r"\(val_split=0\.0 of \d+ samples\); raise val_split"),
        ({"test_split": 5000}, r"\(test_split=5000\); lower test_split"),
    ],
)
def test_an_empty_or_oversized_held_out_split_names_the_key_that_set_it(overrides, message):
    cfg = load_recipe(None, {"dataset": "digits", **overrides}).data
    with pytest.raises(ValueError, match=message):
        load_splits(cfg)


@pytest.mark.parametrize("held", [3, 95])  # fewer samples than classes on one side: no stratification possible
def test_a_held_out_split_too_small_to_stratify_on_either_side_is_still_made(held):
    labels = [i % 10 for i in range(100)]
    kept, out = _holdout(labels, held, seed=0, key="val_split")
    assert len(out) == held and sorted(kept + out) == list(range(100))
    assert _holdout(labels, held, seed=0, key="val_split") == (kept, out)  # seeded
    kept, out = _holdout(labels, 50, seed=0, key="val_split")  # stratified where both sides can be
    assert sorted(labels[i] for i in out) == sorted(labels[i] for i in kept)


@pytest.mark.parametrize("policy", ["rand-m9-n3-mstd0.5", "augmix-m5-w4-d2"])
def test_per_image_augmentation_is_seeded_whatever_numpys_state(policy):
    cfg = load_recipe(None, {"dataset": "digits", "augment": "timm", "auto_augment": policy}).data
    raw = load_splits(cfg)
    data = build_datasets(cfg, raw=raw, seed=3)
    first = []
    for k in (0, 1):
        np.random.seed(k)  # RandAugment and AugMix draw from numpy: the sample's own seed must decide
        first.append(torch.stack([data.train[i][0] for i in range(4)]))
    assert torch.equal(first[0], first[1])
    # the policy reaches the transform: the same pipeline and seed without it gives other images, every one
    plain_cfg = load_recipe(None, {"dataset": "digits", "augment": "timm"}).data
    assert plain_cfg.auto_augment is None
    plain = build_datasets(plain_cfg, raw=raw, seed=3)
    without = torch.stack([plain.train[i][0] for i in range(4)])
    assert without.shape == first[0].shape
    assert ((first[0] - without).flatten(1).abs().amax(1) > 0.1).all()


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_shipped_recipe_gets_an_augmentation_its_data_set_can_use(name):
    from torch.utils.data import TensorDataset

    from timm_exits.training.data import RawSplits, resolve_augment
    from timm_exits.training.recipe_schema import DataSection
    from timm_exits.training.sources import _ArrayImages

    spec = load_recipe(name).data
    if spec.dataset in ("cinic10", "imagefolder"):  # read image by image from class folders
        base = TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    else:
        base = _ArrayImages(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 0, 1])
    raw = RawSplits((base, [0, 1]), (base, [2]), (base, [3]), ["a", "b"])
    kind = resolve_augment(spec, raw)
    assert kind in ("crop_flip", "rrc", "timm")
    if spec.crop_scale != DataSection().crop_scale:  # a recipe that sets crop_scale gets one that reads it
        assert kind in ("rrc", "timm")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("kind", ["rrc", "crop_flip"])
def test_training_resizes_array_images_with_the_interpolation_evaluation_uses(kind, interpolation):
    from timm_exits.training.augment import _resize
    from timm_exits.training.build import build_model

    recipe = load_recipe("digits_quick", {"augment": kind, "interpolation": interpolation, "crop_padding": 0})
    raw = load_splits(recipe.data)
    model = build_model(recipe.model, len(raw.classes), recipe.data.img_size, pretrained=False)
    train = build_datasets(recipe.data, model, raw, seed=0).train
    assert train.interpolation == interpolation and train.images.shape[-1] == 8  # 8 px digits, trained at 32
    n = 16
    # the augmentation's identity: the whole image, centred, no flip (rrc), or no shift and no flip (crop_flip)
    identity = [1.0, 1.0, 0.0, 0.0] if kind == "rrc" else [0.0, 0.0, 0.0, 0.0]
    train._params = torch.tensor([identity], dtype=torch.float64).expand(len(train), 4).clone()
    x, _ = train.batch(torch.arange(n))
    images = train.images[train.indices[:n]]
    pixels = x * train.std + train.mean
    reference = _resize(images.float() / 255.0, train.size, train.crop_pct, interpolation)
    if kind == "rrc" and interpolation == "bicubic":  # grid_sample's cubic kernel (a = -0.75) is not PIL's (-0.5)
        bilinear = _resize(images.float() / 255.0, train.size, train.crop_pct, "bilinear")
        assert (pixels - reference).abs().mean() < 0.5 * (bilinear - reference).abs().mean()
        assert (pixels - reference).abs().max() < 0.1
    else:
        torch.testing.assert_close(pixels, reference, rtol=0, atol=1e-5)


def test_runs_of_different_seeds_are_judged_on_the_same_held_out_subsets():
    picked = []
    for seed in (0, 1):
        recipe = load_recipe("digits_quick", {"max_train_samples": 64, "max_eval_samples": 20, "seed": seed})
        data = build_datasets(recipe.data, None, load_splits(recipe.data), seed=recipe.seed)
        picked.append((data.train.indices.tolist(), data.val.indices.tolist(), data.test.indices.tolist()))
    assert picked[0][1:] == picked[1][1:] and len(picked[0][2]) == 20  # val and test: the same images
    assert picked[0][0] != picked[1][0]  # the training subset follows the seed


def _cifar_copies(root, n_per_class: int = 4) -> np.ndarray:
    """The same small CIFAR-10 stand-in as an npz copy and as an image tree written from the arrays
    (``<index>_<name>.png``, shuffled order); returns the training images."""
    from PIL import Image

    rng = np.random.default_rng(1)
    y = rng.permutation(np.arange(10 * n_per_class) % 10)
    x = rng.integers(0, 255, (len(y), 32, 32, 3), dtype=np.uint8)
    names = np.array([f"class{c}" for c in range(10)])
    (root / "npz" / "cifar10").mkdir(parents=True)
    for split in ("train", "test"):
        np.savez(root / "npz" / "cifar10" / f"{split}.npz", x=x, y=y, label_names=names)
        for i in range(len(y)):
            d = root / "tree" / "cifar10" / split / names[y[i]]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(d / f"{i:05d}_img{len(y) - i}.png")
    return x


def test_a_cifar_copy_holds_out_the_same_images_in_every_layout(tmp_path):
    x = _cifar_copies(tmp_path)
    held = []
    for layout in ("npz", "tree"):
        cfg = load_recipe(None, {"dataset": "cifar10", "data_dir": str(tmp_path / layout), "val_split": 10}).data
        raw = load_splits(cfg)
        base, idx = raw.val
        held.append({base.images[i].tobytes() for i in idx})
        np.testing.assert_array_equal(raw.train[0].images, x)  # the tree is put back in index order
    assert len(held[0]) == 10 and held[0] == held[1]


def test_a_cifar_image_tree_without_its_test_split_is_refused(tmp_path):
    _cifar_copies(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "tree" / "cifar10" / "test")
    cfg = load_recipe(None, {"dataset": "cifar10", "data_dir": str(tmp_path / "tree"), "val_split": 10}).data
    with pytest.raises(FileNotFoundError, match=r"cifar10/test is missing: a CIFAR image tree holds train/ and test/"):
        load_splits(cfg)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x": lambda x: x.astype(np.float32) / 255}, r"'x' is float32 of shape \(40, 32, 32, 3\); an npz split holds"),
        ({"x": lambda x: x.transpose(0, 3, 1, 2)}, r"'x' is uint8 of shape \(40, 3, 32, 32\)"),
        ({"y": lambda y: y[:30]}, r"'y' is int64 of shape \(30,\) for 40 images in 'x'"),
        ({"y": lambda y: y + 1, "label_names": None}, r"holds 11 classes, but cifar10 has 10"),
        ({"y": lambda y: np.where(y == 0, 10, y)}, r"the train split has labels \[10\] outside 0..9"),
    ],
)
def test_an_npz_copy_that_does_not_hold_cifar_says_what_is_wrong(tmp_path, change, message):
    from timm_exits.training.data import DataError

    _cifar_copies(tmp_path)
    path = tmp_path / "npz" / "cifar10" / "train.npz"
    with np.load(path) as z:
        arrays = dict(z)
    for key, fn in change.items():
        arrays[key] = fn(arrays[key]) if fn is not None else None
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    cfg = load_recipe(None, {"dataset": "cifar10", "data_dir": str(tmp_path / "npz"), "val_split": 10}).data
    with pytest.raises(DataError, match=message):
        load_splits(cfg)


def test_keras_style_column_labels_in_an_npz_copy_are_read_as_one_label_per_image(tmp_path):
    _cifar_copies(tmp_path)
    path = tmp_path / "npz" / "cifar10" / "train.npz"
    with np.load(path) as z:
        arrays = dict(z)
    np.savez(path, **{**arrays, "y": arrays["y"][:, None]})
    cfg = load_recipe(None, {"dataset": "cifar10", "data_dir": str(tmp_path / "npz"), "val_split": 10}).data
    assert load_splits(cfg).train[0].targets == arrays["y"].tolist()


def test_a_corrupted_image_in_a_cifar_tree_is_named(tmp_path):
    from timm_exits.training.data import DataError

    _cifar_copies(tmp_path)
    bad = sorted((tmp_path / "tree" / "cifar10" / "train" / "class3").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:40])
    cfg = load_recipe(None, {"dataset": "cifar10", "data_dir": str(tmp_path / "tree"), "val_split": 10}).data
    with pytest.raises(DataError, match=rf"{bad.name} cannot be read .*restore or remove that file"):
        load_splits(cfg)


def test_a_held_out_folder_with_an_empty_class_folder_loads(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            if split == "train" or cls == "a":
                for i in range(3):
                    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    raw = load_splits(load_recipe(None, {"dataset": "imagefolder", "data_dir": str(tmp_path), "val_split": 2}).data)
    assert raw.classes == ["a", "b"] and [raw.test[0].targets[i] for i in raw.test[1]] == [0, 0, 0]


def test_crop_padding_as_large_as_the_images_names_the_key():
    from timm_exits.training.recipe_types import RecipeError

    cfg = load_recipe(None, {"dataset": "digits", "augment": "crop_flip", "crop_padding": 8}).data
    with pytest.raises(RecipeError, match=r"crop_padding=8 must be smaller than the 8 x 8 images of 'digits'"):
        build_datasets(cfg, seed=0)


def test_a_rank_whose_shard_of_a_held_out_split_is_empty_gets_no_batch():
    """Fewer val images than processes: the last rank's shard is empty (it got one empty batch and stopped)."""
    images, labels = _images(1)
    split = ArraySplit(images, labels, range(1), CFG)
    assert [len(y) for _, y in make_loader(split, 4, train=False, num_replicas=2, rank=0)] == [1]
    assert list(make_loader(split, 4, train=False, num_replicas=2, rank=1)) == []


def _squashing_resize(x: torch.Tensor, size: int, crop_pct: float = 1.0, mode: str = "bilinear") -> torch.Tensor:
    """`_resize` as it was before it kept the aspect ratio: every batch went to scaled x scaled."""
    import torch.nn.functional as F

    scaled = int(math.floor(size / crop_pct))
    if x.shape[-2:] != (scaled, scaled):
        mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bilinear"
        x = F.interpolate(x, size=(scaled, scaled), mode=mode, antialias=mode != "nearest", align_corners=None)
        if mode == "bicubic":
            x = x.clamp_(0.0, 1.0)
    if scaled != size:
        top = (scaled - size) // 2
        x = x[..., top : top + size, top : top + size]
    return x


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest", "lanczos"])
def test_resizing_square_batches_is_unchanged(mode):
    from timm_exits.training.augment import _resize

    g = torch.Generator().manual_seed(0)
    for side in (8, 32, 35):
        x = torch.rand(3, 3, side, side, generator=g)
        for size, crop_pct in ((32, 1.0), (32, 0.875), (32, 0.9), (24, 0.95), (35, 1.0), (8, 1.0)):
            old = _squashing_resize(x.clone(), size, crop_pct, mode)
            assert torch.equal(_resize(x.clone(), size, crop_pct, mode), old), (side, size, crop_pct)


def _non_square_datasets(root, shape: tuple[int, int], crop_pct: float) -> dict:
    """A 10-class npz CIFAR-10 copy of `shape` images, built with each augment (test_resnet at 32 px)."""
    from timm_exits.training.build import build_model

    rng = np.random.default_rng(0)
    (root / "cifar10").mkdir()
    for split, n in (("train", 40), ("test", 10)):
        x = rng.integers(0, 256, (n, *shape, 3), dtype=np.uint8)
        np.savez(root / "cifar10" / f"{split}.npz", x=x, y=np.arange(n) % 10)
    out = {}
    for augment in ("crop_flip", "rrc", "timm"):
        keys = {"dataset": "cifar10", "data_dir": str(root), "model": "test_resnet", "val_split": 10}
        recipe = load_recipe({**keys, "augment": augment, "crop_pct": crop_pct, "interpolation": "bilinear"})
        model = build_model(recipe.model, 10, 32, pretrained=False)
        out[augment] = build_datasets(recipe.data, model, load_splits(recipe.data), seed=0)
    return out


@pytest.mark.parametrize(("shape", "crop_pct"), [((24, 32), 1.0), ((40, 30), 0.875)])
def test_non_square_images_keep_their_aspect_ratio_on_the_in_memory_path(tmp_path, shape, crop_pct):
    from timm_exits.training.augment import _resize

    data = _non_square_datasets(tmp_path, shape, crop_pct)
    ours, _ = data["crop_flip"].test.batch(torch.arange(10))
    timms = torch.stack([data["timm"].test[i][0] for i in range(10)])  # shorter side, then centre crop (PIL)
    assert ours.shape == timms.shape == (10, 3, 32, 32)
    level = 1 / 255 / data["crop_flip"].test.std.min()  # PIL resamples in fixed point and rounds to uint8
    assert (ours - timms).abs().max() <= 1.5 * level

    # training: both augments give 32 x 32 batches; crop_flip's centred, unflipped window is the whole image with
    # its shorter side resized to 32 and centre-cropped (training reads no crop_pct)
    for augment in ("crop_flip", "rrc"):
        train = data[augment].train
        x, _ = train.batch(torch.arange(8))
        assert x.shape == (8, 3, 32, 32), augment
    train = data["crop_flip"].train
    p = train.augment.padding
    train._params = torch.tensor([[p, p, 0.0, 0.0]], dtype=torch.float64).expand(len(train), 4).clone()
    x, _ = train.batch(torch.arange(8))
    reference = _resize(train.images[train.indices[:8]].float() / 255.0, 32, 1.0, "bilinear")
    torch.testing.assert_close(x * train.std + train.mean, reference, rtol=0, atol=1e-5)


def test_hidden_files_and_folders_in_an_image_folder_are_left_out(tmp_path):
    from PIL import Image

    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
        (tmp_path / split / ".ipynb_checkpoints").mkdir()  # Jupyter's, in the split and in a class folder
        (tmp_path / split / ".ipynb_checkpoints" / "x-checkpoint.ipynb").write_text("{}")
        (tmp_path / split / "a" / ".ipynb_checkpoints").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / split / "a" / ".ipynb_checkpoints" / "0-checkpoint.png")
        (tmp_path / split / ".DS_Store").write_bytes(b"\0")
        (tmp_path / split / "b" / "._0.png").write_bytes(b"\0\5\26\7 macOS resource fork")  # not an image
    cfg = load_recipe(None, {"dataset": "imagefolder", "data_dir": str(tmp_path), "img_size": 16}).data
    data = build_datasets(cfg, seed=0)
    assert data.classes == ["a", "b"]
    for split in (data.train, data.val, data.test):
        assert len(split) == 6 and split.targets == [0, 0, 0, 1, 1, 1]
        assert all(split[i][0].shape == (3, 16, 16) for i in range(len(split)))


def test_16_bit_grey_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    from PIL import Image

    grey = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(grey).save(tmp_path / split / cls / f"{i}.png")
    raw = load_splits(load_recipe(None, {"dataset": "imagefolder", "data_dir": str(tmp_path), "val_split": 2}).data)
    img = np.asarray(raw.test[0][0][0])
    assert img.shape == (8, 8, 3) and np.array_equal(img[..., 0], np.round(grey / 257).astype(np.uint8))
