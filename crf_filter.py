#!/usr/bin/env python
"""CRAFT stages 5-6: Composite Reward Filtering and advantage weights.

Reads a scored candidates folder (metadata.jsonl + rewards.jsonl; rewards named in --filter_rewards that are
missing are scored first and cached there) and writes the small weighted training set the trainers read with
`--train_data_dir`: an imagefolder with metadata.jsonl (file_name, text, weight, advantage, group_id, source_file,
every reward score), crf_report.json and crf_preview.png.

Filter (--mode):
  dominance  (default, the paper) inside each group (all images of one original prompt) the original-prompt images
             (variant 0) are the reference; a rewrite image is kept when it beats the reference on EVERY filter
             reward: score > reference + margin * std_group(reward). Reference = mean (default) or max of the
             variant-0 scores. --require_all_variants keeps a group's images only if all its rewrite images pass.
  topk       keep the --top_k images of each group by the weighted sum of per-group z-scored rewards
             (--reward_weights); for prompt sets without rewrites.
  none       keep every image with weight 1, whatever --weighting (the paper's "unfiltered SFT" ablation).
  pairs      preference pairs for Diffusion-DPO, the baseline the paper compares with (train them with the
             trainers' --loss dpo; the rows have no `weight`, so --loss craft refuses the folder, and with
             --weight_column none trains plain SFT on the preferred images):
             per group, the image of highest advantage (preferred, `file_name`) against the one of lowest
             (`rejected_file_name`), captioned with the original prompt; groups whose advantages are all equal give
             none. One pair per prompt, the clearest comparison its candidates offer, as Diffusion-DPO's data has
             one comparison per prompt; every pair of a group would weigh prompts by their image count squared.
             load_dataset("imagefolder") reads both images (columns `image` and `rejected`).

Advantage (per group): z_r = (r - mean_group(r)) / (std_group(r) + eps) for each filter reward,
r_total = sum_r w_r z_r, A = (r_total - mean_group(r_total)) / (std_group(r_total) + eps), eps = 1e-8, population
std. A group with one image, or with equal totals, gets A = 0. weight = max(A, 0) for kept images
(--weighting advantage) or 1 (--weighting uniform = plain SFT on the filtered set); kept images whose advantage
weight is 0 are left out of the output (they would train nothing) and counted in the report.
"""

import argparse
import itertools
import math
import os
import shutil
import statistics

import craft_rewards as cr
import craft_utils as cu

EPS = 1e-8
REPORT = "crf_report.json"
PREVIEW_GROUPS = 8  # the groups crf_preview.png shows


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates_dir", required=True, help="generate_candidates.py's output folder")
    parser.add_argument("--output_dir", default="filtered", help="where the training imagefolder is written")
    parser.add_argument("--filter_rewards", default="hpsv2.1,pickscore,aesthetic",
                        help="the rewards of the advantage; in dominance mode an image must win them all (paper: "
                             "hpsv2.1 | hpsv2.1,aesthetic | hpsv2.1,pickscore,aesthetic = the default and best)")
    parser.add_argument("--mode", choices=["dominance", "topk", "none", "pairs"], default="dominance",
                        help="dominance: CRF (rewrites that beat the original on every reward); topk: each group's "
                             "--top_k of highest advantage; none: every image (the paper's no-filter ablation); "
                             "pairs: each group's best against its worst image, for --loss dpo")
    parser.add_argument("--reference", choices=["mean", "max"], default="mean",
                        help="dominance: compare with the mean or the max of the original-prompt images' scores")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="dominance: win by at least this many group standard deviations of each reward")
    parser.add_argument("--require_all_variants", action="store_true",
                        help="dominance: keep a group's images only if every rewrite image of it passes")
    parser.add_argument("--top_k", type=int, default=1, help="topk: images kept per group")
    parser.add_argument("--reward_weights", help="weights of the filter rewards in r_total, e.g. 1,1,0.5")
    parser.add_argument("--weighting", choices=["advantage", "uniform"], default="advantage",
                        help="training weight of a kept image: its advantage (CRAFT), or 1 (plain SFT on the set)")
    parser.add_argument("--weight_clip", type=float, help="cap each weight at this value")
    parser.add_argument("--max_samples", type=int,
                        help="keep at most N images, those of highest advantage (pairs: of largest advantage gap)")
    parser.add_argument("--caption", choices=["original", "expanded"], default="original",
                        help="training caption: the original prompt (default) or the rewrite that made the image")
    parser.add_argument("--link", action="store_true", help="hard-link images instead of copying them")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="skip (and count) rows with missing images, NaN/inf scores or groups without an "
                             "original-prompt image instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing filtered folder")
    cr.add_reward_args(parser)
    args = parser.parse_args(input_args)
    args.reward_names = cr.parse_reward_names(args.filter_rewards, "--filter_rewards")
    if args.reward_weights:
        try:
            args.weights = [float(w) for w in args.reward_weights.split(",")]
        except ValueError:
            parser.error(f"--reward_weights {args.reward_weights}: give comma-separated numbers")
        if len(args.weights) != len(args.reward_names):
            parser.error(f"--reward_weights has {len(args.weights)} values for {len(args.reward_names)} rewards")
    else:
        args.weights = [1.0] * len(args.reward_names)
    if not all(math.isfinite(w) for w in args.weights) or not any(args.weights):
        parser.error(f"--reward_weights {args.reward_weights}: give finite numbers, at least one of them not 0")
    if not math.isfinite(args.margin):
        parser.error(f"--margin must be a finite number (got {args.margin})")
    if args.weight_clip is not None and not args.weight_clip > 0:
        parser.error(f"--weight_clip must be > 0 (got {args.weight_clip}); leave it out for no cap")
    if args.top_k < 1 or (args.max_samples is not None and args.max_samples < 1):
        parser.error("--top_k and --max_samples must be >= 1")
    dominance_only = {"margin": 0.0, "reference": "mean", "require_all_variants": False}
    if args.mode in ("topk", "none"):
        ignored = [flag for flag, default in {**dominance_only, **({"top_k": 1} if args.mode == "none" else {})}.items()
                   if getattr(args, flag) != default]
        if ignored:
            parser.error(f"--{ignored[0]} does not apply to --mode {args.mode}; leave it out (it is read by "
                         f"{'--mode topk' if ignored[0] == 'top_k' else '--mode dominance'})")
    elif args.top_k != 1:
        parser.error(f"--top_k does not apply to --mode {args.mode}; leave it out (it is read by --mode topk)")
    if args.mode == "pairs":
        defaults = {"caption": "original", "weighting": "advantage", "weight_clip": None, "margin": 0.0,
                    "reference": "mean", "require_all_variants": False}
        ignored = [flag for flag, default in defaults.items() if getattr(args, flag) != default]
        if ignored:
            parser.error(f"--mode pairs pairs each group's best and worst image by advantage, captioned with the "
                         f"original prompt; --{ignored[0]} does not apply to it")
    return args


def zscores(values):
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    return [(v - mean) / (std + EPS) for v in values]


def group_advantages(scores, names, weights):
    """scores: one {reward: value} per image of a group -> (advantage per image, std of each reward)."""
    per_reward = {name: zscores([s[name] for s in scores]) for name in names}
    totals = [sum(w * per_reward[name][i] for name, w in zip(names, weights)) for i in range(len(scores))]
    return zscores(totals), {name: statistics.pstdev([s[name] for s in scores]) for name in names}


def beats(score, reference, stds, names, margin):
    return all(score[name] > reference[name] + margin * stds[name] for name in names)


def filter_group(rows, names, args, counts):
    """Rows of one group (each with `scores`) -> the kept rows, each with `advantage` and `weight` set."""
    advantages, stds = group_advantages([row["scores"] for row in rows], names, args.weights)
    for row, advantage in zip(rows, advantages):
        row["advantage"] = advantage
    if args.mode == "none":
        return rows
    if args.mode == "topk":
        return sorted(rows, key=lambda r: -r["advantage"])[: args.top_k]
    if args.mode == "pairs":
        ranked = sorted(rows, key=lambda r: (r["advantage"], r["variant_id"], r.get("image_index", 0)))
        preferred, rejected = ranked[-1], ranked[0]
        if preferred["advantage"] <= rejected["advantage"]:
            counts["groups_without_pair"] += 1
            return []
        return [{**preferred, "rejected": rejected, "advantage_gap": preferred["advantage"] - rejected["advantage"]}]
    references = [row for row in rows if row["variant_id"] == 0]
    rewrites = [row for row in rows if row["variant_id"] != 0]
    pick = max if args.reference == "max" else statistics.fmean
    reference = {name: pick([row["scores"][name] for row in references]) for name in names}
    counts["rewrite_images"] += len(rewrites)
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            key = "+".join(subset)
            counts["pass"][key] = counts["pass"].get(key, 0) + sum(
                beats(row["scores"], reference, stds, subset, args.margin) for row in rewrites)
    kept = [row for row in rewrites if beats(row["scores"], reference, stds, names, args.margin)]
    for row in kept:
        row["reference"] = reference
    if args.require_all_variants and len(kept) < len(rewrites):
        counts["dropped_by_require_all_variants"] += len(kept)
        return []
    return kept


def load_candidates(args, state):
    """Candidate rows with their scores; invalid rows stop the run or, with --skip_invalid, are counted."""
    metadata = os.path.join(args.candidates_dir, cu.METADATA)
    if not os.path.isfile(metadata):
        cu.fail(f"{args.candidates_dir} has no {cu.METADATA}; give generate_candidates.py's output folder")
    rows = cu.read_jsonl(metadata)
    for number, row in enumerate(rows, start=1):
        for column in ("file_name", "group_id", "variant_id", "original_prompt", "text"):
            if column not in row:
                cu.fail(f"{metadata}, row {number}: no '{column}' column; give generate_candidates.py's output")
        for column in ("group_id", "variant_id"):
            if type(row[column]) is not int:
                cu.fail(f"{metadata}, row {number}: {column} {row[column]!r} is not a whole number; fix that row")
        cu.path_in_folder(args.candidates_dir, row["file_name"], f"{metadata}, row {number}")  # copied out later
    cu.refuse_repeated_rows(rows, metadata)
    rewards_path = os.path.join(args.candidates_dir, cr.REWARDS_FILE)
    table = {r["file_name"]: r for r in cu.read_jsonl(rewards_path)} if os.path.exists(rewards_path) else {}
    missing = [name for name in args.reward_names if any(table.get(r["file_name"], {}).get(name) is None for r in rows)]
    if missing:
        if state.is_main_process:
            print(f"scoring {', '.join(missing)} first (cached in {rewards_path})")
        _, table = cr.score_folders([args.candidates_dir], missing, args, state)[args.candidates_dir]
    skipped = {"missing_image": 0, "invalid_score": 0, "group_without_original": 0}
    valid = []
    for number, row in enumerate(rows, start=1):
        problem = None
        scores = {k: v for k, v in table.get(row["file_name"], {}).items() if k != "file_name"}
        bad = [name for name in args.reward_names
               if not cr.is_valid_score(scores.get(name))]
        if not os.path.isfile(os.path.join(args.candidates_dir, row["file_name"])):
            problem = ("missing_image", f"image {row['file_name']} is missing")
        elif bad:
            problem = ("invalid_score", f"{bad[0]} score is {scores.get(bad[0])!r} in {rewards_path}")
        if problem and not args.skip_invalid:
            cu.fail(f"{metadata}, row {number}: {problem[1]}; fix it or pass --skip_invalid to leave such rows out")
        if problem:
            skipped[problem[0]] += 1
            continue
        valid.append({**row, "scores": scores, "row_number": number})
    groups = {}
    for row in valid:
        groups.setdefault(row["group_id"], []).append(row)
    if args.mode == "dominance":
        for group_id in sorted(g for g, members in groups.items() if not any(r["variant_id"] == 0 for r in members)):
            if not args.skip_invalid:
                cu.fail(f"{metadata}: group {group_id} has no original-prompt image (variant_id 0) to compare with; "
                        "pass --skip_invalid to leave such groups out, or use --mode topk")
            skipped["group_without_original"] += len(groups.pop(group_id))
    return rows, groups, skipped


def check_output_dir(args):
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        cu.fail(f"--output_dir {args.output_dir} is a file; give a folder (new, or one crf_filter.py wrote)")
    if os.path.realpath(args.output_dir) == os.path.realpath(args.candidates_dir):
        cu.fail(f"--output_dir {args.output_dir} is the --candidates_dir itself; give a new folder for the filtered set")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        if not args.overwrite:
            cu.fail(f"{args.output_dir} is not empty; pass --overwrite to replace it or choose another --output_dir")
        if not os.path.exists(os.path.join(args.output_dir, REPORT)):
            cu.fail(f"{args.output_dir} is not empty and holds no {REPORT} (not a crf_filter.py folder); "
                    "choose another --output_dir")
        metadata = os.path.join(args.output_dir, cu.METADATA)
        rows = cu.read_jsonl(metadata) if os.path.isfile(metadata) else []
        written = {REPORT, cu.METADATA, "crf_preview.png"} | {row.get(column) for row in rows if isinstance(row, dict)
                                                              for column in ("file_name", "rejected_file_name")}
        cu.refuse_foreign_entries(args.output_dir, written.__contains__, "--overwrite")


def preview_groups(kept, count):
    return sorted({row["group_id"] for row in kept}, key=str)[:count]


def first_original(group_rows):
    return [row for row in group_rows if row["variant_id"] == 0][:1]


def write_preview(path, kept, groups, source_dir, names, count):
    """One row per group, labelled with its prompt: the first original-prompt image (under it, the reference scores in
    dominance mode), then the kept images with their weight and scores (pairs mode: the preferred and the rejected
    image)."""
    from PIL import Image

    shown = preview_groups(kept, count)
    if not shown:
        return
    tiles, captions = [], []
    for group_id in shown:
        kept_rows = [shown_row for r in kept if r["group_id"] == group_id
                     for shown_row in ([r, {**r["rejected"], "is_rejected": True}] if "rejected" in r else [r])]
        tiles.append([]), captions.append([])
        for x, row in enumerate(first_original(groups[group_id]) + kept_rows):
            if x and ("rejected" in row or row.get("is_rejected")):
                label = [f"{'rejected' if row.get('is_rejected') else 'preferred'}, A {row['advantage']:+.2f}"]
                values = row["scores"]
            elif row["variant_id"] == 0:
                reference = kept_rows[0].get("reference")
                label, values = ["reference" if reference else "original"], reference or row["scores"]
            else:
                label, values = [f"kept, weight {row['weight']:.2f}"], row["scores"]
            tiles[-1].append(Image.open(os.path.join(source_dir, row["file_name"])))
            captions[-1].append("\n".join(label + [f"{name} {values[name]:.3f}" for name in names]))
    prompts = [groups[group_id][0]["original_prompt"] for group_id in shown]
    cu.save_image_atomic(cu.labelled_grid(tiles, prompts, captions=captions, tile_size=192), path)


def copy_image(args, row, staging):
    """Copy (or hard-link) a candidate image into the folder being built; returns its source path."""
    source = os.path.abspath(os.path.join(args.candidates_dir, row["file_name"]))
    target = os.path.join(staging, row["file_name"])
    try:
        if args.link:
            os.link(source, target)
        else:
            shutil.copy2(source, target)
    except OSError as error:
        shutil.rmtree(staging)
        cu.fail(f"cannot {'hard-link' if args.link else 'copy'} {source} ({error.strerror}); "
                f"{'drop --link (different filesystems?)' if args.link else 'check the disk'}")
    return source


def main(args):
    from tqdm.auto import tqdm

    state = cu.process_state()
    if state.is_main_process:
        cu.recover_folder(args.output_dir)
    state.wait_for_everyone()
    check_output_dir(args)
    rows, groups, skipped = load_candidates(args, state)
    if not state.is_main_process:
        return
    counts = {"rewrite_images": 0, "pass": {}, "dropped_by_require_all_variants": 0, "groups_without_pair": 0}
    kept = []
    for group_id in sorted(groups, key=str):
        kept += filter_group(groups[group_id], args.reward_names, args, counts)
    filtered = len(kept)
    for row in kept:
        weight = 1.0 if args.mode in ("none", "pairs") or args.weighting == "uniform" else max(row["advantage"], 0.0)
        row["weight"] = min(weight, args.weight_clip) if args.weight_clip else weight
    zero_weight = sum(row["weight"] == 0 for row in kept)
    kept = [row for row in kept if row["weight"] > 0]
    rank = "advantage_gap" if args.mode == "pairs" else "advantage"
    kept.sort(key=lambda r: (-r[rank], str(r["group_id"]), r["variant_id"], r.get("image_index", 0)))
    capped = max(len(kept) - args.max_samples, 0) if args.max_samples else 0
    kept = kept[: len(kept) - capped]
    if not kept and args.mode == "pairs":
        cu.fail(f"no group of {args.candidates_dir} has images of different advantage to pair; give candidates with "
                "several images per prompt")
    if not kept:
        cu.fail(f"no image of {args.candidates_dir} passed the filter ({filtered} passed, {zero_weight} with zero "
                "advantage); try fewer --filter_rewards, --reference mean, a smaller --margin or more candidates")
    kept.sort(key=lambda r: (str(r["group_id"]), r["variant_id"], r.get("image_index", 0)))
    shown = preview_groups(kept, PREVIEW_GROUPS)
    pairs = [row["rejected"] for row in kept if "rejected" in row]
    for row in kept + pairs + [original for g in shown for original in first_original(groups[g])]:
        # every pixel of what is copied or shown decodes, before anything is written
        cu.check_image(os.path.join(args.candidates_dir, row["file_name"]),
                       f"{os.path.join(args.candidates_dir, cu.METADATA)}, row {row['row_number']}")

    # build the folder beside its destination, then swap it in: a kill never leaves half a training set
    staging = cu.staging_folder(args.output_dir)
    metadata = []
    for number, row in enumerate(tqdm(kept, desc="writing", unit="img")):
        if number == len(kept) // 2:
            cu.fault_point("crf_writing")
        source = copy_image(args, row, staging)
        caption = row["original_prompt"] if args.caption == "original" else row["text"]
        metadata.append({"file_name": row["file_name"], "text": caption,
                         **({} if args.mode == "pairs" else {"weight": row["weight"]}), "advantage": row["advantage"],
                         "group_id": row["group_id"], "source_file": source,
                         "variant_id": row["variant_id"], "seed": row.get("seed"), "rewrite": row["text"],
                         **row["scores"]})
        if "rejected" in row:  # the pair's other image: datasets reads *_file_name columns as images too
            rejected = row["rejected"]
            metadata[-1].update(rejected_file_name=rejected["file_name"],
                                rejected_source_file=copy_image(args, rejected, staging),
                                rejected_advantage=rejected["advantage"], advantage_gap=row["advantage_gap"],
                                rejected_rewrite=rejected["text"], rejected_scores=rejected["scores"])
    cu.write_jsonl_atomic(os.path.join(staging, cu.METADATA), metadata)
    report = {
        "candidates": len(rows), "groups": len(groups), "skipped": skipped, "rewrite_images": counts["rewrite_images"],
        "passed": counts["pass"], "passed_filter": filtered, "zero_advantage": zero_weight,
        "dropped_by_require_all_variants": counts["dropped_by_require_all_variants"],
        "groups_without_pair": counts["groups_without_pair"],
        "dropped_by_max_samples": capped, "kept": len(metadata), "kept_groups": len({r["group_id"] for r in kept}),
        "weight_sum": sum(r.get("weight", 0.0) for r in metadata),
        "settings": {k: getattr(args, k) for k in ("candidates_dir", "filter_rewards", "mode", "reference", "margin",
                                                     "require_all_variants", "top_k", "weights", "weighting",
                                                     "weight_clip", "max_samples", "caption")},
    }
    cu.write_json_atomic(os.path.join(staging, REPORT), report)
    write_preview(os.path.join(staging, "crf_preview.png"), kept, groups, args.candidates_dir, args.reward_names,
                  PREVIEW_GROUPS)
    cu.publish_folder(staging, args.output_dir)  # replaces an empty folder, or ours with --overwrite (checked)

    print(f"{len(rows)} candidates in {len(groups)} groups")
    if args.mode == "dominance":
        print(f"rewrite images (of {counts['rewrite_images']}) beating the reference ({args.reference}) on:")
        for key, number in counts["pass"].items():
            print(f"  {key:40s} {number}")
    if args.mode == "pairs":
        print(f"{len(metadata)} preference pairs, one per group ({counts['groups_without_pair']} groups of equal "
              f"advantages gave none, over --max_samples {capped}, skipped {sum(skipped.values())})")
    else:
        print(f"kept {len(metadata)} images from {report['kept_groups']} groups (passed {filtered}, zero advantage "
              f"{zero_weight}, over --max_samples {capped}, skipped {sum(skipped.values())}); weight sum "
              f"{report['weight_sum']:.2f}")
    print(f"-> {args.output_dir}/metadata.jsonl, {REPORT}, crf_preview.png")


if __name__ == "__main__":
    args = parse_args()
    with cu.write_faults_in_one_line(args.output_dir):
        main(args)
