"""The worker-process side of `sweep_models.py`: build, wrap and exercise one timm model at a time.

`sweep_models.py --worker` runs `worker_main`, which reads model names from stdin and answers on its
stdout in JSON lines: `{"ready": true}` once, then per model stage markers (`{"stage": ...}`), the
record of a `num_classes=0` model before its `num_classes=1000` retry (`{"primary": ...}`) and the
model's record (`{"result": ...}`). The parent (`Worker` in `sweep_models.py`) turns a worker that
dies, times out or is killed for memory into a failure record of its own.

torch, timm and timm_exits are imported inside the functions, never at import time: the parent
imports this module before it sets the thread environment variables, and the worker sets its torch
threads right after importing torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

__all__ = ["NonFiniteError", "Send", "source_hash", "vm_kb", "worker_main"]

Send = Callable[[dict[str, Any]], None]
"""How the worker answers the parent: one JSON-lines protocol message per call."""


def source_hash() -> str:
    """Short hash of the timm_exits sources a result was measured with (the package changes during a sweep)."""
    import hashlib

    import timm_exits

    h = hashlib.sha1()
    for f in sorted(Path(timm_exits.__file__).parent.rglob("*.py")):
        h.update(f.relative_to(Path(timm_exits.__file__).parent).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:8]


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:200]


class NonFiniteError(RuntimeError):
    """An output, the loss or a gradient contains NaN or Inf."""


def vm_kb(field: str, pid: int | str = "self") -> int:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM, VmSize, ...); 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _exercise(model: Any, size: tuple[int, ...], state: dict[str, str], send: Send, **wrap_kwargs: Any) -> int:
    """Wrap with exits="auto", forward a batch of 2, back-propagate and check; return the number of exits."""
    import torch

    import timm_exits

    def enter(stage: str) -> None:
        state["stage"] = stage
        send({"stage": stage})

    enter("wrap")
    wrapped = timm_exits.wrap(model, exits="auto", **wrap_kwargs)
    wrapped.train()

    enter("forward")
    x = torch.randn(2, *size)
    out = wrapped(x)
    tensors = {f"logits[{i}]": t for i, t in enumerate(out.logits)}
    tensors.update(log_probs=out.log_probs, expected_cost=out.expected_cost, gate_logits=out.gate_logits)
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        with torch.no_grad():
            plain = wrapped.backbone(x)
        plain_ok = bool(torch.isfinite(plain).all()) if torch.is_tensor(plain) else None
        raise NonFiniteError(f"non-finite {bad}; plain backbone output finite: {plain_ok}")

    enter("backward")
    target = torch.randint(0, wrapped.num_classes, (2,))
    loss = timm_exits.SoftConditionalLoss(cost_weight=0.1)(out, target)
    if not torch.isfinite(loss):
        raise NonFiniteError(f"loss is {loss.item()}")
    loss.backward()
    no_grad = [b.name for b in wrapped.branches if all(p.grad is None for p in b.parameters())]
    if no_grad:
        raise RuntimeError(f"exit branches {no_grad} received no gradient")
    grads = [(n, p.grad) for n, p in wrapped.named_parameters() if p.grad is not None]
    bad_grads = [n for n, g in grads if not torch.isfinite(g).all()]
    if bad_grads:
        raise NonFiniteError(f"non-finite gradients in {len(bad_grads)} tensors, e.g. {bad_grads[:3]}")
    n = wrapped.num_exits
    wrapped.unwrap()
    return n


def _error_fields(e: BaseException) -> tuple[str, str]:
    """A failure's (error, message): the exception's type (OutOfMemory for an allocation failure) and first line."""
    msg = _first_line(e)
    err = type(e).__name__
    if "can't allocate memory" in msg or "not enough memory" in msg:
        err = "OutOfMemory"
    return err, msg


def _run_one(name: str, mem_bytes: int, send: Send) -> dict[str, Any]:
    """Create, wrap, forward and backward one model; return its record (without time and name)."""
    import timm
    import torch

    rec: dict[str, Any] = {}
    state = {"stage": "create"}
    model = None
    try:
        send({"stage": "size"})
        n_params = None
        with contextlib.suppress(Exception), torch.device("meta"):  # a size estimate only; the real build decides
            n_params = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            rec["params_m"] = round(n_params / 1e6, 1)
        need = (n_params or 0) * 4 * 2  # fp32 weights + gradients, before any activation
        if n_params and need > mem_bytes:
            rec.update(
                status="excluded",
                stage="create",
                error="TooLarge",
                message=f"{n_params / 1e9:.2f}B params need > {need / 2**30:.1f} GiB for weights + grads "
                f"(limit {mem_bytes / 2**30:.1f} GiB)",
            )
            return rec

        send({"stage": "create"})
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        rec["cls"] = type(model).__name__
        size = tuple(int(v) for v in model.pretrained_cfg["input_size"])
        rec["input"] = list(size)
        rec["exits"] = _exercise(model, size, state, send)
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure (MemoryError included) is a result here
        err, msg = _error_fields(e)
        rec.update(status="fail", stage=state["stage"], error=err, message=msg)
    if rec.get("status") == "fail" and model is not None and getattr(model, "num_classes", None) == 0:
        # A pooled-feature model (num_classes=0 by default): wrap() asks for num_classes by design. Say
        # whether the exits themselves would work once a head is requested.
        send({"primary": dict(rec)})  # the parent keeps this if the retry times out or crashes
        try:
            rec["nc1000"] = f"ok, {_exercise(model, rec['input'], state, send, num_classes=1000)} exits"
        except Exception as e:  # noqa: BLE001
            err, msg = _error_fields(e)
            rec["nc1000"] = f"{state['stage']} {err}: {msg[:150]}"
    return rec


def worker_main(mem_gb: float) -> None:
    """Serve model names from stdin; answer stage markers and records on the original stdout."""
    proto: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the models print goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    import warnings

    warnings.filterwarnings("ignore")
    import timm  # noqa: F401
    import torch

    import timm_exits  # noqa: F401

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    mem_bytes = int(mem_gb * 2**30)
    base = vm_kb("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (base + mem_bytes, base + mem_bytes))

    src = source_hash()

    def send(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")

    send({"ready": True})
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        print(f"### {name}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) so rss_gb is this model's
        t0, c0 = time.perf_counter(), time.process_time()
        rec = _run_one(name, mem_bytes, send)
        rec["time_s"] = round(time.perf_counter() - t0, 1)
        rec["cpu_s"] = round(time.process_time() - c0, 1)
        rec["rss_gb"] = round(vm_kb("VmHWM") / 2**20, 1)
        rec["src"] = src
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back before the next model
        send({"result": rec})
