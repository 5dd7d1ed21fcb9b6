# CRAFT, every stage, with the settings of the recipe that sources this file (sd15_full_finetune.sh, sdxl_paper.sh,
# sdxl_lora_16gb.sh, zimage_lora_16gb.sh, flux2_klein_lora_16gb.sh). Every variable below can be set from the
# environment; rerunning a recipe resumes where it stopped (each stage resumes or reuses its finished output, and
# refuses one made with other settings). The filter level names its own folders, so the paper's three levels share
# one set of candidates:
#   for level in hpsv2.1 hpsv2.1,aesthetic hpsv2.1,pickscore,aesthetic; do FILTER_REWARDS=$level bash RECIPE; done
# CRAFT in rounds (ROUNDS=3 bash RECIPE): round k+1 generates its candidates with round k's model on the next
# NUM_PROMPTS prompts of the same shuffled list (none seen before), filters them, and trains on from round k's
# weights; every round is evaluated against the base, and rounds.md/.json/.png in $OUT/eval/rounds-LEVEL compare them.
# Rerunning with more rounds reuses the rounds done.
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
: "${EVAL_IMAGES_PER_PROMPT:=1}"             # seeds per benchmark prompt (the paper's 1); 2+ also measure diversity
: "${REWARD_FLAGS:=}"                        # reward weights other than the Hub defaults (e.g. local files offline)
: "${REWARD_PRECISION:=fp16}"
: "${SEED:=0}"
: "${ROUNDS:=1}"                              # CRAFT in rounds (see above)

if [ ! -e "$PROMPTS_FILE" ] || [ ! -e "$BENCHMARK_PROMPTS" ]; then
  hf download ymhao/HPDv2 train.json benchmark/ --repo-type dataset --local-dir "$HPDV2"
fi

LEVEL=${FILTER_REWARDS//,/+}
if [ "$TUNED_MODEL" = pipeline ]; then FINAL_FILE=model_index.json; else FINAL_FILE=pytorch_lora_weights.safetensors; fi
timed() {  # timed FILE COMMAND...: runs COMMAND; the seconds of the run that finished it first go to FILE
  local started=$SECONDS
  "${@:2}"
  [ -e "$1" ] || echo $((SECONDS - started)) > "$1"
}
runs() {  # RUN=(the flags that run the model in folder $1; the base model when $1 is empty)
  if [ -z "$1" ]; then
    RUN=(--pretrained_model_name_or_path "$BASE_MODEL")
  elif [ "$TUNED_MODEL" = pipeline ]; then  # a full fine-tune: a whole pipeline folder
    RUN=(--pretrained_model_name_or_path "$1")
  else  # a LoRA on the base model
    RUN=(--pretrained_model_name_or_path "$BASE_MODEL" --lora_path "$1")
  fi
}
ROUND_EVALS=()
PREVIOUS=  # the model the round starts from: none in round 1 (the base)
for ((round = 1; round <= ROUNDS; round++)); do
  if [ "$round" = 1 ]; then  # the first round's candidates serve every filter level
    CANDIDATES=$OUT/candidates FILTERED=$OUT/filtered-$LEVEL MODEL_DIR=$OUT/model-$LEVEL EVAL=$OUT/eval/craft-$LEVEL
  else
    CANDIDATES=$OUT/round$round-$LEVEL/candidates FILTERED=$OUT/round$round-$LEVEL/filtered
    MODEL_DIR=$OUT/round$round-$LEVEL/model EVAL=$OUT/eval/craft-$LEVEL-round$round
    echo "==== round $round of $ROUNDS, from $PREVIOUS"
  fi

  echo "== 1-3. candidates: $NUM_PROMPTS prompts x ($NUM_VARIANTS rewrites + the prompt) x $IMAGES_PER_TEXT seeds"
  runs "$PREVIOUS"
  # shellcheck disable=SC2086  # LAUNCH and the *_FLAGS variables are word lists
  timed "$CANDIDATES.seconds" $LAUNCH "$REPO/generate_candidates.py" "${RUN[@]}" $GENERATION_FLAGS \
    --prompts_file "$PROMPTS_FILE" --prompt_column prompt --max_prompts "$NUM_PROMPTS" \
    --skip_prompts $(((round - 1) * NUM_PROMPTS)) --shuffle_prompts --num_variants "$NUM_VARIANTS" --expansion llm \
    --expansion_model "$EXPANSION_MODEL" --num_images_per_prompt "$IMAGES_PER_TEXT" --seed "$SEED" \
    --output_dir "$CANDIDATES"

  echo "== 4. training rewards: $FILTER_REWARDS"
  $LAUNCH "$REPO/eval_rewards.py" --images_dir "$CANDIDATES" --rewards "$FILTER_REWARDS" \
    --reward_precision "$REWARD_PRECISION" $REWARD_FLAGS

  echo "== 5-6. composite reward filtering on $LEVEL"
  if [ ! -e "$FILTERED/crf_report.json" ]; then
    python "$REPO/crf_filter.py" --candidates_dir "$CANDIDATES" --output_dir "$FILTERED" \
      --filter_rewards "$FILTER_REWARDS"
  fi

  echo "== 7. advantage-weighted fine-tune"
  if [ -n "$PREVIOUS" ] && [ "$TUNED_MODEL" != pipeline ]; then  # the LoRA starts where the last round's ended
    START=(--pretrained_model_name_or_path "$BASE_MODEL" --init_lora "$PREVIOUS")
  else  # the base model, or the last round's pipeline
    runs "$PREVIOUS"
    START=("${RUN[@]}")
  fi
  # what a finished model is checked against, in one line
  TRAINED_WITH="$TRAINER $(echo $TRAINING_FLAGS) --seed $SEED${PREVIOUS:+ from $PREVIOUS}"
  if [ -e "$MODEL_DIR/$FINAL_FILE" ]; then  # finished: kept, if trained with these settings
    if [ "$(cat "$MODEL_DIR.trained_with.txt" 2>/dev/null)" != "$TRAINED_WITH" ]; then
      echo "error: $MODEL_DIR was trained with other settings ($MODEL_DIR.trained_with.txt); set another OUT" >&2
      exit 1
    fi
  else  # a killed run resumes at its last checkpoint
    $LAUNCH "$REPO/$TRAINER" "${START[@]}" --train_data_dir "$FILTERED" --output_dir "$MODEL_DIR" \
      --resume_from_checkpoint latest --seed "$SEED" $TRAINING_FLAGS
    echo "$TRAINED_WITH" > "$MODEL_DIR.trained_with.txt"
  fi
  runs "$MODEL_DIR"

  echo "== 8. $BENCHMARKS: base and tuned on the same prompts and seeds, $EVAL_PROMPTS_PER_PART prompts per part"
  for benchmark in $BENCHMARKS; do
    prompts=$BENCHMARK_PROMPTS
    [ "$benchmark" = parti ] && prompts=$PARTI_PROMPTS
    models=tuned
    [ "$round" = 1 ] && models="base tuned"  # the base once, for every round
    for model in $models; do
      if [ $model = base ]; then
        where=(--pretrained_model_name_or_path "$BASE_MODEL" --output_dir "$OUT/eval/base")
      else
        where=("${RUN[@]}" --output_dir "$EVAL" --compare_to "$OUT/eval/base")
      fi
      $LAUNCH "$REPO/eval_rewards.py" "${where[@]}" $GENERATION_FLAGS --benchmark "$benchmark" \
        --benchmark_prompts "$prompts" --max_prompts "$EVAL_PROMPTS_PER_PART" --shuffle_prompts \
        --num_images_per_prompt "$EVAL_IMAGES_PER_PROMPT" --seed "$SEED" --rewards "$EVAL_REWARDS" \
        --reward_precision "$REWARD_PRECISION" $REWARD_FLAGS
    done
    echo "the report: $EVAL/benchmark_$benchmark.md (.json, .png)"
  done
  ROUND_EVALS+=(--round "$CANDIDATES" "$FILTERED" "$MODEL_DIR" "$EVAL")
  PREVIOUS=$MODEL_DIR
done

if [ "$ROUNDS" -gt 1 ]; then
  echo "== the rounds compared"
  python "$REPO/examples/recipes/rounds_table.py" "${ROUND_EVALS[@]}" --benchmarks $BENCHMARKS \
    --output_dir "$OUT/eval/rounds-$LEVEL"
fi
