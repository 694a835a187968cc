"""Plan a device/server split of the digits model, and measure the tiered path end to end.

Without ``--run`` a multi-exit resnet18 is trained here in about a minute on 2 CPU cores:
scikit-learn's 8x8 digits upscaled to 32x32 (60 / 20 / 20 train / val / test, fixed seed), the
soft-conditional loss, SGD with a cosine schedule. With ``--run DIR`` a run folder written by
``timm_exits.training.train`` is loaded instead (its recipe's val / test splits are used; a run whose
training has not finished is refused unless ``--unfinished`` asks for its last checkpoint as it is).

Then, on the held-out data:

1. the policy's threshold is calibrated on val (``--max-accuracy-drop``) unless ``--threshold`` is given;
2. ``plan_split`` for the given link and speeds, and for a small grid of links and codecs;
3. ``measure_compression`` at every split point on test (agreement of the final exit's predictions
   with the uncompressed run, max abs logit difference, bytes per sample);
4. a real tiered run at the best split point: the cloud part on Ray Serve (a local instance on
   127.0.0.1, ``cloud_app``) and ``EdgeClient``, one request per image (``--requests`` images) and
   the whole test set, checked against ``predict``; bytes sent, per-sample latency (loopback, no
   simulated link) and exit counts.

Prints one JSON document and writes ``plan.md``, ``plan.png`` and ``plan.json`` under ``--out``.
Timings are wall-clock at batch 1 on this machine with ``--threads`` intra-op threads; other jobs on
the machine make them noisy (the planner keeps the fastest of ``--repeats`` runs).

    python benchmarks/plan_split.py --out runs/plan_split
    python benchmarks/plan_split.py --run runs/digits_quick --uplink 1 --rtt 80 --compression int8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _args import non_negative_float, positive_float
from _serving import local_serve
from _timing import machine, positive_int
from torch.utils.data import DataLoader, TensorDataset

from timm_exits import SoftConditionalLoss, calibrate, collect, fit_gates, predict, wrap
from timm_exits.deploy.planning import plan_split
from timm_exits.deploy.serve import COMPRESSIONS, EdgeClient, cloud_app, measure_compression
from timm_exits.deploy.split import split
from timm_exits.inference.gate_fitting import GATE_OBJECTIVES

SCENARIOS = [  # (name, uplink Mbit/s, RTT ms)
    ("slow 3G-like", 1.0, 100.0),
    ("LTE-like", 10.0, 40.0),
    ("Wi-Fi-like", 100.0, 5.0),
]


def _digits(img_size: int, seed: int) -> dict[str, TensorDataset]:
    """Digits as normalised (N, 3, S, S) tensors, split 60/20/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = n_val = len(y) // 5
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return {k: TensorDataset(x[i], y[i]) for k, i in (("train", train), ("val", val), ("test", test))}


def _shift(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels (the only augmentation)."""
    padded = F.pad(x, (pad,) * 4, mode="replicate")
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., i : i + x.shape[-2], j : j + x.shape[-1]]


def _train(args: argparse.Namespace, data: dict[str, TensorDataset]) -> tuple[Any, dict[str, Any]]:
    import timm

    torch.manual_seed(args.seed)
    backbone = timm.create_model(args.arch, pretrained=False, num_classes=10)
    model = wrap(backbone, exits="auto", input_size=(3, args.img_size, args.img_size))
    g = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(data["train"], batch_size=64, shuffle=True, generator=g, drop_last=True)
    steps = args.epochs * len(loader)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.15)
    loss_fn = SoftConditionalLoss(cost_weight=0.0)
    start = time.perf_counter()
    step = 0
    model.train()
    for _ in range(args.epochs):
        for x, y in loader:
            loss_fn.cost_weight = 0.1 * min(1.0, step / (0.2 * steps))
            loss = loss_fn(model(_shift(x, g)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    model.eval()
    return model, {"arch": args.arch, "epochs": args.epochs, "train_s": time.perf_counter() - start}


def _load_run(args: argparse.Namespace) -> tuple[Any, DataLoader, DataLoader, dict[str, Any]]:
    try:
        from _runs import load_finished_run, trained

        from timm_exits.training.data import build_datasets
    except ImportError as e:
        sys.exit(f"--run needs timm_exits.training: {e}")
    run = load_finished_run(args.run, args.unfinished, data_dir=args.data_dir)
    splits = build_datasets(run.recipe.data, run.model, seed=run.recipe.seed)
    val = DataLoader(splits.val, batch_size=128)
    test = DataLoader(splits.test, batch_size=128)
    info = {"run": str(args.run), "arch": run.recipe.model.model, "dataset": run.recipe.data.dataset}
    info["training"] = trained(run)
    return run.model, val, test, info


def _gates_note(info: dict[str, Any]) -> str:
    fit = info.get("gate_fit")
    return f" (gates fitted on val, {fit['objective']})" if fit else ""


def _tiered(model, parts, test: DataLoader, policy: str, thresholds: list[float], requests: int) -> dict[str, Any]:
    """Real run over Ray Serve at one split, batch-of-one requests and the whole set, checked against predict."""
    edge, cloud = parts
    xs, ys = zip(*[(x, y) for x, y in test])
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    ref = predict(model, x_all, policy, thresholds, labels=y_all)
    out: dict[str, Any] = {"split": edge.exit_name}
    with local_serve() as base:
        from ray import serve

        serve.run(cloud_app(cloud), name="cloud", route_prefix="/cloud")
        for compression in ("none", "int8-channel"):
            runner = EdgeClient(edge, f"{base}/cloud", policy, thresholds, compression=compression)
            whole = runner.run(x_all)
            single = [runner.run(x_all[i : i + 1]) for i in range(min(requests, len(y_all)))]
            lat = np.array([float(r.latency_s[0]) for r in single]) * 1e3
            sent = [r for r in single if r.requests]
            out[compression] = {
                "batch": {
                    **whole.summary(),
                    "exit_index_matches_predict": float((whole.exit_index == ref.exit_index).float().mean()),
                    "max_abs_logit_diff_vs_predict": float((whole.logits - ref.logits).abs().max()),
                    "accuracy": float((whole.logits.argmax(-1) == y_all).float().mean()),
                },
                "per_request": {
                    "requests": len(single),
                    "offloaded": len(sent),
                    "bytes_sent_per_offloaded": float(np.mean([r.bytes_sent for r in sent])) if sent else 0.0,
                    "latency_ms_mean": float(lat.mean()),
                    "latency_ms_p50": float(np.percentile(lat, 50)),
                    "latency_ms_p95": float(np.percentile(lat, 95)),
                    "latency_ms_offloaded_mean": (
                        float(np.mean([float(r.latency_s[0]) for r in sent]) * 1e3) if sent else None
                    ),
                    "latency_ms_edge_only_mean": (
                        float(np.mean([float(r.latency_s[0]) for r in single if not r.requests]) * 1e3)
                        if len(sent) < len(single)
                        else None
                    ),
                },
            }
        out["predict_accuracy"] = ref.stats.accuracy
        out["server"] = runner.check_server()
    return out


def _compression_table(rows_by_split: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| split | codec | bytes / sample | ratio | final-exit agreement | exit agreement | max abs logit diff |",
        "|:---|:---|---:|---:|---:|---:|---:|",
    ]
    for name, rows in rows_by_split.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['compression']} | {r['bytes_per_sample']:,.0f} | {r['ratio']:.2f} | "
                f"{r['final_agreement']:.4f} | {r['exit_agreement']:.4f} | {r['max_abs_logit_diff']:.2e} |"
            )
    return "\n".join(lines)


def _scenario_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| link | codec | recommended | expected ms | best split | its ms | device ms | cloud ms |",
        "|:---|:---|:---|---:|:---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} ({r['uplink_mbps']} Mbit/s, {r['rtt_ms']} ms) | {r['compression']} | {r['best']} | "
            f"{r['best_ms']:.2f} | {r['best_split']} | {r['best_split_ms']:.2f} | {r['device_ms']:.2f} | "
            f"{r['cloud_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a run folder written by timm_exits.training.train (default: train here)")
    p.add_argument("--out", type=Path, default=Path("runs/plan_split"))
    p.add_argument("--data-dir", help="where the --run's data set lives now, if it moved")
    p.add_argument(
        "--unfinished",
        action="store_true",
        help="with --run: use the last checkpoint of a run whose training has not finished (else it is refused)",
    )
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", type=positive_int, default=32)
    p.add_argument("--epochs", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default="gate", choices=["gate", "confidence", "entropy"])
    p.add_argument("--threshold", type=float, help="fixed threshold (default: calibrated on val)")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01)
    p.add_argument("--uplink", type=positive_float, default=10.0, help="Mbit/s")
    p.add_argument("--downlink", type=positive_float, help="Mbit/s (default: --uplink)")
    p.add_argument("--rtt", type=non_negative_float, default=40.0, help="ms")
    p.add_argument("--device-speed", type=positive_float, default=0.2)
    p.add_argument("--server-speed", type=positive_float, default=1.0)
    p.add_argument("--compression", default="none", choices=list(COMPRESSIONS))
    p.add_argument("--min-accuracy", type=float)
    p.add_argument("--repeats", type=positive_int, default=7)
    p.add_argument("--requests", type=positive_int, default=100, help="batch-of-one requests in the HTTP run")
    p.add_argument(
        "--threads", type=positive_int, default=1, help="torch intra-op threads (1 is steadier on a shared box)"
    )
    p.add_argument(
        "--fit-gates",
        default="no_gain",
        choices=[*GATE_OBJECTIVES, "none"],
        help="re-fit the stats gates on val before calibrating the 'gate' policy (none: the trained gates)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.run is not None:
        model, val, test, info = _load_run(args)
    else:
        data = _digits(args.img_size, args.seed)
        model, info = _train(args, data)
        val = DataLoader(data["val"], batch_size=128)
        test = DataLoader(data["test"], batch_size=128)
    info["exits"] = [e.name for e in model.exits]
    val_outputs = collect(model, val)
    info["exit_accuracy_val"] = val_outputs.exit_accuracy
    if args.fit_gates != "none" and args.policy == "gate":
        info["gate_fit"] = {
            "objective": args.fit_gates,
            **fit_gates(model, val_outputs, objective=args.fit_gates).__dict__,
        }

    if args.threshold is None:
        cal = calibrate(model, val, args.policy, max_accuracy_drop=args.max_accuracy_drop, apply=False)
        threshold: float = cal.threshold
        info["calibration"] = {
            "threshold": cal.threshold,
            "val_accuracy": cal.accuracy,
            "val_final_accuracy": cal.final_accuracy,
            "val_cost": cal.cost,
            "val_exit_distribution": cal.exit_distribution,
        }
    else:
        threshold = args.threshold
    common = {"device_speed": args.device_speed, "server_speed": args.server_speed, "policy": args.policy}
    plan = plan_split(
        model,
        val,
        uplink_mbps=args.uplink,
        rtt_ms=args.rtt,
        threshold=threshold,
        downlink_mbps=args.downlink,
        compression=args.compression,
        min_accuracy=args.min_accuracy,
        repeats=args.repeats,
        **common,
    )

    scenarios = []
    for name, up, rtt in SCENARIOS:
        for compression in ("none", "int8-channel"):
            s = plan_split(
                model,
                val,
                up,
                rtt,
                threshold=threshold,
                compression=compression,
                timings=plan.params["measured_ms"],  # same compute numbers, only the link and codec change
                **common,
            )
            rows = {r["split"]: r for r in s.rows}
            scenarios.append(
                {
                    "scenario": name,
                    "uplink_mbps": up,
                    "rtt_ms": rtt,
                    "compression": compression,
                    "best": s.best["split"],
                    "best_ms": s.best["latency_ms"],
                    "best_split": s.best_split["split"] if s.best_split else None,
                    "best_split_ms": s.best_split["latency_ms"] if s.best_split else math.nan,
                    "device_ms": rows["device"]["latency_ms"],
                    "cloud_ms": rows["cloud"]["latency_ms"],
                }
            )

    thresholds = plan.params["thresholds"]
    compression_rows = {}
    for k in range(len(model.branches)):
        parts = split(model, k)
        compression_rows[parts.edge.exit_name] = measure_compression(parts.edge, parts.cloud, test)
    best_k = plan.best_split["exit_index"] if plan.best_split else 0
    tiered = _tiered(model, split(model, best_k), test, args.policy, thresholds, args.requests)

    args.out.mkdir(parents=True, exist_ok=True)
    png = plan.plot(args.out / "plan.png")
    md = "\n\n".join(
        [
            f"# Split plan ({info.get('arch')}, {info.get('dataset', 'digits')} {args.img_size}px, policy "
            f"{args.policy!r}{_gates_note(info)}, threshold {threshold:.4f})",
            plan.to_markdown(),
            "## Link scenarios",
            _scenario_table(scenarios),
            "## Cost of compressing the intermediate tensor (test set, every sample through the cloud part)",
            _compression_table(compression_rows),
            f"Timings: fastest of {args.repeats} runs at batch 1, {args.threads} thread(s) on "
            f"{machine(args.threads)['cpu']} "
            "(the fastest, not the median: the planner's own rule, which discounts other jobs on the machine).",
        ]
    )
    (args.out / "plan.md").write_text(md + "\n", encoding="utf-8")
    result = {
        "model": info,
        "threshold": threshold,
        "plan": plan.to_dict(),
        "scenarios": scenarios,
        "compression": compression_rows,
        "tiered_http": tiered,
        "machine": machine(args.threads),
        "threads": args.threads,
        "batch_size": 1,
        "repeats": args.repeats,
        "files": {"table": str(args.out / "plan.md"), "plot": str(png), "json": str(args.out / "plan.json")},
    }
    (args.out / "plan.json").write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
    print(json.dumps(result, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
