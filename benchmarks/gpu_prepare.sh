#!/usr/bin/env bash
# Prepares, on the CPU machine, what the GPU machine lacks (it reaches no registry): the
# wheels of benchmarks/gpu_travel.py's list for Python 3.12 in .whl/ (diffusers and what it
# imports that the image does not have) and the full-size model configs in .skeletons/
# (configs and tokenizers, no weights). Both folders are git-ignored; carry them with the
# device tool: carry [".whl", ".skeletons"]. Ends with the travel check (under 60 MiB).
#   bash benchmarks/gpu_prepare.sh SKELETONS_DIR     # a folder holding sd21-base/ and sd15/
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:?usage: bash benchmarks/gpu_prepare.sh SKELETONS_DIR (a folder with sd21-base/ and sd15/)}
for m in sd21-base sd15; do
    [ -f "$src/$m/model_index.json" ] || { echo "no $src/$m/model_index.json" >&2; exit 2; }
done
rm -rf .whl .skeletons
mkdir -p .whl .skeletons
mapfile -t wheels < <(python3 -m benchmarks.gpu_travel --wheels)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${wheels[@]}"
for m in sd21-base sd15; do cp -r "$src/$m" .skeletons/; done
python3 -m benchmarks.gpu_travel --check
