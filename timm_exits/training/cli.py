"""The ``timm-exits`` command line.

    timm-exits train -c cifar10_resnet18 [--data-dir D] [--output runs/x]
                     [--resume | --overwrite] [--set key=value ...] [key=value ...]
    timm-exits eval RUN_DIR [--policy gate|confidence|entropy|soft] [--threshold T]
                     [--target-cost C | --max-accuracy-drop D] [--data-dir D] [--no-timing] [--unfinished]
    timm-exits bench RUN_DIR [--policy P ...] [--batch-size 1] [--images N] [--repeats R] [--threads T]
                     [--unfinished]
    timm-exits push RUN_DIR --repo-id ORG/NAME [--private] [--token T] [--revision BRANCH]
    timm-exits recipes                                      # the shipped recipes, one line each
    timm-exits recipe -c NAME_OR_FILE [--sections | --json] [key=value ...]   # print the resolved recipe

``-c`` takes the name of a shipped recipe (``timm-exits recipes``) or the path of a YAML file. Errors
print one line and exit with status 2; Ctrl-C exits with status 130 (``train`` first writes a checkpoint
that ``--resume`` continues from).

Many processes: ``torchrun --nproc_per_node N -m timm_exits.training.cli train -c recipe.yaml ...`` (same options
as ``timm-exits train``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main"]


def _number(kind: type, low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a `kind` number in [low, high] ((low, high] when `low_open`), else a clear error."""
    left = "(" if low_open else "["
    right = "]" if math.isfinite(high) else ")"
    span = f"{left}{low:g}, {high:g}{right}" if math.isfinite(high) else f"{left}{low:g}, inf)"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}; valid range: {span}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; valid range: {span}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _device(text: str) -> str:
    """A ``--device`` value checked as the recipe's ``device`` is (``cuda`` means ``cuda:0``)."""
    from .distributed import _pick_device
    from .recipe_types import RecipeError

    try:
        return str(_pick_device(text, 0))
    except RecipeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_UNIT = _number(float, 0.0, 1.0)
_COUNT = _number(int, 1)
_COUNT0 = _number(int, 0)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a recipe, then evaluate it and write its report")
    p.add_argument(
        "-c", "--config", help="shipped recipe name (see `timm-exits recipes`) or YAML file (default: digits defaults)"
    )
    p.add_argument("--data-dir", help="root folder of the data set (recipe key data_dir)")
    p.add_argument("-o", "--output", help="run folder (default: runs/<name>-<method>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    g.add_argument(
        "--overwrite", action="store_true", help="replace the run --output holds (only files timm-exits wrote)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (recipe key progress=false)")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="overrides")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (YAML values, dotted keys)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run and rewrite its report, plots and saved model")
    p.add_argument("run_dir")
    p.add_argument("--policy", choices=("gate", "confidence", "entropy", "soft"), help="policy to store and show")
    p.add_argument("--threshold", type=_UNIT, help="use this threshold in [0, 1] for --policy instead of calibrating")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--target-cost", type=_number(float, 0.0, low_open=True), help="calibrate: best val accuracy at this cost"
    )
    g.add_argument("--max-accuracy-drop", type=_UNIT, help="calibrate: lowest cost within this drop (e.g. 0.01)")
    p.add_argument("--data-dir", help="where the data set lives now")
    p.add_argument("--device", default="cpu", type=_device, help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=_COUNT, help="torch threads (default: the recipe's)")
    p.add_argument("--no-timing", action="store_true", help="skip the batch-1 timing")
    p.add_argument("--timing-images", type=_COUNT0, help="test images timed at batch 1 (default: the recipe's)")
    p.add_argument(
        "--fit-gates", choices=("no_gain", "correct", "soft", "none"), help="gate re-fit objective (default: recipe's)"
    )
    p.add_argument("--no-save", action="store_true", help="do not rewrite run_dir/model")
    p.add_argument(
        "--unfinished", action="store_true", help="evaluate the last checkpoint of a run that has not finished training"
    )


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
    p.add_argument("--batch-size", type=_COUNT, default=1, help="images per call (>= 1)")
    p.add_argument("--images", type=_COUNT, help="test images to time")
    p.add_argument("--repeats", type=_COUNT, help="timed passes (median reported)")
    p.add_argument("--warmup", type=_COUNT0, help="untimed calls first")
    p.add_argument("--threads", type=_COUNT, help="torch threads")
    p.add_argument("--data-dir", help="where the data set lives now")
    p.add_argument("--device", default="cpu", type=_device, help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--unfinished", action="store_true", help="time the last checkpoint of a run that has not finished training"
    )


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a trained run's model/ and report to the Hugging Face Hub")
    p.add_argument("run_dir")
    p.add_argument("--repo-id", required=True, help="Hub repo, ORG/NAME (created if it does not exist)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the logged-in one)")
    p.add_argument("--revision", help="branch to commit to (default: main; created if needed)")
    p.add_argument("--commit-message", help="message of the commit")


def _add_recipes(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("recipes", help="list the shipped recipes (select one with -c NAME)")


def _add_recipe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="print a resolved recipe (defaults, base files and overrides merged)")
    p.add_argument("-c", "--config", help="shipped recipe name or YAML file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sections", action="store_true", help="print YAML by section (default: flat keys)")
    g.add_argument("--json", action="store_true", help="print JSON by section")
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
    _add_push(sub)
    _add_recipes(sub)
    _add_recipe(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    from .recipe import RecipeError, parse_overrides

    out = parse_overrides([*args.overrides, *args.sets])
    flags = {}
    if getattr(args, "data_dir", None):
        flags["data_dir"] = ("--data-dir", args.data_dir)
    if getattr(args, "no_progress", False):
        flags["progress"] = ("--no-progress", False)
    for key, (flag, value) in flags.items():
        given = [k for k in out if k.rsplit(".", 1)[-1] == key]  # data_dir or data.data_dir
        if given and any(out[k] != value for k in given):
            raise RecipeError(f"{flag} and the override {given[0]}={out[given[0]]} disagree; give one of them.")
        out[key] = value
    return out


def _command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The subcommand's own parser."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _check_repo_id(parser: argparse.ArgumentParser, repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        parser.error(f"argument --repo-id: {repo_id!r} is not of the form ORG/NAME")


def _run(args: argparse.Namespace) -> None:
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
            unfinished=args.unfinished,
        )
    elif args.command == "bench":
        from .timing import benchmark

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
            unfinished=args.unfinished,
        )
        _print_bench(res, as_json=args.json)
    elif args.command == "push":
        from ..hub import push_run

        info = push_run(
            args.run_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
        )
        print(f"pushed {args.run_dir} to {args.repo_id}: {getattr(info, 'commit_url', None) or info}")
    elif args.command == "recipes":
        from .recipe import list_recipes

        recipes = list_recipes()
        width = max(map(len, recipes))
        for name, line in recipes.items():
            print(f"{name:<{width}}  {line}".rstrip())
    elif args.command == "recipe":
        from .recipe import load_recipe

        recipe = load_recipe(args.config, _overrides(args))
        print(recipe.to_json() if args.json else recipe.to_yaml(flat=not args.sections), end="\n" if args.json else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``timm-exits`` command; returns the exit status (2: an error, 130: interrupted)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = _command_parser(parser, args.command)  # its errors show the command's usage and name
    if extra and hasattr(args, "overrides"):  # KEY=VALUE overrides after an option (`--output d lr=0.1`)
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "push":
        _check_repo_id(command, args.repo_id)
    from ..hub import ExitCheckpointError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .recipe import RecipeError
    from .report import CalibrationError
    from .run_folder import RunFolderError

    expected: tuple[type[BaseException], ...] = (
        RecipeError,
        RunFolderError,
        CheckpointError,
        CalibrationError,
        DataError,
        ExitCheckpointError,
        OSError,  # the file system's (no space, read-only, no such folder) and the Hub client's HTTP errors
        FloatingPointError,  # a diverging training's loss, with what to change
    )
    if args.command == "push":
        expected += (ValueError,)
    try:
        _run(args)
    except expected as e:
        print(f"timm-exits {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        again = "run the command again" + (
            " with --resume once the folder holds the run" if args.command == "train" else ""
        )
        line = f"interrupted: {e}" if str(e) else f"interrupted; nothing half-written is kept: {again}"
        if str(e).startswith("interrupted"):  # the trainer's own line: where it stopped and how to resume
            line = str(e)
        print(f"timm-exits {args.command}: {line}", file=sys.stderr)
        return 130
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
        shares = " / ".join(f"{100 * v:.1f}" for v in p["exit_distribution"])
        print(f"  {name:<16} {p['ms_per_image']:9.3f} ms/image  speed-up {p['speedup']:.2f}x {thr}")
        print(f"  {'':<16} exits (#1 / ... / final): {shares} %")


if __name__ == "__main__":
    sys.exit(main())
