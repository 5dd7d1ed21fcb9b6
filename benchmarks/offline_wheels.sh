#!/usr/bin/env bash
# For a GPU machine without a network (an offline cluster node): on a machine with one and the README's install
# (.venv), fetch into .whl/ the wheels of everything that install holds except torch and its CUDA libraries (the GPU
# machine keeps its own build), for the GPU machine's Python (PYTHON_VERSION, default 3.12) on x86-64 Linux. Copy
# .whl/ into the repository there: run_gpu_benchmarks.sh installs it, or `pip install --no-index --no-deps .whl/*.whl`.
#
#   PYTHON_VERSION=3.11 bash benchmarks/offline_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
pinned=$(.venv/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|torchvision|triton|nvidia-)')
from_source='^(image-reward|fairscale|clip-anytorch)=='  # no wheel for every platform (fairscale: none at all)
# shellcheck disable=SC2046
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl $(grep -v -i -E "$from_source" <<< "$pinned")
# shellcheck disable=SC2046
python3 -m pip wheel --quiet --no-deps -w .whl $(grep -i -E "$from_source" <<< "$pinned")
du -sh .whl
