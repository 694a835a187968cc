"""Per-exit costs measured with fvcore.

fvcore's `by_module()` is not cumulative and charges functional ops to the root module, so summing
it in order is wrong. Instead the backbone is traced once with fvcore's scoped JIT tracer and the
graph's nodes are walked in execution order, accumulating fvcore's per-op counts; the cumulative
count after the last node inside a module's scope is the cost of running the backbone up to that
module. One multiply-add counts as one flop, as everywhere in fvcore.

Attention: neither fvcore nor torch's own counter counts `scaled_dot_product_attention` on CPU, so
a handle for it (B * H * N * M * (d + dv)) is registered here.

The trace runs the plain backbone (exit hooks inactive): fvcore must never trace the early-stop
path, whose exception kills the process inside the JIT tracer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():  # fvcore's import touches the deprecated torch.jit.script
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_analysis import _get_scoped_trace_graph
    from fvcore.nn.jit_handles import get_shape

from ._utils import evaluating

__all__ = ["sdpa_flop_jit", "cumulative_flops", "module_flops"]


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for `aten::scaled_dot_product_attention`: Q @ K^T plus P @ V."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for s in q[:-2]:
        batch *= s
    n, d = q[-2], q[-1]
    m, dv = k[-2], v[-1]
    return int(batch * n * m * (d + dv))


def _analysis(module: nn.Module, inputs: tuple) -> FlopCountAnalysis:
    fca = FlopCountAnalysis(module, inputs)
    fca.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return fca


def cumulative_flops(model: nn.Module, example: torch.Tensor, points: Sequence[str]) -> tuple[dict[str, int], int]:
    """Flops of running `model` on `example` up to the end of each module in `points`.

    Args:
        model: The backbone (traced in eval mode; its train/eval flags are restored).
        example: Input batch, usually of size 1.
        points: Module names.

    Returns:
        ({name: cumulative flops}, total flops of the whole forward). A module in which no
        counted op runs gets the cumulative count of the last counted op before it ended.
    """
    fca = _analysis(model, (example,))
    handles = fca._op_handles
    with warnings.catch_warnings(), torch.no_grad(), evaluating(model), _no_hooks_left(model):
        warnings.simplefilter("ignore")
        try:
            graph = _get_scoped_trace_graph(model, (example,), fca._aliases)
        except RuntimeError as e:  # torch.jit's tracer: outputs it cannot hold (dataclasses, ints in tuples)
            raise ValueError(
                f"fvcore could not trace {type(model).__name__} to measure its FLOPs ({str(e).splitlines()[0]}); "
                "its forward must return tensors (a logits tensor for wrap()). Pass costs=[...] to skip the "
                "measurement."
            ) from e
    canonical = {p: fca.canonical_module_name(p) for p in points}
    prefixes = {p: (c + ".", c) for p, c in canonical.items()}
    running = 0
    marks: dict[str, int] = {}
    for node in graph.nodes():
        kind = node.kind()
        if kind == "prim::PythonOp":
            kind = kind + "." + node.pyname()
        handle = handles.get(kind)
        if handle is not None:
            counts = handle(list(node.inputs()), list(node.outputs()))
            running += int(counts if isinstance(counts, (int, float)) else sum(counts.values()))
        scope = node.scopeName().split("/")[-1]
        for p, (dotted, exact) in prefixes.items():
            if scope == exact or scope.startswith(dotted):
                marks[p] = running
    missing = [p for p in points if p not in marks]
    if missing:
        raise ValueError(
            f"no traced operation ran inside {missing}; these modules cannot be costed. Pick modules "
            "that compute something, or pass costs=[...] explicitly."
        )
    return marks, running


@contextlib.contextmanager
def _no_hooks_left(model: nn.Module) -> Iterator[None]:
    """Remove the hooks fvcore's scoped trace adds to every module even when the trace fails or is interrupted
    (fvcore removes them only after a trace that finishes)."""
    before = {m: (set(m._forward_pre_hooks), set(m._forward_hooks)) for m in model.modules()}
    try:
        yield
    finally:
        for m, (pre, post) in before.items():
            for key in set(m._forward_pre_hooks) - pre:
                del m._forward_pre_hooks[key]
                m._forward_pre_hooks_with_kwargs.pop(key, None)
            for key in set(m._forward_hooks) - post:
                del m._forward_hooks[key]
                m._forward_hooks_with_kwargs.pop(key, None)
                m._forward_hooks_always_called.pop(key, None)


def module_flops(module: nn.Module, inputs: tuple) -> int:
    """Total fvcore flops of `module(*inputs)` (attention included)."""
    with warnings.catch_warnings(), torch.no_grad(), evaluating(module):
        warnings.simplefilter("ignore")
        return int(_analysis(module, inputs).total())
