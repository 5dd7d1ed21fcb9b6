# One CRAFT round, every stage, with the settings of the recipe that sources this file (sd15_full_finetune.sh,
# sdxl_paper.sh, sdxl_lora_16gb.sh, zimage_lora_16gb.sh, flux2_klein_lora_16gb.sh). Every variable below can be set from the environment; rerunning a recipe
# resumes where it stopped (each stage resumes or reuses its finished output, and refuses one made with other
# settings). The filter level names its own folders, so the paper's three levels share one set of candidates:
#   for level in hpsv2.1 hpsv2.1,aesthetic hpsv2.1,pickscore,aesthetic; do FILTER_REWARDS=$level bash RECIPE; done
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

: "${OUT:=craft_run/$RECIPE}"                # every stage's folder goes under it, one per recipe
: "${LAUNCH:=accelerate launch}"             # or e.g. "accelerate launch --num_processes 8"
: "${HPDV2:=hpdv2}"                          # where HPDv2's train.json and benchmark/ are downloaded
: "${PROMPTS_FILE:=$HPDV2/train.json}"       # HPDv2's training prompts (records with a `prompt` field)
: "${BENCHMARK_PROMPTS:=$HPDV2/benchmark}"   # HPSv2's benchmark: anime/concept-art/paintings/photo.json
: "${NUM_PROMPTS:=10000}"                    # the paper's 10k, a seeded sample of the deduplicated prompts
: "${NUM_VARIANTS:=3}"                       # LLM rewrites per prompt
: "${IMAGES_PER_TEXT:=2}"                    # seeds per prompt text
: "${EXPANSION_MODEL:=Qwen/Qwen2.5-7B-Instruct}"
: "${FILTER_REWARDS:=hpsv2.1,pickscore,aesthetic}"  # the paper's strictest level (~100 kept); looser: hpsv2.1,aesthetic or hpsv2.1
: "${EVAL_REWARDS:=hpsv2.1,imagereward,pickscore,aesthetic,clip}"
: "${BENCHMARKS:=hpsv2 parti}"              # the paper's: HPDv2's benchmark and PartiPrompts (drawbench also works)
: "${PARTI_PROMPTS:=nateraw/parti-prompts}"  # a dataset with a Prompt column (Hub id or local copy)
: "${EVAL_PROMPTS_PER_PART:=100}"            # a seeded sample per HPSv2 style and of PartiPrompts (all: 800, 1632)
: "${REWARD_FLAGS:=}"                        # reward weights other than the Hub defaults (e.g. local files offline)
: "${REWARD_PRECISION:=fp16}"
: "${SEED:=0}"

if [ ! -e "$PROMPTS_FILE" ] || [ ! -e "$BENCHMARK_PROMPTS" ]; then
  hf download ymhao/HPDv2 train.json benchmark/ --repo-type dataset --local-dir "$HPDV2"
fi

echo "== 1-3. candidates: $NUM_PROMPTS prompts x ($NUM_VARIANTS rewrites + the prompt) x $IMAGES_PER_TEXT seeds"
# shellcheck disable=SC2086  # LAUNCH and the *_FLAGS variables are word lists
$LAUNCH "$REPO/generate_candidates.py" --pretrained_model_name_or_path "$BASE_MODEL" $GENERATION_FLAGS \
  --prompts_file "$PROMPTS_FILE" --prompt_column prompt --max_prompts "$NUM_PROMPTS" --shuffle_prompts \
  --num_variants "$NUM_VARIANTS" --expansion llm --expansion_model "$EXPANSION_MODEL" \
  --num_images_per_prompt "$IMAGES_PER_TEXT" --seed "$SEED" --output_dir "$OUT/candidates"

echo "== 4. training rewards: $FILTER_REWARDS"
$LAUNCH "$REPO/eval_rewards.py" --images_dir "$OUT/candidates" --rewards "$FILTER_REWARDS" \
  --reward_precision "$REWARD_PRECISION" $REWARD_FLAGS

LEVEL=${FILTER_REWARDS//,/+}
echo "== 5-6. composite reward filtering on $LEVEL"
if [ ! -e "$OUT/filtered-$LEVEL/crf_report.json" ]; then
  python "$REPO/crf_filter.py" --candidates_dir "$OUT/candidates" --output_dir "$OUT/filtered-$LEVEL" \
    --filter_rewards "$FILTER_REWARDS"
fi

echo "== 7. advantage-weighted fine-tune"
MODEL_DIR=$OUT/model-$LEVEL
if [ "$TUNED_MODEL" = pipeline ]; then  # a full fine-tune: a whole pipeline folder
  FINAL_FILE=model_index.json
  TUNED=(--pretrained_model_name_or_path "$MODEL_DIR")
else                                     # a LoRA on the base model
  FINAL_FILE=pytorch_lora_weights.safetensors
  TUNED=(--pretrained_model_name_or_path "$BASE_MODEL" --lora_path "$MODEL_DIR")
fi
TRAINED_WITH="$TRAINER $(echo $TRAINING_FLAGS) --seed $SEED"  # one line: what a finished model is checked against
if [ -e "$MODEL_DIR/$FINAL_FILE" ]; then  # finished: kept, if trained with these settings
  if [ "$(cat "$MODEL_DIR.trained_with.txt" 2>/dev/null)" != "$TRAINED_WITH" ]; then
    echo "error: $MODEL_DIR was trained with other settings ($MODEL_DIR.trained_with.txt); set another OUT" >&2
    exit 1
  fi
else  # a killed run resumes at its last checkpoint
  $LAUNCH "$REPO/$TRAINER" --pretrained_model_name_or_path "$BASE_MODEL" --train_data_dir "$OUT/filtered-$LEVEL" \
    --output_dir "$MODEL_DIR" --resume_from_checkpoint latest --seed "$SEED" $TRAINING_FLAGS
  echo "$TRAINED_WITH" > "$MODEL_DIR.trained_with.txt"
fi

echo "== 8. $BENCHMARKS: base and tuned on the same prompts and seeds, $EVAL_PROMPTS_PER_PART prompts per part"
for benchmark in $BENCHMARKS; do
  prompts=$BENCHMARK_PROMPTS
  [ "$benchmark" = parti ] && prompts=$PARTI_PROMPTS
  for model in base tuned; do
    if [ $model = base ]; then
      where=(--pretrained_model_name_or_path "$BASE_MODEL" --output_dir "$OUT/eval/base")
    else
      where=("${TUNED[@]}" --output_dir "$OUT/eval/craft-$LEVEL" --compare_to "$OUT/eval/base")
    fi
    $LAUNCH "$REPO/eval_rewards.py" "${where[@]}" $GENERATION_FLAGS --benchmark "$benchmark" \
      --benchmark_prompts "$prompts" --max_prompts "$EVAL_PROMPTS_PER_PART" --shuffle_prompts \
      --num_images_per_prompt 1 --seed "$SEED" --rewards "$EVAL_REWARDS" --reward_precision "$REWARD_PRECISION" \
      $REWARD_FLAGS
  done
  echo "the report: $OUT/eval/craft-$LEVEL/benchmark_$benchmark.md (.json, .png)"
done
