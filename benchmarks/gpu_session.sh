#!/usr/bin/env bash
# The one prepared GPU command: install, then every stage of benchmarks/gpu_run.py in order of
# value within 8 minutes of wall time (benchmarks/gpu_plan.json has each stage's estimate).
# Each stage writes $OUT/<stage>.json when it ends; $OUT/log.txt holds everything printed.
#
# Prepare once on the CPU machine (both folders are git-ignored, so carry them):
#   bash benchmarks/gpu_prepare.sh SKELETONS_DIR      # .whl/ and .skeletons/
# then on the device machine, with carry [".whl", ".skeletons"]:
#   bash benchmarks/gpu_session.sh
# and back here: python -m benchmarks.gpu_run --table DIR --results-md benchmarks/RESULTS.md
#
#   bash benchmarks/gpu_session.sh --dry-run    # CPU: every stage's code, tiny model, toy sizes (CI test)
set -o pipefail
START=$(date +%s)
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--dry-run" ]; then
    OUT=${OUT:-$(mktemp -d)}
    mkdir -p "$OUT"
    python3 -m benchmarks.gpu_run --dry-run --out "$OUT" --started "$START" 2>&1 | tee "$OUT/log.txt"
    rc=$?
    missing=0
    for stage in a-env b-correctness c-headline d-side e-mini f-hyperfeatures g-checks; do
        [ -s "$OUT/$stage.json" ] || { echo "dry run: $stage wrote no $OUT/$stage.json" >&2; missing=1; }
    done
    [ "$missing" = 0 ] && echo "dry run: every stage wrote its JSON under $OUT"
    [ "$rc" = 0 ] && [ "$missing" = 0 ]
    exit $?
fi

OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1   # a killed run still returns its log
unset TRITON_INTERPRET              # kernels run natively on the GPU
export EMERDIFF_SKELETONS=$PWD/.skeletons
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "FAILED: installing the carried wheels (.whl/)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . \
    || { echo "FAILED: installing the project"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# one line, within the first 30 s, for anything the project cannot import under this image
python3 - <<'EOF' || exit 1
import importlib, sys
versions = []
for name in ("torch", "triton", "diffusers", "transformers", "safetensors", "numpy", "scipy", "PIL"):
    try:
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:
        sys.exit(f"FAILED: cannot import {name}: {type(exc).__name__}: {exc}")
print(", ".join(versions))
for name in ("emerdiff_fast", "emerdiff_fast.kernels", "emerdiff_fast.hyperfeatures", "benchmarks.gpu_run"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        sys.exit(f"FAILED: cannot import {name}: {type(exc).__name__}: {exc}")
import torch
if not torch.cuda.is_available():
    sys.exit("FAILED: torch sees no CUDA device")
EOF
[ -d .skeletons/sd21-base ] && [ -d .skeletons/sd15 ] || { echo "FAILED: no .skeletons/sd21-base or sd15 (carry .skeletons)"; exit 1; }
echo "setup took $(( $(date +%s) - START )) s"
python3 -m benchmarks.gpu_run --out "$OUT" --started "$START"
