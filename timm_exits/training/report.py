"""Evaluation and the report of a trained run (timing: `timm_exits.training.timing`, plots: `.plots`).

`evaluate(run_dir)` loads the run's model (EMA weights when it kept an EMA), runs every exit over the
val and test splits, and writes into the run folder:

* ``report.json`` (schema below; the Hub model-card generator reads these keys) and ``report.md``;
* ``plots/``: gate-value histograms per exit (the paper's Figure 4), accuracy against expected cost
  for a threshold sweep of every policy next to static truncation (every image at exit k), and the
  exit distribution of each policy;
* ``model/``: the model saved with `timm_exits.hub.save_pretrained`, with the recommended policy and
  its calibrated thresholds stored in its config.

Thresholds of the "gate", "confidence" and "entropy" policies are calibrated on the val split with
`timm_exits.calibrate` (lowest cost within ``calibrate_max_drop`` of the final exit's accuracy, or
best accuracy at ``calibrate_target_cost``); "gate_0.5" is the paper's plain hard gating and "soft"
the soft-conditional ensemble (every exit runs). ``test.soft_accuracy`` is the ensemble of the jointly
trained gates, as the method trained it; where the gates are re-fitted (``fit_gates``), the saved model mixes
its exits with the re-fitted gates, whose ensemble is ``test.soft_accuracy_fitted_gates`` and the "soft"
policy's accuracy (what `predict(model, x, policy="soft")` gives). Test numbers come from the real hard early-exit
path (`EarlyExitModel.predict`), not a simulation. Times are measured at batch 1: the median over
``timing_repeats`` passes over ``timing_images`` test images (after ``timing_warmup`` untimed
images), all candidates interleaved within each pass, against ``model.backbone`` called directly
(its exit hooks inactive: the plain model's forward) in the same process; every row ("gate_joint" and "gate_0.5"
on a copy of the model holding the jointly trained gates) is timed against that one baseline. A run whose training
has not finished is refused unless ``unfinished=True`` (``--unfinished``) asks for its last checkpoint as it is.

report.json::

    {"model", "dataset", "method", "recipe": {...: the recipe as applied, eval's options included},
     "exits": [{"name", "cost"}, ..., final last],
     "test": {"exit_accuracy": [...], "soft_accuracy", "soft_accuracy_fitted_gates", "final_accuracy",
              "num_samples"},
     "policies": {name: {"threshold", "accuracy", "expected_cost", "exit_distribution", "ms_per_image",
                         "speedup", ...}},
     "gate_fit": {"objective", ...} or None, "gate_fit_skipped": why fit_gates did not apply, or None,
     "timing": {"machine", "threads", "batch_size", "repeats", "baseline_ms_per_image", ...},
     "training": {"epochs" (trained), "planned_epochs", "unfinished" (where it stopped, or None), "steps",
                  "seconds", "median_epoch_seconds",
                  "runtimes": [{"machine", "threads", "processes", "epochs"}, ...], "last_epoch"}, ...}
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..core.model import EarlyExitModel
from ..core.soft import exit_log_probs, soft_log_output
from ..inference.calibration import Collected, calibrate, collect, sweep
from ..inference.gate_fitting import fit_gates
from ..inference.policies import EXIT_RULES
from .plots import write_plots
from .recipe_schema import Recipe
from .recipe_types import RecipeError
from .run_state import check_finished, training_summary
from .runfiles import Staging
from .timing import _time_model, _timing_inputs, machine_name

__all__ = [
    "PLOTS_HEADING",
    "CalibrationError",
    "evaluate",
    "format_distribution",
    "render_markdown",
]

PLOTS_HEADING = "## Plots"  # report.md's last section: the images under the run folder's plots/


class CalibrationError(ValueError):
    """The requested calibration target cannot be met on the val split; nothing was written."""


def format_distribution(dist: Sequence[float]) -> str:
    """The paper's Table 2 form: ``"#1: 0.4 %, #2: 22.4 %, ..."``."""
    return ", ".join(f"#{i + 1}: {100 * float(p):.1f} %" for i, p in enumerate(dist))


# ------------------------------------------------------------------------------------- evaluation
def _fitted_soft(test: Mapping[str, Any]) -> str:
    """The report's note on the saved model's soft output when its gates were re-fitted after training."""
    fitted = test.get("soft_accuracy_fitted_gates")
    return (
        ""
        if fitted is None
        else f" (jointly trained gates; {_pct(fitted)} with the re-fitted gates saved with the model)"
    )


def _soft_accuracy(data: Collected) -> float:
    logits = list(data.logits.unbind(1))
    log_probs = soft_log_output(logits, exit_log_probs(data.gate_logits))
    return float((log_probs.argmax(-1) == data.labels).float().mean())


@torch.no_grad()
def _hard(model: EarlyExitModel, loader: Any, policy: str, threshold: float, device: torch.device) -> dict[str, Any]:
    """Accuracy, expected cost and exit shares of the real hard early-exit path over a loader."""
    e = model.num_exits
    counts = torch.zeros(e, dtype=torch.long)
    hits = torch.zeros(e, dtype=torch.long)
    n = 0
    for x, y in loader:
        pred = model.predict(x.to(device), policy=policy, threshold=threshold)
        idx = pred.exit_index.cpu()
        ok = pred.logits.argmax(-1).cpu() == y
        counts += torch.bincount(idx, minlength=e)
        hits += torch.bincount(idx[ok], minlength=e)
        n += len(y)
    costs = model.exit_costs.detach().double().cpu()
    return {
        "threshold": float(threshold),
        "accuracy": float(hits.sum()) / n,
        "expected_cost": float((counts.double() * costs).sum()) / n,
        "exit_distribution": (counts.double() / n).tolist(),
        "exit_accuracy": [float(h) / float(c) if c else None for h, c in zip(hits.tolist(), counts.tolist())],
    }


def evaluate(
    run_dir: str | os.PathLike,
    *,
    policy: str | None = None,
    threshold: float | None = None,
    target_cost: float | None = None,
    max_accuracy_drop: float | None = None,
    data_dir: str | None = None,
    timing: bool = True,
    save_model: bool = True,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    timing_images: int | None = None,
    fit_gates_objective: str | None = None,
    unfinished: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate a trained run and write its report, plots and saved model (see the module docstring).

    Args:
        run_dir: The run folder.
        policy: Policy stored with the saved model and shown first (default: the recipe's ``policy``).
        threshold: Use this threshold for `policy` instead of the calibrated one.
        target_cost: Calibrate for the best accuracy at this expected cost.
        max_accuracy_drop: Calibrate for the lowest cost within this accuracy drop (default: the recipe's).
            `policy`, `target_cost` and `max_accuracy_drop` replace the recipe's keys in the report's recipe.
        data_dir: Where the data set lives now, if it moved.
        timing: Measure inference times (batch 1).
        save_model: Save the model to ``run_dir/model`` (via `timm_exits.hub`).
        device: Device to evaluate on.
        threads: torch threads (default: the recipe's ``threads``, else torch's default).
        timing_images: Test images timed at batch 1 (default: the recipe's ``timing_images``).
        fit_gates_objective: Objective of the gate re-fit on the val split, or "none" (default: the
            recipe's ``fit_gates``); an objective other than "none" needs stats gates.
        unfinished: Evaluate the last checkpoint of a run whose training has not finished, as it is (else such a
            run is refused); the report says so.
        log: Where progress lines go.

    Returns:
        The report dict (also written to ``run_dir/report.json``).
    """
    from .checkpoint import load_run
    from .data import build_datasets, load_splits, make_loader

    run_dir = Path(run_dir).expanduser()
    device = torch.device(device)
    run = load_run(
        run_dir,
        device=device,
        data_dir=data_dir,
        threads=threads,
        timing_images=timing_images,
        fit_gates=fit_gates_objective,
        **_calibration_keys(policy, target_cost, max_accuracy_drop),
    )
    recipe, model = run.recipe, run.model
    check_finished(run, unfinished)
    ev = recipe.eval
    skipped = _refit_skipped(ev.fit_gates, model.config.gate, explicit=fit_gates_objective is not None)
    cheapest = float(model.exit_costs.min())
    target_cost = ev.calibrate_target_cost
    max_accuracy_drop = None if target_cost is not None else ev.calibrate_max_drop
    if target_cost is not None and target_cost < cheapest - 1e-9:
        raise CalibrationError(_unreachable(target_cost, cheapest, run_dir))
    policy = ev.policy
    if threshold is not None and policy == "soft":
        raise RecipeError(
            f"a threshold applies to the {', '.join(EXIT_RULES)} policies; 'soft' averages every exit and has "
            "none. Pass one of those policies with the threshold, or leave the threshold out."
        )
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    t0 = time.time()
    data = build_datasets(recipe.data, model, load_splits(recipe.data), seed=recipe.seed)
    bs = recipe.data.eval_batch_size
    workers = recipe.data.num_workers
    val_loader = make_loader(data.val, bs, train=False, num_workers=workers)
    test_loader = make_loader(data.test, bs, train=False, num_workers=workers)
    val = collect(model, val_loader, device=device)
    test = collect(model, test_loader, device=device)
    costs = [float(c) for c in model.exit_costs.tolist()]

    policies: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    do_timing = timing and ev.timing_images > 0
    inputs = _timing_inputs(data.test, ev.timing_images, device) if do_timing else []

    def calibrated(p: str, val: Collected, test: Collected, user_threshold: bool = True) -> dict[str, Any]:
        entry: dict[str, Any] = {"calibration": {"split": "val", "target_cost": target_cost}}
        entry["calibration"]["max_accuracy_drop"] = max_accuracy_drop
        try:
            cal = calibrate(model, val, p, target_cost=target_cost, max_accuracy_drop=max_accuracy_drop, apply=False)
        except ValueError as e:  # out of reach: fail before anything is written
            reach = min(c["cost"] for c in sweep(val, p, num=201))
            if target_cost is not None:
                raise CalibrationError(_unreachable(target_cost, reach, run_dir, p)) from e
            raise CalibrationError(f"calibration of policy {p!r} failed ({e}); nothing was written.") from e
        thr = cal.threshold
        entry["calibration"].update({"val_accuracy": cal.accuracy, "val_expected_cost": cal.cost})
        if user_threshold and p == policy and threshold is not None:
            thr = float(threshold)
            entry["calibration"]["overridden_by_user"] = True
        entry.update(_hard(model, test_loader, p, thr, device))
        curves[p] = sweep(test, p, num=101)
        return entry

    # The soft ensemble is the jointly trained gates' mixture: measured before any re-fit of the gates.
    soft_acc, soft_val_acc = _soft_accuracy(test), _soft_accuracy(val)
    gate_fit = None
    joint_models: dict[str, EarlyExitModel] = {}  # rows timed on the jointly trained gates
    objective = ev.fit_gates
    if objective != "none" and model.config.gate == "stats" and len(model.branches):
        # The jointly trained gates, kept for comparison, then gates re-fitted on the val split.
        policies["gate_joint"] = calibrated("gate", val, test, user_threshold=False)  # the threshold is for the re-fit
        policies["gate_0.5"] = _hard(model, test_loader, "gate", 0.5, device)
        curves["gate_joint"] = curves.pop("gate")
        if do_timing:
            joint = copy.deepcopy(model)
            joint_models = {"gate_joint": joint, "gate_0.5": joint}
        gate_fit = {"objective": objective, "split": "val", **fit_gates(model, val, objective=objective).__dict__}
        val = collect(model, val_loader, device=device)
        test = collect(model, test_loader, device=device)
    elif skipped:
        log(f"gates not re-fitted: {skipped}")
    saved_soft_acc = _soft_accuracy(test)  # the mixture of the gates saved with the model (re-fitted or not)
    for p in EXIT_RULES:
        policies[p] = calibrated(p, val, test)
    if "gate_0.5" not in policies:
        policies["gate_0.5"] = _hard(model, test_loader, "gate", 0.5, device)
    policies["soft"] = {
        "threshold": None,
        "accuracy": saved_soft_acc,
        "expected_cost": costs[-1],
        "exit_distribution": [0.0] * (len(costs) - 1) + [1.0],
    }

    timing_info: dict[str, Any] = {
        "machine": machine_name(device),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": 1,
        "repeats": int(ev.timing_repeats),
        "images": min(int(ev.timing_images), len(data.test)),
        "warmup": int(ev.timing_warmup),
        "baseline_ms_per_image": None,
    }
    if do_timing:  # every row in one pass against one baseline
        thresholds = {k: v["threshold"] for k, v in policies.items()}
        base, ms = _time_model(model, thresholds, inputs, ev.timing_repeats, ev.timing_warmup, joint_models)
        for k, v in ms.items():
            policies[k]["ms_per_image"] = v
            policies[k]["speedup"] = base / v if v > 0 else None
        timing_info["baseline_ms_per_image"] = base

    report: dict[str, Any] = {
        "model": recipe.model.model,
        "dataset": recipe.data.dataset,
        "method": recipe.method.method,
        "recipe": recipe.flat(),
        "exits": [{"name": b.name, "cost": c} for b, c in zip(model.branches, costs)]
        + [{"name": "final", "cost": costs[-1]}],
        "test": {
            "exit_accuracy": test.exit_accuracy,
            "soft_accuracy": soft_acc,
            **({} if gate_fit is None else {"soft_accuracy_fitted_gates": saved_soft_acc}),
            "final_accuracy": test.exit_accuracy[-1],
            "num_samples": int(test.labels.shape[0]),
        },
        "val": {
            "exit_accuracy": val.exit_accuracy,
            "soft_accuracy": soft_val_acc,
            "num_samples": int(val.labels.shape[0]),
        },
        "policies": policies,
        "gate_fit": gate_fit,
        "gate_fit_skipped": skipped,
        "recommended_policy": policy,
        "static": [
            {"exit": i + 1, "cost": c, "accuracy": a} for i, (c, a) in enumerate(zip(costs, test.exit_accuracy))
        ],
        "timing": timing_info,
        "training": training_summary(run),
        "splits": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timm_exits_version": __version__,
    }

    if policy != "soft":
        model.config.policy = policy
        model.config.thresholds = [float(policies[policy]["threshold"])] * len(model.branches)
    else:
        model.config.policy, model.config.thresholds = "soft", None
    _log_stored_policy(run_dir, report, save_model, log)
    # every file is written into a staging folder first and moved into place once all of them exist
    with Staging(run_dir) as stage:
        staged = write_plots(stage.path("plots"), test, report, curves)
        plot_paths = {k: stage.final(v) for k, v in staged.items()}
        stage.path("report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        md = render_markdown(report, plot_paths, run_dir, saved=save_model)
        stage.path("report.md").write_text(md, encoding="utf-8")
        if save_model:
            _save_model(model, stage.path("model"), report, data.data_config, log)
        stage.commit()
    log(_summary(report, policy) + f" (evaluated in {time.time() - t0:.1f} s; report: {run_dir / 'report.md'})")
    return report


def _calibration_keys(policy: str | None, target_cost: float | None, max_drop: float | None) -> dict[str, Any]:
    """The recipe keys `evaluate`'s policy and calibration arguments replace (None: the recipe's stays); a target
    cost takes the place of the accuracy drop as in a recipe, an accuracy drop clears the recipe's target cost."""
    keys: dict[str, Any] = {"policy": policy}
    if target_cost is not None:
        keys["calibrate_target_cost"] = target_cost
    elif max_drop is not None:  # "none": the override that clears a key (a None is left out by load_run)
        keys.update(calibrate_max_drop=max_drop, calibrate_target_cost="none")
    return keys


def _refit_skipped(objective: str, gate: str, explicit: bool) -> str | None:
    """Why the gates are not re-fitted though `objective` asks for it (None: they are, or none is asked); an
    objective given explicitly for gates it cannot re-fit is an error."""
    if objective == "none" or gate == "stats":
        return None
    if explicit:
        raise RecipeError(
            f"--fit-gates {objective} re-fits stats gates only, and this run's gates are {gate!r} (recipe key gate); "
            "nothing was written. Leave --fit-gates out, or pass --fit-gates none."
        )
    return f"fit_gates {objective!r} re-fits stats gates only, and this model's gates are {gate!r}"


def _stored(report: Mapping[str, Any]) -> str:
    name = report.get("recommended_policy")
    threshold = report.get("policies", {}).get(name, {}).get("threshold")
    return f"{name}" + ("" if threshold is None else f" at threshold {threshold:.4g}")


def _log_stored_policy(run_dir: Path, report: Mapping[str, Any], save_model: bool, log: Callable) -> None:
    """Say when the policy stored with ``model/`` changes, or (``save_model`` False) stays behind the report."""
    path = run_dir / "model" / "report.json"
    try:
        old = _stored(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return
    new = _stored(report)
    if not save_model:
        log(f"{run_dir / 'model'} keeps its stored policy {old} (--no-save); report.json now recommends {new}")
    elif old != new:
        log(f"{run_dir / 'model'}: stored policy {old} replaced by {new}")


_POLICY_KEYS = ("policy", "fit_gates", "calibrate_max_drop", "calibrate_target_cost")  # what the stored policy follows


def _eval_keys_changed(report_path: Path, recipe: Recipe) -> list[str] | None:
    """The keys the stored policy follows (`_POLICY_KEYS`) that differ from those the report at `report_path`
    was made with, as "key: old -> new"; None when they agree or there is no readable report. Timing keys do not
    count: the report's figures stand."""
    try:
        made_with = json.loads(report_path.read_text(encoding="utf-8"))["recipe"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    now = json.loads(json.dumps({k: getattr(recipe.eval, k) for k in _POLICY_KEYS}))
    diff = [f"{k}: {made_with[k]!r} -> {v!r}" for k, v in now.items() if k in made_with and made_with[k] != v]
    return diff or None


def _save_model(model: EarlyExitModel, folder: Path, report: dict[str, Any], data_config: dict, log: Callable) -> None:
    from .. import hub

    keep = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items() if k in keep}
    try:
        hub.save_pretrained(model, folder, report=report, data_config=cfg)
    except ValueError as e:  # e.g. a backbone that is not a timm model
        log(f"model not saved to {folder}: {e}")


def _unreachable(target: float, reach: float, run_dir: Path, policy: str | None = None) -> str:
    who = f"policy {policy!r}" if policy else "any policy"
    least = math.ceil(round(reach * 1e4, 6)) / 1e4  # rounded up (4 decimals): the value stated is accepted
    return (
        f"target cost {target:g} is out of reach: the cheapest expected cost {who} reaches on the val split is "
        f"{least:.4f} (every image at the first exit it allows). Give a target of at least {least:.4f}, e.g. "
        f"--target-cost {least:.4f}. Nothing in {run_dir} was changed."
    )


def _summary(report: Mapping[str, Any], policy: str) -> str:
    t = report["test"]
    p = report["policies"][policy]
    accs = "/".join(f"{100 * a:.1f}" for a in t["exit_accuracy"])
    text = (
        f"test: exits {accs} %, soft {100 * t['soft_accuracy']:.2f} %; policy {policy}: "
        f"{100 * p['accuracy']:.2f} % at cost {p['expected_cost']:.3f}, "
        f"exits {format_distribution(p['exit_distribution'])}"
    )
    if p.get("speedup") is not None:
        text += f", {p['ms_per_image']:.3f} ms/image, speed-up {p['speedup']:.2f}x"
    return text


# --------------------------------------------------------------------------------------- markdown
def _pct(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f} %"


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, Path], run_dir: Path, saved: bool = True) -> str:
    """The human-readable report.md of a report dict; `saved` False: ``model/`` was not rewritten with it."""
    r = report["recipe"]
    t = report["test"]
    tm = report["timing"]
    sp = report.get("splits", {})
    lines = [
        f"# {r['name'] or r['model']}: {report['method']} on {report['dataset']}",
        "",
        f"Backbone `{report['model']}` (pretrained: {r['pretrained']}, input {r['img_size']} px), method "
        f"`{report['method']}`, {len(report['exits'])} exits. Splits: {sp.get('train')} train / {sp.get('val')} val "
        f"(calibration) / {sp.get('test')} test images.",
    ]
    tr = report.get("training") or {}
    if tr:
        runtimes = tr.get("runtimes", [])
        places = [f"{w['machine']} ({w['threads']} threads x {w['processes']} process(es))" for w in runtimes]
        if len(places) > 1:
            where = ": " + "; ".join(f"{w['epochs']} epochs on {p}" for w, p in zip(runtimes, places))
        else:
            where = "".join(f" on {p}" for p in places)
        unfinished = f" (unfinished: {tr['unfinished']})" if tr.get("unfinished") else ""
        lines.append(
            f"Trained {tr['epochs']} epochs ({tr['steps']} steps){unfinished} in {tr['seconds']:.1f} s{where}."
        )
    lines += [
        "",
        "## Test accuracy per exit",
        "",
        "| exit | module | cost (share of backbone FLOPs) | accuracy |",
        "|---|---|---|---|",
    ]
    for i, (ex, acc) in enumerate(zip(report["exits"], t["exit_accuracy"])):
        lines.append(f"| #{i + 1} | `{ex['name']}` | {ex['cost']:.3f} | {_pct(acc)} |")
    lines += [
        "",
        f"Soft-conditional ensemble: **{_pct(t['soft_accuracy'])}**{_fitted_soft(t)}; final exit: "
        f"{_pct(t['final_accuracy'])} ({t['num_samples']} test images).",
        "",
        "## Hard early exit",
        "",
    ]
    cal = report["policies"]["gate"].get("calibration", {})
    if cal.get("target_cost") is not None:
        how = f"best val accuracy at an expected cost of at most {cal['target_cost']}"
    else:
        how = f"lowest val cost within {100 * (cal.get('max_accuracy_drop') or 0):.4g} points of the final exit"
    fit = report.get("gate_fit")
    gates = (
        f"`gate` uses gates re-fitted on the val split on frozen exits (objective `{fit['objective']}`, "
        "`timm_exits.fit_gates`); `gate_joint` and `gate_0.5` use the jointly trained gates (a copy kept from before "
        f"the re-fit{'; the saved model holds the re-fitted gates' if saved else ''})"
        if fit
        else "`gate` and `gate_0.5` use the jointly trained gates"
        + (f" (not re-fitted: {report['gate_fit_skipped']})" if report.get("gate_fit_skipped") else "")
    )
    lines += [
        f"Thresholds of gate / confidence / entropy calibrated on the val split ({how}); `gate_0.5` is the "
        f"paper's plain hard gating, `soft` runs every exit; {gates}. Test numbers from the real early-exit path.",
    ]
    if not saved:
        lines += [
            "",
            f"This evaluation did not rewrite `{run_dir.name}/model` (--no-save): the model saved there keeps the "
            "policy, thresholds and gates of an earlier evaluation, which its own `model/report.json` describes.",
        ]
    lines += [
        "",
        "| policy | threshold | accuracy | expected cost | ms / image | speed-up | exit distribution |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in report["policies"].items():
        thr = "-" if p.get("threshold") is None else f"{p['threshold']:.4g}"
        ms = "-" if p.get("ms_per_image") is None else f"{p['ms_per_image']:.3f}"
        su = "-" if p.get("speedup") is None else f"{p['speedup']:.2f}x"
        mark = (" (stored)" if saved else " (recommended)") if name == report.get("recommended_policy") else ""
        lines.append(
            f"| `{name}`{mark} | {thr} | {_pct(p['accuracy'])} | {p['expected_cost']:.3f} | {ms} | {su} | "
            f"{format_distribution(p['exit_distribution'])} |"
        )
    lines.append("")
    if tm.get("baseline_ms_per_image") is not None:
        threads = f"{tm['threads']} thread{'s' if tm['threads'] != 1 else ''}"
        lines.append(
            f"Timing: batch {tm['batch_size']}, {threads} on {tm['machine']} ({tm['device']}); median of "
            f"{tm['repeats']} passes over {tm['images']} test images after {tm['warmup']} warm-up images. Plain "
            f"backbone (`model.backbone`, exit hooks inactive): {tm['baseline_ms_per_image']:.3f} ms / image. "
            "Speed-up = backbone time / policy time, measured in the same process."
        )
    else:
        lines.append("Timing was not measured.")
    if plots:
        lines += ["", PLOTS_HEADING, ""]
        titles = {
            "accuracy_vs_cost": "Accuracy vs expected cost",
            "gate_histograms": "Gate values per exit",
            "exit_distribution": "Exit distribution",
        }
        for key, path in plots.items():
            lines.append(f"![{titles.get(key, key)}]({Path(path).relative_to(run_dir).as_posix()})")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
