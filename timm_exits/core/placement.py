"""Exit placement: turn an `exits=` request into module names, checked against a real forward.

Requests:
  * "auto": the backbone's `feature_info` branch points, minus the last one (the backbone's own
    head is the final exit), minus points reached within the first 15 % of the backbone's FLOPs
    (stem-level points such as resnet's `act1` are too cheap to pay for an exit). When more than
    four points remain (isotropic models such as ViT list every block), the three whose
    cumulative cost is closest to 25 %, 50 % and 75 % are kept.
  * "blocks": one exit per block inside the stages (the children of each `feature_info` stage), with
    the same two exclusions, e.g. seven exits plus the final head on resnet18. A stage that is itself
    one block (Inception's mixed blocks, a Mixer or ReXNet block) is one point: the parallel branches
    and residual sub-layers inside a block never are.
  * a list of module names, of `feature_info` indices, or of cost fractions in (0, 1) (each placed
    at the block whose cumulative cost is closest).

Every placement is validated by one probe forward (eval mode, no grad, training flags restored):
the modules must run exactly once, in the listed order, before the last branch point, and return a
tensor.
"""

from __future__ import annotations

import difflib
import itertools
import numbers
from collections import Counter
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._utils import default_input_size, evaluating, feature_tensor
from .cost import cumulative_flops
from .layout import channels_of, check_layouts, detect_layout, layouts_by_kind, module_layout

__all__ = [
    "AUTO_MAX_EXITS",
    "AUTO_MIN_COST",
    "AUTO_TARGETS",
    "ExitPoint",
    "ExitRequest",
    "Probe",
    "block_points",
    "feature_points",
    "probe",
    "resolve_exits",
]

ExitRequest = str | Sequence[str] | Sequence[int] | Sequence[float]

AUTO_MIN_COST = 0.15  # "auto" and "blocks" skip points reached before this share of the FLOPs
AUTO_MAX_EXITS = 4  # beyond this many points, "auto" keeps those closest to AUTO_TARGETS
AUTO_TARGETS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class ExitPoint:
    """A resolved exit.

    Attributes:
        name: Module name inside the backbone.
        channels: Channels of the tensor the module returns.
        layout: "NCHW", "NHWC", "NLC" or "NC".
        reduction: Stride relative to the input, when `feature_info` declares it.
        backbone_cost: Fraction of the backbone's FLOPs spent when this module finishes.
        cost: gamma_b: backbone cost plus every exit head and gate evaluated up to this exit.
        prefix_tokens: Class / register tokens at the start of an NLC output, when they differ from the
            backbone's ``num_prefix_tokens`` (CaiT, XCiT and ConViT add their class token after the blocks).
    """

    name: str
    channels: int
    layout: str
    reduction: int | None = None
    backbone_cost: float | None = None
    cost: float | None = None
    prefix_tokens: int | None = None


@dataclass
class Probe:
    """What one forward revealed about a set of modules."""

    order: dict[str, int]
    calls: Counter
    outputs: dict[str, Any]
    final: Any
    kinds: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)


def feature_points(model: nn.Module) -> list[dict[str, Any]]:
    """The backbone's `feature_info` as a list of dicts, or a clear error if it has none."""
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(
            f"{type(model).__name__} has no `feature_info`, so exits='auto'/'blocks'/indices/fractions "
            "cannot be resolved. Pass explicit module names, e.g. exits=['features.5', 'features.12'] "
            "(list them with [n for n, _ in model.named_modules()])."
        )
    info = info.info if hasattr(info, "info") else info
    modules = dict(model.named_modules())
    return [{**f, "module": _existing_module(modules, f["module"])} for f in info]


def _existing_module(modules: dict[str, nn.Module], name: str) -> str:
    """`name`, or the module timm meant by it: MViTv2's and Twins' `feature_info` name `block.i`, where
    the modules are `stages.i` and `blocks.i`; Gemma4 ViT's names `blocks.i`, a module one level down
    (the only module whose name ends that way). Unrepairable names are returned as they are."""
    if name in modules:
        return name
    prefix, _, index = name.rpartition(".")
    if index.isdigit():
        for alt in (f"{prefix}s.{index}", f"stages.{index}"):
            if alt in modules:
                return alt
    nested = [n for n in modules if n.endswith("." + name)]  # Gemma4 ViT: `blocks.i` is `encoder.blocks.i`
    return nested[0] if len(nested) == 1 else name


def _nested(a: str, b: str) -> bool:
    """Whether module `a` is `b`, inside `b`, or contains `b` (by dotted name)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _final_features(pr: Probe, name: str, last_point: str) -> bool:
    """Whether module `name` yields the backbone's final features: it is the last branch point, or the
    last point returns its tensor as its whole output (an identity `final_conv`) or returns it from
    inside (a block of the last stage). A tensor that merely reappears among several the last point
    passes through (CoaT's parallel blocks keep the first scale untouched) is an ordinary branch point."""
    if name == last_point:
        return True
    same = pr.outputs.get(name) is not None and pr.outputs[name] is pr.outputs.get(last_point)
    return same and (pr.kinds.get(last_point) == "Tensor" or _nested(name, last_point))


def _block_children(model: nn.Module, stage_name: str) -> tuple[list[str], bool]:
    """The blocks of a stage, and whether they were guessed as its repeated composite children (a custom
    stage), which only a forward can confirm (`_one_block_stages`)."""
    stage = model.get_submodule(stage_name)
    container, prefix = stage, stage_name
    for child in ("blocks", "layers"):
        sub = getattr(stage, child, None)
        if isinstance(sub, (nn.Sequential, nn.ModuleList)) and len(sub) > 0:
            container, prefix = sub, f"{stage_name}.{child}"
            break
    named = [(n, m) for n, m in container.named_children() if not isinstance(m, nn.Identity)]
    if isinstance(container, (nn.Sequential, nn.ModuleList)):
        return [f"{prefix}.{n}" for n, _ in named] or [stage_name], False
    # A custom stage (e.g. RegStage): its blocks are the repeated composite children.
    kinds = Counter(type(m) for _, m in named if any(True for _ in m.children()))
    if kinds:
        kind, count = kinds.most_common(1)[0]
        if count >= 2:
            return [f"{prefix}.{n}" for n, m in named if type(m) is kind], True
    return [stage_name], False


def _one_block_stages(model: nn.Module, guessed: dict[str, list[str]], example: torch.Tensor) -> set[str]:
    """The stages among `guessed` that are one block: their repeated children do not run one after
    another, each on the previous one's output, the last one returning the stage's output. They are
    the parallel branches (Inception, RepVGG) or residual sub-layers (Mixer, ReXNet) of one block, or
    layers whose outputs the stage concatenates (DenseNet)."""
    pr = probe(model, list(dict.fromkeys([*guessed, *itertools.chain(*guessed.values())])), example)

    def chained(stage: str, kids: list[str]) -> bool:
        if any(pr.calls[k] != 1 for k in kids) or pr.outputs.get(kids[-1]) is None:
            return False
        linked = all(pr.inputs.get(b) is pr.outputs[a] for a, b in zip(kids, kids[1:]))
        return linked and pr.outputs.get(stage) is pr.outputs[kids[-1]]

    return {stage for stage, kids in guessed.items() if not chained(stage, kids)}


def _example_input(model: nn.Module) -> torch.Tensor:
    """A one-image batch of the backbone's pretrained input size (3 x 224 x 224 when it has none)."""
    size = default_input_size(model, None)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    return torch.randn(1, *size, device=param.device if param is not None else None, dtype=dtype)


def _is_stage(module: nn.Module) -> bool:
    """A Sequential or ModuleList of composite blocks."""
    return isinstance(module, (nn.Sequential, nn.ModuleList)) and any(any(True for _ in c.children()) for c in module)


def _folded_scales(model: nn.Module, names: list[str]) -> list[str]:
    """`feature_info` module names, each once, with the stages of scales that one module stands for.

    When consecutive entries name the same module for several scales (CoaT with parallel blocks names
    `parallel_blocks` for scales 2-4), the stage containers registered between the previous point and
    that module (`serial_blocks2`..`serial_blocks4`, which run first) are inserted before it.
    """
    out: list[str] = []
    for i, name in enumerate(names):
        if name in out:
            continue
        if names[i + 1 : i + 2] == [name] and out:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            prefix = f"{parent_name}." if parent_name else ""
            prev_child = out[-1][len(prefix) :].split(".")[0] if out[-1].startswith(prefix) else None
            children = dict(parent.named_children())
            keys = list(children)
            if prev_child in children and child in children:
                between = keys[keys.index(prev_child) + 1 : keys.index(child)]
                out += [f"{parent_name}.{k}" if parent_name else k for k in between if _is_stage(children[k])]
        out.append(name)
    return out


def _stages(model: nn.Module) -> list[str]:
    """`feature_info` modules plus the composite siblings between them (e.g. efficientnet's
    `blocks.3`, which feature_info skips because it keeps the stride, or CoaT's serial stages that
    its `feature_info` folds into the parallel blocks)."""
    stages: list[str] = []
    modules = dict(model.named_modules())
    for name in _folded_scales(model, [f["module"] for f in feature_points(model) if f["module"] in modules]):
        parent_name, _, child = name.rpartition(".")
        prev = stages[-1] if stages else None
        if prev is not None and child.isdigit() and prev.rpartition(".")[0] == parent_name:
            parent = model.get_submodule(parent_name) if parent_name else model
            start = int(prev.rpartition(".")[2]) if prev.rpartition(".")[2].isdigit() else None
            if isinstance(parent, (nn.Sequential, nn.ModuleList)) and start is not None:
                for i in range(start + 1, int(child)):
                    sibling = parent[i]
                    if any(True for _ in sibling.children()):
                        stages.append(f"{parent_name}.{i}" if parent_name else str(i))
        stages.append(name)
    return stages


def block_points(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """One candidate exit point per block inside each stage, in model order.

    Args:
        model: The backbone.
        example: Input batch for the forward that tells a custom stage's blocks from the parts of one
            block (only run when the backbone has such a stage); default: one random image of the
            backbone's pretrained input size.
    """
    modules = dict(model.named_modules())
    # feature_info may name a module that does not exist (e.g. mvitv2)
    found = {stage: _block_children(model, stage) for stage in _stages(model) if stage in modules}
    guessed = {stage: kids for stage, (kids, unsure) in found.items() if unsure}
    single = _one_block_stages(model, guessed, _example_input(model) if example is None else example) if guessed else ()
    names: list[str] = []
    for stage, (kids, _) in found.items():
        for n in [stage] if stage in single else kids:
            if n not in names:
                names.append(n)
    return names


def probe(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> Probe:
    """Run `model(example)` once in eval mode and record when and how often each module finishes.

    The model's parameters, buffers and train/eval flags are left exactly as they were.
    """
    modules = dict(model.named_modules())
    order: dict[str, int] = {}
    calls: Counter = Counter()
    outputs: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    inputs: dict[str, Any] = {}
    tick = itertools.count()
    handles = []
    for name in names:

        def hook(_m, args, out, name=name):
            calls[name] += 1
            if name not in order:
                order[name] = next(tick)
                inputs[name] = args[0] if args else None
                feat = feature_tensor(out, example.shape[0])
                if feat is not None and (feat.ndim < 2 or feat.shape[0] != example.shape[0]):
                    # e.g. TNT's inner pixel tokens: batch * patches rows, not one row per image
                    kinds[name] = f"a tensor of shape {tuple(feat.shape)} whose first dim is not the batch"
                    feat = None
                else:
                    kinds[name] = type(out).__name__
                outputs[name] = feat

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with evaluating(model), torch.no_grad():
            final = model(example)
    except (RuntimeError, ValueError, AssertionError) as e:  # conv / attention / timm's own shape checks
        raise ValueError(
            f"a probe forward of {type(model).__name__} on an input of shape {tuple(example.shape)} failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass the input_size=(C, H, W) "
            "the backbone takes (its in_chans and an image size it accepts)."
        ) from e
    finally:
        for h in handles:
            h.remove()
    return Probe(order, calls, outputs, final, kinds, inputs)


def _runnable(modules: dict[str, nn.Module], name: str) -> str:
    """A ModuleList never runs itself (CoaT's `serial_blocksN`): its last child marks the branch point."""
    module = modules[name]
    while isinstance(module, nn.ModuleList) and len(module):
        name = f"{name}.{len(module) - 1}"
        module = modules[name]
    return name


def _unknown_module_error(model: nn.Module, name: str) -> ValueError:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {close}?" if close else ""
    return ValueError(
        f"exit {name!r}: {type(model).__name__} has no module of that name.{hint} "
        "List the valid names with [n for n, _ in model.named_modules()]."
    )


def _refuse_feature_extractor(model: nn.Module) -> None:
    """A clear error for a timm `features_only=True` model (FeatureListNet, FeatureGetterNet, ...), whose
    forward returns a list of maps and whose modules are renamed (`stages_0`), so no exit can be placed."""
    if type(model).__module__ == "timm.models._features" and type(model).__name__.startswith("Feature"):
        raise ValueError(
            f"{type(model).__name__}: a features_only model returns a list of maps and cannot be wrapped: wrap the "
            "model created without features_only (num_classes=0 for a headless one) and give num_classes=N."
        )


def _as_request(exits: Any) -> ExitRequest:
    """The request with numpy / torch values as Python ones; a single value is refused with the list to give."""
    if hasattr(exits, "tolist"):  # a numpy array or a tensor of indices or fractions
        exits = exits.tolist()
    if isinstance(exits, str):
        return exits
    if not isinstance(exits, Sequence | AbstractSet):
        one = f" (one exit: exits=[{exits!r}])" if isinstance(exits, numbers.Number) else ""
        raise TypeError(
            f"exits={exits!r} is not understood; give 'auto', 'blocks', or a list of module names, feature_info "
            f"indices or cost fractions{one}."
        )
    items = [e.tolist() if hasattr(e, "tolist") else e for e in exits]  # numpy scalars
    return [int(e) if isinstance(e, numbers.Integral) and not isinstance(e, bool) else e for e in items]


def _request_kind(exits: ExitRequest) -> str:
    if isinstance(exits, str):
        if exits in ("auto", "blocks"):
            return exits
        raise ValueError(
            f"exits={exits!r} is not understood; use 'auto', 'blocks', or a list of module names, "
            "feature_info indices or cost fractions."
        )
    items = list(exits)
    if not items:
        raise ValueError("exits is empty; give at least one exit point or use exits='auto'.")
    if all(isinstance(e, str) for e in items):
        return "names"
    if all(isinstance(e, int) and not isinstance(e, bool) for e in items):
        return "indices"
    if all(isinstance(e, float) for e in items):
        return "fractions"
    raise ValueError(
        f"exits={items!r} mixes types; use only module names (str), feature_info indices (int) "
        "or cost fractions (float in (0, 1))."
    )


def _check_duplicates(items: Sequence[Any]) -> None:
    seen = [e for e, n in Counter(items).items() if n > 1]
    if seen:
        raise ValueError(f"exits {seen} are listed more than once; list each exit point once.")


def resolve_exits(
    model: nn.Module,
    exits: ExitRequest,
    example: torch.Tensor,
    layouts: dict[str, str] | None = None,
    measure_costs: bool = True,
) -> tuple[list[ExitPoint], Probe, int | None]:
    """Resolve an exit request to checked exit points.

    Args:
        model: The backbone.
        exits: "auto", "blocks", or a list of module names / feature_info indices / cost fractions.
        example: Input batch used for the probe forward and for counting FLOPs.
        layouts: Optional {module name: layout} overrides.
        measure_costs: Count FLOPs with fvcore (needed for "auto", "blocks" and fractions).

    Returns:
        (exit points in execution order, the probe, the backbone's total FLOPs or None).
    """
    _refuse_feature_extractor(model)
    unordered = isinstance(exits, AbstractSet)  # a set iterates in hash order: its exits go in run order
    exits = _as_request(exits)
    kind = _request_kind(exits)
    info = feature_points(model) if kind != "names" or hasattr(model, "feature_info") else []
    fi_chs = {f["module"]: f.get("num_chs") for f in info}
    fi_red = {f["module"]: f.get("reduction") for f in info}
    modules = dict(model.named_modules())
    existing = [
        _runnable(modules, n) for n in _folded_scales(model, [f["module"] for f in info if f["module"] in modules])
    ]
    last_point = existing[-1] if existing else None

    if kind == "names":
        requested = list(exits)
        _check_duplicates(requested)
        for n in requested:
            if n not in modules or n == "":
                raise _unknown_module_error(model, n)
        candidates = requested
    elif kind == "indices":
        _check_duplicates(list(exits))
        bad = [i for i in exits if not 0 <= i < len(info)]
        if bad:
            raise ValueError(
                f"feature_info indices {bad} are out of range; {type(model).__name__} has {len(info)} "
                f"branch points (0..{len(info) - 1}): {[f['module'] for f in info]}."
            )
        requested = [
            _runnable(modules, info[i]["module"]) if info[i]["module"] in modules else info[i]["module"] for i in exits
        ]
        candidates = requested
    elif kind == "fractions":
        bad = [f for f in exits if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"cost fractions {bad} are outside (0, 1); give fractions of the backbone's FLOPs.")
        requested = []
        candidates = block_points(model, example)
    elif kind == "blocks":
        requested = []
        candidates = block_points(model, example)
        if not candidates:
            raise ValueError(
                f"{type(model).__name__}.feature_info names modules that do not exist in the model; pass explicit "
                "module names instead."
            )
    else:
        requested = []
        candidates = list(dict.fromkeys(existing))
        if not candidates:
            raise ValueError(
                f"{type(model).__name__}.feature_info names modules that do not exist in the model "
                f"({[f['module'] for f in info]}); pass explicit module names instead."
            )

    probe_names = list(dict.fromkeys(candidates + existing))  # every branch point: the layouts of their blocks
    pr = probe(model, probe_names, example)

    if kind in ("names", "indices"):
        if unordered:
            requested.sort(key=lambda n: pr.order.get(n, -1))
        _validate_explicit(model, requested, pr, last_point)
        chosen = requested
    else:
        chosen = [n for n in candidates if pr.calls[n] == 1 and pr.outputs.get(n) is not None and n != last_point]
        if last_point in pr.order:
            chosen = [
                n for n in chosen if pr.order[n] < pr.order[last_point] and not _final_features(pr, n, last_point)
            ]
        chosen.sort(key=lambda n: pr.order[n])
        if not chosen:
            raise ValueError(
                f"none of {type(model).__name__}'s candidate branch points {candidates} runs exactly once "
                "before its last branch point, so no exit can be placed automatically. Pass explicit "
                "module names that run during forward."
            )

    total = None
    cum: dict[str, float] = {}
    if measure_costs or kind in ("auto", "blocks", "fractions"):
        marks, total = cumulative_flops(model, example, chosen)
        cum = {n: marks[n] / total for n in chosen}

    if kind in ("auto", "blocks"):
        chosen = [n for n in chosen if cum[n] >= AUTO_MIN_COST]
        if kind == "auto" and len(chosen) > AUTO_MAX_EXITS:
            chosen = _nearest(chosen, cum, AUTO_TARGETS, strict=False)
        if not chosen:
            raise ValueError(
                f"every branch point of {type(model).__name__} is reached within {AUTO_MIN_COST:.0%} of its "
                "FLOPs; place exits explicitly by module name."
            )
    elif kind == "fractions":
        chosen = _nearest(chosen, cum, list(exits), strict=True)

    hint, grid = _layout_hint(pr, fi_chs), (int(example.shape[-2]), int(example.shape[-1]))
    kinds = {n: type(modules[n]) for n in pr.outputs}
    by_kind = layouts_by_kind(pr.outputs, kinds, fi_chs, grid)
    check_layouts(layouts or {}, chosen, pr.outputs)
    points = []
    for n in chosen:
        t = pr.outputs[n]
        layout = (layouts or {}).get(n) or module_layout(n, t, fi_chs, hint, by_kind.get(kinds[n]), grid)
        points.append(
            ExitPoint(
                name=n,
                channels=channels_of(t, layout),
                layout=layout,
                reduction=fi_red.get(n),
                backbone_cost=cum.get(n),
                prefix_tokens=_prefix_tokens(model, t, example, fi_red.get(n)) if layout == "NLC" else None,
            )
        )
    return points, pr, total


def _prefix_tokens(model: nn.Module, t: torch.Tensor, example: torch.Tensor, reduction: int | None) -> int | None:
    """Prefix tokens an NLC exit output holds when its length shows fewer than the backbone's
    ``num_prefix_tokens`` (None: as many), from the patch grid at the exit's reduction."""
    n = int(getattr(model, "num_prefix_tokens", 0) or 0)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if reduction:
        patches = (example.shape[-2] // reduction) * (example.shape[-1] // reduction)
    elif grid:
        patches = int(grid[0]) * int(grid[1])
    else:
        return None
    extra = int(t.shape[1]) - patches
    return extra if n and 0 <= extra < n else None


def _validate_explicit(model: nn.Module, names: list[str], pr: Probe, last_point: str | None) -> None:
    for n in names:
        if pr.calls[n] == 0:
            raise ValueError(
                f"exit {n!r}: module never runs during {type(model).__name__}.forward, so an exit there "
                "would never fire. Choose a module that runs (feature_info lists the usual branch points)."
            )
        if pr.calls[n] > 1:
            raise ValueError(
                f"exit {n!r}: module runs {pr.calls[n]} times per forward (a shared or reused module); "
                "choose a module that runs exactly once."
            )
        if pr.outputs[n] is None:
            raise ValueError(
                f"exit {n!r}: module returns {pr.kinds[n]}; an exit needs a (batch, ...) feature tensor or a tuple "
                "starting with one. Choose another module."
            )
    ran = sorted(names, key=lambda n: pr.order[n])
    if ran != names:
        raise ValueError(f"exits {names} are out of order; they run in the order {ran}. List them in that order.")
    if last_point is not None and last_point in pr.order:
        for n in names:
            if _final_features(pr, n, last_point):
                raise ValueError(
                    f"exit {n!r} is the backbone's last branch point; its own head is already the final exit. "
                    "Place exits before it."
                )
            if pr.order[n] > pr.order[last_point]:
                raise ValueError(
                    f"exit {n!r} runs after the last branch point {last_point!r} (in the backbone's head); "
                    "place exits at or before the earlier branch points."
                )


def _nearest(names: list[str], cum: dict[str, float], targets: Sequence[float], strict: bool) -> list[str]:
    picked: list[str] = []
    for t in targets:
        best = min(names, key=lambda n: (abs(cum[n] - t), cum[n]))
        if best in picked:
            if strict:
                raise ValueError(
                    f"cost fractions {list(targets)} place two exits at {best!r} "
                    f"(cumulative cost {cum[best]:.3f}); available points: "
                    + ", ".join(f"{n}={cum[n]:.2f}" for n in names)
                )
            continue
        picked.append(best)
    return sorted(picked, key=lambda n: cum[n])


def _layout_hint(pr: Probe, fi_chs: dict[str, int | None]) -> str | None:
    votes = Counter()
    for n, chs in fi_chs.items():
        t = pr.outputs.get(n)
        if chs is not None and torch.is_tensor(t) and t.ndim == 4:
            votes[detect_layout(t, chs)] += 1
    return votes.most_common(1)[0][0] if votes else None
