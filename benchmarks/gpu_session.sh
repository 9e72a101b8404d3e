#!/usr/bin/env bash
# One device-tool call per stage on the lent GPU (each stage fits the 10-minute limit).
# Prepare once on the CPU machine (see ../shared/gpu/README.md):
#   ../shared/gpu/fetch-wheels.sh && mkdir -p .skeletons && cp -r ../shared/model-skeletons/* .skeletons/
# then run with carry [".whl", ".skeletons"]:
#   bash benchmarks/gpu_session.sh check       # kernel tests on CUDA, fast-vs-reference at 512 px
#   bash benchmarks/gpu_session.sh waterfall   # benchmarks/waterfall.py --full (JSON + RESULTS.md)
#   bash benchmarks/gpu_session.sh bench       # pytest-benchmark suite, full size
#   bash benchmarks/gpu_session.sh gpu18       # issue 18's GPU-only checks (chunk, CUDA graphs, int64)
# Everything lands in $OUT (log, JSON, RESULTS.md, benchmark JSON); copy it into the repo.
set -o pipefail
export PYTHONUNBUFFERED=1 EMERDIFF_SKELETONS=$PWD/.skeletons
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)" | tee -a "$OUT/gpu.txt"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
case "$1" in
  check)
    python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT/check.log"
    python3 -m benchmarks.check_equivalence --resolution 512 --masks 30 --dtypes bfloat16 float32 \
      --json "$OUT/equivalence.json" 2>&1 | tee -a "$OUT/check.log" ;;
  waterfall)
    python3 -m benchmarks.waterfall --full --rounds "${ROUNDS:-2}" --out-dir "$OUT" \
      --results-md "$OUT/RESULTS.md" 2>&1 | tee "$OUT/waterfall.log" ;;
  bench)
    EMERDIFF_BENCH_FULL=1 python3 -m pytest -q -p no:cacheprovider benchmarks/ --benchmark-only \
      --benchmark-json "$OUT/bench.json" 2>&1 | tail -60 | tee "$OUT/bench.log" ;;
  gpu18)
    python3 -m benchmarks.gpu_checks --json "$OUT/gpu_checks.json" 2>&1 | tee "$OUT/gpu18.log" ;;
  *) echo "usage: $0 check|waterfall|bench|gpu18"; exit 2 ;;
esac
