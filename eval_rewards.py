#!/usr/bin/env python
"""Score an image folder, or a model, with CRAFT's reward models; compare against a baseline folder.

Folder mode (`--images_dir DIR`, an imagefolder with metadata.jsonl): writes DIR/rewards.jsonl, one row per image
with `file_name` and one column per reward. The text scored is `original_prompt` when the folder has it (CRAFT
candidates: rewrites and originals answer the same question), else `--caption_column`. Rerunning with more
rewards adds columns and keeps the others; `--overwrite` recomputes.

Model mode (`--pretrained_model_name_or_path` [+ `--lora_path`] with a prompt set): generates one image per prompt
and seed into --output_dir (the seed scheme of generate_candidates.py), then scores that folder.

Both modes print and save a summary (rewards_summary.json/.md: mean, std, median, n per reward) and a picture of
the score distributions (rewards_hist.png). `--compare_to OTHER_DIR` pairs images by (prompt, seed) and reports
the per-reward mean delta, its standard error and the win/tie/loss rates: the comparison with the base model.
Under `accelerate launch` the images are split across processes; the scores equal a single-process run.
"""

import argparse
import gc
import math
import os
import statistics
import time

import craft_rewards as cr
import craft_utils as cu

def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images_dir", help="folder mode: an imagefolder (images + metadata.jsonl) to score")
    parser.add_argument("--caption_column", default="text",
                        help="text column scored when the folder has no original_prompt column")
    parser.add_argument("--rewards", default="hpsv2.1,pickscore,aesthetic",
                        help=f"comma-separated rewards, from: {', '.join(sorted(cr.REWARDS))}")
    parser.add_argument("--compare_to", help="a baseline folder (scored too, if needed) to pair by (prompt, seed)")
    parser.add_argument("--overwrite", action="store_true", help="recompute rewards already in rewards.jsonl")
    parser.add_argument("--output_dir", default="eval", help="model mode: where generated images are written")
    cu.add_generation_args(parser, model_required=False)
    cu.add_prompt_args(parser)
    cr.add_reward_args(parser)
    args = parser.parse_args(input_args)
    if bool(args.images_dir) == bool(args.pretrained_model_name_or_path):
        parser.error("give --images_dir (score a folder) or --pretrained_model_name_or_path (score a model)")
    args.reward_names = cr.parse_reward_names(args.rewards)
    return args


def check_scores(folder, rows, table, names):
    """Every score a finite number; a bad cached one (NaN, a string) is named, with the way to rescore it."""
    path = os.path.join(folder, cr.REWARDS_FILE)
    for number, row in enumerate(rows, start=1):
        for name in names:
            value = table[row["file_name"]].get(name)
            if not cr.is_valid_score(value):
                cu.fail(f"{path}: {name} score of {row['file_name']} (image {number} of {cu.METADATA}) is {value!r}; "
                        f"delete that value to rescore it, or rerun with --overwrite")


def summarize(rows, table, names):
    summary = {}
    for name in names:
        values = [table[row["file_name"]][name] for row in rows]
        summary[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "median": statistics.median(values), "n": len(values)}
    return summary


def compare(rows, table, other_rows, other_table, names, folder, other):
    """Pair images by (prompt, seed); per reward: mean delta (this - other), its standard error, win/tie/loss."""
    def keyed(rows_, table_, where):
        if any("seed" not in row for row in rows_):
            cu.fail(f"{where}/{cu.METADATA} has no seed column; --compare_to pairs images by (prompt, seed)")
        return {(row["_text"], row["seed"]): table_[row["file_name"]] for row in rows_}

    mine, theirs = keyed(rows, table, folder), keyed(other_rows, other_table, other)
    pairs = sorted(set(mine) & set(theirs), key=str)
    if not pairs:
        shared = {prompt for prompt, _ in mine} & {prompt for prompt, _ in theirs}
        cu.fail(f"{folder} and {other} share no (prompt, seed) pair"
                + (f" though they share {len(shared)} prompt(s): a seed follows its prompt's position in the prompts "
                   "file, so generate both from the same file, in the same order, with the same --seed" if shared
                   else "; generate both from the same prompts file with the same --seed"))
    if len(pairs) < max(len(mine), len(theirs)):
        print(f"note: compared on the {len(pairs)} (prompt, seed) pairs found in both folders; {len(mine) - len(pairs)} "
              f"image(s) of {folder} and {len(theirs) - len(pairs)} of {other} have no partner")
    result = {"compare_to": other, "pairs": len(pairs), "unpaired": len(mine) - len(pairs),
              "baseline_unpaired": len(theirs) - len(pairs), "rewards": {}}
    for name in names:
        deltas = [mine[key][name] - theirs[key][name] for key in pairs]
        std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        result["rewards"][name] = {
            "mean_delta": statistics.fmean(deltas), "stderr": std / math.sqrt(len(deltas)),
            "win_rate": sum(d > 0 for d in deltas) / len(deltas), "tie_rate": sum(d == 0 for d in deltas) / len(deltas),
            "loss_rate": sum(d < 0 for d in deltas) / len(deltas),
            "mean": statistics.fmean(mine[key][name] for key in pairs),
            "baseline_mean": statistics.fmean(theirs[key][name] for key in pairs),
        }
    return result


def markdown(folder, summary, comparison):
    lines = [f"Rewards of {folder}", "", "| reward | mean | std | median | n |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['mean']:.4f} | {s['std']:.4f} | {s['median']:.4f} | {s['n']} |"
              for name, s in summary.items()]
    if comparison:
        lines += ["", f"Against {comparison['compare_to']} ({comparison['pairs']} pairs by prompt and seed)", "",
                  "| reward | mean | baseline | delta | stderr | win | tie | loss |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {c['mean']:.4f} | {c['baseline_mean']:.4f} | {c['mean_delta']:+.4f} | {c['stderr']:.4f} "
                  f"| {c['win_rate']:.1%} | {c['tie_rate']:.1%} | {c['loss_rate']:.1%} |"
                  for name, c in comparison["rewards"].items()]
    return "\n".join(lines) + "\n"


def plot_histograms(path, names, folder, values, other=None, other_values=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        axis.hist(values[name], bins=20, alpha=0.6, label=os.path.basename(folder.rstrip("/")))
        if other_values:
            axis.hist(other_values[name], bins=20, alpha=0.6, label=os.path.basename(other.rstrip("/")))
        axis.set_title(name)
        axis.set_xlabel("score")
    axes[0][0].set_ylabel("images")
    axes[0][0].legend()
    figure.tight_layout()
    cu.write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=100))
    plt.close(figure)


def generate_eval_images(args, state):
    """Model mode: one image per prompt and seed, the same seeds as generate_candidates.py's variant 0."""
    prompts = cu.load_prompts(args)
    settings = {**cu.generation_settings(args), "prompts_source": args.prompts_file or args.dataset_name,
                "num_prompts": len(prompts), "prompts_sha256": cu.sha256_of(prompts)}
    start_over = cu.check_generation_folder(args.output_dir, settings, args.overwrite)
    pipe = cu.load_pipeline(args, state.device)
    cu.start_generation_folder(args.output_dir, settings, pipe, args, start_over, state)
    planned = cu.plan_images([(prompt, [prompt]) for prompt in prompts], args.num_images_per_prompt, args.seed)
    cu.generate_images(pipe, planned, args.output_dir, args, state)
    del pipe
    gc.collect()
    return args.output_dir


def main(args):
    state = cu.process_state()
    started = time.time()
    names = args.reward_names
    if args.compare_to:
        cr.read_folder(args.compare_to, args.caption_column)  # refuse a bad baseline before any work
    folder = args.images_dir or generate_eval_images(args, state)
    rows, table = cr.score_folder(folder, names, args, state, args.caption_column, args.overwrite)
    other_rows = other_table = None
    if args.compare_to:
        other_rows, other_table = cr.score_folder(args.compare_to, names, args, state, args.caption_column,
                                                 args.overwrite)
    if not state.is_main_process:
        return
    check_scores(folder, rows, table, names)
    if other_rows:
        check_scores(args.compare_to, other_rows, other_table, names)
    summary = summarize(rows, table, names)
    comparison = compare(rows, table, other_rows, other_table, names, folder, args.compare_to) if other_rows else None
    cu.write_json_atomic(os.path.join(folder, "rewards_summary.json"), {"rewards": summary, "comparison": comparison})
    report = markdown(folder, summary, comparison)
    cu.write_text_atomic(os.path.join(folder, "rewards_summary.md"), report)
    values = {name: [table[row["file_name"]][name] for row in rows] for name in names}
    other_values = ({name: [other_table[row["file_name"]][name] for row in other_rows] for name in names}
                    if other_rows else None)
    plot_histograms(os.path.join(folder, "rewards_hist.png"), names, folder, values, args.compare_to, other_values)
    print(report)
    print(f"{len(rows)} images scored with {', '.join(names)} in {time.time() - started:.0f} s: "
          f"{os.path.join(folder, cr.REWARDS_FILE)}, rewards_summary.json/.md, rewards_hist.png")


if __name__ == "__main__":
    main(parse_args())
