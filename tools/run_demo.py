#!/usr/bin/env python
"""The newcomer's demo: every CRAFT stage, through the real scripts, on tiny local models (CPU, no downloads).

    python tools/run_demo.py [--output_dir demo_output] [--num_prompts 6]

tiny model zoo -> prompts -> generate_candidates.py (template rewrites, several seeds) -> eval_rewards.py ->
crf_filter.py -> train_craft_sd15.py (LoRA) and train_craft_sdxl_lora.py -> eval_rewards.py on held-out prompts,
tuned vs base on the same seeds. Prints where each artefact is.
"""

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the center"]


def prompts(count, offset):
    """Prompts naming a colour, a shape and a place; `offset` gives a disjoint held-out set."""
    out = []
    for i in range(offset, offset + count):
        out.append(f"a {COLOURS[i % 6]} {SHAPES[(i // 6) % 4]} {PLACES[(i // 24 + i) % 5]}")
    return out


def step(title, script, *args):
    print(f"\n== {title}", flush=True)
    started = time.time()
    command = [sys.executable, os.path.join(REPO, script), *map(str, args)]
    result = subprocess.run(command, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE, text=True)
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "", flush=True)
    if result.returncode != 0:
        raise SystemExit(f"demo stopped: {script} failed (its error is above)")
    print(f"   ({time.time() - started:.0f} s)", flush=True)
    return result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--num_prompts", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    args = parser.parse_args()
    from make_tiny_models import make_zoo

    started = time.time()
    out = args.output_dir
    models = os.path.join(out, "models")
    if not os.path.isdir(os.path.join(models, "sd15")):
        make_zoo(models)
    os.makedirs(out, exist_ok=True)
    for name, chosen in (("train_prompts.txt", prompts(args.num_prompts, 0)),
                         ("heldout_prompts.txt", prompts(args.num_prompts, 100))):
        with open(os.path.join(out, name), "w") as f:
            f.write("\n".join(chosen) + "\n")
    sd15 = os.path.join(models, "sd15")
    rewards = ["--rewards", "jpeg"]
    sampling = ["--num_inference_steps", 10, "--num_images_per_prompt", 2]
    step("1-3. candidates", "generate_candidates.py", "--pretrained_model_name_or_path", sd15, "--prompts_file",
         os.path.join(out, "train_prompts.txt"), "--num_variants", 3, "--output_dir", os.path.join(out, "candidates"),
         *sampling)
    step("4. rewards", "eval_rewards.py", "--images_dir", os.path.join(out, "candidates"), *rewards)
    step("5-6. composite reward filter", "crf_filter.py", "--candidates_dir", os.path.join(out, "candidates"),
         "--output_dir", os.path.join(out, "filtered"), "--filter_rewards", "jpeg", "--overwrite")
    training = ["--train_data_dir", os.path.join(out, "filtered"), "--resolution", 64, "--train_batch_size", 4,
                "--max_train_steps", args.steps, "--learning_rate", 1e-3, "--report_to", "none",
                "--checkpointing_steps", 1000, "--overwrite_output_dir", "--validation_prompt",
                prompts(1, 100)[0], "--num_validation_images", 4, "--validation_epochs", 1000,
                "--validation_inference_steps", 10]
    step("7. CRAFT fine-tune (SD1.5, LoRA)", "train_craft_sd15.py", "--pretrained_model_name_or_path", sd15,
         "--use_lora", "--rank", 8, "--output_dir", os.path.join(out, "craft-sd15-lora"), *training)
    step("7. CRAFT fine-tune (SDXL, LoRA)", "train_craft_sdxl_lora.py", "--pretrained_model_name_or_path",
         os.path.join(models, "sdxl"), "--output_dir", os.path.join(out, "craft-sdxl-lora"), *training)
    heldout = ["--prompts_file", os.path.join(out, "heldout_prompts.txt"), *sampling, *rewards, "--overwrite"]
    step("8. base model on held-out prompts", "eval_rewards.py", "--pretrained_model_name_or_path", sd15,
         "--output_dir", os.path.join(out, "eval_base"), *heldout)
    report = step("8. tuned model on the same prompts and seeds", "eval_rewards.py", "--pretrained_model_name_or_path",
                  sd15, "--lora_path", os.path.join(out, "craft-sd15-lora"), "--output_dir",
                  os.path.join(out, "eval_craft"), "--compare_to", os.path.join(out, "eval_base"), *heldout)
    print("\n" + report.split("Against")[-1].strip() if "Against" in report else "")
    print(f"\ndemo finished in {time.time() - started:.0f} s. Artefacts:")
    for path, what in (("candidates/", "self-generated candidates, rewards.jsonl, rewards_hist.png"),
                       ("filtered/", "the CRAFT training set, crf_report.json, crf_preview.png"),
                       ("craft-sd15-lora/", "LoRA, training_config.json, validation grid, model card"),
                       ("craft-sdxl-lora/", "SDXL LoRA"),
                       ("eval_craft/", "rewards_summary.md (tuned vs base), rewards_hist.png")):
        print(f"  {os.path.join(out, path):40s} {what}")


if __name__ == "__main__":
    main()
