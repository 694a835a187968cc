"""Split a multi-exit model at one of its early exits into an edge part and a cloud part.

`split(model, at=k)` traces the backbone with `torch.fx` (timm's registered leaf modules and
autowrapped functions honoured, every exit module kept as a single leaf call) and cuts the graph
at the call of exit `k`'s module:

* the edge part (`EdgePart`) takes the image batch and runs the backbone up to and including that
  module, evaluating exits 0..k on the way (each exit's head and gate run right after its module,
  exactly where the wrapper's hook runs them). It returns `EdgeOutput(logits, gate_logits, stats,
  features)`: the logits of exits 0..k stacked (B, k+1, K), their gate logits (B, k+1), the
  confidence statistics the later gates read (B, 3 * (k+1)) and `features`, the exit module's output.
* the cloud part (`CloudPart`) takes `(features, stats)` and runs the rest of the backbone, the
  remaining early exits and the final head: `CloudOutput(logits, gate_logits)` with logits (B, m, K)
  of exits k+1.. (final head last) and gate logits (B, m - 1) of the remaining early exits.

`torch.cat([edge.logits, cloud.logits], 1)` equals `torch.stack(model(x).logits, 1)` and the gate
logits likewise. A backbone whose later layers read a tensor computed before the cut (other than
the cut itself, parameters and constants), e.g. a dense block or a multi-resolution network, cannot be
cut there; `split` names the node and the earlier value it needs. The parts are inference graphs
traced in eval mode (training-only Python branches such as drop-path are not recorded). They share
their modules with the model (nothing is copied): `model` is not modified, but moving or
re-moding a part moves or re-modes those shared modules.

Exporting a part: `timm_exits.deploy.export`.
"""

from __future__ import annotations

import copy
import inspect
import operator
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn

from ..core._utils import evaluating
from ..core.gates import NUM_STATS
from ..core.model import EarlyExitModel
from ..core.placement import probe
from ..core.soft import gates_with_final

__all__ = [
    "SplitError",
    "EdgeOutput",
    "CloudOutput",
    "EdgePart",
    "CloudPart",
    "Split",
    "split",
    "resolve_split_point",
]

_CHANNEL_AXIS = {"NCHW": 1, "NHWC": -1, "NLC": -1, "NC": -1}


class SplitError(ValueError):
    """The model cannot be split at the requested point (or the split parts disagree with it)."""


class EdgeOutput(NamedTuple):
    """Output of an `EdgePart`.

    Attributes:
        logits: (B, k+1, K) logits of exits 0..k.
        gate_logits: (B, k+1) gate logits of exits 0..k (gate value = sigmoid).
        stats: (B, 3 * (k+1)) confidence statistics of exits 0..k, read by the later gates.
        features: Output of exit k's backbone module, the input of the cloud part.
    """

    logits: torch.Tensor
    gate_logits: torch.Tensor
    stats: torch.Tensor
    features: torch.Tensor

    @property
    def gates(self) -> torch.Tensor:
        """(B, k+1) gate values sigmoid(gate logit)."""
        return torch.sigmoid(self.gate_logits.float())


class CloudOutput(NamedTuple):
    """Output of a `CloudPart`.

    Attributes:
        logits: (B, m, K) logits of the exits after the split, the backbone's final head last.
        gate_logits: (B, m - 1) gate logits of the remaining early exits (the final exit has no gate).
    """

    logits: torch.Tensor
    gate_logits: torch.Tensor

    @property
    def gates(self) -> torch.Tensor:
        """(B, m) gate values, the final exit's fixed to 1."""
        return gates_with_final(self.gate_logits)


class _Part(nn.Module):
    """Shared metadata of the two parts."""

    def __init__(self, net: fx.GraphModule, model: EarlyExitModel, index: int) -> None:
        super().__init__()
        self.net = net
        self.split_index = index
        self.exit_name = model.branches[index].name
        self.num_early_exits = len(model.branches)
        self.num_classes = model.num_classes
        self.input_size = tuple(model.config.input_size or ())
        self.feature_layout = model.exits[index].layout
        self.feature_shape: tuple[int, ...] = ()
        self.stats_dim = NUM_STATS * (index + 1)
        self.config = copy.deepcopy(model.config)

    @property
    def channel_axis(self) -> int:
        """Axis of `features` that holds the channels (used by per-channel compression)."""
        return _CHANNEL_AXIS.get(self.feature_layout, 1)

    def extra_repr(self) -> str:
        return f"at={self.exit_name!r} (exit {self.split_index}), features={self.feature_shape}"


class EdgePart(_Part):
    """Backbone up to exit k's module plus exits 0..k. `forward(x) -> EdgeOutput`."""

    def __init__(self, net: fx.GraphModule, model: EarlyExitModel, index: int) -> None:
        super().__init__(net, model, index)
        self.exit_names = [b.name for b in model.branches[: index + 1]]

    def forward(self, x: torch.Tensor) -> EdgeOutput:
        return EdgeOutput(*self.net(x))

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor]:
        """A random input batch of the model's configured input size."""
        param = next(self.parameters(), torch.empty(0))
        return (torch.randn(batch, *self.input_size, device=param.device, dtype=param.dtype),)


class CloudPart(_Part):
    """Rest of the backbone, exits k+1.. and the final head. `forward(features, stats) -> CloudOutput`."""

    def __init__(self, net: fx.GraphModule, model: EarlyExitModel, index: int) -> None:
        super().__init__(net, model, index)
        self.exit_names = [b.name for b in model.branches[index + 1 :]] + ["final"]

    @property
    def num_outputs(self) -> int:
        """Exits this part evaluates (m), the final head included."""
        return len(self.exit_names)

    def forward(self, features: torch.Tensor, stats: torch.Tensor) -> CloudOutput:
        return CloudOutput(*self.net(features, stats))

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Random `(features, stats)` of the shapes the edge part produces."""
        param = next(self.parameters(), torch.empty(0))
        features = torch.randn(batch, *self.feature_shape, device=param.device, dtype=param.dtype)
        return features, torch.rand(batch, self.stats_dim, device=param.device)


class Split(NamedTuple):
    """The two parts of a split model: `edge, cloud = split(model, at=k)`."""

    edge: EdgePart
    cloud: CloudPart


def _check_example(model: EarlyExitModel, example: Any) -> None:
    """Refuse an example the model cannot run as it is: not a batch, or another dtype or device than its weights."""
    if not torch.is_tensor(example) or example.ndim < 2 or example.shape[0] == 0:
        shape = tuple(example.shape) if torch.is_tensor(example) else type(example).__name__
        raise SplitError(f"example must be a non-empty input batch (B, C, H, W), got {shape}.")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and (example.dtype != param.dtype or example.device != param.device):
        raise SplitError(
            f"example is {example.dtype} on {example.device} but the model's parameters are {param.dtype} on "
            f"{param.device}; convert it with example.to({str(param.device)!r}, {param.dtype}) and split again."
        )


def _check_tensor_outputs(model: EarlyExitModel, x: torch.Tensor) -> None:
    """Refuse exits whose module returns more than one tensor: the parts pass one tensor between them."""
    kinds = probe(model.backbone, [b.name for b in model.branches], x).kinds
    other = {n: k for n, k in kinds.items() if k != "Tensor"}
    if other:
        raise SplitError(
            f"exit module(s) {other} return a {next(iter(other.values()))}, not one tensor; split() cuts the "
            "network where one tensor passes from the edge to the cloud. Wrap the model with exits at modules "
            "that return a tensor to split it."
        )


# ------------------------------------------------------------------------------------ tracing
def _no_stats(t: torch.Tensor) -> torch.Tensor:
    """(B, 0) float32 statistics: what the first exit's gate is given as 'earlier exits'."""
    return t.new_zeros((t.shape[0], 0), dtype=torch.float32)


def _no_gates(logits: torch.Tensor) -> torch.Tensor:
    """(B, 0) gate logits when no early exit follows the split."""
    return logits.new_zeros((logits.shape[0], 0))


class _ExitTracer(fx.Tracer):
    """FX tracer keeping timm's no-trace modules and the exit modules as leaf calls."""

    def __init__(self, leaves: set[str]) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self._leaf_names = leaves
        self._leaf_types = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _concrete_args(backbone: nn.Module) -> dict[str, Any]:
    """Defaults of every forward argument after the image (e.g. ViT's attn_mask=None), fixed for tracing."""
    params = list(inspect.signature(backbone.forward).parameters.values())
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise SplitError(
                f"{type(backbone).__name__}.forward needs argument {p.name!r} besides the image; only backbones "
                "called as backbone(x) can be split."
            )
        concrete[p.name] = p.default
    return concrete


def _trace(model: EarlyExitModel) -> fx.Graph:
    backbone = model.backbone
    tracer = _ExitTracer({b.name for b in model.branches})
    try:
        with evaluating(model):
            graph = tracer.trace(backbone, concrete_args=_concrete_args(backbone) or None)
    except SplitError:
        raise
    except Exception as e:
        raise SplitError(
            f"torch.fx could not trace {type(backbone).__name__} ({type(e).__name__}: {e}). Splitting needs a "
            "symbolically traceable backbone (timm's FX feature-extraction support); register the offending "
            "module or function with timm.layers.register_notrace_module / register_notrace_function, or "
            "split a different architecture."
        ) from e
    return graph


def resolve_split_point(model: EarlyExitModel, at: int | str) -> int:
    """0-based early-exit index of a split point given as an index or an exit's module name."""
    names = [b.name for b in model.branches]
    listing = ", ".join(f"{i}={n!r}" for i, n in enumerate(names))
    if isinstance(at, str):
        if at not in names:
            raise SplitError(f"{at!r} is not an early exit of this model; split at one of: {listing}.")
        return names.index(at)
    if isinstance(at, bool) or not isinstance(at, int):
        raise SplitError(f"at={at!r} must be an early-exit index (int) or an exit's module name (str).")
    if not 0 <= at < len(names):
        raise SplitError(
            f"at={at} is out of range: the model has {len(names)} early exits ({listing}); the final head is not a "
            "split point (split at the last early exit to send its features)."
        )
    return at


def _describe(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return f"{node.name} ({node.op} {node.target!r})"
    target = getattr(node.target, "__name__", node.target)
    return f"{node.name} ({node.op} {target})"


class _GraphBuilder:
    """Copies backbone nodes into a new graph, re-rooted under `backbone.`, and inserts exit calls."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.logits: list[fx.Node] = []
        self.gates: list[fx.Node] = []
        self.stats: fx.Node | None = None

    def copy(self, node: fx.Node) -> fx.Node:
        args = fx.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.map_arg(node.kwargs, lambda n: self.env[n])
        target = f"backbone.{node.target}" if node.op in ("call_module", "get_attr") else node.target
        new = self.graph.create_node(node.op, target, args, kwargs, name=node.name, type_expr=node.type)
        new.meta = dict(node.meta)
        self.env[node] = new
        return new

    def exit(self, index: int, features: fx.Node) -> None:
        g = self.graph
        prev = self.stats if self.stats is not None else g.call_function(_no_stats, (features,))
        out = g.call_module(f"branches.{index}", (features, prev))
        self.logits.append(g.call_function(operator.getitem, (out, 0)))
        self.gates.append(g.call_function(operator.getitem, (out, 1)))
        self.stats = g.call_function(operator.getitem, (out, 2))


def _locate(model: EarlyExitModel, graph: fx.Graph) -> dict[str, fx.Node]:
    found: dict[str, list[fx.Node]] = {b.name: [] for b in model.branches}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in found:
            found[node.target].append(node)
    for name, nodes in found.items():
        if len(nodes) != 1:
            raise SplitError(
                f"exit module {name!r} is called {len(nodes)} times in the traced graph of "
                f"{type(model.backbone).__name__}; a split point must be a module called exactly once."
            )
    return {name: nodes[0] for name, nodes in found.items()}


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(u in dep for u in node.all_input_nodes):
            dep.add(node)
    return dep


def _carried(nodes: list[fx.Node], cut: fx.Node, exit_name: str) -> list[fx.Node]:
    """Nodes before the cut that the cloud part must recompute (parameters and constants only)."""
    index = {n: i for i, n in enumerate(nodes)}
    c = index[cut]
    dep = _input_dependent(cut.graph)
    needed: set[fx.Node] = set()
    problems, missing_nodes = [], []
    for node in nodes[c + 1 :]:
        missing = []
        for u in node.all_input_nodes:
            if u is cut or index[u] > c:
                continue
            if u in dep:
                missing.append(_describe(u))
                missing_nodes.append(u)
            else:
                stack = [u]
                while stack:
                    v = stack.pop()
                    if v not in needed:
                        needed.add(v)
                        stack.extend(v.all_input_nodes)
        if missing:
            problems.append(f"{_describe(node)} needs {', '.join(missing)}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        sizes = all(_from_shape(u) for u in missing_nodes)
        why = (
            "sizes read from the input's shape (a patch grid's height and width, say) that the backbone hands to "
            "each later block itself, so no cut between those blocks works"
            if sizes
            else "split at a point whose output is the only tensor passed on (e.g. between stages, not inside a "
            "dense block or multi-branch stage)"
        )
        raise SplitError(
            f"cannot split at {exit_name!r}: layers after it read values computed before it, so its output alone "
            f"does not carry the state the rest of the network needs ({shown}): {why}."
        )
    return sorted(needed, key=index.__getitem__)


def _from_shape(node: fx.Node, depth: int = 6) -> bool:
    """Whether `node` is computed from a tensor's shape (``x.shape`` / ``x.size()``), not its values."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:2] == ("shape",):
        return True
    inputs = node.all_input_nodes
    return depth > 0 and bool(inputs) and all(_from_shape(u, depth - 1) for u in inputs)


def _root(model: EarlyExitModel) -> nn.Module:
    root = nn.Module()
    root.backbone = model.backbone
    root.branches = model.branches
    if model.final_head is not None:
        root.final_head = model.final_head
    return root


def _edge_graph(model: EarlyExitModel, nodes: list[fx.Node], exits: dict[str, fx.Node], k: int) -> fx.Graph:
    b = _GraphBuilder()
    cut = exits[model.branches[k].name]
    exit_of = {exits[br.name]: br.position for br in model.branches[: k + 1]}
    for node in nodes:
        b.copy(node)
        if node in exit_of:
            b.exit(exit_of[node], b.env[node])
        if node is cut:
            break
    g = b.graph
    logits = g.call_function(torch.stack, (b.logits,), {"dim": 1})
    gates = g.call_function(torch.stack, (b.gates,), {"dim": 1})
    g.output((logits, gates, b.stats, b.env[cut]))
    return g


def _cloud_graph(model: EarlyExitModel, nodes: list[fx.Node], exits: dict[str, fx.Node], k: int) -> fx.Graph:
    name = model.branches[k].name
    cut = exits[name]
    carried = _carried(nodes, cut, name)
    b = _GraphBuilder()
    g = b.graph
    b.env[cut] = g.placeholder("features")
    b.stats = g.placeholder("stats")
    for node in carried:
        b.copy(node)
    exit_of = {exits[br.name]: br.position for br in model.branches[k + 1 :]}
    final = None
    for node in nodes[nodes.index(cut) + 1 :]:
        if node.op == "output":
            final = node.args[0]
            break
        b.copy(node)
        if node in exit_of:
            b.exit(exit_of[node], b.env[node])
    if not isinstance(final, fx.Node):
        raise SplitError(
            f"the traced forward of {type(model.backbone).__name__} returns {type(final).__name__}, not one tensor."
        )
    final_logits = b.env[final]
    if model.final_head is not None:
        final_logits = g.call_module("final_head", (final_logits,))
    logits = g.call_function(torch.stack, (b.logits + [final_logits],), {"dim": 1})
    if b.gates:
        gates = g.call_function(torch.stack, (b.gates,), {"dim": 1})
    else:
        gates = g.call_function(_no_gates, (final_logits,))
    g.output((logits, gates))
    return g


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two same-shape tensors (0 when empty)."""
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _check_split(model: EarlyExitModel, parts: Split, example: torch.Tensor | None, rtol: float, atol: float) -> None:
    edge, cloud = parts
    x = example if example is not None else edge.example_inputs(2)[0]
    with evaluating(model), torch.no_grad():
        ref = model(x)
        e = edge(x)
        c = cloud(e.features, e.stats)
    edge.feature_shape = cloud.feature_shape = tuple(e.features.shape[1:])
    got_logits = torch.cat([e.logits, c.logits], dim=1).float()
    want_logits = torch.stack(ref.logits, dim=1).float()
    got_gates = torch.cat([e.gate_logits, c.gate_logits], dim=1).float()
    want_gates = ref.gate_logits.float()
    if got_logits.shape != want_logits.shape or got_gates.shape != want_gates.shape:
        raise SplitError(
            f"the split parts return logits {tuple(got_logits.shape)} / gates {tuple(got_gates.shape)} but the model "
            f"returns {tuple(want_logits.shape)} / {tuple(want_gates.shape)}."
        )
    diff = max(_max_abs(got_logits, want_logits), _max_abs(got_gates, want_gates))
    if not (
        torch.allclose(got_logits, want_logits, rtol=rtol, atol=atol)
        and torch.allclose(got_gates, want_gates, rtol=rtol, atol=atol)
    ):
        raise SplitError(
            f"edge + cloud do not reproduce the model at {edge.exit_name!r} (max abs difference {diff:.3g}); the "
            "traced graph does not match the backbone's eager forward (data-dependent Python control flow?)."
        )


def split(
    model: EarlyExitModel,
    at: int | str,
    *,
    check: bool = True,
    example: torch.Tensor | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Split:
    """Split a wrapped model at an early exit into an edge part and a cloud part.

    Args:
        model: A wrapped model (`timm_exits.wrap`).
        at: 0-based early-exit index or the exit's module name (see `model.exits`).
        check: Run the model and the two parts on `example` (default: 2 random images of the configured
            input size) in eval mode and raise `SplitError` unless they agree; also records
            `feature_shape` on the parts.
        example: Input batch for the check, in the dtype and on the device of the model. Its image size
            becomes the parts' `input_size` (it may differ from the configured one): the edge part takes
            images of that size and the cloud part the features they give.
        rtol: Relative tolerance of the check.
        atol: Absolute tolerance of the check.

    Returns:
        `Split(edge, cloud)`.

    Raises:
        SplitError: Unknown split point, an untraceable backbone, a cut that later layers bypass, or an
            example of another dtype or device than the model.
    """
    if not isinstance(model, EarlyExitModel):
        raise TypeError(f"split() needs a wrapped model (timm_exits.wrap), got {type(model).__name__}.")
    k = resolve_split_point(model, at)
    if example is not None:
        _check_example(model, example)
    before = set(vars(model.backbone))
    try:
        graph = _trace(model)
        exits = _locate(model, graph)
        nodes = list(graph.nodes)
        root = _root(model)
        cloud_graph = _cloud_graph(model, nodes, exits, k)
        edge_graph = _edge_graph(model, nodes, exits, k)
        edge = EdgePart(fx.GraphModule(root, edge_graph, class_name="EdgeGraph"), model, k)
        cloud = CloudPart(fx.GraphModule(root, cloud_graph, class_name="CloudGraph"), model, k)
    finally:  # torch.fx stores tensor constants on the traced root; the graph modules hold their own references
        for name in set(vars(model.backbone)) - before:
            delattr(model.backbone, name)
    parts = Split(edge, cloud)
    if example is not None:
        edge.input_size = cloud.input_size = tuple(example.shape[1:])
    shared = {id(m) for m in model.modules()}
    for part in parts:
        for m in part.modules():
            if id(m) not in shared:
                m.training = model.training
    _check_tensor_outputs(model, example if example is not None else edge.example_inputs(1)[0])
    if check:
        _check_split(model, parts, example, rtol, atol)
    else:
        with evaluating(model), torch.no_grad():
            x = example if example is not None else edge.example_inputs(1)[0]
            edge.feature_shape = cloud.feature_shape = tuple(edge(x).features.shape[1:])
    return parts
