#!/usr/bin/env bash
# The GPU figures the docs mark "not yet measured", in priority order, each under its own time limit so one slow
# part cannot eat the others' time. Run from the repository root on a CUDA machine with the pack installed:
#   bash benchmarks/gpu_pending.sh 2>&1 | tee gpu_pending.log
# then copy the printed tables into docs/benchmarks.md and the README's VRAM table.
set -uo pipefail
ZOO=${ZOO:-/tmp/zoo}
[ -d "$ZOO" ] || python tools/make_tiny_models.py "$ZOO" > /dev/null
run() { echo; echo "### $1"; shift; timeout "$@" || echo "(stopped: exit $?)"; }

# issue 17: SDXL generation, every speed option (offloads included), then batch 1 for the 8-12 GB rows
run "SDXL generation options, batch 4" 420 python benchmarks/bench_generation.py --real_size sdxl \
  --mixed_precision bf16 --steps 20 --num_prompts 2 --num_variants 1 --num_images_per_prompt 2 --batch_size 4
run "SDXL generation, batch 1, offload and slicing" 300 python benchmarks/bench_generation.py --real_size sdxl \
  --mixed_precision bf16 --steps 20 --num_prompts 2 --num_variants 0 --num_images_per_prompt 1 --batch_size 1 \
  --options model_cpu_offload,sequential_cpu_offload,vae_slicing
# issue 17: SD1.5 full fine-tune with Adam inside backward against the normal step, both without clipping
run "SD1.5 full fine-tune, fused step" 300 python benchmarks/bench_training.py --real_size --steps 12 \
  --configs "sd15 full"
# issue 18: FLUX.1 QLoRA memory and speed (writes ~34 GB of random weights first)
run "FLUX.1 LoRA, nf4 vs bf16 base" 600 python benchmarks/bench_training.py --real_size --steps 6 --configs flux
# issue 17: SD1.5 generation options, and scoring from PNG files with decode threads
run "SD1.5 generation options, batch 8" 300 python benchmarks/bench_generation.py --real_size sd15 \
  --mixed_precision bf16 --steps 20 --num_prompts 4 --num_variants 1 --num_images_per_prompt 2 --batch_size 8
run "rewards from disk" 300 python benchmarks/bench_rewards.py --real_size --zoo "$ZOO" --reward_precision fp16 \
  --num_images 64 --batch_size 16 --rewards hpsv2.1,pickscore,aesthetic
