#!/usr/bin/env bash
# Every GPU benchmark of the pack on this machine's CUDA card, most wanted first, each under its own time limit and
# all under one budget, so that what finishes is printed even when the rest does not fit. The tables it prints are
# the ones docs/benchmarks.md and the README's VRAM table show (with the card and the date: add yours).
#
#   bash benchmarks/run_gpu_benchmarks.sh [budget in seconds, default 1800] 2>&1 | tee gpu_benchmarks.log
#
# Needs the README's install. On a GPU machine without a network, install the wheels that
# benchmarks/offline_wheels.sh fetched on a machine with one: copied into .whl/ beside this repository's scripts,
# they are installed into /tmp/site (on top of the machine's own torch) when present.
set -uo pipefail
cd "$(dirname "$0")/.."
deadline=$(( $(date +%s) + ${1:-1800} ))
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__)" || exit 1
date -u +"%Y-%m-%d %H:%M UTC"

run() {  # title, limit in seconds, command...
  local title=$1 limit=$2 left=$(( deadline - $(date +%s) ))
  shift 2
  if (( left < 30 )); then echo; echo "### $title: not run (the budget is spent)"; return; fi
  (( limit > left )) && limit=$left
  echo; echo "### $title (limit ${limit} s)"
  timeout "$limit" "$@" || echo "(stopped: exit $?)"
}

sdxl=(--real_size sdxl --mixed_precision bf16 --steps 20 --num_variants 1)
# generation speed (the options against the default path), SDXL on 8-12 GB cards with offload
run "SDXL generation, batch 4: the default, then the options by expected gain" 240 \
  python3 benchmarks/bench_generation.py "${sdxl[@]}" --num_prompts 2 --num_images_per_prompt 2 --batch_size 4 \
  --options compile+fuse+channels_last,compile,fuse_qkv_projections,channels_last,vae_slicing,sdpa_math
run "SDXL generation, batch 1: offload for 8-12 GB cards" 150 \
  python3 benchmarks/bench_generation.py "${sdxl[@]}" --num_prompts 1 --num_images_per_prompt 2 --batch_size 1 \
  --options model_cpu_offload,vae_slicing,sequential_cpu_offload
# training memory and speed: the VRAM table's rows
run "SD1.5 full fine-tune: fused step vs the normal step, with and without clipping" 150 \
  python3 benchmarks/bench_training.py --real_size --steps 10 --configs "sd15 full"
run "SDXL LoRA: cached latents vs encoded each step" 180 \
  python3 benchmarks/bench_training.py --real_size --steps 10 --configs "sdxl LoRA"
run "FLUX.1 LoRA, nf4 vs bf16 base (writes ~34 GB of random weights first)" 240 \
  python3 benchmarks/bench_training.py --real_size --steps 4 --configs flux
run "Z-Image and FLUX.2 [klein] LoRA, nf4 vs bf16 base" 300 \
  python3 benchmarks/bench_training.py --real_size --steps 4 --configs zimage,klein
run "SD1.5 generation, batch 8" 150 \
  python3 benchmarks/bench_generation.py --real_size sd15 --mixed_precision bf16 --steps 20 --num_prompts 4 \
  --num_variants 1 --num_images_per_prompt 2 --batch_size 8 \
  --options compile+fuse+channels_last,compile,fuse_qkv_projections,channels_last,vae_slicing,model_cpu_offload
# scoring throughput, from PNG files as eval_rewards.py reads them (the reward weights are random, real-size)
[ -d /tmp/zoo ] || run "the tiny zoo (reward model files)" 60 python3 tools/make_tiny_models.py /tmp/zoo
run "rewards from PNG files, decode threads" 120 \
  python3 benchmarks/bench_rewards.py --real_size --zoo /tmp/zoo --reward_precision fp16 --num_images 64 \
  --batch_size 16 --rewards hpsv2.1,pickscore,aesthetic
