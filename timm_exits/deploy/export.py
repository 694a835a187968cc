"""Export the parts of a split.

`export(part, example, format="torch" | "onnx")` exports a part with `torch.export` or to ONNX
(the dynamo exporter), with a dynamic batch dimension, and checks that the exported program
(for ONNX: onnxruntime, an optional dependency) reproduces the PyTorch outputs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..hub.files import _host, _process_gone
from .split import CloudOutput, CloudPart, EdgeOutput, EdgePart, _max_abs, _Part

__all__ = [
    "Exported",
    "export",
    "run_onnx",
]


# ------------------------------------------------------------------------------------- export
@dataclass
class Exported:
    """An exported part.

    Attributes:
        format: "torch" (a `torch.export.ExportedProgram`) or "onnx" (serialised ONNX model bytes).
        program: The `ExportedProgram` (its module returns a plain tuple in `output_names` order) or the
            ONNX model bytes.
        path: Where it was saved, if a path was given.
        input_names: Names of the inputs.
        output_names: Names of the (flattened) outputs.
        max_abs_diff: Largest absolute difference between the exported program's outputs (for ONNX:
            onnxruntime's) and PyTorch's on the example, when checked.
        diffs: That difference per output name.
    """

    format: str
    program: Any = field(repr=False)  # ONNX bytes run to megabytes: the repr names the path and the check
    path: str | None
    input_names: list[str]
    output_names: list[str]
    max_abs_diff: float | None = None
    diffs: dict[str, float] = field(default_factory=dict)


class _Flat(nn.Module):
    """Returns a part's outputs as a plain tuple (exported programs then need no named-tuple registration)."""

    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_flat_outputs(self.part(*args)))


def _names(part: nn.Module, n_inputs: int) -> tuple[list[str], list[str]]:
    if isinstance(part, EdgePart):
        return ["image"], list(EdgeOutput._fields)
    if isinstance(part, CloudPart):
        return ["features", "stats"], list(CloudOutput._fields)
    return [f"input_{i}" for i in range(n_inputs)], []


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    flat: list[torch.Tensor] = []
    for o in out:
        flat.extend(_flat_outputs(o))
    return flat


def run_onnx(model: bytes | str | os.PathLike, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run an ONNX model with onnxruntime (CPU) on tensors and return its outputs as tensors.

    Args:
        model: ONNX model bytes or a path to a .onnx file.
        inputs: One tensor per graph input, in order.

    Returns:
        The outputs, in graph order.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(
            "checking an ONNX export needs onnxruntime; install it with `pip install timm-exits[onnx]` "
            "(or pip install onnxruntime)."
        ) from e
    source = model if isinstance(model, bytes) else os.fspath(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the ONNX model takes {len(names)} inputs {names}, got {len(inputs)} tensors.")
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _is_wrapper(module: nn.Module) -> bool:
    """A split's own containers (the part, its traced graph, the plain root module): they hold no layer whose
    forward depends on the mode, and keep the mode the model had when it was split."""
    return isinstance(module, (_Part, torch.fx.GraphModule)) or type(module) is nn.Module


def export(
    part: nn.Module,
    example: torch.Tensor | Sequence[torch.Tensor] | None = None,
    path: str | os.PathLike | None = None,
    format: str = "onnx",
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Exported:
    """Export a split part (or any module) with `torch.export` or to ONNX and check the result.

    Args:
        part: An `EdgePart`, a `CloudPart` or another module, in eval mode (a module in train mode is refused).
        example: Example inputs (one tensor or a tuple); default: `part.example_inputs()` (batch 2).
        path: Save the result there (.pt2 for "torch", .onnx for "onnx"; `~` is the home folder, and the folder
            must exist); None keeps it in memory. The file is written in a temporary folder next to `path` and
            moved into place only once the check passed: an export that fails (or is killed) leaves a file
            already at `path` as it was.
        format: "torch" or "onnx".
        dynamic_batch: Export the batch dimension as dynamic.
        check: Compare the exported program's outputs with PyTorch's on `example` (ONNX: through
            onnxruntime) and raise `RuntimeError` if they differ beyond rtol/atol.
        rtol: Relative tolerance of the check.
        atol: Absolute tolerance of the check.

    Returns:
        An `Exported` record with the program (or ONNX bytes) and the measured difference.
    """
    if format not in ("torch", "onnx"):
        raise ValueError(f"format={format!r}; use 'torch' or 'onnx'.")
    out_path = _checked_path(path) if path is not None else None
    if example is None:
        if not hasattr(part, "example_inputs"):
            raise ValueError("give example inputs for a module that is not a split part.")
        example = part.example_inputs()
    args = (example,) if torch.is_tensor(example) else tuple(example)
    training = sorted({type(m).__name__ for m in part.modules() if m.training and not _is_wrapper(m)})
    if training:
        raise ValueError(
            f"the part has modules in train mode ({', '.join(training[:4])}); exporting would record the training "
            "graph (batch statistics, dropout) and move BatchNorm's running statistics. Call .eval() on the model "
            "or the part first."
        )
    if dynamic_batch and any(a.shape[0] < 2 for a in args):
        raise ValueError(
            "an example batch of 1 makes torch.export fix the batch size; give examples with batch >= 2 "
            "(part.example_inputs() gives 2), or pass dynamic_batch=False for a batch-1 program."
        )
    input_names, output_names = _names(part, len(args))
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic = (tuple({0: batch} for _ in args),)  # _Flat.forward takes *args
    with torch.no_grad():
        want = _flat_outputs(part(*args))
    if not output_names:
        output_names = [f"output_{i}" for i in range(len(want))]
    result, save = _export(part, args, format, dynamic, check, rtol, atol, want, input_names, output_names)
    if out_path is not None:  # only a program that passed its check replaces what the path holds
        work = _work_folder(out_path)
        try:
            save(os.path.join(work, os.path.basename(out_path)))
            _move_into_place(work, out_path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result.path = out_path
    return result


def _checked_path(path: str | os.PathLike) -> str:
    """`path` with `~` expanded; refused before any export work when it is a folder or its folder does not exist."""
    out_path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(out_path):
        raise IsADirectoryError(f"export path {out_path} is a folder; give a file name (.pt2 or .onnx).")
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"export path {out_path}: its folder {folder} does not exist; create it first (os.makedirs) or give "
            "another path."
        )
    return out_path


def _work_folder(out_path: str) -> str:
    """A new private folder next to `out_path` (the same file system, so moving out of it is atomic), where the
    file is written under its own name (an ONNX file's external data keeps the name the file refers to).

    Its name, ".<file name>.export-<pid>-<host>-<8 characters>", lets a later export of the same file remove the
    folder once its process is gone (`_remove_stale_work_folders`)."""
    target = os.path.abspath(out_path)
    folder, name = os.path.split(target)
    _remove_stale_work_folders(folder, name)
    return tempfile.mkdtemp(dir=folder, prefix=f".{name}.export-{os.getpid()}-{_host()}-")


def _remove_stale_work_folders(folder: str, name: str) -> None:
    """Remove the work folders that exports of `name` into `folder`, killed before they cleaned up, left there:
    only folders of this host whose process no longer runs; any other folder is left alone."""
    pattern = re.compile(rf"\.{re.escape(name)}\.export-(\d+)-([A-Za-z0-9._]*)-[a-z0-9_]{{8}}")
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry)
        path = os.path.join(folder, entry)
        if m is None or os.path.islink(path) or not os.path.isdir(path):
            continue
        if _process_gone(m.group(1), m.group(2)):
            shutil.rmtree(path, ignore_errors=True)


def _move_into_place(work: str, out_path: str) -> None:
    """Move what the export wrote in `work` next to `out_path`, the file at `out_path` last."""
    name = os.path.basename(out_path)
    folder = os.path.dirname(os.path.abspath(out_path))
    for other in sorted(os.listdir(work)):  # an ONNX file's external data
        if other != name:
            os.replace(os.path.join(work, other), os.path.join(folder, other))
    os.replace(os.path.join(work, name), out_path)


def _export(
    part: nn.Module,
    args: tuple[torch.Tensor, ...],
    format: str,
    dynamic: Any,
    check: bool,
    rtol: float,
    atol: float,
    want: list[torch.Tensor],
    input_names: list[str],
    output_names: list[str],
) -> tuple[Exported, Callable[[str], None]]:
    """Export `part` and check the program against `want`; returns the record and a function saving the program."""
    got: list[torch.Tensor] = []
    flat = _Flat(part)
    flat.training = part.training  # its own flag only: .train() would re-mode the modules shared with the model
    if format == "torch":
        program: Any = torch.export.export(flat, args, dynamic_shapes=dynamic)

        def save(dest: str) -> None:
            torch.export.save(program, dest)

        if check:
            with torch.no_grad():
                got = _flat_outputs(program.module()(*args))
    else:
        onnx_program = torch.onnx.export(
            flat,
            args,
            dynamo=True,
            verbose=False,
            dynamic_shapes=dynamic,
            input_names=input_names,
            output_names=output_names,
        )
        if onnx_program is None:
            raise RuntimeError("torch.onnx.export returned no program.")
        program = onnx_program.model_proto.SerializeToString()
        save = onnx_program.save
        if check:
            got = run_onnx(program, args)
    result = Exported(format, program, None, input_names, output_names)
    if check:
        if len(got) != len(want):
            raise RuntimeError(f"the exported program returns {len(got)} outputs, PyTorch {len(want)}.")
        for name, g, w in zip(output_names, got, want):
            g = g.to(w.device)
            if g.shape != w.shape:
                raise RuntimeError(
                    f"exported output {name!r} has shape {tuple(g.shape)}, PyTorch {tuple(w.shape)} ({format})."
                )
            result.diffs[name] = _max_abs(g, w)
            if not torch.allclose(g.float(), w.float(), rtol=rtol, atol=atol):
                raise RuntimeError(
                    f"the {format} export of {type(part).__name__} differs from PyTorch on output {name!r} "
                    f"(max abs difference {result.diffs[name]:.3g} > atol={atol}, rtol={rtol})."
                )
        result.max_abs_diff = max(result.diffs.values(), default=0.0)
    return result, save
