"""Training images/s through the recipe's loop against the model alone on in-memory tensors.

Builds a recipe's trainer (default: resnet18 with exits on CIFAR-10 at 32 px, the grid's recipe),
then times, in interleaved rounds, (a) ``steps`` optimizer steps of the recipe's own loop: batches
from its loader (gathered from the in-memory uint8 images and augmented per batch), the soft
loss, backward and the optimizer step, and (b) the same steps of the same model and loss on one
batch already in memory (no loading, no augmentation). The ratio (a) / (b) is the share of the
model's speed that the data path keeps.

    python benchmarks/data_throughput.py --data-dir DATA --threads 2 --steps 5 --repeats 21 --set batch_size=128 \
        > benchmarks/results/data_throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from _timing import interleaved_samples, machine, paired_ratio, positive_int

from timm_exits.training.distributed import _Dist
from timm_exits.training.recipe import load_recipe
from timm_exits.training.train import _Trainer

# the recipe settings printed with the rates: what the model is and what changes its speed
RECORDED_KEYS = ("model", "dataset", "exits", "method", "img_size", "augment", "batch_size", "amp", "channels_last")


@contextlib.contextmanager
def recipe_trainer(
    recipe: str, data_dir: str, threads: int, sets: list[str]
) -> Iterator[tuple[_Trainer, object, object]]:
    """A recipe's trainer in a temporary run folder, ready to step: its first stage's optimizer and
    schedule, the model in train mode and the loader at epoch 0.

    Args:
        recipe: Shipped recipe name or YAML path.
        data_dir: The data folder.
        threads: Torch threads (also the recipe's ``threads``).
        sets: Recipe overrides, ``KEY=VALUE``.

    Yields:
        (trainer, optimizer, scheduler); torch's thread count is the caller's again on leaving.
    """
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loaded = load_recipe(recipe, [f"data_dir={data_dir}", f"threads={threads}", *sets])
        with tempfile.TemporaryDirectory() as tmp:
            trainer = _Trainer(loaded, _Dist(), Path(tmp) / "run", resume=False, overwrite=False)
            opt, sched = _make(trainer)
            trainer.data.train.set_epoch(0)
            trainer.train_loader.sampler.set_epoch(0)
            trainer.model.train()
            yield trainer, opt, sched
    finally:
        torch.set_num_threads(caller_threads)


WARMUP_ROUNDS = 1  # untimed rounds of each side before the timed ones


def endless_batches(loader: Iterable) -> Iterator:
    """The loader's batches, read again from the first when they run out (a timing may outlast an epoch)."""
    while True:
        yield from loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="cifar10_resnet18", help="shipped recipe name or YAML path")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--steps", type=positive_int, default=10, help="optimizer steps per timed round")
    p.add_argument("--repeats", type=positive_int, default=7, help="timed rounds")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    args = p.parse_args()
    with recipe_trainer(args.recipe, args.data_dir, args.threads, args.set) as (trainer, opt, sched):
        recipe = trainer.recipe
        batches = endless_batches(trainer.train_loader)
        x0, y0 = next(iter(trainer.train_loader))

        def loop() -> None:
            for _ in range(args.steps):
                x, y = next(batches)
                trainer._step(trainer.model, opt, sched, x, y, 0)

        def tensors() -> None:
            for _ in range(args.steps):
                trainer._step(trainer.model, opt, sched, x0, y0, 0)

        samples = interleaved_samples({"recipe_loop": loop, "in_memory": tensors}, args.repeats, warmup=WARMUP_ROUNDS)
    images = args.steps * recipe.data.batch_size
    ips = {k: images / (statistics.median(v) / 1e3) for k, v in samples.items()}
    flat = recipe.flat()
    out = {
        "benchmark": "data_throughput",
        "machine": machine(args.threads),
        "recipe": {k: flat[k] for k in RECORDED_KEYS},
        "overrides": list(args.set),
        "steps_per_round": args.steps,
        "repeats": args.repeats,
        "warmup_rounds": WARMUP_ROUNDS,
        "images_per_s": {k: round(v, 1) for k, v in ips.items()},
        "ratio_loop_over_in_memory": round(1.0 / paired_ratio(samples, "recipe_loop", "in_memory"), 4),
        "round_ms": {k: [round(t, 1) for t in v] for k, v in samples.items()},
    }
    print(json.dumps(out, indent=2))


def _make(trainer: _Trainer):
    from timm_exits.training.stages import _configure_stage, _make_optimizer

    stage = trainer.stages[0]
    _configure_stage(trainer.model, trainer.recipe.method.method, stage)
    return _make_optimizer(trainer.model, trainer.recipe.optim, stage, trainer.steps_per_epoch)


if __name__ == "__main__":
    main()
