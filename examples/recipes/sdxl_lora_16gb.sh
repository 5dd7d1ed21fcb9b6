#!/usr/bin/env bash
# SDXL CRAFT LoRA on a 12-16 GB card: rank 16, 8-bit Adam, gradient checkpointing, batch 1 with gradient
# accumulation to 32 (a quarter of the paper's 128, to keep the fine-tune to an evening), 200 steps; generation in
# batches of 2 (batch 4 peaks at 16.1 GiB; batches 1 and 2 are not measured yet), rewards in fp16.
# Run from anywhere: bash examples/recipes/sdxl_lora_16gb.sh
: "${BASE_MODEL:=stabilityai/stable-diffusion-xl-base-1.0}"
: "${VAE:=madebyollin/sdxl-vae-fp16-fix}"
: "${RESOLUTION:=1024}"
: "${MIXED_PRECISION:=fp16}"
: "${INFERENCE_STEPS:=30}"
: "${GENERATION_BATCH_SIZE:=2}"
: "${TRAIN_BATCH_SIZE:=1}"
: "${GRADIENT_ACCUMULATION:=32}"
: "${MAX_TRAIN_STEPS:=200}"
: "${RANK:=16}"
: "${REWARD_FLAGS:=--reward_batch_size 8}"
RECIPE=sdxl_lora_16gb
TRAINER=train_craft_sdxl_lora.py
TUNED_MODEL=lora
GENERATION_FLAGS="--num_inference_steps $INFERENCE_STEPS --guidance_scale 5.0 --mixed_precision $MIXED_PRECISION
  --batch_size $GENERATION_BATCH_SIZE --pretrained_vae_model_name_or_path $VAE"
TRAINING_FLAGS="--pretrained_vae_model_name_or_path $VAE --resolution $RESOLUTION --rank $RANK
  --train_batch_size $TRAIN_BATCH_SIZE --gradient_accumulation_steps $GRADIENT_ACCUMULATION
  --max_train_steps $MAX_TRAIN_STEPS --learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0
  --use_8bit_adam --gradient_checkpointing --mixed_precision $MIXED_PRECISION --checkpointing_steps 50
  --checkpoints_total_limit 2 --output_kohya_format --report_to tensorboard"
source "$(dirname "$0")/craft_round.sh"
