"""Exit configuration: everything needed to rebuild the exits of a wrapped model.

`ExitConfig` is a plain dataclass that round-trips through JSON, so a multi-exit model can be
re-created from its backbone plus this config (see `timm_exits.hub`). Exit points are stored as
resolved module names, never as "auto", so a saved config keeps meaning the same exits even if the
placement rules change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .layout import Layout, TokenPool

__all__ = ["ExitConfig", "FORMAT_VERSION", "HeadKind", "GateKind", "PolicyName", "HEAD_TYPES", "GATE_TYPES"]

FORMAT_VERSION = 3  # 2: config.json records the weight files' SHA-256; 3: the exits' token pooling, measured costs
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
            backbone's FLOPs. None means measure them with fvcore (and measure them again when
            `reset_classifier` changes the class count).
        input_size: (C, H, W) used to probe shapes and count FLOPs.
        policy: Inference policy stored with the model ("gate", "confidence", "entropy", "soft").
        thresholds: Per-exit thresholds of that policy (None: the policy's default).
        format_version: Version of this layout; loaders refuse newer versions.
        token_pool: How exits reading a token sequence with class (prefix) tokens pool it: "token"
            (the class token) or "avg" (the mean of the other tokens). None: as the backbone's
            `global_pool` says when the exits are attached ("token" for "token", else "avg"); the
            model records what it chose, so a reloaded model pools as the saved one did even where
            the backbone's pool changed since (`reset_classifier(n, global_pool=...)`).
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
    token_pool: TokenPool | None = None

    def __post_init__(self) -> None:
        if self.head not in HEAD_TYPES:
            raise ValueError(f"head={self.head!r} is not a known head type; use one of {HEAD_TYPES}.")
        if self.gate not in GATE_TYPES:
            raise ValueError(f"gate={self.gate!r} is not a known gate type; use one of {GATE_TYPES}.")
        self._check_numbers()
        if self.input_size is not None:
            sizes = _plain(self.input_size)
            if not isinstance(sizes, list) or len(sizes) != 3 or not all(_is_int(v) and v >= 1 for v in sizes):
                raise ValueError(f"input_size={self.input_size!r} must be (C, H, W) with positive integer sizes.")
            self.input_size = tuple(int(v) for v in sizes)  # type: ignore[assignment]
        exits = _plain(self.exits)
        if not isinstance(exits, list) or not all(isinstance(e, str) or _is_number(e) for e in exits):
            raise ValueError(f"exits={self.exits!r} must be a list of module names.")
        self.exits = exits
        policies = get_args(PolicyName)
        if self.policy not in policies:
            raise ValueError(f"policy={self.policy!r} is not an exit policy; use one of {policies}.")
        if self.thresholds is not None:
            self._check_thresholds()
        if self.costs is not None:
            self._check_costs()
        if self.layouts is not None:
            if not isinstance(self.layouts, dict) or not all(isinstance(k, str) for k in self.layouts):
                raise ValueError(f"layouts={self.layouts!r} must map module names to layouts, or be None.")
            bad = {k: v for k, v in self.layouts.items() if v not in get_args(Layout)}
            if bad:
                raise ValueError(f"layouts {bad} are not layouts; use one of {get_args(Layout)}.")
        if self.token_pool is not None and self.token_pool not in get_args(TokenPool):
            raise ValueError(f"token_pool={self.token_pool!r} is not a pooling; use one of {get_args(TokenPool)}.")

    def _check_numbers(self) -> None:
        """Refuse scalar fields of the wrong type or range (a damaged config.json), keeping numbers as Python's."""
        for name, low in (("num_classes", 0), ("head_hidden", 1), ("gate_hidden", 0), ("format_version", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer of at least {low}.")
            setattr(self, name, int(value))
        if not _is_number(self.gate_bias) or not math.isfinite(self.gate_bias):
            raise ValueError(f"gate_bias={self.gate_bias!r} must be a finite number.")
        if not _is_number(self.drop_rate) or not 0 <= self.drop_rate <= 1:
            raise ValueError(f"drop_rate={self.drop_rate!r} must be a number in [0, 1].")
        self.gate_bias, self.drop_rate = float(self.gate_bias), float(self.drop_rate)
        if not isinstance(self.detach_gate_inputs, bool):
            raise ValueError(f"detach_gate_inputs={self.detach_gate_inputs!r} must be True or False.")

    def _check_thresholds(self) -> None:
        if self.policy == "soft":
            raise ValueError("policy 'soft' takes no thresholds; set thresholds=None.")
        values = _plain(self.thresholds)
        count_wrong = not isinstance(values, list) or (bool(self.exits) and len(values) != len(self.exits))
        if count_wrong or not all(_is_number(t) and 0 <= t <= 1 for t in values):
            raise ValueError(
                f"thresholds={self.thresholds!r} must hold one value in [0, 1] per early exit ({len(self.exits)})."
            )
        self.thresholds = [float(t) for t in values]

    def _check_costs(self) -> None:
        values = _plain(self.costs)
        count_wrong = not isinstance(values, list) or (bool(self.exits) and len(values) != len(self.exits) + 1)
        if count_wrong or not all(_is_number(c) and math.isfinite(c) and c >= 0 for c in values):
            raise ValueError(
                f"costs={self.costs!r} must hold one finite, non-negative value per exit, the final exit last "
                f"({len(self.exits) + 1}), or be None."
            )
        self.costs = [float(c) for c in values]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        if d["input_size"] is not None:
            d["input_size"] = list(d["input_size"])
        for key in ("thresholds", "costs"):  # set after construction, perhaps as numpy values
            values = _plain(d[key])
            if isinstance(values, list) and all(_is_number(v) for v in values):
                d[key] = [float(v) for v in values]
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


def _is_int(value: Any) -> bool:
    """Whether `value` is an integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """Whether `value` is a real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(values: Any) -> Any:
    """A tuple or numpy array as a list; anything else (a string, a scalar, a dict) as it is."""
    if hasattr(values, "tolist") and not isinstance(values, numbers.Number):
        values = values.tolist()
    return list(values) if isinstance(values, tuple) else values
