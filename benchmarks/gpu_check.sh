#!/usr/bin/env bash
# GPU check: the CUDA tests, then benchmarks/speed.py and benchmarks/overhead.py on CUDA at batch 1 and
# 64 (eager and compiled exits side by side), in under 8 minutes on one GPU, JSON and logs kept.
#
#   bash benchmarks/gpu_check.sh                    # on the GPU machine, from the repo root
#   bash benchmarks/gpu_check.sh --prepare-wheels   # beforehand, on a machine that reaches PyPI
#
# The GPU machine gets a copy of the working tree and may lack the package's dependencies and any
# network. --prepare-wheels puts pure-Python wheels of what such a machine lacks (timm at this
# machine's version; fvcore and its small dependencies) in .whl/ (git-ignored; carry it along); the
# check installs them under /tmp with --no-deps and never touches the machine's torch. Without
# .whl/, missing packages are installed from the index with torch pinned to the installed version.
#
# Output goes to $OUT, else benchmarks/results/gpu: setup.log, tests.log, speed.json, speed.log,
# speed_table.md, overhead.json, overhead.log, summary.txt. Each step has its own time limit, capped
# by what is left of the whole budget (GPU_CHECK_BUDGET_S, 465 s); a failing or timed-out step does
# not stop the later ones, and the script exits non-zero if any step failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SELF="$PWD/benchmarks/gpu_check.sh"
PY=${PYTHON:-$(command -v python3 || command -v python)}
WHEELS=.whl
SITE=/tmp/timm-exits-site

# what the package, its tests and the benchmarks import: import name, or import name=pip name
MODULES="torch torchvision timm fvcore iopath yacs termcolor tabulate portalocker safetensors huggingface_hub=huggingface-hub
yaml=pyyaml numpy tqdm sklearn=scikit-learn matplotlib PIL=pillow pytest"
OFFLINE_WHEELS=(timm fvcore iopath yacs termcolor tabulate portalocker safetensors huggingface_hub pytest pluggy iniconfig)

if [[ "${1:-}" == "--prepare-wheels" ]]; then
  pins=$("$PY" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' "${OFFLINE_WHEELS[@]}")
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # shellcheck disable=SC2086  # one argument per pin
  "$PY" -m pip wheel -q --no-deps -w "$WHEELS" $pins
  ls -l "$WHEELS"
  echo "carry $WHEELS along with the working tree (device tool: carry [\"$WHEELS\"])"
  exit 0
fi

OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
START=$SECONDS
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-465}))
STEPS=()
FAILED=0

# step NAME BUDGET_S LOG CMD...: runs CMD under `timeout`, output to LOG; prints its time and exit code
step() {
  local name=$1 budget=$2 log=$3
  shift 3
  local left=$((DEADLINE - SECONDS)) rc t0=$SECONDS
  if ((budget > left)); then budget=$left; fi
  echo "== $name (limit ${budget}s): $*"
  if ((budget < 10)); then
    rc=124
    echo "no time left in the budget: not run" >"$log"
  else
    set +e
    timeout --kill-after=10 "$budget" "$@" >"$log" 2>&1
    rc=$?
    set -e
  fi
  rm -f "$OUT"/*.tmp # a benchmark killed while writing its JSON keeps the previous version
  local took=$((SECONDS - t0))
  if ((rc != 0)); then
    FAILED=1
    if ((rc == 124 || rc == 137)); then echo "-- $name TIMED OUT after ${took}s; its log ends:"; else
      echo "-- $name FAILED (exit $rc) after ${took}s; its log ends:"
    fi
    tail -n 25 "$log" | cut -c1-300
  else
    echo "-- $name ok in ${took}s"
    if (($(wc -l <"$log") <= 15)); then cut -c1-300 "$log"; else tail -n 2 "$log" | cut -c1-300; fi
  fi
  STEPS+=("$(printf '%-9s exit %3d  %4ds of %4ds' "$name" "$rc" "$took" "$budget")")
}

# the pip names of the MODULES that do not import (one process: importing torch takes seconds)
missing_modules() {
  # shellcheck disable=SC2086  # one argument per module
  "$PY" -c 'import importlib, sys
missing = []
for item in sys.argv[1:]:
    module, _, pip_name = item.partition("=")
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(pip_name or module)
print(" ".join(missing))' $MODULES
}

setup() {
  echo "python: $PY"
  "$PY" -c "import sys, torch; print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available(),
'| CUDA', torch.version.cuda, '| python', sys.version.split()[0])"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  fi
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing the carried wheels into $SITE (no dependencies, no index): $(ls "$WHEELS")"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  fi
  local missing
  missing=$(PYTHONPATH="$SITE" missing_modules)
  if [[ -n "$missing" ]]; then
    # into the machine's environment (--target would ignore what is installed and fetch torch again);
    # the pins make pip fail rather than replace the machine's torch
    echo "missing: $missing; installing them from the index with torch pinned to the installed one"
    local pins=/tmp/timm-exits-torch-pins.txt
    "$PY" -c 'from importlib.metadata import version
for n in ("torch", "torchvision", "triton"):
    try:
        print(f"{n}=={version(n)}")
    except Exception:
        pass' >"$pins"
    # shellcheck disable=SC2086  # one argument per package
    "$PY" -m pip install -q --retries 0 --timeout 10 -c "$pins" $missing || true
    missing=$(PYTHONPATH="$SITE" missing_modules)
    if [[ -n "$missing" ]]; then
      echo "still missing: $missing"
      return 1
    fi
  fi
  PYTHONPATH="$PWD:$SITE" "$PY" -c "import timm, torch, timm_exits; assert torch.cuda.is_available(), 'no CUDA device'
print('timm', timm.__version__, '| timm_exits from', timm_exits.__file__, '|', torch.cuda.get_device_name())"
}

summary() {
  timeout 10 "$PY" - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"{name}: none ({type(e).__name__})")
        return None


speed, overhead = load("speed.json"), load("overhead.json")
m = (speed or overhead or {}).get("machine")
if m:
    keys = ("gpu", "gpu_driver", "torch", "cuda", "cudnn", "triton", "timm", "tf32_cudnn", "tf32_matmul")
    print(" | ".join(f"{k} {m.get(k)}" for k in keys))
if speed:
    print("speed.py: ms per batch, speed-up over the plain forward (compiled exits in brackets)")
    for r in speed["results"]:
        cells = [
            f"{c['case'].replace('all_at_exit_', 'exit ')} {c['measured_speedup']:.2f}x ({c['measured_speedup_compiled']:.2f}x)"
            for c in r["cases"]
        ]
        print(
            f"  {r['model']}@{r['input_size'][1]} b{r['batch']}: plain {r['plain_ms']:.2f} ms, graphs "
            f"{r.get('compiled_graphs')}; " + ", ".join(cells)
        )
if overhead:
    print("overhead.py: no exit taken, paired ratio to the prediction (plain x gamma_final)")
    for r in overhead["inference"]:
        ms = r["ms"]
        print(
            f"  {r['model']} b{r['batch']}: plain {ms['plain']:.2f} ms, gates closed {ms['gates_closed']:.2f} ms "
            f"({r['gates_closed_over_predicted_paired']:.3f}), compiled {ms['gates_closed_compiled']:.2f} ms "
            f"({r['gates_closed_compiled_over_predicted_paired']:.3f}), compile {r['compile_s']:.1f} s, "
            f"graphs {r.get('compiled_graphs')}, max diff {r.get('compiled_max_abs_diff', float('nan')):.1e}"
        )
    for r in overhead["training"]:
        ms = r["ms"]
        print(
            f"  {r['model']} training step b{r['batch']}: plain {ms['plain_step']:.2f} ms, wrapped "
            f"{ms['wrapped_step']:.2f} ms ({r['wrapped_over_plain_paired']:.3f})"
        )
EOF
}

if [[ "${1:-}" == "--setup" ]]; then # the setup step, run by the check below under its time limit
  setup
  exit
fi

echo "GPU check into $OUT, budget $((DEADLINE - START)) s"
step setup 60 "$OUT/setup.log" bash "$SELF" --setup
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# (a) the CUDA tests: hard exit on CUDA (fp32, bf16, one host sync per exit) and compiled exits on CUDA
# (in this process: the ini's `-n auto` would need pytest-xdist, which the machine may lack)
step tests 100 "$OUT/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider -o addopts= -m "not slow" \
  tests/test_inference.py tests/test_compile.py -k cuda
# (b) measured vs predicted speed-up of hard exit, eager and compiled exits; resnet18 at 224 and 32, vit_tiny
step speed 190 "$OUT/speed.log" "$PY" benchmarks/speed.py --device cuda --batches 1 64 \
  --models resnet18 vit_tiny_patch16_224 --repeats 31 --warmup 3 --threads 8 --out "$OUT/speed.json"
# (c) overhead with no exit taken (eager and compiled exits), the exits alone, and the training step
step overhead 110 "$OUT/overhead.log" "$PY" benchmarks/overhead.py --device cuda --batches 1 64 \
  --models resnet18 vit_tiny_patch16_224 --repeats 61 --warmup 3 --threads 8 --out "$OUT/overhead.json"

if [[ -f "$OUT/speed.json" ]]; then
  timeout 10 "$PY" benchmarks/speed_table.py "$OUT/speed.json" >"$OUT/speed_table.md" || true
fi
{
  echo "== summary ($((SECONDS - START)) s in all)"
  printf '%s\n' "${STEPS[@]}"
  summary || true
} | tee "$OUT/summary.txt"
if ((FAILED)); then
  echo "GPU check: some step failed (see above and the logs in $OUT)"
  exit 1
fi
echo "GPU check: all steps passed"
