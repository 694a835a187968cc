"""Training images/s of the whole machine: one run with every thread against runs side by side.

How to spend a CPU's cores on a grid of runs: each layout ("1x2": one training process with 2
threads; "2x1": two processes with 1 thread each; "2x1+channels_last=true": the same with recipe
overrides of its own after ``+``) starts its processes at once; every process builds
the recipe's trainer (as `data_throughput.py` does), takes ``--warmup`` steps of the recipe's loop,
waits until every process of the layout is ready, then times ``--steps`` steps. The layout's
throughput is the sum of its processes' images/s. Layouts alternate over ``--repeats`` rounds; the
JSON gives each layout's median and its ratio to the first layout, and the values that the recipe
resolves for the layout's own overrides.

    python benchmarks/grid_throughput.py --data-dir DATA --steps 15 --repeats 3 --set batch_size=128 \
        > benchmarks/results/grid_throughput.json
    python benchmarks/grid_throughput.py --data-dir DATA --layouts 2x1 2x1+channels_last=true --steps 15 \
        --repeats 3 --set batch_size=128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _timing import machine, non_negative_int, positive_int

from timm_exits.training.recipe import load_recipe
from timm_exits.training.recipe_schema import RecipeError, _flat_pairs, parse_overrides

HERE = Path(__file__).resolve().parent


def _resolved(flat: dict, key: str) -> object:
    """The value a flat recipe holds for an override key: 'lr', 'optim.lr' or 'model_kwargs.drop_rate'."""
    [(flat_key, _)] = _flat_pairs({key: None})  # without its section prefix
    top, *subs = flat_key.split(".")
    value = flat[top]
    for sub in subs:  # a key inside a mapping value
        value = value[sub]
    return value


def _worker(args: argparse.Namespace) -> None:
    """One training process: warm up, say ready, wait for the go line, time the steps, print images/s."""
    from data_throughput import endless_batches, recipe_trainer

    with recipe_trainer(args.recipe, args.data_dir, args.threads, args.set) as (trainer, opt, sched):
        batch_size = trainer.recipe.data.batch_size
        batches = endless_batches(trainer.train_loader)

        def steps(n: int) -> None:
            for _ in range(n):
                x, y = next(batches)
                trainer._step(trainer.model, opt, sched, x, y, 0)

        steps(args.warmup)
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.perf_counter()
        steps(args.steps)
        seconds = time.perf_counter() - start
    print(json.dumps({"images_per_s": args.steps * batch_size / seconds}), flush=True)


def _parse_layout(layout: str) -> tuple[int, int, list[str]]:
    """'2x1+channels_last=true' -> (2, 1, ['channels_last=true'])."""
    shape, *sets = layout.split("+")
    try:
        procs, threads = (int(n) for n in shape.split("x"))
    except ValueError:
        raise SystemExit(
            f"--layouts {layout}: each layout is PROCESSESxTHREADS, e.g. 2x1, optionally with recipe overrides "
            "after '+', e.g. 2x1+channels_last=true"
        ) from None
    return procs, threads, sets


def _resolve_layouts(recipe: str, overrides: list[str], layouts: list[str]) -> dict[str, dict]:
    """Each layout's own overrides as the recipe resolves them, checked before any process starts.

    Args:
        recipe: Shipped recipe name or YAML path.
        overrides: KEY=VALUE overrides shared by every layout.
        layouts: Layout strings, e.g. '2x1+channels_last=true'.

    Returns:
        {layout: {override key: resolved value}}; a bad key or value exits naming its layout.
    """
    resolved: dict[str, dict] = {}
    for layout in layouts:
        _, _, sets = _parse_layout(layout)
        try:
            flat = load_recipe(recipe, [*overrides, *sets]).flat()
        except RecipeError as e:
            raise SystemExit(f"--layouts {layout}: {e}") from None
        resolved[layout] = {k: _resolved(flat, k) for k in parse_overrides(sets)}
    return resolved


def _layout(procs: int, threads: int, sets: list[str], args: argparse.Namespace) -> float:
    """Images/s of `procs` processes with `threads` threads each and recipe overrides `sets`, timed over
    the same window."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--data-dir", args.data_dir]
    cmd += ["--recipe", args.recipe, "--threads", str(threads), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--set", *args.set, *sets]
    workers = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE) for _ in range(procs)
    ]
    for w in workers:
        if w.stdout.readline().strip() != "ready":
            raise SystemExit(f"a worker of layout {procs}x{threads} failed before its timed steps")
    for w in workers:
        w.stdin.write("go\n")
        w.stdin.flush()
    total = 0.0
    for w in workers:
        out, _ = w.communicate()
        if w.returncode != 0:
            raise SystemExit(f"a worker of layout {procs}x{threads} exited with {w.returncode}")
        total += json.loads(out.strip().splitlines()[-1])["images_per_s"]
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="cifar10_resnet18", help="shipped recipe name or YAML path")
    p.add_argument("--data-dir", required=True)
    p.add_argument(
        "--layouts",
        nargs="+",
        default=["1x2", "2x1"],
        help="PROCESSESxTHREADS[+KEY=VALUE...], the first is the baseline",
    )
    p.add_argument("--steps", type=positive_int, default=12, help="timed optimizer steps per process and round")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--repeats", type=positive_int, default=3, help="rounds, the layouts alternating")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--threads", type=positive_int, default=1, help=argparse.SUPPRESS)  # a worker's threads
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(args)
    layouts = [_parse_layout(layout) for layout in args.layouts]
    resolved = _resolve_layouts(args.recipe, [f"data_dir={args.data_dir}", *args.set], args.layouts)
    samples: dict[str, list[float]] = {layout: [] for layout in args.layouts}
    for _ in range(args.repeats):
        for name, (procs, threads, sets) in zip(args.layouts, layouts):
            samples[name].append(_layout(procs, threads, sets, args))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = args.layouts[0]
    flat = load_recipe(args.recipe, [f"data_dir={args.data_dir}", *args.set]).flat()
    out = {
        "benchmark": "grid_throughput",
        "machine": machine(max(procs * threads for procs, threads, _ in layouts)),
        "recipe": {k: flat[k] for k in ("name", "model", "dataset", "method", "img_size", "batch_size")},
        "overrides": args.set,
        "layout_overrides": resolved,
        "steps_per_process": args.steps,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "images_per_s": {k: round(v, 1) for k, v in medians.items()},
        "ratio_to_" + base: {k: round(v / medians[base], 3) for k, v in medians.items()},
        "rounds_images_per_s": {k: [round(s, 1) for s in v] for k, v in samples.items()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
