"""Sweep `timm_exits.wrap(model, exits="auto")` over every `timm.list_models()` name.

For each model: create it (pretrained=False, default num_classes), wrap it with exits="auto", run a
random batch of 2 at the model's default input size (`pretrained_cfg["input_size"]`) in train mode,
back-propagate a `SoftConditionalLoss` (soft output, expected cost and every exit's cross-entropy)
and check that every output, the loss and the exit gradients are finite.

Models run in persistent worker processes (one torch thread each, `--jobs` in parallel); a worker is
restarted after a crash, a timeout, a memory kill, or every `--restart-every` models. Per model
there is a timeout in CPU seconds of the worker (the machine is shared and niced processes get
paused, so wall time is no fair limit) plus a wall-clock limit (`--wall-factor` times it), an
address-space limit inside the worker (allocations beyond it raise), and watchdogs in the parent
that kill the worker when its RSS passes the limit or the machine's available memory runs low. A
crash, timeout or memory kill is a recorded failure, never a stop.
Models whose parameters alone (weights + gradients, counted on the meta device) exceed the memory
limit are not built; they are recorded as "excluded" with the reason.

Results are written after every model to `--out` (one short record per model) and printed as JSON at
the end; a rerun skips the models already recorded there, so the sweep can be resumed. The summary
always counts every listed model; a `--filter` run updates its models' records and keeps the file's
machine and config (those of the sweep that wrote it; each record keeps its sources' hash, "src").

    nice -n 19 .venv/bin/python benchmarks/sweep_models.py --limit 30
    nice -n 19 .venv/bin/python benchmarks/sweep_models.py --filter 'resnet*' --timeout 60
    nice -n 19 .venv/bin/python benchmarks/sweep_models.py --jobs 2 --filter 'coat_*' --rerun

This file is the parent (arguments, the model list, workers, records and the results file); what runs
inside a worker process is in `_sweep_worker.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import platform
import random
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from _args import non_negative_int, positive_int
from _sweep_worker import source_hash, vm_kb, worker_main  # imports no torch: threads are set first

__all__ = [
    "THREAD_ENV",
    "Worker",
    "group_failures",
    "machine_info",
    "main",
    "parse_args",
    "reason_key",
    "summarize",
    "write_results",
]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "results" / "sweep_models.json"
RESTART_RSS_KB = 3 * 2**20  # restart a worker that keeps more than 3 GiB after a model
MIN_AVAILABLE_KB = 2 * 2**20  # kill the worker before the machine itself runs out of memory
MEMORY_ERRORS = ("MemoryError", "OutOfMemory", "MemoryKill")
THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


# ------------------------------------------------------------------------------------------ parent
def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _mem_available_kb() -> int:
    """The machine's available memory in kB (MemAvailable of /proc/meminfo); 2**40 where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 2**40


class Worker:
    """A worker subprocess (`sweep_models.py --worker`) speaking the protocol of `_sweep_worker.worker_main`."""

    def __init__(self, mem_gb: float, log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        env = {**os.environ, **THREAD_ENV, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--worker", "--mem-gb", str(mem_gb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=str(ROOT),
            text=True,
            bufsize=1,
        )
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.served = 0
        msg = self._read(deadline=time.monotonic() + 600, cpu_deadline=None, rss_limit_kb=None)
        if not msg or not msg.get("ready"):
            self.kill()
            raise RuntimeError(f"worker failed to start; see {log_path}")

    def _read(
        self, deadline: float, cpu_deadline: float | None, rss_limit_kb: int | None
    ) -> dict[str, Any] | str | None:
        """Next protocol message, or "timeout" / "cpu-timeout" / "memory" / "system-memory" / None (worker died)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            if cpu_deadline is not None and _cpu_seconds(self.proc.pid) > cpu_deadline:
                return "cpu-timeout"
            if rss_limit_kb and vm_kb("VmRSS", self.proc.pid) > rss_limit_kb:
                return "memory"
            if rss_limit_kb and _mem_available_kb() < MIN_AVAILABLE_KB:
                return "system-memory"
            if self.sel.select(timeout=min(left, 0.5)):
                line = self.proc.stdout.readline()
                if not line:
                    return None
                with contextlib.suppress(json.JSONDecodeError):
                    return json.loads(line)

    def run(self, name: str, timeout: float, wall_timeout: float, rss_limit_kb: int) -> dict[str, Any]:
        """Run one model: `timeout` is in CPU seconds of the worker (robust to a shared, niced or paused
        machine), `wall_timeout` in wall-clock seconds."""
        self.served += 1
        self.log.flush()
        log_start = self.log_path.stat().st_size
        t0 = time.perf_counter()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + wall_timeout
        cpu_start = _cpu_seconds(self.proc.pid)
        cpu_deadline = cpu_start + timeout
        stage = "create"
        primary: dict[str, Any] | None = None
        while True:
            msg = self._read(deadline, cpu_deadline, rss_limit_kb)
            if isinstance(msg, dict) and "stage" in msg:
                stage = "create" if msg["stage"] == "size" else msg["stage"]
                continue
            if isinstance(msg, dict) and "primary" in msg:
                primary = msg["primary"]
                continue
            if isinstance(msg, dict) and "result" in msg:
                return msg["result"]
            elapsed = round(time.perf_counter() - t0, 1)
            used = {"cpu_s": round(_cpu_seconds(self.proc.pid) - cpu_start, 1), "src": source_hash()}
            limit = timeout if msg == "cpu-timeout" else wall_timeout
            rec = self._lost(msg, stage, elapsed, limit, rss_limit_kb, log_start)
            if primary is not None:  # the run died in the num_classes=1000 retry; the real result stands
                nc1000 = f"{stage} {rec['error']}: {rec['message']}"[:150]
                return {**primary, "nc1000": nc1000, "time_s": elapsed, **used}
            return {**rec, **used}

    def _lost(
        self, msg: Any, stage: str, elapsed: float, timeout: float, rss_limit_kb: int, log_start: int
    ) -> dict[str, Any]:
        """The record of a model whose worker timed out, ran out of memory or died (the worker is gone)."""
        if msg == "cpu-timeout":
            error, message = "Timeout", f"> {timeout:.0f} CPU-s"
        elif msg == "timeout":
            error, message = "Timeout", f"> {timeout:.0f} s wall clock"
        elif msg == "memory":
            error, message = "MemoryKill", f"RSS > {rss_limit_kb / 2**20:.0f} GiB"
        elif msg == "system-memory":
            error, message = "MemoryKill", f"machine's available memory < {MIN_AVAILABLE_KB / 2**20:.1f} GiB"
        else:
            self.proc.wait()
            error, message = "Crash", f"exit code {self.proc.returncode}: {self._log_tail(log_start)}"
        self.kill()
        return {"status": "fail", "stage": stage, "error": error, "message": message, "time_s": elapsed}

    def _log_tail(self, start: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        # the first error-looking line is usually the cause (a C++ abort message, a fatal signal, ...)
        for ln in lines:
            if re.search(r"terminate|Error|error|Fatal|Abort|Segmentation|Killed", ln):
                return ln[:200]
        return (lines[-1] if lines else "no output")[:200]

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        if self.proc.poll() is None:
            self.kill()
        self.sel.close()
        self.log.close()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(workers: int = 1) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    import timm
    import torch

    import timm_exits

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": 1,
        "workers": workers,
        "ram_gb": mem_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "timm_exits": timm_exits.__version__,
        "timm_exits_src": source_hash(),
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
    }


def reason_key(rec: dict[str, Any]) -> str:
    """Group failures: stage, exception type and the message with names and numbers blanked out."""
    msg = rec.get("message", "")
    if rec.get("cls"):
        msg = re.sub(rf"\b{re.escape(rec['cls'])}\b", "<Model>", msg)
    msg = re.sub(r"\[[^\]]*\]|\([^)]*\)", "[…]", msg)
    msg = re.sub(r"'[^'\s]*'|\"[^\"]*\"", "'…'", msg)
    msg = re.sub(r"\d+(\.\d+)?", "N", msg)
    return f"{rec['stage']}: {rec['error']}: {msg[:100]}"


def summarize(records: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    done = [records[n] for n in names if n in records]
    status = Counter(r["status"] for r in done)
    created = [r for r in done if r["status"] == "ok" or (r["status"] == "fail" and r["stage"] != "create")]
    resource_limited = [r for r in created if r.get("error") in ("Timeout", *MEMORY_ERRORS)]
    ok = status["ok"]

    def rate(n: int) -> float | None:
        return round(ok / n, 4) if n else None

    return {
        "models_listed": len(names),
        "models_done": len(done),
        "ok": ok,
        "fail": status["fail"],
        "excluded": status["excluded"],
        "create_failures": sum(1 for r in done if r["status"] == "fail" and r["stage"] == "create"),
        "failures_by_stage": dict(Counter(r["stage"] for r in done if r["status"] == "fail")),
        "created": len(created),
        "resource_limited_after_create": len(resource_limited),
        "pass_rate_all": rate(len(done)),
        "pass_rate_created": rate(len(created)),
        "pass_rate_created_within_limits": rate(len(created) - len(resource_limited)),
        "num_classes0_models": sum(1 for r in done if "nc1000" in r),
        "num_classes0_ok_with_num_classes_1000": sum(1 for r in done if r.get("nc1000", "").startswith("ok")),
        "exits_histogram": dict(sorted(Counter(r.get("exits") for r in done if r["status"] == "ok").items())),
        "model_seconds": round(sum(r.get("time_s", 0.0) for r in done), 1),
    }


def group_failures(records: dict[str, dict[str, Any]], names: list[str], examples: int = 6) -> list[dict[str, Any]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for n in names:
        r = records.get(n)
        if r and r["status"] == "fail":
            groups[reason_key(r)].append(n)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [
        {"reason": k, "count": len(v), "examples": v[:examples], "message": records[v[0]].get("message", "")}
        for k, v in ordered
    ]


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Write the results JSON atomically, one record per line so the file diffs well."""
    records = payload["records"]
    head = {k: v for k, v in payload.items() if k != "records"}
    text = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
    lines = [
        f"  {json.dumps(n)}: {json.dumps(r, ensure_ascii=False, separators=(',', ':'))}"
        for n, r in sorted(records.items())
    ]
    text += ',\n "records": {\n' + ",\n".join(lines) + "\n }\n}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--filter", default="*", help="fnmatch pattern(s) on timm model names, comma-separated")
    p.add_argument(
        "--limit",
        type=non_negative_int,
        default=None,
        help="run at most this many models not yet in --out (0: none, only rewrite the summary)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="CPU seconds per model (default 120)")
    p.add_argument(
        "--wall-factor", type=float, default=5.0, help="wall-clock limit per model, as a multiple of --timeout"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    p.add_argument(
        "--mem-gb",
        type=float,
        default=16.0,
        help="memory limit per model in GiB; larger models are excluded (default 16)",
    )
    p.add_argument(
        "--order",
        choices=("shuffle", "name"),
        default="shuffle",
        help="shuffle (seeded, so a partial sweep is a random sample) or alphabetical",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="workers in parallel, one torch thread each (a model killed for the machine's memory is best "
        "retried with --jobs 1)",
    )
    p.add_argument(
        "--restart-every", type=positive_int, default=40, help="restart the worker after this many models (1 or more)"
    )
    p.add_argument(
        "--retry-failed",
        nargs="?",
        const="",
        default=None,
        metavar="REGEX",
        help="rerun models recorded as failed (only those whose 'error: message nc1000' matches REGEX, if given)",
    )
    p.add_argument(
        "--rerun",
        action="store_true",
        help="rerun the models matching --filter whatever their record says (after a fix that changes them)",
    )
    p.add_argument("--log", type=Path, default=None, help="worker stderr log (default: <tmpdir>/sweep_models.log)")
    p.add_argument("--quiet", action="store_true", help="no per-model progress lines on stderr")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.mem_gb)
        return 0
    os.environ.update(THREAD_ENV)
    import warnings

    warnings.filterwarnings("ignore")
    import timm

    all_names = timm.list_models()
    patterns = [p.strip() for p in args.filter.split(",") if p.strip()]
    names = [n for n in all_names if any(fnmatch.fnmatch(n, p) for p in patterns)]

    out: Path = args.out
    previous: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    records: dict[str, dict[str, Any]] = previous.get("records", {})
    before = set(records)
    if args.retry_failed is not None:
        pattern = re.compile(args.retry_failed)
        selected = set(names)  # only failures within --filter are retried; the others stay recorded
        records = {
            n: r
            for n, r in records.items()
            if r["status"] != "fail"
            or n not in selected
            or not pattern.search(f"{r['error']}: {r.get('message', '')} {r.get('nc1000', '')}")
        }
    if args.rerun:
        if args.filter == "*":
            raise SystemExit("--rerun reruns the models matching --filter; give --filter (it would redo every model)")
        chosen = set(names)
        records = {n: r for n, r in records.items() if n not in chosen}
    todo = [n for n in names if n not in records]
    if args.order == "shuffle":
        random.Random(args.seed).shuffle(todo)
    todo.sort(key=lambda n: n not in before)  # retried models first
    if args.limit is not None:
        todo = todo[: args.limit]

    config = {
        "batch": 2,
        "exits": "auto",
        "loss": "SoftConditionalLoss(cost_weight=0.1)",
        "mode": "train",
        "timeout_cpu_s": args.timeout,
        "timeout_wall_s": args.timeout * args.wall_factor,
        "mem_limit_gib": args.mem_gb,
        "filter": args.filter,
    }
    payload: dict[str, Any] = {"machine": machine_info(args.jobs), "config": config}
    if args.filter != "*":  # part of the list: the file keeps the machine and config of the sweep that wrote it
        payload.update({k: previous[k] for k in ("machine", "config") if k in previous})

    def save() -> dict[str, Any]:
        payload.update(
            summary=summarize(records, all_names),
            failures=group_failures(records, all_names),
            excluded=[
                {"model": n, "reason": records[n]["message"]}
                for n in all_names
                if records.get(n, {}).get("status") == "excluded"
            ],
            records=records,
        )
        write_results(out, payload)
        return payload

    log_path = args.log or Path(tempfile.gettempdir()) / "sweep_models.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rss_limit_kb = int((args.mem_gb + 1.0) * 2**20)
    signal.signal(signal.SIGTERM, _terminate)
    t_start = time.perf_counter()
    lock = threading.Lock()
    stop = threading.Event()
    pending = iter(enumerate(todo, 1))
    workers: dict[int, Worker] = {}

    def serve(slot: int) -> None:
        """One worker's loop: take the next model, run it, record it (records and the file under the lock)."""
        slot_log = log_path if args.jobs == 1 else log_path.with_name(f"{log_path.stem}.{slot}{log_path.suffix}")
        while not stop.is_set():
            with lock:
                i, name = next(pending, (None, None))
            if name is None:
                return
            if slot not in workers:
                workers[slot] = Worker(args.mem_gb, slot_log)
            worker = workers[slot]
            rec = worker.run(name, args.timeout, args.timeout * args.wall_factor, rss_limit_kb)
            if stop.is_set():  # the worker was killed by the stop, not by the model: record nothing
                return
            dead = worker.proc.poll() is not None or vm_kb("VmRSS", worker.proc.pid) > RESTART_RSS_KB
            if dead or worker.served >= args.restart_every or rec.get("error") in MEMORY_ERRORS:
                workers.pop(slot).close()
            with lock:
                records[name] = rec
                save()
                if not args.quiet:
                    detail = (
                        f"exits={rec.get('exits')}"
                        if rec["status"] == "ok"
                        else (f"{rec['stage']} {rec.get('error')}: {rec.get('message', '')[:90]}")
                    )
                    print(
                        f"[{i}/{len(todo)} {time.perf_counter() - t_start:.0f}s] {name}: {rec['status']} "
                        f"{rec.get('time_s')}s ({rec.get('cpu_s')} CPU-s) {detail}",
                        file=sys.stderr,
                        flush=True,
                    )

    threads = [threading.Thread(target=serve, args=(slot,), daemon=True) for slot in range(args.jobs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=1.0)
    finally:
        stop.set()
        for w in list(workers.values()):
            w.kill()  # a stopped sweep abandons the models in progress; they are rerun on resume
        for t in threads:
            t.join(timeout=60)
    final = save()
    print(json.dumps({k: v for k, v in final.items() if k != "records"}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
