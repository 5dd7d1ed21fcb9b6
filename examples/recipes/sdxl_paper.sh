#!/usr/bin/env bash
# The paper's SDXL setting at its data scale and schedule: batch 128, 200 steps, text encoders frozen, on one
# 80 GB card. The paper fine-tunes the full UNet; this pack's SDXL trainer trains a LoRA, here of rank 64 with a
# LoRA-sized learning rate (1e-4): that departure is ours, and not yet measured against the paper's numbers.
# Run from anywhere: bash examples/recipes/sdxl_paper.sh
: "${BASE_MODEL:=stabilityai/stable-diffusion-xl-base-1.0}"
: "${VAE:=madebyollin/sdxl-vae-fp16-fix}"     # the SDXL VAE overflows in fp16 without it
: "${RESOLUTION:=1024}"
: "${MIXED_PRECISION:=fp16}"
: "${INFERENCE_STEPS:=30}"
: "${GENERATION_BATCH_SIZE:=8}"
: "${TRAIN_BATCH_SIZE:=16}"
: "${GRADIENT_ACCUMULATION:=8}"              # 16 x 8 = the paper's batch of 128
: "${MAX_TRAIN_STEPS:=200}"
: "${RANK:=64}"
RECIPE=sdxl_paper
TRAINER=train_craft_sdxl_lora.py
TUNED_MODEL=lora
GENERATION_FLAGS="--num_inference_steps $INFERENCE_STEPS --guidance_scale 5.0 --mixed_precision $MIXED_PRECISION
  --batch_size $GENERATION_BATCH_SIZE --pretrained_vae_model_name_or_path $VAE"
TRAINING_FLAGS="--pretrained_vae_model_name_or_path $VAE --resolution $RESOLUTION --rank $RANK
  --train_batch_size $TRAIN_BATCH_SIZE --gradient_accumulation_steps $GRADIENT_ACCUMULATION
  --max_train_steps $MAX_TRAIN_STEPS --learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0
  --gradient_checkpointing --mixed_precision $MIXED_PRECISION --checkpointing_steps 50 --checkpoints_total_limit 2
  --output_kohya_format --report_to tensorboard"
source "$(dirname "$0")/craft_round.sh"
