#!/usr/bin/env bash
# The wheels benchmarks/gpu_pending.sh needs on an offline GPU machine, fetched on one with a network. Written for
# an image with Python 3.12 and its own torch, accelerate, huggingface_hub, timm, pyarrow and pandas, but not
# diffusers, datasets, open_clip, bitsandbytes or the ImageReward packages, and older transformers and peft:
#   .whl/      everything the generation and reward benchmarks import (~29 MB)
#   .whl-bnb/  bitsandbytes and what the trainers import besides, on the image's own transformers (~52 MB)
# Copy both folders into the repository root on the GPU machine. Run from the repository root:
# bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -h "^$1==" requirements.txt requirements-imagereward.txt; }
download() {  # folder, then requirements: binary wheels for the device's Python and platform
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@"
}
rm -rf .whl .whl-bnb
trainers="$(pin diffusers) $(pin peft) $(pin datasets) dill==0.4.1 multiprocess==0.70.19"
# shellcheck disable=SC2046,SC2086
download .whl $trainers $(pin transformers) $(pin tokenizers) $(pin open-clip-torch) ftfy==6.3.1 wcwidth==0.9.4 \
  "setuptools<81"  # clip-anytorch imports pkg_resources
# ImageReward's packages (the reward benchmark builds its model): fairscale has no wheel, so one is built from its
# pure-Python source
# shellcheck disable=SC2046
python3 -m pip wheel --quiet --no-deps -w .whl $(pin image-reward) $(pin clip-anytorch) $(pin fairscale)
# shellcheck disable=SC2046,SC2086
download .whl-bnb $trainers $(pin bitsandbytes)
du -sh .whl .whl-bnb
