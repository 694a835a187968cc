"""The multi-exit wrapper: exits attached to an unmodified backbone through forward hooks.

`wrap(model, exits=...)` resolves exit points (`timm_exits.core.placement`), builds one `ExitBranch`
(head + gate) per point and registers each branch's bound method `_hook` as a forward hook on the
backbone module it reads, keeping the returned handle. Hooks are bound methods of modules owned by
the wrapper, so `copy.deepcopy` (timm's EMA) re-binds them, and their handles, to the copies;
`unwrap()` removes them through the handles and returns the backbone untouched.

The hooks do nothing unless a forward of the wrapper is running: calling `model.backbone(x)`
directly gives exactly the plain model's output. During `EarlyExitModel.forward` every exit is
computed (training and soft inference); `EarlyExitModel.predict` (see `timm_exits.inference.hard_exit`) runs
the hard early-exit path in which exited samples leave the batch and the backbone stops when none
is left. `EarlyExitModel.compile_exits()` runs every exit's inference computation through
`torch.compile`.

Layering rule: `predict`, `save_pretrained` and `push_to_hub` import `timm_exits.inference.hard_exit` and
`timm_exits.hub.save` when called, so those modules must never import this one at run time (annotations only,
under `typing.TYPE_CHECKING`, as this module imports `Prediction` for its annotations; the model is
recognised by its attributes).
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._utils import default_input_size, evaluating, feature_tensor
from .branch import ExitBranch
from .compiled_exit import CompiledExit, compile_options
from .config import ExitConfig, GateKind, HeadKind, PolicyName
from .cost import module_flops
from .grouping import exit_group_matcher
from .heads import FinalHead
from .layout import channels_of, detect_layout
from .placement import ExitPoint, ExitRequest, resolve_exits
from .soft import exit_log_probs, expected_cost, gates_with_final, soft_log_output

if TYPE_CHECKING:
    from ..inference.hard_exit import Prediction

__all__ = ["ExitOutput", "ExitBranch", "EarlyExitModel", "wrap"]


@dataclass
class ExitOutput:
    """Everything one forward of an `EarlyExitModel` computes.

    Attributes:
        logits: Logits of every exit, the backbone's final head last, each (B, K).
        gate_logits: (B, num_exits - 1) gate logits of the early exits (the final gate is 1).
        exit_log_probs: (B, num_exits) log-probability of leaving at each exit (log pi_b).
        log_probs: (B, K) log of the soft-conditional output y_1.
        expected_cost: (B,) expected cost C_1 per sample, in units of the backbone's FLOPs.
    """

    logits: list[torch.Tensor]
    gate_logits: torch.Tensor
    exit_log_probs: torch.Tensor
    log_probs: torch.Tensor
    expected_cost: torch.Tensor

    @property
    def gates(self) -> torch.Tensor:
        """(B, num_exits) gate values, the final exit's fixed to 1."""
        return gates_with_final(self.gate_logits)

    @property
    def soft(self) -> torch.Tensor:
        """(B, K) class probabilities of the soft-conditional ensemble."""
        return self.log_probs.exp()

    @property
    def final(self) -> torch.Tensor:
        """Logits of the backbone's own head."""
        return self.logits[-1]


class _FullRun:
    """Collects every exit's logits and gate logit during one full forward."""

    def __init__(self, batch: int, device: torch.device):
        self.logits: list[torch.Tensor] = []
        self.gate_logits: list[torch.Tensor] = []
        self.stats = torch.zeros(batch, 0, device=device)

    def on_exit(self, branch: ExitBranch, output: Any) -> None:
        if branch.position != len(self.logits):
            raise RuntimeError(
                f"exit {branch.name!r} fired out of order (expected exit {len(self.logits)}); the backbone's "
                "forward no longer matches the one the exits were placed on, or another thread runs this model "
                "at the same time (a wrapped model runs one forward at a time: give each thread its own copy)."
            )
        run = branch if torch.is_grad_enabled() else branch.infer
        logits, gate_logit, self.stats = run(feature_tensor(output, self.stats.shape[0]), self.stats)
        self.logits.append(logits)
        self.gate_logits.append(gate_logit)
        return None


class EarlyExitModel(nn.Module):
    """A timm (or any) backbone with early exits and gates attached through forward hooks.

    Build it with `wrap()`. The backbone is held as `self.backbone`, unchanged. One model runs one forward at
    a time (the hooks share the forward's state): threads that serve requests each need their own copy
    (`copy.deepcopy`), as Ray Serve's replicas have.
    """

    def __init__(
        self,
        backbone: nn.Module,
        config: ExitConfig,
        points: Sequence[ExitPoint],
        final_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        num_prefix = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        own_pool = "token" if str(getattr(backbone, "global_pool", "avg")) == "token" else "avg"
        config.token_pool = token_pool = config.token_pool or own_pool  # recorded: a rebuild pools as these exits
        prefixes = [num_prefix if p.prefix_tokens is None else p.prefix_tokens for p in points]
        self.branches = nn.ModuleList(
            [
                ExitBranch(p, i, config, prefix, token_pool if prefix else "avg")
                for i, (p, prefix) in enumerate(zip(points, prefixes))
            ]
        )
        self.final_head = final_head
        self._points = list(points)
        self.register_buffer("exit_costs", torch.ones(len(points) + 1), persistent=True)
        self._batch_shrink_safe: bool | None = None
        self._hook_handles: list[RemovableHandle] = []
        self._install_hooks()

    # ----------------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> None:
        modules = dict(self.backbone.named_modules())
        self._hook_handles = [modules[b.name].register_forward_hook(b._hook) for b in self.branches]

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    @contextlib.contextmanager
    def _attached(self, run: Any) -> Iterator[None]:
        # object.__setattr__ skips nn.Module's parameter/module bookkeeping: `_run` is a plain
        # attribute, and this runs twice per forward (a measurable share of a batch-1 forward)
        for b in self.branches:
            object.__setattr__(b, "_run", run)
        try:
            yield
        finally:
            for b in self.branches:
                object.__setattr__(b, "_run", None)

    def _apply(self, fn: Any, recurse: bool = True) -> EarlyExitModel:
        # `.to(bf16)` / `.half()` cast every floating buffer; the costs stay float32, exact as measured
        costs = self.exit_costs
        super()._apply(fn, recurse)
        if self.exit_costs.dtype != costs.dtype:
            self.exit_costs = costs.to(self.exit_costs.device)
        return self

    def unwrap(self) -> nn.Module:
        """Remove every exit hook and return the original backbone (parameters untouched)."""
        self._remove_hooks()
        return self.backbone

    def compile_exits(
        self,
        enable: bool = True,
        *,
        mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None,
        dynamic: bool | None = None,
        fullgraph: bool = True,
        backend: str = "inductor",
    ) -> EarlyExitModel:
        """Run each exit's inference computation through `torch.compile` (opt-in; nothing is compiled
        otherwise).

        What is compiled is one exit's `ExitBranch.forward` (pooling, norm, head, confidence
        statistics, gate), as the hard early-exit path (`predict`) and the soft forward without
        autograd run it; the training forward and the backbone stay as they are. Each exit compiles at
        its first call, on CPU (inductor needs a C++ compiler there) or CUDA; the compiled code and
        its caches are `torch.compile`'s. Results equal the eager ones to float rounding.

        Batch sizes change inside the hard path as samples leave. With `dynamic=None` (torch's
        default) the second batch size an exit sees recompiles it once with a symbolic batch, and
        later sizes reuse that; batch 1 keeps its own specialised graph. Deep copies (timm's EMA) and
        pickles keep the setting and compile their own exits.

        Args:
            enable: False returns the exits to eager execution.
            mode: `torch.compile` mode (None: its default).
            dynamic: `torch.compile`'s `dynamic` (True: symbolic shapes from the first call).
            fullgraph: Require one graph per exit (an exit's forward has no graph breaks).
            backend: `torch.compile` backend ("inductor" generates the fused code).

        Returns:
            This model.
        """
        options = compile_options(mode, dynamic, fullgraph, backend) if enable else None
        for b in self.branches:
            b._compiled = None if options is None else CompiledExit(dict(options))
        return self

    # ----------------------------------------------------------------------------- properties
    @property
    def exits(self) -> list[ExitPoint]:
        """The early exits: module name, channels, layout, reduction and costs (gamma_b)."""
        costs = self.exit_costs.tolist()
        return [replace(p, cost=costs[i]) for i, p in enumerate(self._points)]

    @property
    def num_exits(self) -> int:
        """Number of exits, the final head included."""
        return len(self.branches) + 1

    @property
    def costs(self) -> torch.Tensor:
        """Per-exit costs gamma_b (final exit last), as fractions of the plain backbone's FLOPs."""
        return self.exit_costs

    def set_costs(self, costs: Sequence[float]) -> None:
        """Override the per-exit costs gamma_b (one per exit, the final exit included)."""
        values = [float(c) for c in costs]
        if len(values) != self.num_exits:
            raise ValueError(
                f"got {len(values)} costs for {self.num_exits} exits; give one per exit, the final exit last."
            )
        t = torch.tensor(values)
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError(f"costs {values} must be finite and non-negative.")
        self.exit_costs.copy_(t)
        self.config.costs = values

    @property
    def in_chans(self) -> int:
        """Input channels (timm's attribute), from the configured input size."""
        return int(self.config.input_size[0]) if self.config.input_size else 3

    @property
    def num_classes(self) -> int:
        """Classes of every exit."""
        return self.config.num_classes

    @property
    def num_features(self) -> int | None:
        """The backbone's `num_features` (timm's attribute), or None."""
        return getattr(self.backbone, "num_features", None)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The backbone's `pretrained_cfg` (input size, mean and std, ...), so timm's data config works."""
        return getattr(self.backbone, "pretrained_cfg", {}) or {}

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of `pretrained_cfg`."""
        return self.pretrained_cfg

    # -------------------------------------------------------------------- timm conventions
    def no_weight_decay(self) -> set[str]:
        """The backbone's no-weight-decay names, prefixed so they resolve on this wrapper."""
        fn = getattr(self.backbone, "no_weight_decay", None)
        names = fn() if callable(fn) else set()
        return {f"backbone.{n}" for n in names}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int]]:
        """timm's parameter grouping (layer-wise lr decay): the backbone's groups, each exit in its block's."""
        return exit_group_matcher(self.backbone, [p.name for p in self._points], coarse)

    def get_classifier(self) -> nn.Module:
        """The final exit's classifier (the added final head, else the backbone's)."""
        return self.final_head if self.final_head is not None else self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """Reset the backbone's classifier and every exit classifier for `num_classes` classes; measured costs
        are measured again (the classifiers' FLOPs change with the class count), given ones are kept."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"num_classes={num_classes!r}: every exit predicts classes, so give a positive count (a "
                "feature extractor is the unwrapped backbone: model.unwrap().reset_classifier(0))."
            )
        if self.final_head is not None:
            self.final_head = self.final_head.reset(num_classes)
        else:
            self.backbone.reset_classifier(num_classes, *args, **kwargs)
        for b in self.branches:
            b.head.reset_classifier(num_classes)
        self.config.num_classes = num_classes
        if self.config.costs is None:
            self._remeasure_costs()

    def _remeasure_costs(self) -> None:
        """Measure gamma_b again, as `wrap` does, with the exit hooks off during the probe."""
        param = next(self.parameters())
        example = torch.randn(1, *self.config.input_size, device=param.device, dtype=param.dtype)
        self._remove_hooks()
        try:
            names = [p.name for p in self._points]
            layouts = {p.name: p.layout for p in self._points}
            self._points, pr, total = resolve_exits(self.backbone, names, example, layouts=layouts)
            self.set_costs(_measure_costs(self, pr, total))
            self.config.costs = None
        finally:
            self._install_hooks()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's gradient checkpointing, which exits cannot use: refused when `enable` is True.

        timm's checkpointed stages call their blocks directly (no forward hooks run, so exits after a
        block never fire) or recompute them without the hooks (the exits' saved tensors then disagree).
        """
        if enable:
            raise NotImplementedError(
                "gradient checkpointing recomputes the backbone's blocks without their forward hooks, so the "
                "exits would not run; it cannot be used with exits. Lower the batch size or train with "
                "amp: bf16 to save memory."
            )
        self.backbone.set_grad_checkpointing(False)

    def exit_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the exit heads and gates (and the added final head), not the backbone's."""
        yield from self.branches.parameters()
        if self.final_head is not None:
            yield from self.final_head.parameters()

    # ------------------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error unless `x` is a non-empty floating-point (B, C, H, W) batch with the right channels."""
        if not torch.is_tensor(x):
            raise TypeError(f"expected a tensor, got {type(x).__name__}")
        if x.ndim != 4:
            fix = " Add the batch dimension with x.unsqueeze(0)." if x.ndim == 3 else ""
            raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(x.shape)}.{fix}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"input has {x.shape[1]} channels but the backbone takes {self.in_chans}; "
                f"convert the images (e.g. x.expand(-1, {self.in_chans}, -1, -1) for grey images)."
            )
        if x.shape[0] == 0:
            raise ValueError("empty batch: the input has 0 samples.")
        if not x.is_floating_point():
            raise TypeError(
                f"input images are {x.dtype}; the model takes floating-point images. Convert them as the model "
                "expects, e.g. x.float() / 255 and then normalised with the model's mean and std."
            )

    def final_logits(self, backbone_out: torch.Tensor) -> torch.Tensor:
        """Logits of the final exit from the backbone's output."""
        if not torch.is_tensor(backbone_out):
            raise TypeError(f"the backbone returned {type(backbone_out).__name__}; a logits tensor is needed.")
        return self.final_head(backbone_out) if self.final_head is not None else backbone_out

    def assemble(self, logits: list[torch.Tensor], gate_logits: torch.Tensor) -> ExitOutput:
        """Soft-conditional output and expected cost from every exit's logits and gate logits."""
        log_pi = exit_log_probs(gate_logits)
        return ExitOutput(
            logits=logits,
            gate_logits=gate_logits,
            exit_log_probs=log_pi,
            log_probs=soft_log_output(logits, log_pi),
            expected_cost=expected_cost(log_pi, self.exit_costs),
        )

    def forward(self, x: torch.Tensor) -> ExitOutput:
        """Run the backbone once, computing every exit (training and soft inference)."""
        self.check_input(x)
        run = _FullRun(x.shape[0], x.device)
        with self._attached(run):
            out = self.backbone(x)
        if len(run.logits) != len(self.branches):
            missing = [b.name for b in self.branches[len(run.logits) :]]
            raise RuntimeError(
                f"exits {missing} did not fire during this forward (their modules did not run through their "
                "forward hooks, or another thread runs this model at the same time: give each thread its own copy)."
            )
        logits = run.logits + [self.final_logits(out)]
        if run.gate_logits:
            gate_logits = torch.stack(run.gate_logits, dim=1)
        else:
            gate_logits = x.new_zeros(x.shape[0], 0)
        return self.assemble(logits, gate_logits)

    def predict(
        self, x: torch.Tensor, policy: PolicyName | None = None, threshold: Any = None, **kwargs: Any
    ) -> Prediction:
        """Hard early-exit inference; see `timm_exits.inference.hard_exit.predict`."""
        from ..inference.hard_exit import predict

        return predict(self, x, policy=policy, threshold=threshold, **kwargs)

    def save_pretrained(self, save_directory: str, report: dict | None = None, **kwargs: Any) -> Path:
        """Write a folder that is both a timm model repo and this multi-exit model; see `timm_exits.hub`."""
        from ..hub.save import save_pretrained

        return save_pretrained(self, save_directory, report, **kwargs)

    def push_to_hub(self, repo_id: str, report: dict | None = None, **kwargs: Any) -> Any:
        """Upload to the Hugging Face Hub in one commit; see `timm_exits.hub.push_to_hub` (returns the commit info)."""
        from ..hub.save import push_to_hub

        return push_to_hub(self, repo_id, report, **kwargs)


def wrap(
    model: nn.Module,
    exits: ExitRequest = "auto",
    *,
    num_classes: int | None = None,
    head: HeadKind = "linear",
    gate: GateKind = "stats",
    costs: Sequence[float] | None = None,
    input_size: Sequence[int] | None = None,
    config: ExitConfig | None = None,
    **config_kwargs: Any,
) -> EarlyExitModel:
    """Attach early exits and gates to `model` without modifying it.

    Args:
        model: A timm model (or any `nn.Module` when exits are given as module names).
        exits: "auto", "blocks", or a list of module names / `feature_info` indices / cost fractions.
        num_classes: Classes of every exit. Defaults to the backbone's; required when the backbone has
            `num_classes=0` (a linear final head is then added on its pooled features).
        head: Exit head type ("linear", "mlp", "conv").
        gate: Gate input ("stats", "features", "both").
        costs: Per-exit costs gamma_b overriding the fvcore measurement (final exit included).
        input_size: (C, H, W) used to probe shapes and count FLOPs (default: the model's own size).
        config: A full `ExitConfig` (e.g. from a saved model); overrides the other options. The model
            gets a copy; the caller's config is left as it is.
        **config_kwargs: Further `ExitConfig` fields (head_hidden, gate_bias, drop_rate, ...).

    Returns:
        An `EarlyExitModel`.
    """
    model = _check_backbone(model)
    if config is not None:
        config = copy.deepcopy(config)
        exits = config.exits
        input_size = config.input_size
        costs = config.costs
    size = default_input_size(model, input_size)
    backbone_classes = getattr(model, "num_classes", None)
    if num_classes is None and config is not None:
        num_classes = config.num_classes
    if num_classes is None:
        num_classes = backbone_classes
    if backbone_classes == 0 and not num_classes:
        raise ValueError(
            f"{type(model).__name__} has num_classes=0 (it returns features, no logits) and no num_classes was "
            "given; pass wrap(model, num_classes=N) to add a final linear head, or create the model with "
            "num_classes=N."
        )
    if backbone_classes not in (None, 0) and num_classes != backbone_classes:
        raise ValueError(
            f"the backbone predicts {backbone_classes} classes but num_classes={num_classes}; call "
            f"model.reset_classifier({num_classes}) first (or create it with num_classes={num_classes})."
        )

    device = next(model.parameters(), torch.empty(0)).device
    dtype = _floating_dtype(model)
    example = torch.randn(1, *size, device=device, dtype=dtype)
    cfg = config or ExitConfig(exits=[], num_classes=0, head=head, gate=gate, input_size=size, **config_kwargs)
    points, pr, total = resolve_exits(model, exits, example, layouts=cfg.layouts, measure_costs=costs is None)
    final_out = pr.final
    final_head = _final_head(model, final_out, backbone_classes, num_classes, points)
    if final_head is None and (not torch.is_tensor(final_out) or final_out.ndim != 2):
        shape = tuple(final_out.shape) if torch.is_tensor(final_out) else type(final_out).__name__
        fix = (
            "A features_only model returns a list of maps and cannot be wrapped: wrap the model created without "
            "features_only (num_classes=0 for a headless one) and give num_classes=N."
            if isinstance(final_out, (list, tuple)) and num_classes
            else "For a feature extractor, pass wrap(model, num_classes=N) to add a pooled linear final head."
        )
        raise ValueError(f"the backbone's forward returns {shape}; a (B, classes) logits tensor is needed. {fix}")
    out_classes = int(final_out.shape[1])
    if final_head is None and num_classes is not None and num_classes != out_classes:
        raise ValueError(
            f"the backbone outputs {out_classes} classes but num_classes={num_classes}; replace its classifier "
            f"so it predicts {num_classes} classes before wrapping."
        )
    cfg.num_classes = int(num_classes or out_classes)
    cfg.exits = [p.name for p in points]
    cfg.input_size = size
    if cfg.head == "conv" and hasattr(model, "reroll"):  # Hiera: tokens in mask-unit order, not raster order
        raise ValueError("head='conv' needs a spatial grid; Hiera's tokens are in mask-unit order: use 'linear'.")
    if cfg.thresholds is not None and len(cfg.thresholds) != len(points):
        raise ValueError(
            f"thresholds={cfg.thresholds} must hold one value per early exit; the exits placed are {cfg.exits}."
        )

    wrapped = EarlyExitModel(model, cfg, points, final_head=final_head)
    try:
        wrapped.to(device)
        for m in (wrapped.branches, wrapped.final_head):  # exits compute in the backbone's dtype
            if m is not None:
                m.to(dtype)
        if costs is not None:
            wrapped.set_costs(costs)
        else:
            wrapped.set_costs(_measure_costs(wrapped, pr, total))
            cfg.costs = None  # measured, not user-given: re-measured when rebuilt
    except BaseException:
        wrapped.unwrap()  # the backbone leaves a failed wrap() without hooks, as it came
        raise
    # the exits take the backbone's mode (the wrapper's own flag too), leaving its per-module modes alone
    wrapped.training = model.training
    for m in (wrapped.branches, wrapped.final_head):
        if m is not None:
            m.train(model.training)
    return wrapped


def _check_backbone(model: Any) -> nn.Module:
    """The module to wrap, or a clear error for what cannot be wrapped (a name, a wrapped or compiled model)."""
    if isinstance(model, str):
        raise TypeError(
            f"wrap() takes a model, not the name {model!r}; create it first: "
            f"timm_exits.wrap(timm.create_model({model!r}, pretrained=...))."
        )
    if isinstance(model, EarlyExitModel):
        raise ValueError("this model is already wrapped; call .unwrap() first or use it as it is.")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise TypeError(
            "wrap() needs the model itself, not a torch.compile()d one: exits are forward hooks placed by tracing the "
            "eager model. Wrap the original module, then compile the wrapper if you like: "
            "wrapped = timm_exits.wrap(compiled._orig_mod); torch.compile(wrapped)."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap() takes a torch.nn.Module (e.g. a timm model), got {type(model).__name__}.")
    return model


def _floating_dtype(model: nn.Module) -> torch.dtype:
    """The one floating dtype of the backbone's parameters (float32 when it has none)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        names = sorted(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(
            f"the backbone's parameters mix dtypes {names}; cast it to one first, e.g. model.to(torch.bfloat16) "
            "or model.float()."
        )
    return dtypes.pop() if dtypes else torch.float32


def _final_head(
    model: nn.Module, out: Any, backbone_classes: int | None, num_classes: int | None, points: list[ExitPoint]
) -> FinalHead | None:
    """A linear final head for a backbone without logits: one with `num_classes=0`, or a plain module
    returning an unpooled map or token sequence when `num_classes` is given; None otherwise. A map whose
    channel count the backbone does not declare takes the layout most of the exits' maps have."""
    if not torch.is_tensor(out) or out.ndim not in (2, 3, 4):
        return None
    headless = backbone_classes == 0 or (backbone_classes is None and num_classes and out.ndim > 2)
    if not headless:
        return None
    # MambaOut's unpooled output has head_hidden_size channels, not num_features
    widths = [int(w) for w in (getattr(model, "head_hidden_size", None), getattr(model, "num_features", None)) if w]
    width = next((w for w in widths if out.ndim == 4 and w in (out.shape[1], out.shape[-1])), None)
    maps = Counter(p.layout for p in points if p.layout in ("NCHW", "NHWC"))
    layout = detect_layout(out, width, maps.most_common(1)[0][0] if maps else None)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if layout == "NLC" else 0
    token_pool = "token" if str(getattr(model, "global_pool", "avg")) == "token" else "avg"
    return FinalHead(channels_of(out, layout), int(num_classes), layout, prefix, token_pool)


def _measure_costs(model: EarlyExitModel, pr, backbone_total: int) -> list[float]:
    """gamma_b = (backbone FLOPs to exit b + every head and gate up to b) / (backbone + its head)."""
    total = float(backbone_total)
    if model.final_head is not None:
        total += module_flops(model.final_head, (pr.final[:1],))
    stats = None
    spent_on_exits = 0.0
    costs = []
    with evaluating(model.branches), torch.no_grad():
        for b, point in zip(model.branches, model._points):
            feat = pr.outputs[b.name][:1]
            if stats is None:
                stats = feat.new_zeros(1, 0)
            spent_on_exits += module_flops(b, (feat, stats))
            _, _, stats = b(feat, stats)
            costs.append((point.backbone_cost * backbone_total + spent_on_exits) / total)
    costs.append((total + spent_on_exits) / total)
    return costs
