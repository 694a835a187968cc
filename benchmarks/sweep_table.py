"""Render the model sweep's results (`sweep_models.py` output) as the README's table.

Counts a model as passing when `wrap(model, exits="auto")` forward + backward worked as created, or,
for the models that default to `num_classes=0` (the documented error), with `num_classes=1000`.
Failures are split into those beyond the sweep's per-model limits (CPU time, memory, models too
large to build) and the rest, which are listed with their reasons. The pass rate of the sample
comes with a 95 % Wilson score interval for the whole list while the sweep is partial (it visits
models in a seeded random order, so a partial sweep is a random sample).

    python benchmarks/sweep_table.py results/sweep_models.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

LIMIT_ERRORS = ("Timeout", "OutOfMemory", "TooLarge", "MemoryError", "MemoryKill")


def wilson(passed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion."""
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _beyond_limits(rec: dict) -> bool:
    if rec["status"] == "excluded":
        return True
    text = f"{rec.get('error', '')} {rec.get('nc1000', '')}" if "nc1000" in rec else rec.get("error", "")
    return any(e in text for e in LIMIT_ERRORS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path)
    args = p.parse_args()
    data = json.loads(args.results.read_text())
    records = data["records"]
    done = len(records)
    listed = max(done, data["summary"]["models_listed"])  # the records count, whatever a summary says
    as_is = [n for n, r in records.items() if r["status"] == "ok"]
    nc0 = [n for n, r in records.items() if "nc1000" in r]
    nc0_ok = [n for n in nc0 if records[n]["nc1000"].startswith("ok")]
    failing = [n for n, r in records.items() if r["status"] != "ok" and n not in nc0_ok]
    limited = [n for n in failing if _beyond_limits(records[n])]
    other = [n for n in failing if n not in limited]
    passed = len(as_is) + len(nc0_ok)
    low, high = wilson(passed, done)
    runnable = done - len(limited)
    print(f"All {listed} models:\n" if done >= listed else f"A random {done} of the {listed} models:\n")
    print("| | models |\n|---|---|")
    print(f"| pass as they are | {len(as_is)} |")
    print(
        "| default to `num_classes=0`: the documented error asks for `wrap(model, num_classes=N)`; pass with it "
        f"| {len(nc0_ok)} of {len(nc0)} |"
    )
    share = f"{100 * passed / done:.1f} %"
    if done < listed:  # a sample: say what it tells about the whole list
        share += f"; 95 % Wilson interval for the whole list {100 * low:.1f} to {100 * high:.1f} %"
    print(f"| **pass in all** | **{passed} of {done} ({share})** |")
    print(f"| beyond this machine's limits (CPU time or memory per model) | {len(limited)} |")
    print(f"| **pass, of the models this machine can run** | **{passed} of {runnable}** |")
    if other:
        print("\nOther failures:\n")
        for n in other:
            r = records[n]
            print(f"- `{n}`: {r.get('stage')} {r.get('error')}: {r.get('message', '')[:200]} {r.get('nc1000', '')}")
    print("\nBeyond the limits: " + ", ".join(f"`{n}`" for n in sorted(limited)))


if __name__ == "__main__":
    main()
