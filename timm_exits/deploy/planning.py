"""Plan where to split a multi-exit model between a device and a server.

`plan_split` evaluates every early exit as a split point, plus the two trivial deployments (all on
the device; all in the cloud, sending the image), and returns the expected end-to-end latency,
bytes per request and accuracy of each. Ingredients:

* exit rates: the policy's exit decisions on held-out data (`calibration.collect` + `simulate`),
  i.e. the fraction of requests that leave on the device at or before exit k;
* compute: the edge and cloud parts of each split (`timm_exits.deploy.split`) timed at batch 1 on this
  machine (fastest of a few runs) and scaled by `device_speed` / `server_speed` (relative to this
  machine: 0.2 means the device is 5x slower);
* the link: `rtt_ms` plus the payload bytes (the real safetensors payload of one sample's
  intermediate tensor and statistics, in the chosen compression) over `uplink_mbps`, and the
  response (the remaining exits' logits and gate logits) over `downlink_mbps`.

Latency model (batch 1, one request at a time, HTTP header bytes ignored):

* split at k: every request runs the whole edge part (a static graph evaluates exits 0..k);
  the fraction that does not exit by k also pays the link and the cloud part;
* all on device / all in cloud: the whole model with hard early exit (`predict`), so a request
  leaving at exit j costs the compute up to exit j (timed as the edge part of the split at j; the
  final exit as the full forward); "all in cloud" sends the image as uint8 pixels and always pays the
  link.

Accuracy is that of the policy; it differs between rows only when the intermediate tensor is
compressed (then measured by running edge, codec and cloud on the held-out data).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core._utils import evaluating
from ..core.model import EarlyExitModel
from ..inference.calibration import _images_and_labels, collect, simulate
from ..inference.policies import EXIT_RULES, resolve_thresholds
from .serve.client import EdgeClient
from .serve.codec import COMPRESSIONS, encode_tensors
from .split import Split, split

__all__ = ["LinkModel", "SplitPlan", "plan_split", "time_module"]

_COLUMNS = (
    ("split", "split"),
    ("p_offload", "offloaded"),
    ("edge_ms", "device ms"),
    ("transfer_ms", "link ms"),
    ("cloud_ms", "server ms"),
    ("latency_ms", "expected ms"),
    ("offload_latency_ms", "offloaded ms"),
    ("payload_bytes", "payload B"),
    ("bytes_per_request", "B / request"),
    ("accuracy", "accuracy"),
)


@dataclass
class LinkModel:
    """A network link: bandwidths in megabit/s and a round-trip time in ms."""

    uplink_mbps: float = 10.0
    downlink_mbps: float = 10.0
    rtt_ms: float = 40.0

    def __post_init__(self) -> None:
        bandwidths = (self.uplink_mbps, self.downlink_mbps)
        if not all(math.isfinite(b) and b > 0 for b in bandwidths) or not (
            math.isfinite(self.rtt_ms) and self.rtt_ms >= 0
        ):
            raise ValueError(f"link {self} needs positive bandwidths and a non-negative RTT (finite numbers, not NaN).")

    def transfer_ms(self, up_bytes: float, down_bytes: float) -> float:
        """One request/response: RTT plus serialisation of both payloads."""
        return self.rtt_ms + up_bytes * 8e-3 / self.uplink_mbps + down_bytes * 8e-3 / self.downlink_mbps


@dataclass
class SplitPlan:
    """Result of `plan_split`.

    Attributes:
        rows: One dict per candidate ("device", each split exit, "cloud"): offload fraction, expected
            device / link / server / total latency (ms), latency of an offloaded request, payload
            bytes per offloaded request, expected uplink bytes per request, accuracy.
        best: The recommended row (lowest expected latency meeting `min_accuracy`), possibly a baseline.
        best_split: The best row among the real splits (not "device" / "cloud").
        params: The inputs of the plan (link, speeds, policy, thresholds, measured timings).
    """

    rows: list[dict[str, Any]]
    best: dict[str, Any]
    best_split: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        """The table as GitHub markdown, the recommended row in bold."""
        head = "| " + " | ".join(t for _, t in _COLUMNS) + " |"
        sep = "|" + "|".join("---:" if k != "split" else ":---" for k, _ in _COLUMNS) + "|"
        lines = [head, sep]
        for row in self.rows:
            cells = [_fmt(k, row.get(k)) for k, _ in _COLUMNS]
            if row is self.best:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        p = self.params
        lines.append("")
        lines.append(
            f"Link {p['uplink_mbps']} Mbit/s up, {p['downlink_mbps']} Mbit/s down, RTT {p['rtt_ms']} ms; device speed "
            f"{p['device_speed']}x, server speed {p['server_speed']}x of the measuring machine; "
            f"policy {p['policy']!r}, compression {p['compression']!r}. Recommended: **{self.best['split']}**"
            + (f"; best split point: {self.best_split['split']}." if self.best_split else ".")
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        best_split = self.best_split["split"] if self.best_split else None
        return {"best": self.best["split"], "best_split": best_split, "rows": self.rows, "params": self.params}

    def to_json(self, **kwargs: Any) -> str:
        """The plan as JSON: `to_dict()`, `kwargs` passed to `json.dumps`."""
        return json.dumps(self.to_dict(), **kwargs)

    def plot(self, path: str | Path) -> Path:
        """Save a PNG: stacked expected latency (device, link, server) and bytes per request per candidate."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = [r["split"] for r in self.rows]
        y = list(range(len(names)))
        fig = Figure(figsize=(10, 0.55 * len(names) + 1.8))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
        left = [0.0] * len(names)
        for key, label, color in (
            ("edge_ms", "device", "#4c72b0"),
            ("transfer_ms", "link", "#dd8452"),
            ("cloud_ms", "server", "#55a868"),
        ):
            vals = [r[key] for r in self.rows]
            ax1.barh(y, vals, left=left, label=label, color=color)
            left = [a + b for a, b in zip(left, vals)]
        best = self.rows.index(self.best)
        ax1.barh([best], [left[best]], fill=False, edgecolor="black", linewidth=2, label="recommended")
        ax1.set_yticks(y, names)
        ax1.invert_yaxis()
        ax1.set_xlabel("expected latency per request (ms)")
        ax1.legend(loc="lower right", fontsize=8)
        ax2.barh(y, [r["bytes_per_request"] / 1024 for r in self.rows], color="#8172b2")
        ax2.set_xlabel("expected uplink KiB per request")
        p = self.params
        fig.suptitle(
            f"split plan: {p['uplink_mbps']} Mbit/s, RTT {p['rtt_ms']} ms, device {p['device_speed']}x, "
            f"server {p['server_speed']}x, {p['compression']}",
            fontsize=10,
        )
        fig.tight_layout()
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in ("p_offload", "accuracy"):
        return f"{v:.3f}"
    if key.endswith("_ms"):
        return f"{v:.2f}"
    if key.endswith("bytes") or key == "bytes_per_request":
        return f"{v:,.0f}"
    return str(v)


def time_module(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2) -> float:
    """Fastest wall time of `repeats` calls of `fn()` in seconds, without gradients.

    The minimum rather than the median: other processes on the machine only ever add time.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(max(repeats, 1)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return min(times)


def _given_timings(timings: Mapping[str, Any], n: int) -> tuple[list[float], list[float], float]:
    try:
        edge = [float(t) / 1e3 for t in timings["edge"]]
        cloud = [float(t) / 1e3 for t in timings["cloud"]]
        full = float(timings["full_forward"]) / 1e3
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"timings must look like plan.params['measured_ms'] (edge, cloud, full_forward in ms): {e}"
        ) from e
    if len(edge) != n or len(cloud) != n:
        raise ValueError(f"timings give {len(edge)} edge / {len(cloud)} cloud times for {n} split points.")
    if not all(math.isfinite(t) and t > 0 for t in edge + cloud + [full]):
        raise ValueError("timings must be positive finite numbers of ms (not NaN or infinity).")
    return edge, cloud, full


def _keeping_first(loader: Iterable, first: list[torch.Tensor], one_size: bool) -> Iterator[Any]:
    """The loader's batches, the first one's images kept in `first`; with `one_size`, images of another size than
    the first are refused (the split parts that run them through a codec take one image size)."""
    for batch in loader:
        x, _ = _images_and_labels(batch)
        if not first:
            first.append(x)
        elif one_size and x.shape[1:] != first[0].shape[1:]:
            raise ValueError(
                f"the loader gives images of shape {tuple(x.shape[1:])} after {tuple(first[0].shape[1:])}; planning "
                "with a compression runs the split parts, which take one image size: resize the held-out images "
                "to one size, or plan with compression='none'."
            )
        yield batch


def _accuracy_with_codec(parts: Split, loader: Iterable, policy: str, thresholds: list[float], compression: str):
    runner = EdgeClient(parts.edge, parts.cloud, policy, thresholds, compression=compression)
    device = next(parts.edge.parameters()).device
    correct = agree = n = 0
    ref_runner = EdgeClient(parts.edge, parts.cloud, policy, thresholds, compression="none")
    for batch in loader:
        x, y = _images_and_labels(batch)
        x = x.to(device)
        got = runner.run(x).logits.argmax(-1).cpu()
        ref = ref_runner.run(x).logits.argmax(-1).cpu()
        correct += int((got == y).sum())
        agree += int((got == ref).sum())
        n += int(y.shape[0])
    return correct / max(n, 1), agree / max(n, 1)


def plan_split(
    model: EarlyExitModel,
    val_loader: Iterable,
    uplink_mbps: float = 10.0,
    rtt_ms: float = 40.0,
    device_speed: float = 0.2,
    server_speed: float = 1.0,
    policy: str = "gate",
    threshold: float | list[float] | None = None,
    *,
    downlink_mbps: float | None = None,
    compression: str = "none",
    min_accuracy: float | None = None,
    repeats: int = 7,
    timings: Mapping[str, Any] | None = None,
) -> SplitPlan:
    """Expected latency, bytes and accuracy of each split point; recommend the fastest.

    Args:
        model: A wrapped model (timed and evaluated in eval mode; its flags are restored).
        val_loader: Held-out batches for the exit rates and accuracy, in a form `collect` takes ((images,
            labels[, ...]) or a dict with "image" and "label"); iterated more than once (a DataLoader or a
            list, not a one-shot generator). The parts are split and timed at its first batch's image size;
            with a compression every batch must have that size.
        uplink_mbps: Device-to-server bandwidth in Mbit/s.
        rtt_ms: Round-trip time in ms.
        device_speed: Device compute speed relative to this machine (0.2: five times slower).
        server_speed: Server compute speed relative to this machine.
        policy: "gate", "confidence" or "entropy".
        threshold: One value or one per early exit; default: the model's stored calibration, else
            the policy's default (as `predict`).
        downlink_mbps: Server-to-device bandwidth (default: `uplink_mbps`).
        compression: Codec of the intermediate tensor ("none", "fp16", "int8", "int8-channel").
        min_accuracy: Only recommend candidates at least this accurate.
        repeats: Timed runs per part (the fastest is kept).
        timings: Compute times to reuse instead of timing again, as in a previous plan's
            `params["measured_ms"]` ({"edge": [ms per split], "cloud": [ms per split], "full_forward": ms},
            at this machine's speed), e.g. to re-plan for another link with the same numbers.

    Returns:
        A `SplitPlan` with the table, the recommended row, `to_markdown()` and `plot()`.
    """
    if policy not in EXIT_RULES:
        raise ValueError(f"policy {policy!r} has no early exit to plan for; use one of {EXIT_RULES}.")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}; use one of {COMPRESSIONS}.")
    if not all(math.isfinite(v) and v > 0 for v in (device_speed, server_speed)):
        raise ValueError(
            f"device_speed={device_speed}, server_speed={server_speed}: both must be positive finite numbers "
            "(relative to this machine, e.g. 0.2 for five times slower)."
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r}: give 1 or more timed runs per part.")
    link = LinkModel(uplink_mbps, downlink_mbps if downlink_mbps is not None else uplink_mbps, rtt_ms)
    thresholds = resolve_thresholds(model, policy, threshold)
    given = _given_timings(timings, len(model.branches)) if timings is not None else None

    first: list[torch.Tensor] = []
    with evaluating(model):
        data = collect(model, _keeping_first(val_loader, first, one_size=compression != "none"))
        index = simulate(data, policy, thresholds)
        n_exits = model.num_exits
        counts = torch.bincount(index, minlength=n_exits).tolist()
        p_exit = [c / index.shape[0] for c in counts]
        picked = data.logits[torch.arange(index.shape[0]), index]
        accuracy = float((picked.argmax(-1) == data.labels).float().mean())

        device = model.exit_costs.device
        x1 = first[0][:1].to(device)
        parts = [split(model, k, example=x1) for k in range(len(model.branches))]
        t_edge, t_cloud, payload, response = [], [], [], []
        for p in parts:
            with torch.inference_mode():
                e = p.edge(x1)
                c = p.cloud(e.features, e.stats)
            if timings is None:
                t_edge.append(time_module(lambda p=p: p.edge(x1), repeats))
                t_cloud.append(time_module(lambda p=p, e=e: p.cloud(e.features, e.stats), repeats))
            payload.append(
                len(
                    encode_tensors(
                        {"features": e.features, "stats": e.stats},
                        compression,
                        only=("features",),
                        channel_axis=p.edge.channel_axis,
                    )
                )
            )
            response.append(len(encode_tensors({"logits": c.logits.float(), "gate_logits": c.gate_logits.float()})))
        if given is None:
            t_full = time_module(lambda: model(x1), repeats)
        else:
            t_edge, t_cloud, t_full = given

        codec_acc: list[tuple[float, float] | None] = [None] * len(parts)
        if compression != "none":
            codec_acc = [_accuracy_with_codec(p, val_loader, policy, thresholds, compression) for p in parts]

    # compute to reach exit j on one machine (ms at this machine's speed): edge part of split j, full forward last
    reach_ms = [t * 1e3 for t in t_edge] + [t_full * 1e3]
    early_exit_ms = sum(p * t for p, t in zip(p_exit, reach_ms))
    image_bytes = len(encode_tensors({"image": torch.zeros(1, *x1.shape[1:], dtype=torch.uint8)}))  # raw pixels
    answer_bytes = len(encode_tensors({"logits": picked[:1].float(), "exit_index": index[:1]}))

    rows: list[dict[str, Any]] = []

    def add(name: str, kind: str, k: int | None, p_off: float, edge_ms: float, link_ms: float, cloud_ms: float, **kw):
        rows.append(
            {
                "split": name,
                "kind": kind,
                "exit_index": k,
                "p_offload": p_off,
                "edge_ms": edge_ms,
                "transfer_ms": p_off * link_ms,
                "cloud_ms": p_off * cloud_ms,
                "latency_ms": edge_ms + p_off * (link_ms + cloud_ms),
                "offload_latency_ms": (edge_ms + link_ms + cloud_ms) if p_off > 0 else None,
                **kw,
            }
        )

    add(
        "device",
        "all_device",
        None,
        0.0,
        early_exit_ms / device_speed,
        0.0,
        0.0,
        payload_bytes=0,
        response_bytes=0,
        bytes_per_request=0.0,
        accuracy=accuracy,
        agreement=1.0,
    )
    for k, p in enumerate(parts):
        p_off = sum(counts[k + 1 :]) / index.shape[0]
        acc, agree = codec_acc[k] if codec_acc[k] is not None else (accuracy, 1.0)
        add(
            p.edge.exit_name,
            "split",
            k,
            p_off,
            t_edge[k] * 1e3 / device_speed,
            link.transfer_ms(payload[k], response[k]),
            t_cloud[k] * 1e3 / server_speed,
            payload_bytes=payload[k],
            response_bytes=response[k],
            bytes_per_request=p_off * payload[k],
            accuracy=acc,
            agreement=agree,
            feature_shape=list(p.edge.feature_shape),
        )
    add(
        "cloud",
        "all_cloud",
        None,
        1.0,
        0.0,
        link.transfer_ms(image_bytes, answer_bytes),
        early_exit_ms / server_speed,
        payload_bytes=image_bytes,
        response_bytes=answer_bytes,
        bytes_per_request=float(image_bytes),
        accuracy=accuracy,
        agreement=1.0,
    )

    eligible = [r for r in rows if min_accuracy is None or r["accuracy"] >= min_accuracy - 1e-12]
    if not eligible:
        top = max(rows, key=lambda r: r["accuracy"])
        raise ValueError(
            f"no candidate reaches min_accuracy={min_accuracy}; the most accurate is {top['split']!r} at "
            f"{top['accuracy']:.4f}. Lower the floor or use a lighter compression."
        )

    def rank(r: dict[str, Any]) -> tuple[float, float]:
        return (r["latency_ms"], r["bytes_per_request"])

    best = min(eligible, key=rank)
    splits = [r for r in eligible if r["kind"] == "split"]
    best_split = min(splits, key=rank) if splits else None
    params = {
        **asdict(link),
        "device_speed": device_speed,
        "server_speed": server_speed,
        "policy": policy,
        "thresholds": thresholds,
        "compression": compression,
        "min_accuracy": min_accuracy,
        "exit_distribution": p_exit,
        "samples": int(index.shape[0]),
        "timings_reused": timings is not None,
        "measured_ms": {
            "edge": [t * 1e3 for t in t_edge],
            "cloud": [t * 1e3 for t in t_cloud],
            "full_forward": t_full * 1e3,
        },
        "input_size": list(x1.shape[1:]),
    }
    return SplitPlan(rows, best, best_split, params)
