#!/usr/bin/env bash
# The paper's SD1.5 setting: the full UNet fine-tuned on the CRF set, AdamW, lr 5e-5, batch 128, 120 steps, text
# encoder frozen. Sizes for one 80 GB card; on a 12 GB card: TRAIN_BATCH_SIZE=1 GRADIENT_ACCUMULATION=128
# GENERATION_BATCH_SIZE=8 (8-bit Adam is already on; generation at batch 8 peaks at 6.8 GiB). Run from anywhere: bash examples/recipes/sd15_full_finetune.sh
: "${BASE_MODEL:=stable-diffusion-v1-5/stable-diffusion-v1-5}"
: "${RESOLUTION:=512}"
: "${MIXED_PRECISION:=bf16}"
: "${INFERENCE_STEPS:=30}"
: "${GENERATION_BATCH_SIZE:=16}"
: "${TRAIN_BATCH_SIZE:=16}"
: "${GRADIENT_ACCUMULATION:=8}"              # 16 x 8 = the paper's batch of 128
: "${MAX_TRAIN_STEPS:=120}"
RECIPE=sd15_full_finetune
TRAINER=train_craft_sd15.py
TUNED_MODEL=pipeline                         # a full fine-tune saves a whole pipeline folder
GENERATION_FLAGS="--num_inference_steps $INFERENCE_STEPS --guidance_scale 7.5 --mixed_precision $MIXED_PRECISION
  --batch_size $GENERATION_BATCH_SIZE"
TRAINING_FLAGS="--resolution $RESOLUTION --train_batch_size $TRAIN_BATCH_SIZE
  --gradient_accumulation_steps $GRADIENT_ACCUMULATION --max_train_steps $MAX_TRAIN_STEPS --learning_rate 5e-5
  --lr_scheduler constant --lr_warmup_steps 0 --use_8bit_adam --gradient_checkpointing
  --mixed_precision $MIXED_PRECISION --checkpointing_steps 20 --checkpoints_total_limit 2 --report_to tensorboard"
source "$(dirname "$0")/craft_round.sh"
