#!/usr/bin/env bash
# The one prepared GPU command: install what the image lacks, a first-seconds check, then
# benchmarks/gpu_run.py's stages, the headline first (benchmarks/gpu_plan.json has each
# stage's estimate, planned for an H100 within 8 minutes). Each stage writes $OUT/<stage>.json
# (the headline after every row); $OUT/log.txt holds everything printed; nothing else is left
# in $OUT. The run is stopped (SIGINT, its files kept) before the device tool's 10 minutes.
#
# Prepare once on the CPU machine (both folders are git-ignored, so carry them):
#   bash benchmarks/gpu_prepare.sh SKELETONS_DIR      # .whl/ and .skeletons/, then the travel check
# then on the device machine, with carry [".whl", ".skeletons"] (.git does not travel, so
# pass the commit: `git rev-parse --short HEAD` here):
#   EMERDIFF_COMMIT=<hash> bash benchmarks/gpu_session.sh
# and back here: python -m benchmarks.gpu_run --table DIR --results-md benchmarks/RESULTS.md
#
#   bash benchmarks/gpu_session.sh --dry-run    # CPU: what travels, every stage's code, tiny model,
#                                               # toy sizes (a CI test); installs .whl/ where it exists
set -o pipefail
START=$(date +%s)
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry-run" ]; then
    DRY=--dry-run
    OUT=${OUT:-$(mktemp -d)}
    EMERDIFF_COMMIT=${EMERDIFF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)}
else
    OUT=${OUT:-/tmp/out}
    unset TRITON_INTERPRET              # kernels run natively on the GPU
    export EMERDIFF_SKELETONS=$PWD/.skeletons
fi
export EMERDIFF_COMMIT
mkdir -p "$OUT"
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"; rm -f "$OUT"/.*.tmp' EXIT
exec > >(tee "$OUT/log.txt") 2>&1   # a killed run still returns its log
TEE=$!
echo "commit ${EMERDIFF_COMMIT:-unknown: pass EMERDIFF_COMMIT=<hash>}, source digest $(python3 -m benchmarks.gpu_travel --digest)"
if [ -n "$DRY" ]; then
    python3 -m benchmarks.gpu_travel --check || { echo "FAILED: the GPU call would carry too much (above)"; exit 1; }
else
    [ -d .skeletons/sd21-base ] && [ -d .skeletons/sd15 ] || { echo "FAILED: no .skeletons/sd21-base or sd15 (carry .skeletons)"; exit 1; }
    [ -d .whl ] || { echo "FAILED: no .whl (carry .whl: bash benchmarks/gpu_prepare.sh)"; exit 1; }
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# .whl holds Python 3.12 wheels (the image's): a dry run elsewhere uses what is installed
if [ -d .whl ] && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    # what the image lacks, and the project itself, as on the GPU machine
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
        || { echo "FAILED: installing the carried wheels (.whl/)"; exit 1; }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$SITE" . \
        || { echo "FAILED: installing the project"; exit 1; }
elif [ -z "$DRY" ]; then
    echo "FAILED: .whl holds wheels for Python 3.12; this is $(python3 --version)"; exit 1
fi
echo "setup took $(( $(date +%s) - START )) s"
# gpu_run first checks the imports and builds the full-size models on the meta device (one line,
# in seconds, if anything fails under this image); SIGINT 30 s before the device tool's 600 s:
# the stage in progress writes what it has
left=$(( 570 - ($(date +%s) - START) )); [ "$left" -ge 30 ] || left=30
timeout -s INT -k 15 "$left" python3 -m benchmarks.gpu_run --out "$OUT" --started "$START" $DRY
rc=$?
# 124: stopped at the time limit on purpose (its files written); not the device tool's kill
[ "$rc" = 124 ] && { echo "stopped at the session's time limit"; rc=3; }
rm -f "$OUT"/.*.tmp
python3 -m benchmarks.gpu_run --check-out "$OUT" || rc=1
exec >&- 2>&-   # the log's last lines reach log.txt before the command ends
wait "$TEE" 2>/dev/null
exit $rc
