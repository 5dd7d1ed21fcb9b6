#!/usr/bin/env bash
# FLUX.2 [klein] CRAFT LoRA on a 16 GB card: the base model (klein base 4B, not the 4-step distilled klein) generates
# and is tuned; QLoRA (the frozen transformer in NF4), rank 16, 8-bit Adam, gradient checkpointing, batch 1 with
# gradient accumulation to 32, 200 steps. Sampling at the pipeline's own classifier-free guidance (4.0), 50 steps, as
# the base model is meant to be sampled. The rewrites come from a Qwen3 instruct model, the family of klein's own text
# encoder. For klein base 9B set BASE_MODEL=black-forest-labs/FLUX.2-klein-base-9B. Memory not yet measured.
# Run from anywhere: bash examples/recipes/flux2_klein_lora_16gb.sh
: "${BASE_MODEL:=black-forest-labs/FLUX.2-klein-base-4B}"
: "${RESOLUTION:=1024}"
: "${MIXED_PRECISION:=bf16}"
: "${INFERENCE_STEPS:=50}"
: "${MAX_SEQUENCE_LENGTH:=512}"
: "${GENERATION_BATCH_SIZE:=2}"
: "${TRAIN_BATCH_SIZE:=1}"
: "${GRADIENT_ACCUMULATION:=32}"
: "${MAX_TRAIN_STEPS:=200}"
: "${RANK:=16}"
: "${QUANTIZE=--quantize_base nf4}"  # QLoRA; empty trains on the bf16 base
: "${EXPANSION_MODEL:=Qwen/Qwen3-4B-Instruct-2507}"
: "${REWARD_FLAGS:=--reward_batch_size 8}"
RECIPE=flux2_klein_lora_16gb
TRAINER=train_craft_flux2_klein_lora.py
TUNED_MODEL=lora
GENERATION_FLAGS="--num_inference_steps $INFERENCE_STEPS --mixed_precision $MIXED_PRECISION
  --batch_size $GENERATION_BATCH_SIZE --height $RESOLUTION --width $RESOLUTION
  --max_sequence_length $MAX_SEQUENCE_LENGTH"
TRAINING_FLAGS="--resolution $RESOLUTION --rank $RANK --max_sequence_length $MAX_SEQUENCE_LENGTH $QUANTIZE
  --train_batch_size $TRAIN_BATCH_SIZE --gradient_accumulation_steps $GRADIENT_ACCUMULATION
  --max_train_steps $MAX_TRAIN_STEPS --learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0
  --use_8bit_adam --gradient_checkpointing --mixed_precision $MIXED_PRECISION --checkpointing_steps 50
  --checkpoints_total_limit 2 --report_to tensorboard"
source "$(dirname "$0")/craft_round.sh"
