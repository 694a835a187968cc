"""Markdown table of `speed.py` output, as shown in README.md.

python benchmarks/speed_table.py benchmarks/results/speed.json benchmarks/results/speed_channels_last.json
"""

from __future__ import annotations

import argparse
import json


def rows(result: dict) -> list[str]:
    """Table rows of one (model, input size, batch) result of speed.py."""
    fmt = "channels_last" if result["memory_format"].startswith("channels") else "NCHW"
    device = result.get("device", "cpu")  # results before --device ran on the CPU
    where = "" if device == "cpu" else f" ({device})"
    head = f"| {result['model']} @ {result['input_size'][1]}{where} | {fmt} | {result['batch']} |"
    out = []
    for c in result["cases"]:
        case = "mixed 40/30/20/10 %" if c["case"] == "mixed" else c["case"].replace("all_at_exit_", "all at exit ")
        limit = f"{c['truncated_speedup']:.2f}x" if "truncated_speedup" in c else "-"
        comp = "- | - | -"  # results without compiled runs
        if "ms_compiled" in c:
            comp = (
                f"{c['ms_compiled']:.2f} | {c['measured_speedup_compiled']:.2f}x "
                f"| {c['measured_over_predicted_compiled']:.2f}"
            )
        out.append(
            f"{head} {case} | {c['ms']:.2f} | {c['measured_speedup']:.2f}x | {c['predicted_speedup']:.2f}x "
            f"| {c['measured_over_predicted']:.2f} | {comp} | {limit} |"
        )
    out.append(f"{head} plain timm forward | {result['plain_ms']:.2f} | 1.00x | | | | | | |")
    return out


def speed_results(path: str) -> list[dict]:
    """The results of a speed.py JSON file; ValueError, saying why, for a file that is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("benchmark") != "speed" or "results" not in data:
        kind = data.get("benchmark") if isinstance(data, dict) else None
        raise ValueError(f"{path} is not speed.py output (benchmark: {kind})")
    return data["results"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="JSON files written by speed.py")
    args = p.parse_args()
    try:  # every file checked before the table starts
        results = [result for path in args.files for result in speed_results(path)]
    except ValueError as e:
        p.error(str(e))
    print(
        "| model @ input | memory format | batch | exits taken | ms | measured speed-up | predicted "
        "| measured / predicted | ms, compiled exits | speed-up, compiled | compiled / predicted "
        "| bare backbone's limit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        print("\n".join(rows(result)))


if __name__ == "__main__":
    main()
