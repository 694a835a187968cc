"""Model cards: the report a card's numbers come from (read and checked against the model) and the card itself,
rendered from the `string.Template` files in `timm_exits/hub/hub_cards/` (package data).
"""

from __future__ import annotations

import json
import math
import os
import string
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from torch import nn

from .files import _read_json

if TYPE_CHECKING:  # annotations only: the model's save methods import this module
    from ..core.model import EarlyExitModel

__all__ = [
    "render_model_card",
]

_CARD_FILES = ("model_card.md", "results.md", "no_results.md")


def _architecture(backbone: nn.Module) -> str:
    arch = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise ValueError(
            f"the backbone ({type(backbone).__name__}) is not a timm model (it has no pretrained_cfg "
            "'architecture'); the Hub format stores timm backbones only."
        )
    return str(arch)


# ------------------------------------------------------------------------------------------- report
def _load_report(report: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    if report is None:
        return None
    if isinstance(report, (str, os.PathLike)):
        path = Path(report).expanduser()
        return _read_json(path, str(path))
    if isinstance(report, Mapping):
        return json.loads(json.dumps(dict(report), default=_json_scalar))  # a JSON-clean deep copy
    raise TypeError(f"report must be a dict or the path of a report.json, got {type(report).__name__}")


def _json_scalar(v: Any) -> Any:
    """numpy / torch scalars and arrays in a report, as plain Python numbers and lists."""
    if hasattr(v, "tolist"):  # scalars give a number, arrays a (nested) list
        return v.tolist()
    raise TypeError(f"report value {v!r} ({type(v).__name__}) is not JSON-serialisable")


def _check_report(report: dict[str, Any], model: EarlyExitModel) -> None:
    """Refuse a report written for other exits: its numbers would end up on this model's card."""
    names = [b.name for b in model.branches]
    exits = report.get("exits")
    if isinstance(exits, list) and exits:
        reported = [e.get("name") if isinstance(e, dict) else e for e in exits]
        if reported[: len(names)] != names or len(reported) > model.num_exits:
            raise ValueError(f"the report describes exits {reported} but the model has exits {names}.")
    acc = _dict(report, "test").get("exit_accuracy")
    if isinstance(acc, list) and acc and len(acc) != model.num_exits:
        raise ValueError(
            f"the report gives {len(acc)} exit accuracies but the model has {model.num_exits} exits "
            "(the final head included)."
        )
    policies = report.get("policies")
    shares: dict[str, Any] = {f"test.{k}": _dict(report, "test").get(k) for k in ("soft_accuracy", "final_accuracy")}
    shares["test.exit_accuracy"] = acc
    for name, pol in policies.items() if isinstance(policies, dict) else []:
        dist = pol.get("exit_distribution") if isinstance(pol, dict) else None
        if isinstance(dist, list) and dist and len(dist) != model.num_exits:
            raise ValueError(
                f"the report's {name!r} exit distribution has {len(dist)} entries but the model has "
                f"{model.num_exits} exits."
            )
        if isinstance(pol, dict):
            shares[f"policies.{name}.accuracy"] = pol.get("accuracy")
            shares[f"policies.{name}.exit_distribution"] = dist
    for key, value in shares.items():
        values = [_real(v) for v in (value if isinstance(value, list) else [value])]
        bad = [v for v in values if v is not None and not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(
                f"the report's {key} holds {bad}: accuracies and exit shares are fractions in [0, 1], as "
                "timm-exits writes them (divide percentages by 100)."
            )


# --------------------------------------------------------------------------------------- model card
def _template_dir() -> Path:
    folder = Path(__file__).resolve().parent / "hub_cards"
    missing = [n for n in _CARD_FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"model card templates {missing} not found in {folder}; this installation of timm-exits is incomplete "
            "(reinstall it: the templates are package data)."
        )
    return folder


def _template(name: str) -> string.Template:
    return string.Template((_template_dir() / name).read_text(encoding="utf-8"))


def _real(v: Any) -> float | None:
    """`v` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v: float) -> str:
    """A report number as printed: integers whole, numbers of 100 or more to one decimal, others rounded to
    four significant digits (rounding may change the integer part: 0.99996 prints as 1, 1.99996 as 2)."""
    if float(v).is_integer():
        return str(int(v))
    if abs(v) >= 100:
        return f"{v:.1f}"
    return np.format_float_positional(v, precision=4, fractional=False, trim="-")


def _pct(v: float, digits: int) -> str:
    """A fraction as a percentage."""
    return f"{100.0 * v:.{digits}f} %"


def _fmt_any(v: Any) -> str | None:
    """A threshold or other report value for a table cell (numbers, lists of numbers, strings)."""
    if _real(v) is not None:
        return _fmt(_real(v))
    if isinstance(v, list) and v and all(_real(x) is not None for x in v):
        return ", ".join(_fmt(_real(x)) for x in v)
    if isinstance(v, str) and v:
        return v
    return None


def _dict(d: Any, key: str) -> dict[str, Any]:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


def _distribution(dist: Any) -> str | None:
    """The paper's form: "#1: 0.4 %, #2: 22.4 %, ..."."""
    if not isinstance(dist, list) or not dist or any(_real(p) is None for p in dist):
        return None
    return ", ".join(f"#{i + 1}: {_pct(_real(p), 1)}" for i, p in enumerate(dist))


def _exit_table(report: dict[str, Any], model: EarlyExitModel) -> str | None:
    test = _dict(report, "test")
    acc = test.get("exit_accuracy") if isinstance(test.get("exit_accuracy"), list) else []
    exits = report.get("exits") if isinstance(report.get("exits"), list) else []
    names = [b.name for b in model.branches] + ["(the final head)"]
    costs: list[float | None] = [None] * model.num_exits
    for i, e in enumerate(exits[: model.num_exits]):
        if isinstance(e, dict):
            costs[i] = _real(e.get("cost"))
    if not any(_real(a) is not None for a in acc) and not any(c is not None for c in costs):
        return None
    rows = ["| exit | module | cost (share of the backbone's FLOPs) | accuracy |", "|---|---|---|---|"]
    for i, name in enumerate(names):
        a = _real(acc[i]) if i < len(acc) else None
        cell = f"`{name}`" if i < len(model.branches) else name
        cost = _fmt(costs[i]) if costs[i] is not None else "not reported"
        rows.append(f"| #{i + 1} | {cell} | {cost} | {_pct(a, 2) if a is not None else 'not reported'} |")
    return "\n".join(rows)


_SOFT = "soft"  # the policy without early exit: every exit runs, their predictions averaged by the gates

_JOINT_SOFT = "jointly trained gates' ensemble, not this model's re-fitted gates"


def _soft_is_joint(report: dict[str, Any]) -> bool:
    """Whether the report's ``policies.soft`` figures are the jointly trained gates' ensemble though the model
    holds re-fitted gates: reports written before ``test.soft_accuracy_fitted_gates`` existed."""
    return bool(report.get("gate_fit")) and "soft_accuracy_fitted_gates" not in _dict(report, "test")


_SOFT_TEXT = (
    "every exit runs and the prediction is the soft-conditional output, the exits' class probabilities averaged "
    "with the gates' exit probabilities as weights"
)


def _policy_section(report: dict[str, Any]) -> str | None:
    policies = _dict(report, "policies")
    joint = _soft_is_joint(report)
    rows, dists = [], []
    for name, pol in policies.items():
        if not isinstance(pol, dict):
            continue
        cells = [
            "none" if name == _SOFT else _fmt_any(pol.get("threshold")),
            _pct(_real(pol["accuracy"]), 2) if _real(pol.get("accuracy")) is not None else None,
            _fmt(_real(pol["expected_cost"])) if _real(pol.get("expected_cost")) is not None else None,
            _fmt(_real(pol["ms_per_image"])) if _real(pol.get("ms_per_image")) is not None else None,
            f"{_fmt(_real(pol['speedup']))}x" if _real(pol.get("speedup")) is not None else None,
        ]
        label = f"`{name}` ({_JOINT_SOFT})" if joint and name == _SOFT else f"`{name}`"
        rows.append(f"| {label} | " + " | ".join(c if c is not None else "not reported" for c in cells) + " |")
        d = _distribution(pol.get("exit_distribution"))
        if d is not None:
            dists.append(f"- `{name}`: {d}")
    if not rows:
        return None
    head = [
        "| policy | threshold | accuracy | expected cost (share of the backbone's FLOPs) | ms per image | "
        "measured speed-up |",
        "|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows)
    if _SOFT in policies:
        text += f"\n\nThe `{_SOFT}` policy exits nowhere early: {_SOFT_TEXT}."
        if joint:
            text += (
                f" The report predates the figures of re-fitted gates: its `{_SOFT}` row is the {_JOINT_SOFT}, "
                "and it gives no figure for the gates stored with this model."
            )
    if dists:
        text += "\n\nShare of test images leaving at each exit:\n\n" + "\n".join(dists)
    return text


def _speed_text(report: dict[str, Any]) -> str | None:
    timing = _dict(report, "timing")
    parts = []
    machine = timing.get("machine")
    if isinstance(machine, str) and machine:
        parts.append(f"on {machine}")
    details = []
    if _real(timing.get("threads")) is not None:
        details.append(f"{_fmt(_real(timing['threads']))} threads")
    if _real(timing.get("batch_size")) is not None:
        details.append(f"batch size {_fmt(_real(timing['batch_size']))}")
    if details:
        parts.append(f"({', '.join(details)})")
    baseline = _real(timing.get("baseline_ms_per_image"))
    timed = [
        p
        for p in _dict(report, "policies").values()
        if isinstance(p, dict) and _real(p.get("ms_per_image")) is not None
    ]
    if baseline is None and not timed:  # evaluation writes the machine even when it timed nothing
        return None
    text = "Times were measured " + (" ".join(parts) if parts else "on a machine the report does not name") + "."
    if baseline is not None:
        text += f" The plain backbone takes {_fmt(baseline)} ms per image there."
    return text + " Speed-ups are the measured ratios given in the report, not FLOP ratios."


def _headline(report: dict[str, Any], policy: str) -> str:
    test = _dict(report, "test")
    parts = []
    n = _real(test.get("num_samples"))
    on = f" on {_fmt(n)} test images" if n is not None else ""
    if _real(test.get("soft_accuracy")) is not None:
        soft = f"The soft-conditional output reaches {_pct(_real(test['soft_accuracy']), 2)} accuracy{on}"
        if _real(test.get("soft_accuracy_fitted_gates")) is not None:
            fitted = _pct(_real(test["soft_accuracy_fitted_gates"]), 2)
            soft += f" with the jointly trained gates ({fitted} with the re-fitted gates stored with this model)"
        elif _soft_is_joint(report):
            soft += " with the jointly trained gates (the report gives none for the re-fitted gates of this model)"
        parts.append(soft)
    if _real(test.get("final_accuracy")) is not None:
        parts.append(f"the backbone's own head reaches {_pct(_real(test['final_accuracy']), 2)}")
    text = "; ".join(parts) + "." if parts else ""
    pol = _dict(_dict(report, "policies"), policy)
    bits = []
    joint = policy == _SOFT and _soft_is_joint(report)  # not this model's figure: left out of the headline
    if _real(pol.get("accuracy")) is not None and not joint:
        bits.append(f"{_pct(_real(pol['accuracy']), 2)} accuracy")
    if _real(pol.get("expected_cost")) is not None:
        bits.append(f"an expected cost of {_fmt(_real(pol['expected_cost']))} of the backbone's FLOPs")
    if _real(pol.get("speedup")) is not None:
        bits.append(f"a measured speed-up of {_fmt(_real(pol['speedup']))}x")
    if bits and policy == _SOFT:
        text += f" With the stored policy (`{policy}`) {_SOFT_TEXT}; it reaches " + ", ".join(bits) + "."
    elif bits:
        text += f" With hard early exit by the stored policy (`{policy}`) it reaches " + ", ".join(bits) + "."
    return text.strip() or "The report gives no summary numbers."


def _predict_note(policy: str) -> str:
    """The usage snippet's comment on `model.predict(images)`."""
    if policy == _SOFT:
        return f"the stored policy ({_SOFT}): every exit runs, their predictions averaged by the gates"
    return "hard early exit with the stored policy"


def _unfinished(report: dict[str, Any]) -> str | None:
    """ "Training did not finish: ..." for the report of a run evaluated before its training finished."""
    training = _dict(report, "training")
    stopped = training.get("unfinished")
    if not isinstance(stopped, str) or not stopped:
        return None
    epochs, planned = _real(training.get("epochs")), _real(training.get("planned_epochs"))
    trained = (
        f" ({_fmt(epochs)} of the {_fmt(planned)} planned epochs trained)"
        if epochs is not None and planned is not None
        else ""
    )
    return (
        f"Training did not finish: it stopped after {stopped}{trained}. These weights are its last checkpoint, "
        "not a fully trained model."
    )


def _recipe_text(report: dict[str, Any]) -> str:
    lines = []
    for key in ("model", "dataset", "method"):
        if isinstance(report.get(key), str) and report[key]:
            lines.append(f"- {key}: `{report[key]}`")
    recipe = report.get("recipe")
    if isinstance(recipe, dict):
        for k, v in recipe.items():
            shown = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            lines.append(f"- {k}: {shown}")
    stopped = _unfinished(report)
    if not lines:
        return stopped or "The report does not describe the training recipe."
    recipe_lines = "From the training report:\n\n" + "\n".join(lines)
    if stopped:
        return f"{stopped} The recipe below gives the planned epochs.\n\n{recipe_lines}"
    return recipe_lines


def _license(report: dict[str, Any], backbone_cfg: dict[str, Any]) -> str:
    """The report's licence; else, for a model started from pretrained weights, the backbone's (its
    pretrained_cfg "license"); else apache-2.0."""
    if isinstance(report.get("license"), str) and report["license"]:
        return report["license"]
    upstream = backbone_cfg.get("license")
    if _dict(report, "recipe").get("pretrained") and isinstance(upstream, str) and upstream:
        return upstream
    return "apache-2.0"


def _front_matter(model: EarlyExitModel, report: dict[str, Any] | None) -> str:
    report = report or {}
    backbone_cfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    fm: dict[str, Any] = {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "license": _license(report, backbone_cfg),
        "tags": ["image-classification", "timm", "early-exit", "timm-exits", "safetensors"],
    }
    if isinstance(report.get("dataset"), str) and report["dataset"]:
        fm["datasets"] = [report["dataset"]]
    base = report.get("base_model")
    if not isinstance(base, str) and _dict(report, "recipe").get("pretrained"):
        base = backbone_cfg.get("hf_hub_id")
    if isinstance(base, str) and base:
        fm["base_model"] = base
    if report:
        fm["metrics"] = ["accuracy"]
    return yaml.safe_dump(fm, sort_keys=False, allow_unicode=True).strip()


def _check_repo_id(repo_id: str) -> None:
    """Refuse a repo id ("org/name" or "org/name@revision") the Hub would not accept, naming what is wrong.

    Raises:
        ValueError: `repo_id` is not a string or not a valid Hub repo id.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise ValueError(f"repo_id must be a string like 'org/name', got {type(repo_id).__name__}.")
    name, _, revision = repo_id.partition("@")
    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repo id: {e}") from None
    if "@" in repo_id and not revision:
        raise ValueError(f"repo_id={repo_id!r} ends with '@' but names no revision; give 'org/name@branch'.")


def render_model_card(
    model: EarlyExitModel,
    report: Mapping[str, Any] | str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    folder_name: str | None = None,
) -> str:
    """Render the README.md model card from the templates in `timm_exits/hub/hub_cards/`.

    Every number on the card comes from `report` (schema: see the recipes' report.json); without a report the
    card states no results and says so.

    Args:
        model: The `EarlyExitModel` the card describes (names, head and gate types, stored policy).
        report: Training report (dict or path of report.json), or None.
        repo_id: Hub repo id ("org/name" or "org/name@revision") for the usage snippets.
        folder_name: Local folder name used in the snippets when there is no repo id.

    Returns:
        The card's markdown text, with YAML front matter.
    """
    if repo_id:
        _check_repo_id(repo_id)
    report_dict = _load_report(report)
    if report_dict is not None:
        _check_report(report_dict, model)
    architecture = _architecture(model.backbone)
    if repo_id:
        source = timm_source = f"hf-hub:{repo_id}"
        title = repo_id.split("@")[0].split("/")[-1]
    else:
        path = f"./{folder_name or 'model'}"
        source, timm_source = path, f"local-dir:{path}"
        title = folder_name or architecture
    exit_list = ", ".join(f"`{b.name}`" for b in model.branches) or "no module (only the final head)"
    final_note = " (plus a linear final head on the pooled features)" if model.final_head is not None else ""

    if report_dict is None:
        results = _template("no_results.md").substitute()
        training = "No training report was given when this model was saved."
        trained = ""
    else:
        results = _template("results.md").substitute(
            headline=_headline(report_dict, model.config.policy),
            exit_table=_exit_table(report_dict, model) or "The report gives no per-exit results.",
            policies=_policy_section(report_dict) or "The report gives no exit-policy results.",
            speed=_speed_text(report_dict) or "The report gives no timing.",
        )
        training = _recipe_text(report_dict)
        ds = report_dict.get("dataset")
        method = report_dict.get("method")
        trained = (f" Trained on `{ds}`" if isinstance(ds, str) and ds else "") + (
            f"{' with' if isinstance(ds, str) and ds else ' Trained with'} the `{method}` method"
            if isinstance(method, str) and method
            else ""
        )
        trained = f"{trained}." if trained else ""
        stopped = _unfinished(report_dict)
        trained += f"\n\n**{stopped}**" if stopped else ""

    return _template("model_card.md").substitute(
        front_matter=_front_matter(model, report_dict),
        title=title,
        architecture=architecture,
        exit_list=exit_list,
        final_note=final_note,
        head=model.config.head,
        gate=model.config.gate,
        policy=model.config.policy,
        predict_note=_predict_note(model.config.policy),
        trained=trained,
        source=source,
        timm_source=timm_source,
        results=results.strip(),
        training=training,
    )
