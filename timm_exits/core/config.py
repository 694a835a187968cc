"""Exit configuration: everything needed to rebuild the exits of a wrapped model.

`ExitConfig` is a plain dataclass that round-trips through JSON, so a multi-exit model can be
re-created from its backbone plus this config (see `timm_exits.hub`). Exit points are stored as
resolved module names, never as "auto", so a saved config keeps meaning the same exits even if the
placement rules change.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .layout import Layout

__all__ = ["ExitConfig", "FORMAT_VERSION", "HeadKind", "GateKind", "PolicyName", "HEAD_TYPES", "GATE_TYPES"]

FORMAT_VERSION = 2  # 2: config.json records the weight files' SHA-256
HeadKind = Literal["linear", "mlp", "conv"]
GateKind = Literal["stats", "features", "both"]
PolicyName = Literal["soft", "gate", "confidence", "entropy"]
HEAD_TYPES: tuple[str, ...] = get_args(HeadKind)
GATE_TYPES: tuple[str, ...] = get_args(GateKind)


@dataclass
class ExitConfig:
    """Configuration of the exits attached to a backbone.

    Args:
        exits: Module names of the exit points, in the order they run.
        num_classes: Classes predicted by every exit.
        head: Exit head type: "linear" (pool, norm, linear), "mlp" (pool, norm, two linears) or
            "conv" (3x3 conv block, pool, linear).
        head_hidden: Hidden width of "mlp" and "conv" heads.
        gate: Gate input: "stats" (confidence statistics of this exit and the earlier ones),
            "features" (pooled features) or "both".
        gate_hidden: Hidden width of the gate MLP.
        gate_bias: Initial bias of each gate logit; negative values start the gates closed.
        detach_gate_inputs: Stop gradients from the gates into heads and backbone.
        drop_rate: Dropout before each exit classifier.
        layouts: Optional per-exit layout overrides ("NCHW", "NHWC", "NLC", "NC").
        costs: Per-exit costs gamma_b (the final exit included), as a fraction of the plain
            backbone's FLOPs. None means measure them with fvcore.
        input_size: (C, H, W) used to probe shapes and count FLOPs.
        policy: Inference policy stored with the model ("gate", "confidence", "entropy", "soft").
        thresholds: Per-exit thresholds of that policy (None: the policy's default).
        format_version: Version of this layout; loaders refuse newer versions.
    """

    exits: list[str]
    num_classes: int
    head: str = "linear"
    head_hidden: int = 256
    gate: str = "stats"
    gate_hidden: int = 32
    gate_bias: float = -2.0
    detach_gate_inputs: bool = True
    drop_rate: float = 0.0
    layouts: dict[str, Layout] | None = None
    costs: list[float] | None = None
    input_size: tuple[int, int, int] | None = None
    policy: PolicyName = "gate"
    thresholds: list[float] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.head not in HEAD_TYPES:
            raise ValueError(f"head={self.head!r} is not a known head type; use one of {HEAD_TYPES}.")
        if self.gate not in GATE_TYPES:
            raise ValueError(f"gate={self.gate!r} is not a known gate type; use one of {GATE_TYPES}.")
        if self.input_size is not None:
            self.input_size = tuple(int(v) for v in self.input_size)  # type: ignore[assignment]
            if len(self.input_size) != 3 or min(self.input_size) < 1:
                raise ValueError(f"input_size={self.input_size} must be (C, H, W) with positive sizes.")
        self.exits = list(self.exits)
        policies = get_args(PolicyName)
        if self.policy not in policies:
            raise ValueError(f"policy={self.policy!r} is not an exit policy; use one of {policies}.")
        if self.thresholds is not None:
            if self.policy == "soft":
                raise ValueError("policy 'soft' takes no thresholds; set thresholds=None.")
            count_wrong = bool(self.exits) and len(self.thresholds) != len(self.exits)  # exits are known
            if count_wrong or not all(0 <= t <= 1 for t in self.thresholds):
                raise ValueError(
                    f"thresholds={self.thresholds} must hold one value in [0, 1] per early exit ({len(self.exits)})."
                )
        if self.layouts is not None:
            bad = {k: v for k, v in self.layouts.items() if v not in get_args(Layout)}
            if bad:
                raise ValueError(f"layouts {bad} are not layouts; use one of {get_args(Layout)}.")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        if d["input_size"] is not None:
            d["input_size"] = list(d["input_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExitConfig:
        """Build a config from `to_dict()` output, refusing unknown keys and newer versions."""
        version = int(d.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"exit config format_version {version} is newer than this timm-exits supports "
                f"({FORMAT_VERSION}); upgrade timm-exits to load it."
            )
        d = dict(d)
        if d.get("extra") == {}:  # an unused field, always empty, that older configs carry
            del d["extra"]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown exit config keys {unknown}; valid keys are {sorted(names)}.")
        return cls(**d)

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExitConfig:
        """Parse a JSON string written by `to_json()`."""
        return cls.from_dict(json.loads(text))
