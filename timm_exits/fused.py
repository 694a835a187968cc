"""A compiled fast path for one exit at small batches on the CPU.

Between two backbone stages every PyTorch kernel an exit launches runs with the backbone's code and
data in the caches, at several times its cost in a warm loop (`benchmarks/exit_cost_in_place.py`);
at batch 1 an exit's cost is the number of kernels it launches, not its FLOPs. This module runs a
whole exit (pool, LayerNorm, hidden layer, classifier, confidence statistics, gate) as one C call
on the parameters in place, so `ExitBranch.infer` costs one call instead of about fifteen kernels.

The C source (`fused_exit.c`, shipped with the package) is compiled with the system C compiler at
first use into a per-user cache (`$TIMM_EXITS_CACHE`, else `$XDG_CACHE_HOME/timm_exits`, else
`~/.cache/timm_exits`), keyed by the source, compiler, flags and CPU, and loaded with ctypes. Where
there is no compiler, or an exit or input is outside what the kernel covers (a conv head, training
mode, autograd, autocast, non-float32 or non-CPU tensors, large inputs), `ExitBranch.infer` runs
its PyTorch reference instead; both give the same results to float rounding (tests/test_fused.py).
`TIMM_EXITS_FUSED=0` or `set_fused(False)` turns the fast path off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .gates import NUM_STATS

__all__ = ["MAX_ELEMENTS", "RULES", "FusedExits", "fused_available", "set_fused", "run_fused", "run_fused_decide"]

_log = logging.getLogger(__name__)

# Above this many elements in a branch-point tensor the single-threaded C pooling loses to PyTorch's
# multi-threaded mean (resnet18's first exit holds 200,704 elements per sample at 224 px).
MAX_ELEMENTS = 1 << 20

_FLAGS = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
_ENABLED = os.environ.get("TIMM_EXITS_FUSED", "1") != "0"

# Exit rules the kernel applies itself (`RULE_*` in fused_exit.c), as `timm_exits.policies.exit_mask`.
RULES = {"gate": 1, "confidence": 2, "entropy": 3}


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


class _Plan(ctypes.Structure):
    """Mirror of `exit_plan` in fused_exit.c."""

    _fields_ = [
        ("channels", ctypes.c_int64),
        ("ln_w", ctypes.c_void_p),
        ("ln_b", ctypes.c_void_p),
        ("ln_eps", ctypes.c_float),
        ("hid_w", ctypes.c_void_p),
        ("hid_b", ctypes.c_void_p),
        ("hidden", ctypes.c_int64),
        ("fc_w", ctypes.c_void_p),
        ("fc_b", ctypes.c_void_p),
        ("classes", ctypes.c_int64),
        ("gate_stats", ctypes.c_int64),
        ("gate_features", ctypes.c_int64),
        ("g1_w", ctypes.c_void_p),
        ("g1_b", ctypes.c_void_p),
        ("gate_hidden", ctypes.c_int64),
        ("g2_w", ctypes.c_void_p),
        ("g2_b", ctypes.c_void_p),
    ]


def set_fused(enabled: bool) -> bool:
    """Turn the compiled exit path on or off for this process.

    Returns:
        The previous setting.
    """
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


def fused_available() -> bool:
    """Whether the compiled exit path is on and its library compiled and loaded here."""
    return _ENABLED and _library() is not None


def _cache_dir() -> Path:
    if os.environ.get("TIMM_EXITS_CACHE"):
        return Path(os.environ["TIMM_EXITS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "timm_exits"


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compile(cc: str, source_text: bytes, target: Path, flags: list[str]) -> bool:
    """Compile `source_text` into `target`; every file is private to this call until the atomic
    rename, so processes compiling at the same time cannot see each other's half-written files."""
    fd, src = tempfile.mkstemp(suffix=".c", dir=target.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(source_text)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, src, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            _log.info("compiling fused_exit.c with %s failed: %s", flags, done.stderr.strip()[-2000:])
            return False
        os.replace(tmp, target)
        return True
    finally:
        for path in (src, tmp):
            if os.path.exists(path):
                os.unlink(path)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Compile (once per machine and source) and load fused_exit.c; None where that is not possible."""
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    cc = shutil.which(cc) or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        _log.info("no C compiler found: exits run on PyTorch kernels")
        return None
    source_text = resources.files("timm_exits").joinpath("fused_exit.c").read_bytes()
    native = [*_FLAGS, "-march=native"] if platform.machine() in ("x86_64", "AMD64") else list(_FLAGS)
    try:
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        for flags in (native, list(_FLAGS)):
            key = hashlib.sha256(b"\0".join([source_text, cc.encode(), " ".join(flags).encode(), _cpu_id().encode()]))
            target = cache / f"fused_exit_{key.hexdigest()[:16]}.so"
            if not target.exists() and not _compile(cc, source_text, target, flags):
                continue
            lib = ctypes.CDLL(str(target))
            fn = lib.exit_infer
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(_Plan), ctypes.c_void_p, *[ctypes.c_int64] * 5, ctypes.c_void_p]
            fn.argtypes += [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            fn.argtypes += [ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]
            return lib
    except (OSError, subprocess.SubprocessError) as e:
        _log.info("the compiled exit path is unavailable (%s): exits run on PyTorch kernels", e)
    return None


class _Compiled:
    """An exit as the kernel reads it (`plan` None where the kernel does not implement the exit), and
    what must stay the same for that to hold."""

    __slots__ = (
        "head",
        "drop",
        "slots",
        "params",
        "ptrs",
        "shapes",
        "plan",
        "plan_ref",
        "gate_in",
        "gate_stats",
        "gate_features",
        "channels",
        "classes",
        "layout",
        "prefix",
        "token_pool",
    )

    def is_current(self) -> bool:
        """Same modules in the same places; the parameters the kernel reads at the same addresses
        with the same shapes (a replaced parameter or `.data` shows as a new address)."""
        for parent, name, obj in self.slots:
            if parent.get(name) is not obj:
                return False
        for (owner, name), ptr, shape in zip(self.params, self.ptrs, self.shapes):
            t = owner.get(name)
            if t is None or t.data_ptr() != ptr or t.shape != shape:
                return False
        return True


class _Holder:
    """Keeps a branch's `_Compiled` in the branch's __dict__; deep copies and pickles of the branch get
    an empty holder (the plan holds raw addresses of this branch's tensors)."""

    __slots__ = ("compiled",)

    def __init__(self) -> None:
        self.compiled: _Compiled | None = None

    def __deepcopy__(self, memo: dict) -> _Holder:
        return _Holder()

    def __reduce__(self) -> tuple:
        return (_Holder, ())


def _slot(parent: nn.Module, name: str, kind: str = "_modules") -> tuple[dict, str, Any]:
    container = getattr(parent, kind)
    return container, name, container.get(name)


def _kernel_tensors(head: nn.Module, gate: nn.Module) -> list[torch.Tensor | None] | None:
    """The tensors fused_exit.c reads, in `_Plan` order (None for absent layers), or None if the
    exit's layers are outside what it implements."""
    if head.conv is not None or not isinstance(head.fc, nn.Linear) or head.fc.bias is None:
        return None
    if isinstance(head.norm, nn.LayerNorm):
        if head.norm.weight is None or head.norm.bias is None or len(head.norm.normalized_shape) != 1:
            return None
        ln = [head.norm.weight, head.norm.bias]
    elif isinstance(head.norm, nn.Identity):
        ln = [None, None]
    else:
        return None
    if isinstance(head.hidden, nn.Sequential):
        linear, act = head.hidden
        if not (isinstance(act, nn.GELU) and act.approximate == "none" and linear.bias is not None):
            return None
        hid = [linear.weight, linear.bias]
    elif isinstance(head.hidden, nn.Identity):
        hid = [None, None]
    else:
        return None
    if isinstance(gate.mlp, nn.Linear):
        g = [gate.mlp.weight, gate.mlp.bias, None, None]
    else:
        first, act, last = gate.mlp
        if not isinstance(act, nn.ReLU) or last.bias is None:
            return None
        g = [first.weight, first.bias, last.weight, last.bias]
    if g[1] is None:
        return None
    tensors = [*ln, *hid, head.fc.weight, head.fc.bias, *g]
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()):
            return None
    return tensors if _shapes_fit(tensors) else None


def _shapes_fit(tensors: list[torch.Tensor | None]) -> bool:
    """Whether the shapes chain as the kernel reads them (it indexes raw memory: a mismatch the
    module path would reject must not reach it)."""
    ln_w, ln_b, hid_w, hid_b, fc_w, fc_b, g1_w, g1_b, g2_w, g2_b = tensors
    if fc_w.ndim != 2 or g1_w.ndim != 2 or fc_b.shape != (fc_w.shape[0],) or g1_b.shape != (g1_w.shape[0],):
        return False
    channels = fc_w.shape[1] if hid_w is None else hid_w.shape[1]
    if ln_w is not None and (ln_w.shape != (channels,) or ln_b.shape != (channels,)):
        return False
    if hid_w is not None and (hid_w.ndim != 2 or hid_b.shape != (hid_w.shape[0],) or fc_w.shape[1] != hid_w.shape[0]):
        return False
    if g2_w is None:
        return g1_w.shape[0] == 1
    return g2_w.shape == (1, g1_w.shape[0]) and g2_b.shape == (1,)


def _compile_branch(branch: nn.Module) -> _Compiled:
    head, gate = branch.head, branch.gate
    c = _Compiled()
    c.head, c.drop = head, head.drop
    c.layout, c.prefix, c.token_pool = head.pool.layout, head.pool.num_prefix_tokens, head.pool.token_pool
    modules = list(branch.modules())
    c.slots = tuple(_slot(m, n) for m in modules for n in m._modules)
    tensors = _kernel_tensors(head, gate)
    # each tensor the kernel reads, found again through its owner's _parameters on every check
    owners = {id(t): (m._parameters, n) for m in modules for n, t in m._parameters.items() if t is not None}
    present = [] if tensors is None else [t for t in tensors if t is not None]
    c.params = tuple(owners[id(t)] for t in present)
    c.ptrs = tuple(t.data_ptr() for t in present)
    c.shapes = tuple(t.shape for t in present)
    c.plan = None if tensors is None else _plan(branch, tensors)
    c.plan_ref = None if c.plan is None else ctypes.byref(c.plan)
    c.gate_in = 0 if tensors is None else tensors[6].shape[1]
    if c.plan is not None:
        # the gate input is the statistics (3 per exit so far) and/or the features: gate_in must
        # equal gate_stats * (n_prev + 3) + gate_features, with gate_features counted in floats
        width = c.plan.hidden or c.plan.channels
        c.gate_stats = c.plan.gate_stats
        c.gate_features = c.plan.gate_features * width
        c.channels, c.classes = c.plan.channels, c.plan.classes
    return c


def _plan(branch: nn.Module, tensors: list[torch.Tensor | None]) -> _Plan:
    ln_w, ln_b, hid_w, hid_b, fc_w, fc_b, g1_w, g1_b, g2_w, g2_b = tensors

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    return _Plan(
        channels=(hid_w if hid_w is not None else fc_w).shape[1],
        ln_w=ptr(ln_w),
        ln_b=ptr(ln_b),
        ln_eps=branch.head.norm.eps if ln_w is not None else 0.0,
        hid_w=ptr(hid_w),
        hid_b=ptr(hid_b),
        hidden=0 if hid_w is None else hid_w.shape[0],
        fc_w=ptr(fc_w),
        fc_b=ptr(fc_b),
        classes=fc_w.shape[0],
        gate_stats=int(branch.gate.kind in ("stats", "both")),
        gate_features=int(branch.gate.kind in ("features", "both")),
        g1_w=ptr(g1_w),
        g1_b=ptr(g1_b),
        gate_hidden=0 if g2_w is None else g1_w.shape[0],
        g2_w=ptr(g2_w),
        g2_b=ptr(g2_b),
    )


def _compiled(branch: nn.Module) -> _Compiled:
    holder = branch.__dict__.get("_fused")
    if holder is None:
        holder = branch.__dict__["_fused"] = _Holder()  # a plain attribute, not a parameter, buffer or state
    c = holder.compiled
    if c is None or not c.is_current():
        c = holder.compiled = _compile_branch(branch)
    return c


def _geometry(x: torch.Tensor, layout: str, prefix: int, token_pool: str) -> tuple[int, int, int, int, int] | None:
    """(byte offset, rows, row stride, channel stride, channels) of the pooling, or None if the
    tensor's strides do not let the kernel read it as (rows, channels) per sample."""
    s = x.stride()
    if layout == "NCHW" and x.ndim == 4:
        if x.shape[2] > 1 and x.shape[3] > 1 and s[2] != x.shape[3] * s[3]:
            return None
        return 0, x.shape[2] * x.shape[3], s[3], s[1], x.shape[1]
    if layout == "NHWC" and x.ndim == 4:
        if x.shape[1] > 1 and x.shape[2] > 1 and s[1] != x.shape[2] * s[2]:
            return None
        return 0, x.shape[1] * x.shape[2], s[2], s[3], x.shape[3]
    if layout == "NLC" and x.ndim == 3:
        if token_pool == "token":
            return 0, 1, s[1], s[2], x.shape[2]
        if x.shape[1] <= prefix:
            return None
        return prefix * s[1] * x.element_size(), x.shape[1] - prefix, s[1], s[2], x.shape[2]
    if layout == "NC" and x.ndim == 2:
        return 0, 1, 0, s[1], x.shape[1]
    return None


def run_fused(
    branch: nn.Module, x: torch.Tensor, prev_stats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`ExitBranch.infer` in one compiled call, or None where the kernel does not serve this exit or
    input (the caller then runs the PyTorch reference).

    Args:
        branch: The `ExitBranch`.
        x: Its branch-point tensor, (B, ...).
        prev_stats: (B, 3 * position) statistics of the earlier exits.

    Returns:
        (logits (B, K), gate logits (B,), statistics (B, 3 * (position + 1))), all float32.
    """
    fn = _ready()
    compiled = None if fn is None else _usable(branch)
    out = None if compiled is None else _call(fn, compiled, x, prev_stats, 0, 0.0)
    return None if out is None else out[:3]


def run_fused_decide(
    branch: nn.Module, x: torch.Tensor, prev_stats: torch.Tensor, policy: str, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int] | None:
    """`run_fused` plus the exit decision of `policy` ("gate", "confidence" or "entropy") at
    `threshold`, taken in the same call, so deciding costs no further kernel or host sync.

    Returns:
        (logits, gate logits, statistics, (B,) bool mask of the samples that leave (None at batch 1,
        where the count says it), how many leave), or None where the kernel does not serve this exit
        or input.
    """
    fn = _ready()
    compiled = None if fn is None else _usable(branch)
    return None if compiled is None else _call(fn, compiled, x, prev_stats, RULES[policy], threshold)


class FusedExits:
    """The compiled calls of every exit of one hard-path forward, looked up and checked once before
    the backbone runs, so that between two stages an exit costs one input check and one call.

    Args:
        branches: The model's `ExitBranch`es, in order.
        policy: "gate", "confidence" or "entropy"; None leaves the decision to the caller.
        thresholds: One threshold per branch (with a policy).
    """

    def __init__(self, fn: Any, branches: list[nn.Module], policy: str | None, thresholds: list[float] | None) -> None:
        self.fn = fn
        self.rule = RULES[policy] if policy is not None else 0
        self.thresholds = thresholds or [0.0] * len(branches)
        self.exits = [_usable(b) for b in branches]

    @classmethod
    def prepare(
        cls,
        branches: list[nn.Module],
        device: torch.device,
        policy: str | None = None,
        thresholds: list[float] | None = None,
    ) -> FusedExits | None:
        """The prepared calls for a forward on `device`, or None where the compiled path is off for
        it (not the CPU, switched off, no compiler, autograd or autocast on)."""
        fn = _ready() if device.type == "cpu" else None
        return None if fn is None else cls(fn, branches, policy, thresholds)

    def run(
        self, position: int, x: torch.Tensor, prev_stats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int] | None:
        """`run_fused_decide` for the exit at `position` (without a policy: the mask None and the
        count -1, nothing decided), or None where the kernel does not serve it."""
        compiled = self.exits[position]
        if compiled is None:
            return None
        return _call(self.fn, compiled, x, prev_stats, self.rule, self.thresholds[position])


def _ready() -> Any:
    """The kernel's entry point if the compiled path may run now, else None."""
    if not _ENABLED or torch.is_grad_enabled() or _cpu_autocast():
        return None
    lib = _library()
    return None if lib is None else lib.exit_infer


def _usable(branch: nn.Module) -> _Compiled | None:
    compiled = _compiled(branch)
    if compiled.plan is None or compiled.head.training or compiled.drop.training:
        return None  # not implemented here, or dropout in the head: the reference runs
    return compiled


def _call(fn: Any, compiled: _Compiled, x: torch.Tensor, prev_stats: torch.Tensor, rule: int, threshold: float) -> Any:
    if (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or x.numel() > MAX_ELEMENTS
        or prev_stats.dtype != torch.float32
        or prev_stats.device.type != "cpu"
        or not prev_stats.is_contiguous()
    ):
        return None
    geometry = _geometry(x, compiled.layout, compiled.prefix, compiled.token_pool)
    if geometry is None:
        return None
    offset, rows, s_row, s_chan, channels = geometry
    batch, n_prev = x.shape[0], prev_stats.shape[1]
    if (
        prev_stats.shape[0] != batch
        or channels != compiled.channels
        or compiled.gate_in != compiled.gate_stats * (n_prev + NUM_STATS) + compiled.gate_features
    ):
        return None  # shapes that do not fit: the reference raises the error that explains it
    logits = torch.empty(batch, compiled.classes)
    stats = torch.empty(batch, n_prev + NUM_STATS)
    gate = torch.empty(batch)
    leave = torch.empty(batch, dtype=torch.bool) if rule and batch > 1 else None  # batch 1: n_leave says it
    n_leave = fn(
        compiled.plan_ref,
        x.data_ptr() + offset,
        batch,
        x.stride(0),
        rows,
        s_row,
        s_chan,
        prev_stats.data_ptr(),
        n_prev,
        logits.data_ptr(),
        stats.data_ptr(),
        gate.data_ptr(),
        rule,
        threshold,
        None if leave is None else leave.data_ptr(),
    )
    if n_leave == -1:
        raise MemoryError("the compiled exit path could not allocate its scratch memory")
    if n_leave == -2:  # a gate value at the threshold: decide with PyTorch's sigmoid, as exit_mask does
        leave = torch.sigmoid(gate) >= threshold
        n_leave = int(leave.sum())
    return logits, gate, stats, leave, n_leave if rule else -1
