"""Load test of serving on Ray Serve: plain model, whole model with hard early exit, edge + cloud split.

A local Ray instance (127.0.0.1 only) serves three applications built from one multi-exit model
(random weights, `--model` at `--size` pixels, exits "auto"):

* (a) `plain`: the unwrapped timm model (same weights as the wrapped backbone), `model_app`;
* (b) `exits`: the whole model with hard early exit over each batch (`model_app`, gate policy);
* (c) `split`: the cloud part of `split(model, at=--split-at)` on Serve (`cloud_app`), the edge part
  run by each client (`EdgeClient`) in this process, sending only the samples that did not exit.

The gate thresholds are set on a fixed pool of images so that the exit mix is `--mix` (the share
leaving at each exit, first exits first; the rest reaches the final head). For each concurrency
(default 1, 8, 32 clients) and application, `--requests` requests of `--images-per-request`
images (or until `--max-seconds`) are sent from that many client threads, over loopback HTTP
through Serve's proxy (`--transport http`) or through deployment handles (`--transport handle`);
every answer's exit is checked against `predict` on the same image. Per cell: requests/s,
images/s, p50 / p95 / p99 latency, errors, mismatches and the replica's mean batch (in images);
medians over `--repeats` rounds, the applications interleaved within a round.

Baseline, measured in the same run: `predict` against the plain forward on a batch of
`--max-batch` pool images (same thresholds, so the same exit mix), interleaved medians. Target:
(b)'s throughput gain over (a) at the largest concurrency is >= 0.9 of that gain.

    python benchmarks/serve_load.py --threads 1 --repeats 1 --requests 200 --max-seconds 60 \
        --out benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --model test_resnet --requests 16 --concurrency 1 4 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import timm
import torch
from _serving import local_serve
from _timing import machine, non_negative_int, positive_int, time_interleaved

from timm_exits import predict, split, wrap
from timm_exits.deploy.serve import EdgeClient, ModelClient, cloud_app, model_app

MIX = (0.4, 0.3, 0.2, 0.1)


def _thresholds_for_mix(model, pool: torch.Tensor, mix: list[float]) -> list[float]:
    """Gate thresholds under which the given shares of `pool` leave at each early exit, in order."""
    with torch.no_grad():
        gates = torch.sigmoid(model(pool).gate_logits.float())
    n = pool.shape[0]
    alive = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for j in range(len(model.branches)):
        want = round(mix[j] * n) if j < len(mix) else 0
        scores = gates[alive, j].sort(descending=True).values
        if want <= 0 or scores.numel() == 0:
            t = 1.0
        elif want >= scores.numel():
            t = float(scores[-1])
        else:
            t = float((scores[want - 1] + scores[want]) / 2)
        thresholds.append(min(max(t, 0.0), 1.0))
        alive &= ~(gates[:, j] >= thresholds[-1])
    return thresholds


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _load(
    call, pool: torch.Tensor, want: torch.Tensor, clients: int, requests: int, max_s: float, per_request: int = 1
) -> dict[str, Any]:
    """`requests` calls of `per_request` images from `clients` threads (bounded by `max_s`); latency, correctness."""
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    errors: list[str] = []
    mismatches = [0]
    deadline = time.monotonic() + max_s

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                i = issued[0]
                if i >= requests:
                    return
                issued[0] += 1
            idx = (torch.arange(per_request) + i * per_request) % pool.shape[0]
            t = time.perf_counter()
            try:
                exit_index = call(pool[idx])
            except Exception as e:  # counted and reported, the load continues
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt * 1e3)
                mismatches[0] += int((exit_index != want[idx]).sum())

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max_s + 60)
    wall = time.perf_counter() - start
    done = len(latencies)
    return {
        "completed": done,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "mismatches": mismatches[0],
        "wall_s": wall,
        "requests_per_s": done / wall if wall > 0 else 0.0,
        "images_per_s": done * per_request / wall if wall > 0 else 0.0,
        "p50_ms": _percentile(latencies, 50) if done else None,
        "p95_ms": _percentile(latencies, 95) if done else None,
        "p99_ms": _percentile(latencies, 99) if done else None,
    }


def _median_cells(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("requests_per_s", "images_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_batch")
    out: dict[str, Any] = {
        k: statistics.median([r[k] for r in rounds if r[k] is not None])
        if any(r[k] is not None for r in rounds)
        else None
        for k in keys
    }
    out["completed"] = sum(r["completed"] for r in rounds)
    out["errors"] = sum(r["errors"] for r in rounds)
    out["mismatches"] = sum(r["mismatches"] for r in rounds)
    out["first_error"] = next((r["first_error"] for r in rounds if r["first_error"]), None)
    return out


def main() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=positive_int, default=32)
    p.add_argument("--split-at", type=non_negative_int, default=1, help="early exit the split cuts at (0-based)")
    p.add_argument("--mix", type=float, nargs="+", default=list(MIX))
    p.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=positive_int, default=400, help="requests per cell and round")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time limit per cell and round")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--images-per-request", type=positive_int, default=1)
    p.add_argument("--transport", choices=("http", "handle"), default="http")
    p.add_argument("--max-batch", type=positive_int, default=32)
    p.add_argument("--wait-ms", type=float, default=5.0, help="batch_wait_timeout_s in ms")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per replica and in this process")
    p.add_argument("--pool", type=positive_int, default=256)
    p.add_argument("--out", type=Path, help="also write the JSON there (Ray may print to stdout at shutdown)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = wrap(timm.create_model(args.model, num_classes=10), "auto", input_size=(3, args.size, args.size)).eval()
    torch.manual_seed(0)
    plain = timm.create_model(args.model, num_classes=10).eval()  # the backbone's weights, no exits
    pool = torch.randn(args.pool, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    thresholds = _thresholds_for_mix(model, pool, args.mix)
    want = torch.stack([predict(model, pool[i : i + 1], "gate", thresholds).exit_index[0] for i in range(args.pool)])
    mix = (torch.bincount(want, minlength=model.num_exits).float() / args.pool).tolist()

    xb = pool[: args.max_batch]
    base_repeats, base_warmup = max(5, 2 * args.repeats), 2
    with torch.inference_mode():
        base_ms = time_interleaved(
            {"plain": lambda: plain(xb), "predict": lambda: predict(model, xb, "gate", thresholds)},
            repeats=base_repeats,
            warmup=base_warmup,
        )
    batch_mix = torch.bincount(predict(model, xb, "gate", thresholds).exit_index, minlength=model.num_exits)
    predict_gain = base_ms["plain"] / base_ms["predict"]

    parts = split(model, at=args.split_at)
    opts = {
        "max_batch_size": args.max_batch,
        "batch_wait_timeout_s": args.wait_ms / 1e3,
        "ray_actor_options": {"num_cpus": 0.5},
        "torch_threads": args.threads,
        "max_ongoing_requests": 2 * max(args.max_batch, max(args.concurrency)),
    }
    cells: dict[str, dict[str, list]] = {
        app: {str(c): [] for c in args.concurrency} for app in ("plain", "exits", "split")
    }
    with local_serve(num_cpus=2) as base:
        from ray import serve

        serve.run(model_app(plain, input_size=(3, args.size, args.size), **opts), name="plain", route_prefix="/plain")
        serve.run(model_app(model, "gate", thresholds, **opts), name="exits", route_prefix="/exits")
        serve.run(cloud_app(parts.cloud, **opts), name="split", route_prefix="/split")
        plain_want = torch.zeros_like(want)  # the plain model answers every image at its only exit
        local = threading.local()

        def target(app: str) -> Any:
            return f"{base}/{app}" if args.transport == "http" else serve.get_app_handle(app)

        def model_call(app: str):
            def call(x: torch.Tensor) -> torch.Tensor:
                if not hasattr(local, app):
                    setattr(local, app, ModelClient(target(app), timeout=60))
                return getattr(local, app).predict(x)[1]

            return call

        def split_call(x: torch.Tensor) -> torch.Tensor:
            if not hasattr(local, "edge"):
                local.edge = EdgeClient(parts.edge, target("split"), "gate", thresholds, timeout=60)
            return local.edge.run(x).exit_index

        calls = {
            "plain": (model_call("plain"), plain_want),
            "exits": (model_call("exits"), want),
            "split": (split_call, want),
        }
        for call, expect in calls.values():  # warm-up: replicas, connections, the batch-shrink check
            _load(call, pool, expect, 2, 8, args.max_seconds)
        for _ in range(args.repeats):
            for c in args.concurrency:
                for app, (call, expect) in calls.items():
                    before = ModelClient(f"{base}/{app}").describe()  # the replica's batch counts
                    cell = _load(call, pool, expect, c, args.requests, args.max_seconds, args.images_per_request)
                    after = ModelClient(f"{base}/{app}").describe()
                    batches = after["batches"] - before["batches"]
                    cell["mean_batch"] = (
                        (after["batched_samples"] - before["batched_samples"]) / batches if batches else None
                    )
                    cells[app][str(c)].append(cell)

    results = {app: {c: _median_cells(r) for c, r in by_c.items()} for app, by_c in cells.items()}
    top = str(max(args.concurrency))
    serve_gain = results["exits"][top]["images_per_s"] / results["plain"][top]["images_per_s"]
    out = {
        "benchmark": "serve_load",
        "machine": machine(args.threads),
        "model": args.model,
        "input_size": [3, args.size, args.size],
        "split_at": parts.edge.exit_name,
        "policy": "gate",
        "thresholds": thresholds,
        "exit_mix_pool": mix,
        "concurrency": args.concurrency,
        "requests_per_cell": args.requests,
        "images_per_request": args.images_per_request,
        "transport": args.transport,
        "repeats": args.repeats,
        "max_batch_size": args.max_batch,
        "batch_wait_ms": args.wait_ms,
        "replicas": 1,
        "notes": "loopback only; clients, edge parts and replicas share this machine's CPUs",
        "results": results,
        "baseline_predict": {
            "batch": int(xb.shape[0]),
            "exit_mix": (batch_mix.float() / xb.shape[0]).tolist(),
            "repeats": base_repeats,
            "warmup": base_warmup,
            "plain_ms": base_ms["plain"],
            "predict_ms": base_ms["predict"],
            "gain": predict_gain,
        },
        "target": {
            "concurrency": int(top),
            "serve_gain_exits_over_plain": serve_gain,
            "predict_gain": predict_gain,
            "ratio": serve_gain / predict_gain,
            "met": serve_gain / predict_gain >= 0.9,
        },
    }
    text = json.dumps(out, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return out


if __name__ == "__main__":
    main()
