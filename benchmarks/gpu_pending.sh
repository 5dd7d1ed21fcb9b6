#!/usr/bin/env bash
# The GPU figures the docs mark "not yet measured", in priority order, for any CUDA machine with the README's
# install: two parts, each under a deadline, every run under its own time limit inside it, so what finishes is
# printed even when the rest does not fit. Each bench_generation row prints as its option finishes.
#
#   bash benchmarks/gpu_pending.sh generation 360 2>&1 | tee generation.log
#   bash benchmarks/gpu_pending.sh training 240 2>&1 | tee training.log
#
# The second argument is the part's deadline in seconds. On an offline GPU machine, bring the wheels first
# (bash benchmarks/gpu_wheels.sh on a machine with a network, then copy .whl/ and .whl-bnb/ beside this script's
# repository): they are installed into /tmp/site when present. Copy the printed tables into docs/benchmarks.md and
# the README's VRAM table.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_pending.sh generation|training [deadline seconds]}
deadline=$(( $(date +%s) + ${2:-360} ))
export PYTHONUNBUFFERED=1
for wheels in .whl .whl-bnb; do  # an offline machine's wheels, added to what an earlier part installed
  if [ -d "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$wheels"/*.whl || exit 1
  fi
done
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__)" || exit 1

run() {  # title, limit in seconds, command...
  local title=$1 limit=$2 left=$(( deadline - $(date +%s) ))
  shift 2
  if (( left < 30 )); then echo; echo "### $title: not run (the part's deadline)"; return; fi
  (( limit > left )) && limit=$left
  echo; echo "### $title (limit ${limit} s)"
  timeout "$limit" "$@" || echo "(stopped: exit $?)"
}

sdxl=(--real_size sdxl --mixed_precision bf16 --steps 20 --num_variants 1)
case $part in
generation)  # generation speed (aim: >= 2x at 20 steps), SDXL on 8 GB with offload, scoring from PNGs
  run "SDXL generation, batch 4: the default, then the options by expected gain" 240 \
    python3 benchmarks/bench_generation.py "${sdxl[@]}" --num_prompts 2 --num_images_per_prompt 2 --batch_size 4 \
    --options compile+fuse+channels_last,compile,fuse_qkv_projections,channels_last,vae_slicing,sdpa_math
  run "SDXL generation, batch 1: offload for 8-12 GB cards" 150 \
    python3 benchmarks/bench_generation.py "${sdxl[@]}" --num_prompts 1 --num_images_per_prompt 2 --batch_size 1 \
    --options model_cpu_offload,vae_slicing,sequential_cpu_offload
  run "SD1.5 generation, batch 8" 150 \
    python3 benchmarks/bench_generation.py --real_size sd15 --mixed_precision bf16 --steps 20 --num_prompts 4 \
    --num_variants 1 --num_images_per_prompt 2 --batch_size 8 \
    --options compile+fuse+channels_last,compile,fuse_qkv_projections,channels_last,vae_slicing,model_cpu_offload
  [ -d /tmp/zoo ] || run "the tiny zoo (reward model files)" 60 python3 tools/make_tiny_models.py /tmp/zoo
  run "rewards from PNG files, decode threads" 120 \
    python3 benchmarks/bench_rewards.py --real_size --zoo /tmp/zoo --reward_precision fp16 --num_images 64 \
    --batch_size 16 --rewards hpsv2.1,pickscore,aesthetic
  ;;
training)  # SD1.5 full fine-tune in <= 6.5 GiB with the fused step; FLUX.1 QLoRA in <= 10 GiB
  run "SD1.5 full fine-tune: fused step vs the normal step, with and without clipping" 150 \
    python3 benchmarks/bench_training.py --real_size --steps 10 --configs "sd15 full"
  run "FLUX.1 LoRA, nf4 vs bf16 base (writes ~34 GB of random weights first)" 240 \
    python3 benchmarks/bench_training.py --real_size --steps 4 --configs flux
  ;;
*) echo "unknown part $part: generation or training"; exit 2 ;;
esac
