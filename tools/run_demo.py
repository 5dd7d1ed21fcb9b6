#!/usr/bin/env python
"""The newcomer's demo: CRAFT aligns a tiny text-to-image model on this CPU, through the real scripts.

    python tools/run_demo.py [--output_dir demo_output]

The model is models/tiny-shapes-sd15, pretrained by tools/pretrain_tiny_model.py to draw "a {colour} {shape}
{place}" (shipped, so nothing trains it here). Like a real model it follows detailed prompts better than short ones
(its short training captions were noisy). The rewards need no weights: `color` (does the image show the colour the
prompt names) and `jpeg` (compressibility), which the filter uses, and `place` (is the shape where the prompt puts
it), which it never sees: a held-out reward, with the pixel statistics and the diversity across seeds, to show
whether the gain came with reward hacking. The rewrites are the model's detailed captions, which stress the colour
("a red red circle on the left", "..., red"), as an LLM's rewrites add detail for a real model; the template
suffixes ("cinematic lighting", ...) name styles this model never saw. Stages:

  generate_candidates.py (rewrites from a file, several seeds) -> eval_rewards.py -> crf_filter.py
  -> train_craft_sd15.py (LoRAs on the UNet and the text encoder) -> eval_rewards.py on held-out prompts, tuned vs
     base on the same seeds

and, for comparison, plain SFT on all the candidates (crf_filter.py --mode none, the paper's unfiltered ablation).
The SDXL LoRA script also runs, on the zoo's random SDXL model (that only proves the code path). Prints the
before/after table and where each artefact is.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, REPO)
import craft_drift as cdr  # noqa: E402
from pretrain_tiny_model import PLACES, SHAPES, detailed_captions  # noqa: E402

MODEL = os.path.join(REPO, "models", "tiny-shapes-sd15")
EVAL_REWARDS = ("color", "jpeg", "place")  # the filter's two, and the held-out place


def prompt_sets(count, train_place_offset=0):
    """Training and held-out prompts: every (colour, shape) pair, with places that differ between the two sets (the
    held-out pair i at place i + 2, the training pair at i + `train_place_offset`: 0, 1, 3 or 4 give four training
    sets that share no prompt with each other or with the held-out set)."""
    from craft_reward_models import NAMED_COLOURS

    pairs = [(colour, shape) for shape in SHAPES for colour in NAMED_COLOURS][:count]
    places = list(PLACES)
    train = [f"a {c} {s} {places[(i + train_place_offset) % 5]}" for i, (c, s) in enumerate(pairs)]
    heldout = [f"a {c} {s} {places[(i + 2) % 5]}" for i, (c, s) in enumerate(pairs)]
    return train, heldout


def colour_rewrites(prompts):
    """generate_candidates.py's --expansion_file rows: each prompt's three detailed forms, which stress its colour."""
    return [{"prompt": prompt, "variants": detailed_captions(prompt)} for prompt in prompts]


def step(title, script, *args):
    print(f"\n== {title}", flush=True)
    started = time.time()
    command = [sys.executable, os.path.join(REPO, script), *map(str, args)]
    result = subprocess.run(command, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"demo stopped: {script} failed (its error is above)")
    print(f"{result.stdout.strip().splitlines()[-1]}  ({time.time() - started:.0f} s)", flush=True)


def before_after(out, base_dir, tuned_dir, count):
    """The base model's images (top row) and CRAFT's (bottom row) for the first held-out prompts, same seeds: each
    column under its prompt, each image with its rewards."""
    import craft_utils as cu
    from PIL import Image

    rows = [r for r in cu.read_jsonl(os.path.join(base_dir, "metadata.jsonl")) if r["image_index"] == 0][:count]
    tiles, captions = [], []
    for folder in (base_dir, tuned_dir):
        scores = {r["file_name"]: r for r in cu.read_jsonl(os.path.join(folder, "rewards.jsonl"))}
        tiles.append([Image.open(os.path.join(folder, row["file_name"])) for row in rows])
        captions.append(["\n".join(f"{name} {scores[row['file_name']][name]:.2f}" for name in EVAL_REWARDS)
                         for row in rows])
    grid = cu.labelled_grid(tiles, ["base model", "CRAFT LoRA"], [row["text"] for row in rows], captions,
                            tile_size=160)
    path = os.path.join(out, "before_after.png")
    grid.save(path)
    return path


def craft_against_sft(out):
    """CRAFT vs plain SFT on the same held-out prompts and seeds: what the filter and the advantage weights add."""
    import craft_rewards as cr
    import craft_utils as cu
    import eval_rewards

    folders = [os.path.join(out, f"eval_{name}") for name in ("craft", "sft")]
    rows = [cr.read_folder(folder, "text") for folder in folders]
    tables = [{row["file_name"]: row for row in cu.read_jsonl(os.path.join(folder, cr.REWARDS_FILE))}
              for folder in folders]
    return eval_rewards.compare(rows[0], tables[0], rows[1], tables[1], list(EVAL_REWARDS), *folders)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--num_prompts", type=int, default=24, help="training prompts (and as many held out)")
    parser.add_argument("--num_images_per_prompt", type=int, default=2, help="candidate seeds per prompt text")
    parser.add_argument("--eval_images_per_prompt", type=int, default=12)
    parser.add_argument("--num_inference_steps", type=int, default=15)
    parser.add_argument("--train_steps", type=int, default=400)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--model", default=MODEL, help="the pretrained tiny SD1.5-style pipeline")
    parser.add_argument("--seed", type=int, default=0, help="every stage's seed (candidates, training, evaluation)")
    args = parser.parse_args(argv)
    from make_tiny_models import make_zoo

    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise SystemExit(f"error: the demo's pretrained model {args.model} is missing; make it with "
                         f"`python tools/pretrain_tiny_model.py {args.model}` (42 minutes on 2 CPU cores)")
    started = time.time()
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    train_prompts, heldout_prompts = prompt_sets(args.num_prompts)
    for name, prompts in (("train_prompts.txt", train_prompts), ("heldout_prompts.txt", heldout_prompts)):
        with open(os.path.join(out, name), "w") as f:
            f.write("\n".join(prompts) + "\n")
    with open(os.path.join(out, "rewrites.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in colour_rewrites(train_prompts))
    path = lambda *parts: os.path.join(out, *parts)  # noqa: E731
    sampling = ["--num_inference_steps", args.num_inference_steps, "--guidance_scale", 3, "--seed", args.seed,
                "--batch_size", 16]
    rewards = ["--rewards", "color,jpeg"]  # the filter's; the evaluation adds the held-out place

    step("1-3. candidates: each prompt and 3 rewrites, several seeds", "generate_candidates.py",
         "--pretrained_model_name_or_path", args.model, "--prompts_file", path("train_prompts.txt"),
         "--num_variants", 3, "--expansion", "file", "--expansion_file", path("rewrites.jsonl"),
         "--num_images_per_prompt", args.num_images_per_prompt, "--output_dir",
         path("candidates"), *sampling)
    step("4. rewards", "eval_rewards.py", "--images_dir", path("candidates"), *rewards)
    step("5-6. composite reward filter: rewrites that beat the original on color AND jpeg", "crf_filter.py",
         "--candidates_dir", path("candidates"), "--output_dir", path("filtered"), "--filter_rewards", "color,jpeg",
         "--overwrite")
    step("   ablation: every candidate, weight 1 (plain SFT)", "crf_filter.py", "--candidates_dir",
         path("candidates"), "--output_dir", path("unfiltered"), "--filter_rewards", "color,jpeg", "--mode", "none",
         "--overwrite")
    # LoRAs rather than the full UNet: full fine-tunes of an earlier version of this model on its own samples
    # lowered `color` at every learning rate tried. With the text encoder's LoRA too (the paper keeps it frozen) 400
    # steps gained more on this model, at both learning rates tried (README, "The demo, measured").
    training = ["--pretrained_model_name_or_path", args.model, "--use_lora", "--train_text_encoder", "--rank", 8,
                "--resolution", 64, "--train_batch_size", 8, "--max_train_steps", args.train_steps,
                "--learning_rate", args.learning_rate,
                "--lr_warmup_steps", 5, "--seed", args.seed,
                "--report_to", "none", "--checkpointing_steps", 100000, "--overwrite_output_dir", "--center_crop",
                "--validation_prompt", heldout_prompts[0], "--num_validation_images", 4,
                "--validation_epochs", 100000, "--validation_inference_steps", args.num_inference_steps,
                "--validation_rewards", "color"]
    step("7. CRAFT fine-tune (LoRA, advantage weights)", "train_craft_sd15.py", "--train_data_dir",
         path("filtered"), "--output_dir", path("craft-sd15-lora"), *training)
    step("   ablation: plain SFT on every candidate", "train_craft_sd15.py", "--train_data_dir", path("unfiltered"),
         "--output_dir", path("sft-sd15-lora"), *training)
    zoo = path("zoo")
    if not os.path.isdir(os.path.join(zoo, "sdxl")):
        make_zoo(zoo)
    step("7. SDXL LoRA script on the zoo's random SDXL model (code path only)", "train_craft_sdxl_lora.py",
         "--pretrained_model_name_or_path", os.path.join(zoo, "sdxl"), "--train_data_dir", path("filtered"),
         "--output_dir", path("craft-sdxl-lora"), "--resolution", 64, "--train_batch_size", 4, "--max_train_steps",
         5, "--report_to", "none", "--overwrite_output_dir", "--checkpointing_steps", 100000)
    heldout = ["--prompts_file", path("heldout_prompts.txt"), "--num_images_per_prompt", args.eval_images_per_prompt,
               *sampling, "--rewards", ",".join(EVAL_REWARDS), "--overwrite"]
    step("8. base model on held-out prompts", "eval_rewards.py", "--pretrained_model_name_or_path", args.model,
         "--output_dir", path("eval_base"), *heldout)
    results = {}
    for name in ("craft", "sft"):
        step(f"8. {name} model, same prompts and seeds", "eval_rewards.py", "--pretrained_model_name_or_path",
             args.model, "--lora_path", path(f"{name}-sd15-lora"), "--output_dir", path(f"eval_{name}"),
             "--compare_to", path("eval_base"), *heldout)
        with open(path(f"eval_{name}", "rewards_summary.json")) as f:
            results[name] = json.load(f)["comparison"]
    grid = before_after(out, path("eval_base"), path("eval_craft"), 8)

    with open(path("filtered", "crf_report.json")) as f:
        report = json.load(f)
    lines = [f"\nHeld-out prompts: {results['craft']['pairs']} (prompt, seed) pairs; CRAFT trained on {report['kept']} "
             f"filtered images of {report['candidates']} candidates, plain SFT on all {report['candidates']}. The "
             "filter used color and jpeg; place is held out.", "",
             "| reward | base | CRAFT | delta +- s.e. | win | plain SFT | delta +- s.e. | win |",
             "|---|---|---|---|---|---|---|---|"]
    for reward in EVAL_REWARDS:
        c, s = results["craft"]["rewards"][reward], results["sft"]["rewards"][reward]
        lines.append(f"| {reward}{' (held out)' if reward == 'place' else ''} | {c['baseline_mean']:.4f} | "
                     f"{c['mean']:.4f} | {c['mean_delta']:+.4f} +- {c['stderr']:.4f} | {c['win_rate']:.0%} | "
                     f"{s['mean']:.4f} | {s['mean_delta']:+.4f} +- {s['stderr']:.4f} | {s['win_rate']:.0%} |")
    lines += ["", "Drift (pixel statistics per image; diversity across the "
              f"{args.eval_images_per_prompt} seeds of each prompt):", "",
              "| statistic | base | CRAFT | delta +- s.e. | plain SFT | delta +- s.e. |", "|---|---|---|---|---|---|"]
    measured = (*cdr.STATISTICS, "diversity") if results["craft"]["diversity"] else cdr.STATISTICS  # 2+ seeds
    drift = {name: {model: {**results[model]["drift"], "diversity": results[model]["diversity"]}[name]
                    for model in ("craft", "sft")} for name in measured}
    for name, rows in drift.items():
        c, s = rows["craft"], rows["sft"]
        lines.append(f"| {name} | {c['baseline_mean']:.4f} | {c['mean']:.4f} | {c['delta']:+.4f} +- "
                     f"{c['stderr']:.4f} | {s['mean']:.4f} | {s['delta']:+.4f} +- {s['stderr']:.4f} |")
    signs = results["craft"]["hacking_signs"]
    lines += ["", f"Reward hacking suspected: {'; '.join(signs)}." if signs else
              "No sign of reward hacking in CRAFT's model, by the rules in README, Troubleshooting (a held-out reward "
              f"falling by {cdr.HELD_OUT_EFFECT} standard deviations or more, a statistic past its threshold, "
              f"diversity down by {cdr.DIVERSITY_DROP:.0%} or more)."]
    versus = craft_against_sft(out)
    lines += ["", "CRAFT vs plain SFT, same pairs: " + ", ".join(
        f"{reward} {v['mean_delta']:+.4f} +- {v['stderr']:.4f} (CRAFT better in {v['win_rate']:.0%})"
        for reward, v in versus["rewards"].items())]
    table = "\n".join(lines) + "\n"
    with open(path("demo_results.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"demo finished in {time.time() - started:.0f} s. Artefacts:")
    for where, what in (("candidates/", "self-generated candidates, rewards.jsonl, rewards_hist.png"),
                        ("filtered/", "the CRAFT training set, crf_report.json, crf_preview.png"),
                        ("craft-sd15-lora/", "the LoRA, training_config.json, validation grid, model card"),
                        ("eval_craft/", "rewards_summary.md (tuned vs base), rewards_hist.png"),
                        ("before_after.png", "base (top) and CRAFT (bottom), same held-out prompts and seeds"),
                        ("demo_results.md", "the table above")):
        print(f"  {path(where):34s} {what}")
    return dict(results, craft_vs_sft=versus), grid


if __name__ == "__main__":
    main()
