"""The typed recipe: `Recipe` and its sections, checked and converted from their annotations.

A `Recipe` holds the run's ``name`` and ``seed`` and six sections, plain dataclasses whose fields are
the recipe keys, each with its type, default and a comment:

* ``method`` (`MethodSection`): the training method and its loss.
* ``model`` (`ModelSection`): the timm backbone, the weights it starts from, and the exits.
* ``data`` (`DataSection`): data set, splits, batches, augmentation and mixup.
* ``optim`` (`OptimSection`): training stages, optimizer, schedule, EMA and precision.
* ``eval`` (`EvalSection`): the report after training (gate re-fit, calibration, stored policy, timing).
* ``runtime`` (`RuntimeSection`): device, threads, checkpoints and progress bars.

Key names are unique over the sections, so a recipe reads as one flat mapping (`Recipe.flat`: the keys
of recipe files and run folders) or as a sectioned one (`Recipe.to_dict`: ``optim: {lr: 0.1}``), and
`Recipe.from_dict` takes either, plus overrides as ``key=value`` or ``section.key=value``. Every value is
checked against its field's annotation and converted (YAML may give ``1e-3`` as a string; a
`typing.Literal` lists the choices), so adding a key is adding one field. Runtime keys (`RUNTIME_KEYS`:
every key of a section with ``RUNTIME = True`` and the fields declared with `runtime`) do not change
what a run trains and may change when it is resumed or evaluated.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin, get_type_hints

import yaml

from ..core.config import GateKind, HeadKind, PolicyName
from .recipe_types import RecipeError, RecipeYamlDumper, convert_key, in_range, load_yaml

__all__ = [
    "METHODS",
    "LATER_KEYS",
    "RUNTIME_KEYS",
    "FLAT_KEYS",
    "SECTIONS",
    "RecipeError",
    "Recipe",
    "MethodSection",
    "ModelSection",
    "DataSection",
    "OptimSection",
    "EvalSection",
    "RuntimeSection",
    "runtime",
    "later",
    "parse_overrides",
]


# ------------------------------------------------------------------------------------------- types
MethodName = Literal["baseline", "branchynet", "soft"]
ExitReduction = Literal["sum", "mean"]  # == losses.EXIT_REDUCTIONS
DatasetName = Literal["digits", "cifar10", "cifar100", "cinic10", "imagefolder"]  # == data.DATASETS
AugmentName = Literal["auto", "crop_flip", "rrc", "timm"]  # == augment.AUGMENTS
AmpMode = Literal[None, "bf16", "fp16"]
FitGatesObjective = Literal["no_gain", "correct", "soft", "none"]  # == gate_fitting.GATE_OBJECTIVES + none
ProgressMode = Literal["auto", True, False]
METHODS: tuple[str, ...] = get_args(MethodName)


def _count_from_one(value: float) -> float | int:
    """A split size: a fraction below 1, a count (int) from 1 on."""
    return int(value) if value >= 1 else value


SplitSize = Annotated[float, _count_from_one]
Exits = str | list[str | int | float]

_RUNTIME = "timm_exits.runtime"
_LATER = "timm_exits.later"


def runtime(default: Any) -> Any:
    """Declare a runtime field: not part of a run's identity, free to change when the run is resumed.

    Args:
        default: The field's default.

    Returns:
        The dataclass field.
    """
    return field(default=default, metadata={_RUNTIME: True})


def later(default: Any) -> Any:
    """Declare a field added after runs were first recorded.

    At `default`, the value that trains what those runs trained, the key is left out of the identity, so a
    run recorded before the key existed still resumes.

    Args:
        default: The field's default.

    Returns:
        The dataclass field.
    """
    return field(default=default, metadata={_LATER: True})


def _floats(*values: float) -> Any:
    """A list field defaulting to `values` (a fresh list per recipe)."""
    return field(default_factory=lambda: list(values))


_INF = float("inf")
INTERPOLATIONS = (None, "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# learning-rate schedules: ours, then the timm schedulers that step every update and span the stage (timm's step
# and multistep decay at epoch 90 whatever the stage's length, with no recipe key to move it: left out)
SCHEDULES = ("none", "const", "constant", "onecycle", "cosine", "tanh", "poly", "rsqrt")


# ------------------------------------------------------------------------------------------ sections
class _Section:
    """Base of the sections: on construction every field is converted to its annotation, then `check` runs."""

    RUNTIME: ClassVar[bool] = False  # every key of the section is a runtime key

    def __post_init__(self) -> None:
        for f, hint in _hints(type(self)):
            setattr(self, f.name, convert_key(f.name, hint, getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Checks between the section's own keys (after conversion); raises `RecipeError`."""


@dataclass
class MethodSection(_Section):
    """The training method and its loss."""

    method: MethodName = "soft"  # baseline | branchynet | soft
    cost_weight: float = 0.1  # soft: lambda, weight of the expected cost
    cost_warmup: float = 0.2  # soft: fraction of all steps over which lambda rises linearly from 0
    exit_weight: float = 1.0  # soft: weight of the deep supervision (every exit's CE, as B-Net); 0 = literal
    exit_reduction: ExitReduction = later("sum")  # soft: sum | mean of the exits' CEs in the deep supervision
    branchynet_weights: list[float] | None = None  # branchynet: one weight per exit (default: all 1)
    label_smoothing: float = 0.0  # of every cross-entropy (with mixup: folded into the mixed targets)

    def check(self) -> None:
        if not 0 <= self.cost_warmup <= 1:
            raise RecipeError(f"cost_warmup must be a fraction in [0, 1], got {self.cost_warmup}.")
        in_range(self, "cost_weight", 0, _INF)
        in_range(self, "exit_weight", 0, _INF)
        in_range(self, "label_smoothing", 0, 1, high_open=True)
        if self.branchynet_weights is not None and any(w < 0 for w in self.branchynet_weights):
            raise RecipeError(f"branchynet_weights must be >= 0, got {self.branchynet_weights}.")


@dataclass
class ModelSection(_Section):
    """The timm backbone, the weights it starts from, and the exits attached to it."""

    model: str = "resnet18"  # any timm model name (timm_exits.training.models registers alexnet_cifar, vgg13_cifar)
    pretrained: bool = False  # ImageNet weights from timm / the HF Hub (needs network or a filled cache)
    weights: str | None = later(None)  # start the backbone from a timm checkpoint: local-dir:DIR, hf-hub:ORG/NAME, file
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # further timm.create_model arguments (drop_rate, ...)
    exits: Exits = "auto"  # "auto", "blocks", module names, feature_info indices or cost fractions
    head: HeadKind = "linear"  # exit head: linear | mlp | conv
    head_hidden: int = 256
    gate: GateKind = "stats"  # gate input: stats | features | both
    gate_hidden: int = 32
    gate_bias: float = -2.0  # initial gate logit (negative: gates start closed)
    detach_gate_inputs: bool = True
    exit_drop_rate: float = 0.0  # dropout in the exit heads
    costs: list[float] | None = None  # per-exit costs overriding the fvcore measurement (final exit included)
    init_checkpoint: str | None = None  # start from the weights of a run folder or checkpoint of the same architecture


@dataclass
class DataSection(_Section):
    """The data set, its held-out splits, batches, augmentation and mixup."""

    dataset: DatasetName = "digits"  # digits | cifar10 | cifar100 | cinic10 | imagefolder
    data_dir: str | None = runtime(None)  # root folder of the data set (cifar default: ./data)
    download: bool = runtime(False)  # let torchvision download CIFAR
    img_size: int = 32  # input size the images are resized / cropped to
    val_split: SplitSize = 0.1  # held out of train for calibration: fraction or count
    test_split: SplitSize = 0.2  # digits / folder trees without test/: fraction or count held out as test
    split_seed: int = 0  # seed of the held-out splits (independent of seed)
    max_train_samples: int | None = None  # use a fixed random subset of the train split (smoke tests)
    max_eval_samples: int | None = None  # same for val and test, drawn with split_seed
    batch_size: int = 128  # global batch, split over processes
    eval_batch_size: int = runtime(256)  # per process
    num_workers: int = runtime(2)  # loader processes of per-image data (array data sets are batched in memory)
    augment: AugmentName = "auto"  # crop_flip | rrc (array data, per batch) | timm (per image) | auto: rrc or timm
    crop_padding: int = 4  # crop_flip: reflect padding before the random crop
    crop_scale: list[float] = _floats(0.35, 1.0)  # random-resized-crop scale range (rrc and timm)
    crop_ratio: list[float] = _floats(0.75, 1.3333333333333333)
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5"
    re_prob: float = 0.0  # random erasing
    crop_pct: float = 1.0  # eval: resize to img_size / crop_pct, centre-crop img_size
    interpolation: str | None = None  # default: the backbone's
    mixup: float = 0.0  # timm Mixup alpha (soft targets)
    cutmix: float = 0.0
    mixup_prob: float = 1.0

    def check(self) -> None:
        for key in ("batch_size", "eval_batch_size", "img_size"):
            if getattr(self, key) < 1:
                raise RecipeError(f"recipe key {key!r} must be >= 1, got {getattr(self, key)}.")
        if len(self.crop_scale) != 2 or len(self.crop_ratio) != 2:
            raise RecipeError("crop_scale and crop_ratio take two numbers [low, high].")
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise RecipeError("mixup / cutmix need an even batch_size.")
        for key in ("hflip", "mixup_prob", "re_prob"):
            in_range(self, key, 0, 1)
        for key in ("mixup", "cutmix", "color_jitter", "crop_padding"):
            in_range(self, key, 0, _INF)
        in_range(self, "crop_pct", 0, 1, low_open=True)
        if self.interpolation not in INTERPOLATIONS:
            raise RecipeError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}.")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise RecipeError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}.")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise RecipeError(f"crop_ratio must be [low, high] with 0 < low <= high, got {self.crop_ratio}.")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise RecipeError(f"recipe key {key!r} must be >= 1 (or null for every sample), got {value}.")


@dataclass
class OptimSection(_Section):
    """Training stages, optimizer, learning-rate schedule, EMA and numerics."""

    epochs: int = 30  # joint training epochs
    frozen_epochs: int = 0  # epochs of a first stage on a frozen backbone (exit heads and gates only)
    frozen_lr: float | None = None  # learning rate of that stage (default: lr)
    frozen_train_classifier: bool = True  # train the backbone's own classifier in the frozen stage
    opt: str = "sgd"  # any timm optimizer (create_optimizer_v2)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    layer_decay: float | None = later(None)  # timm's layer-wise lr decay: group lr times layer_decay ** depth from top
    sched: str | None = "cosine"  # onecycle | any timm scheduler (create_scheduler_v2), stepped every update | none
    warmup_epochs: float = 0.0  # linear warm-up (onecycle: from lr / 25 up to lr, then cosine to lr / 2.5e5)
    warmup_lr: float = 1.0e-5
    min_lr: float = 0.0
    clip_grad: float | None = None  # max gradient norm
    ema: bool = False  # keep a timm ModelEmaV3; the EMA weights are validated, reported and saved
    ema_decay: float = 0.999
    amp: AmpMode = None  # None | bf16 | fp16 (fp16: CUDA only)
    channels_last: bool = False
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only): the global batch's statistics

    def check(self) -> None:
        if self.epochs < 0 or self.frozen_epochs < 0 or self.epochs + self.frozen_epochs == 0:
            raise RecipeError("epochs and frozen_epochs must be >= 0 and not both 0.")
        in_range(self, "lr", 0, _INF, low_open=True)
        in_range(self, "frozen_lr", 0, _INF, low_open=True)
        in_range(self, "momentum", 0, 1, high_open=True)
        in_range(self, "ema_decay", 0, 1, high_open=True)
        in_range(self, "clip_grad", 0, _INF, low_open=True)
        in_range(self, "layer_decay", 0, 1, low_open=True)
        for key in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr"):
            in_range(self, key, 0, _INF)
        sched = "none" if self.sched is None else self.sched
        if sched not in SCHEDULES:
            raise RecipeError(f"sched {self.sched!r} is not one of {SCHEDULES}.")
        if sched not in ("none", "const", "constant", "onecycle") and self.warmup_epochs != int(self.warmup_epochs):
            raise RecipeError(
                f"warmup_epochs={self.warmup_epochs}: timm's {sched!r} schedule warms up over whole epochs; give "
                f"{int(self.warmup_epochs)} or {int(self.warmup_epochs) + 1}, or use sched: onecycle."
            )
        from timm.optim import list_optimizers

        name = self.opt.lower().removeprefix("lookahead_")
        if name == "adahessian":  # its step reads second derivatives, from a backward with create_graph=True
            raise RecipeError("opt 'adahessian' needs a backward with create_graph=True; the trainer runs none.")
        if name not in list_optimizers():
            close = difflib.get_close_matches(name, list_optimizers(), n=3)
            raise RecipeError(
                f"opt {self.opt!r} is not a timm optimizer"
                + (f"; did you mean {close}?" if close else "")
                + " (timm.optim.list_optimizers() lists them)."
            )


@dataclass
class EvalSection(_Section):
    """The evaluation and report after training: gate re-fit, calibration, the stored policy and timing."""

    RUNTIME: ClassVar[bool] = True

    report: bool = True  # write the report and save the model at the end
    policy: PolicyName | None = None  # policy stored with the saved model (default: gate / entropy / confidence)
    fit_gates: FitGatesObjective = "no_gain"  # re-fit stats gates on the val split: no_gain | correct | soft | none
    calibrate_max_drop: float = 0.01  # thresholds: lowest cost within this accuracy drop of the final exit (val)
    calibrate_target_cost: float | None = None  # or: best accuracy at this expected cost (overrides max_drop)
    timing_images: int = 100  # test images timed one by one (batch 1)
    timing_repeats: int = 5  # timing passes; the median is reported
    timing_warmup: int = 10  # untimed images before timing

    def check(self) -> None:  # the ranges of `timm-exits eval` / `bench`'s options
        in_range(self, "calibrate_max_drop", 0, 1)
        in_range(self, "calibrate_target_cost", 0, _INF, low_open=True)
        in_range(self, "timing_repeats", 1, _INF)
        for key in ("timing_images", "timing_warmup"):
            in_range(self, key, 0, _INF)


@dataclass
class RuntimeSection(_Section):
    """Where and how a run executes: none of it changes what is trained."""

    RUNTIME: ClassVar[bool] = True

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads per process (default: torch's)
    checkpoint_every_steps: int | None = None  # also checkpoint every N steps within an epoch
    stop_after_steps: int | None = None  # debug: stop (as if killed) after N steps, without a final checkpoint
    progress: ProgressMode = "auto"  # tqdm bars: auto (only on a terminal) | true | false
    compile: bool = False  # run each stage's training forward and backward through torch.compile


_DEFAULT_POLICY = {"baseline": "confidence", "branchynet": "entropy", "soft": "gate"}


@dataclass
class Recipe:
    """A training recipe: the run's name and seed and its sections (see the module docstring).

    Construction converts and checks every value; ``eval.policy`` left at None becomes the method's
    policy. Build one with `from_dict` (flat or sectioned keys) or `timm_exits.training.recipe.load_recipe`.
    """

    name: str | None = None  # run name (default: the recipe file's name)
    method: MethodSection = field(default_factory=MethodSection)
    seed: int = 0  # seeds model init, data order, augmentation, mixup and dropout
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def __post_init__(self) -> None:
        for f, hint in _hints(Recipe):
            value = getattr(self, f.name)
            if f.name in SECTIONS:
                if not isinstance(value, SECTIONS[f.name]):
                    raise RecipeError(
                        f"recipe section {f.name!r} must be a {SECTIONS[f.name].__name__}, got {type(value).__name__}."
                    )
            else:
                setattr(self, f.name, convert_key(f.name, hint, value))
        self.validate()
        if self.eval.policy is None:
            self.eval = dataclasses.replace(self.eval, policy=_DEFAULT_POLICY[self.method.method])

    def validate(self) -> None:
        """Checks across sections (each section checks its own keys when built); raises `RecipeError`."""
        if self.model.init_checkpoint and (self.model.pretrained or self.model.weights):
            raise RecipeError(
                "init_checkpoint replaces every weight that pretrained / weights would load; drop init_checkpoint, "
                "or set pretrained=false and weights=null."
            )
        if self.optim.frozen_epochs and self.method.method == "baseline":
            raise RecipeError(
                "frozen_epochs with method 'baseline' would train nothing (the baseline trains only the backbone); "
                "use method 'soft' or 'branchynet' for a frozen stage."
            )

    # ------------------------------------------------------------------------------- as mappings
    def flat(self) -> dict[str, Any]:
        """Every key under its flat name (the names of recipe files and run folders), in `FLAT_KEYS` order."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECTIONS:
                out.update({s.name: copy.deepcopy(getattr(value, s.name)) for s in dataclasses.fields(value)})
            else:
                out[f.name] = copy.deepcopy(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a sectioned mapping: ``{"name", "method": {...}, "seed", "model": {...}, ...}``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | Sequence[str] | None = None,
    ) -> Recipe:
        """Build a recipe from flat or sectioned keys (or both), then overrides; missing keys take their defaults.

        Args:
            data: ``{"lr": 0.1}``, ``{"optim": {"lr": 0.1}}``, a `flat` or `to_dict` result, or None.
            overrides: Further keys, as a mapping or ``key=value`` strings (``lr=0.1``, ``optim.lr=0.1``,
                dotted keys into mappings: ``model_kwargs.drop_path_rate=0.1``).

        Returns:
            The converted and checked recipe.

        Raises:
            RecipeError: An unknown key or section (the message lists the valid ones), a value of the wrong
                type or outside its choices, or keys that contradict each other.
        """
        values: dict[str, Any] = {}
        for key, value in [*_flat_pairs(data or {}), *_flat_pairs(parse_overrides(overrides))]:
            _apply(values, key, value)
        top = {k: v for k, v in values.items() if FLAT_KEYS[k] is None}
        sections = {
            name: section(**{k: v for k, v in values.items() if FLAT_KEYS[k] == name})
            for name, section in SECTIONS.items()
        }
        return cls(**top, **sections)

    def to_json(self, indent: int | None = 2) -> str:
        """The sectioned recipe as JSON text (`from_json` reads it back)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """A recipe from JSON text of flat or sectioned keys."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe in JSON is an object of keys, got {type(data).__name__}.")
        return cls.from_dict(data)

    def to_yaml(self, flat: bool = False) -> str:
        """The recipe as YAML text, sectioned (default) or flat; ``load_recipe`` and `from_yaml` read both."""
        return yaml.dump(self.flat() if flat else self.to_dict(), Dumper=RecipeYamlDumper, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        """A recipe from YAML text of flat or sectioned keys (``base:`` needs a file: use ``load_recipe``)."""
        data = load_yaml(text) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe in YAML is a mapping of keys, got {type(data).__name__}.")
        if "base" in data:
            raise RecipeError("'base:' is only understood in recipe files; load the file with load_recipe.")
        return cls.from_dict(data)


# ------------------------------------------------------------------------------------- key tables
@functools.cache
def _hints(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """The fields of a dataclass with their resolved annotations (Annotated kept)."""
    hints = get_type_hints(cls, include_extras=True)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


# Sections by name, in the recipe's order.
SECTIONS: dict[str, type[_Section]] = {
    f.name: hint for f, hint in _hints(Recipe) if isinstance(hint, type) and issubclass(hint, _Section)
}


def _key_table() -> dict[str, str | None]:
    table: dict[str, str | None] = {}
    for f, _ in _hints(Recipe):
        names = [s.name for s in dataclasses.fields(SECTIONS[f.name])] if f.name in SECTIONS else [f.name]
        for key in names:
            if key in table:
                raise TypeError(f"recipe key {key!r} is declared twice ({table[key]} and {f.name}).")
            table[key] = f.name if f.name in SECTIONS else None
    return table


# Every flat key -> its section's name (None: a top-level key), in the order of `Recipe.flat`.
FLAT_KEYS: dict[str, str | None] = _key_table()

_FIELDS: dict[str, tuple[dataclasses.Field, Any]] = {
    f.name: (f, hint) for cls in (Recipe, *SECTIONS.values()) for f, hint in _hints(cls) if f.name in FLAT_KEYS
}

# Keys that may change between a run and its resumption without changing what is trained.
RUNTIME_KEYS: frozenset[str] = frozenset(
    k for k, s in FLAT_KEYS.items() if s is not None and (SECTIONS[s].RUNTIME or _FIELDS[k][0].metadata.get(_RUNTIME))
)

# Keys added after runs were first recorded, with the value that trains what those runs trained.
LATER_KEYS: dict[str, Any] = {k: f.default for k, (f, _) in _FIELDS.items() if f.metadata.get(_LATER)}


def _default(key: str) -> Any:
    f = _FIELDS[key][0]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else copy.deepcopy(f.default)


# ------------------------------------------------------------------------------ keys and overrides
def _unknown(key: str, valid: Sequence[str], section: str | None = None) -> RecipeError:
    """An unknown key's error: close names ("Did you mean"), then the valid keys (of the section)."""
    names = [*valid, *SECTIONS] if section is None else list(valid)
    close = difflib.get_close_matches(key, names, n=3)
    parts = set(key.split("_"))
    close += [k for k in names if k not in close and (k in parts or k.startswith(key))][: max(0, 3 - len(close))]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if section is None:
        return RecipeError(
            f"unknown recipe key {key!r}.{hint} Valid keys: {', '.join(valid)}. Sections (a mapping of their keys, "
            f"or section.key): {', '.join(SECTIONS)}."
        )
    home = FLAT_KEYS.get(key, "")
    elsewhere = f" {key!r} is a key of section {home!r}." if home else ""
    elsewhere = f" {key!r} is a top-level key." if home is None else elsewhere
    return RecipeError(
        f"unknown key {key!r} in recipe section {section!r}.{elsewhere}{hint} Valid keys of {section}: "
        f"{', '.join(valid)}."
    )


def _section_key(section: str, key: str) -> None:
    valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key.partition(".")[0] not in valid:
        raise _unknown(key.partition(".")[0], valid, section)


def _flat_pairs(data: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(flat or dotted key, value) pairs of a flat or sectioned mapping; keys of sections are checked here."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        key = str(key)
        head, dot, rest = key.partition(".")
        if dot and head in SECTIONS:  # section.key[.sub]
            _section_key(head, rest)
            out.append((rest, value))
        elif key in SECTIONS and (isinstance(value, Mapping) or key not in FLAT_KEYS):
            if not isinstance(value, Mapping):
                raise RecipeError(
                    f"recipe section {key!r} takes a mapping of its keys, got {value!r}; write {key}: {{KEY: value}} "
                    f"or {key}.KEY=value."
                )
            for sub, v in value.items():
                _section_key(key, str(sub))
                out.append((str(sub), v))
        else:
            out.append((key, value))
    return out


def _apply(values: dict[str, Any], key: str, value: Any) -> None:
    """Set flat key `key` (dotted: a key inside a mapping value) in `values`."""
    top, dot, sub = key.partition(".")
    if top not in FLAT_KEYS:
        raise _unknown(top, list(FLAT_KEYS))
    value = copy.deepcopy(value)
    if not dot:
        values[top] = value
        return
    if get_origin(_FIELDS[top][1]) is not dict:
        raise RecipeError(f"dotted key {key!r}: {top!r} is not a mapping; set it as {top}=value.")
    current = values.get(top, _default(top))
    current = copy.deepcopy(dict(current)) if isinstance(current, Mapping) else {}
    node = current
    parts = sub.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    values[top] = current


def parse_overrides(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Turn ``["lr=0.01", "optim.lr=0.01", "model_kwargs.drop_rate=0.1"]`` (YAML values) into a dict of overrides.

    Args:
        items: ``key=value`` strings, a mapping (returned as a dict), or None.

    Returns:
        Key -> value.
    """
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key=value.")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise RecipeError(f"override {item!r} has no key.")
        out.pop(key, None)  # a key given again moves to its last place: the last value given wins
        try:
            out[key] = load_yaml(text) if text.strip() else None
        except RecipeError as e:
            raise RecipeError(f"override {item!r}: {e}") from e
        if "#" in text and "#" not in json.dumps(out[key], default=str):
            hint = f"{key}='\"{text}\"'"
            raise RecipeError(f"override {item!r}: YAML reads ' #...' as a comment; quote the value: {hint}.")
    return out
