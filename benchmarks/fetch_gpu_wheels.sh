#!/usr/bin/env bash
# Download the wheels the GPU check carries (benchmarks/gpu_wheels.txt) into .whl/, for the GPU machines' Python
# (3.12, manylinux x86_64), without their dependencies: those are in the image (benchmarks/gpu_image.txt) or listed.
#     benchmarks/fetch_gpu_wheels.sh            # then carry .whl with the run: benchmarks/gpu_check.sh installs it
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$' | while read -r spec; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$spec"
done
ls -l .whl
du -sh .whl
