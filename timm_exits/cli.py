"""The ``timm-exits`` command line.

    timm-exits train -c recipes/cifar10_resnet18.yaml [--data-dir D] [--output runs/x]
                     [--resume | --overwrite] [--set key=value ...] [key=value ...]
    timm-exits eval RUN_DIR [--policy gate|confidence|entropy|soft] [--threshold T]
                     [--target-cost C | --max-accuracy-drop D] [--data-dir D] [--no-timing]
    timm-exits bench RUN_DIR [--policy P ...] [--batch-size 1] [--images N] [--repeats R] [--threads T]
    timm-exits recipe -c recipes/X.yaml [key=value ...]      # print the resolved recipe

Many processes: ``torchrun --nproc_per_node N -m timm_exits.train -c recipe.yaml ...`` (same options
as ``timm-exits train``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a recipe, then evaluate it and write its report")
    p.add_argument("-c", "--config", help="recipe YAML file (default: built-in defaults, i.e. digits)")
    p.add_argument("--data-dir", help="root folder of the data set (recipe key data_dir)")
    p.add_argument("-o", "--output", help="run folder (default: runs/<name>-<method>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run --output holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (recipe key progress=false)")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="overrides")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (YAML values, dotted keys)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run and rewrite its report, plots and saved model")
    p.add_argument("run_dir")
    p.add_argument("--policy", choices=("gate", "confidence", "entropy", "soft"), help="policy to store and show")
    p.add_argument("--threshold", type=float, help="use this threshold for --policy instead of calibrating")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-cost", type=float, help="calibrate: best val accuracy at this expected cost")
    g.add_argument("--max-accuracy-drop", type=float, help="calibrate: lowest cost within this drop (e.g. 0.01)")
    p.add_argument("--data-dir", help="where the data set lives now")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: the recipe's)")
    p.add_argument("--no-timing", action="store_true", help="skip the batch-1 timing")
    p.add_argument("--timing-images", type=int, help="test images timed at batch 1 (default: the recipe's)")
    p.add_argument(
        "--fit-gates", choices=("no_gain", "correct", "soft", "none"), help="gate re-fit objective (default: recipe's)"
    )
    p.add_argument("--no-save", action="store_true", help="do not rewrite run_dir/model")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time a trained run's policies against the plain backbone")
    p.add_argument("run_dir")
    p.add_argument(
        "--policy",
        dest="policies",
        action="append",
        choices=("gate", "gate_0.5", "confidence", "entropy", "soft"),
        help="policy to time (repeatable; default: gate, confidence, entropy, soft)",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--images", type=int, help="test images to time")
    p.add_argument("--repeats", type=int, help="timed passes (median reported)")
    p.add_argument("--warmup", type=int, help="untimed calls first")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--data-dir", help="where the data set lives now")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_recipe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="print a resolved recipe (defaults, base files and overrides merged)")
    p.add_argument("-c", "--config")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``timm-exits``."""
    parser = argparse.ArgumentParser(
        prog="timm-exits", description="Train, evaluate and benchmark multi-exit timm models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_recipe(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    from .train import parse_overrides

    out = parse_overrides([*args.overrides, *args.sets])
    if getattr(args, "data_dir", None):
        out["data_dir"] = args.data_dir
    if getattr(args, "no_progress", False):
        out["progress"] = False
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``timm-exits`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    from .train import CheckpointError, RecipeError, RunFolderError

    try:
        if args.command == "train":
            from .train import train

            train(args.config, args.output, resume=args.resume, overwrite=args.overwrite, **_overrides(args))
        elif args.command == "eval":
            from .report import evaluate

            evaluate(
                args.run_dir,
                policy=args.policy,
                threshold=args.threshold,
                target_cost=args.target_cost,
                max_accuracy_drop=args.max_accuracy_drop,
                data_dir=args.data_dir,
                timing=not args.no_timing,
                save_model=not args.no_save,
                device=args.device,
                threads=args.threads,
                timing_images=args.timing_images,
                fit_gates_objective=args.fit_gates,
            )
        elif args.command == "bench":
            from .report import benchmark

            res = benchmark(
                args.run_dir,
                policies=args.policies,
                batch_size=args.batch_size,
                images=args.images,
                repeats=args.repeats,
                warmup=args.warmup,
                threads=args.threads,
                data_dir=args.data_dir,
                device=args.device,
            )
            _print_bench(res, as_json=args.json)
        elif args.command == "recipe":
            import yaml

            from .train import load_recipe

            print(yaml.safe_dump(load_recipe(args.config, _overrides(args)), sort_keys=False), end="")
    except (RecipeError, RunFolderError, CheckpointError, FileNotFoundError) as e:
        print(f"timm-exits {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _print_bench(res: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res, indent=2))
        return
    t = res["timing"]
    print(
        f"{t['machine']} ({t['device']}), {t['threads']} thread(s), batch {t['batch_size']}, {t['images']} images, "
        f"median of {t['repeats']} passes"
    )
    print(f"  {'plain backbone':<16} {t['baseline_ms_per_image']:9.3f} ms/image")
    for name, p in res["policies"].items():
        thr = "" if p["threshold"] is None else f"(threshold {p['threshold']:.4g})"
        print(f"  {name:<16} {p['ms_per_image']:9.3f} ms/image  speed-up {p['speedup']:.2f}x {thr}")


if __name__ == "__main__":
    sys.exit(main())
