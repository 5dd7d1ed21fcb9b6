#!/usr/bin/env python
"""Score an image folder, or a model, with CRAFT's reward models; compare against a baseline folder.

Folder mode (`--images_dir DIR`, an imagefolder with metadata.jsonl): writes DIR/rewards.jsonl, one row per image
with `file_name` and one column per reward. The text scored is `original_prompt` when the folder has it (CRAFT
candidates: rewrites and originals answer the same question), else `--caption_column`. Rerunning with more
rewards adds columns and keeps the others, also when two runs score other rewards of one folder at once (each
merges its column into rewards.jsonl under the folder's lock); `--overwrite` recomputes.

Model mode (`--pretrained_model_name_or_path` [+ `--lora_path`] with a prompt set): generates one image per prompt
and seed into --output_dir (the seed scheme of generate_candidates.py), then scores that folder.

Both modes print and save a summary (rewards_summary.json/.md: mean, std, median, n per reward) and a picture of
the score distributions (rewards_hist.png). `--compare_to OTHER_DIR` pairs images by (prompt, seed) and reports
the per-reward mean delta, its standard error and the win/tie/loss rates: the comparison with the base model.
Under `accelerate launch` the images are split across processes; the scores equal a single-process run.

Benchmark mode (`--benchmark hpsv2|drawbench|parti`): the model (or, with --images_dir, the images of an earlier
benchmark run) is evaluated on each part of a named prompt benchmark, one subfolder per part, and
benchmark_NAME.md/.json/.png report the table the papers print: rows = models (this one and --compare_to, the base's
benchmark folder), columns = rewards, with the mean delta, its standard error and the win rate, per part and
averaged over the parts (each part weighs the same, as the HPSv2 leaderboard averages its four styles). HPSv2
scores are shown x100, as the paper and the leaderboard print them.
"""

import argparse
import functools
import gc
import json
import math
import os
import statistics
import time

import craft_drift as cdr
import craft_generation as cg
import craft_pipelines as cp
import craft_reward_models as cm
import craft_rewards as cr
import craft_utils as cu

# name -> the parts of a benchmark, and where their prompts are read from --benchmark_prompts
BENCHMARKS = {
    "hpsv2": {"parts": ["anime", "concept-art", "paintings", "photo"], "source": "files"},  # HPDv2 benchmark/*.json
    "drawbench": {"parts": ["drawbench"], "source": "files"},  # HPDv2 benchmark/drawbench.json
    "parti": {"parts": ["parti"], "source": "dataset", "default": "nateraw/parti-prompts", "column": "Prompt"},
}
SHOWN_X100 = {"hpsv2.1", "hpsv2.0"}
# generation settings that change what a model's images look like besides the model: --compare_to notes a difference
SAMPLING_SETTINGS = ("guidance_scale", "num_inference_steps", "scheduler", "height", "width", "max_sequence_length")
LABELS = {"hpsv2.1": "HPSv2.1", "hpsv2.0": "HPSv2", "imagereward": "ImageReward", "pickscore": "PickScore",
          "aesthetic": "AES", "clip": "CLIP"}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images_dir", help="folder mode: an imagefolder (images + metadata.jsonl) to score")
    parser.add_argument("--caption_column", default="text",
                        help="text column scored when the folder has no original_prompt column")
    parser.add_argument("--rewards", default="hpsv2.1,pickscore,aesthetic",
                        help=f"comma-separated rewards, from: {', '.join(sorted(cm.REWARDS))}")
    parser.add_argument("--compare_to", help="a baseline folder (scored too, if needed) to pair by (prompt, seed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute rewards already in rewards.jsonl; in model mode, also start over a folder of "
                             "this script's made with other settings")
    parser.add_argument("--output_dir", default="eval", help="model mode: where generated images are written")
    parser.add_argument("--benchmark", choices=sorted(BENCHMARKS),
                        help="evaluate on a named benchmark, one subfolder per part: hpsv2 (HPDv2's four styles), "
                             "drawbench, parti (PartiPrompts); --max_prompts then counts per part")
    parser.add_argument("--benchmark_prompts",
                        help="hpsv2/drawbench: the folder of HPDv2's benchmark/*.json (hf download ymhao/HPDv2 "
                             "benchmark/ --repo-type dataset --local-dir hpdv2 gives hpdv2/benchmark); "
                             "parti: a dataset Hub id or local copy (default nateraw/parti-prompts)")
    cg.add_generation_args(parser, model_required=False)
    cg.add_prompt_args(parser)
    cr.add_reward_args(parser)
    args = parser.parse_args(input_args)
    cg.check_generation_args(args)
    if bool(args.images_dir) == bool(args.pretrained_model_name_or_path):
        parser.error("give --images_dir (score a folder) or --pretrained_model_name_or_path (score a model)")
    if args.benchmark and (args.prompts_file or args.dataset_name):
        parser.error("--benchmark reads its own prompts (--benchmark_prompts); drop --prompts_file/--dataset_name")
    if args.benchmark_prompts and (not args.benchmark or args.images_dir):
        parser.error("--benchmark_prompts goes with --benchmark in model mode (--images_dir has its images already)")
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
    sampled = [cg.recorded_settings(f) if os.path.isfile(os.path.join(f, cg.GENERATION_CONFIG)) else None
               for f in (folder, other)]
    if all(sampled):  # both generated by the pack: the comparison is of models only if they were sampled alike
        differ = [f"{key} {sampled[0].get(key)!r} vs {sampled[1].get(key)!r}" for key in SAMPLING_SETTINGS
                  if sampled[0].get(key) != sampled[1].get(key)]
        if differ:
            print(f"note: {folder} and {other} were sampled with other settings ({'; '.join(differ)}): the deltas "
                  "mix the models' difference with the sampling's")
    result = {"compare_to": other, "pairs": len(pairs), "unpaired": len(mine) - len(pairs),
              "baseline_unpaired": len(theirs) - len(pairs), "rewards": {}}
    for name in names:
        deltas = [mine[key][name] - theirs[key][name] for key in pairs]
        std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        result["rewards"][name] = {
            "mean_delta": statistics.fmean(deltas), "stderr": std / math.sqrt(len(deltas)), "n": len(deltas),
            "win_rate": sum(d > 0 for d in deltas) / len(deltas), "tie_rate": sum(d == 0 for d in deltas) / len(deltas),
            "loss_rate": sum(d < 0 for d in deltas) / len(deltas),
            "mean": statistics.fmean(mine[key][name] for key in pairs),
            "baseline_mean": statistics.fmean(theirs[key][name] for key in pairs),
        }
    return result


def trained_rewards(folder):
    """The rewards the model behind an evaluation folder was filtered and trained on: the filter of the training set,
    read from the training_config.json of its --lora_path or tuned model; None when the folder does not say."""
    if not os.path.isfile(os.path.join(folder, cg.GENERATION_CONFIG)):
        return None
    settings = cg.recorded_settings(folder)
    for model in (settings.get("lora_path"), settings.get("pretrained_model_name_or_path")):
        config = os.path.join(model if model and os.path.isdir(model) else os.path.dirname(model or ""),
                              "training_config.json")
        if model and os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                return cdr.filter_rewards(json.load(f).get("crf_report"))
    return None


def drift_comparison(rows, other_rows, folder, other, embedder=None):
    """Pixel statistics of the images paired by (prompt, seed), and each prompt's diversity across its seeds, this
    folder against the baseline: statistic -> paired delta, and the diversity's paired delta (None: one seed), from
    the image embeddings of `embedder()` (a reward's score function with embed_images; called once, when needed) or,
    without one, in pixels."""
    from PIL import Image

    def keyed(rows_, where):
        return {(row["_text"], row["seed"]): os.path.join(where, row["file_name"]) for row in rows_}

    def measured(path):  # the statistics, and a thumbnail for diversity: no full-size image is kept
        with Image.open(path) as image:
            image = image.convert("RGB")
            return cdr.pixel_stats(image), image.resize((cdr.DIVERSITY_SIZE, cdr.DIVERSITY_SIZE))

    mine, theirs = keyed(rows, folder), keyed(other_rows, other)
    pairs = sorted(set(mine) & set(theirs), key=str)
    measures = {key: (measured(mine[key]), measured(theirs[key])) for key in pairs}
    stats = {key: (a[0], b[0]) for key, (a, b) in measures.items()}
    images = {key: (a[1], b[1]) for key, (a, b) in measures.items()}
    drift = {name: cdr.paired_delta([stats[key][0][name] for key in pairs], [stats[key][1][name] for key in pairs])
             for name in cdr.STATISTICS}
    prompts = {}
    for key in pairs:
        prompts.setdefault(key[0], []).append(key)
    seeds = [keys for keys in prompts.values() if len(keys) > 1]
    if not seeds:
        return drift, None
    if embedder:
        embed = embedder().embed_images

        def spread(paths):
            images = [Image.open(path).convert("RGB") for path in paths]
            return cdr.embedding_diversity(embed(images))

        per_prompt = [(spread([mine[key] for key in keys]), spread([theirs[key] for key in keys])) for keys in seeds]
    else:
        per_prompt = [(cdr.diversity([images[key][0] for key in keys]), cdr.diversity([images[key][1] for key in keys]))
                      for keys in seeds]
    return drift, cdr.paired_delta([a for a, _ in per_prompt], [b for _, b in per_prompt])


def markdown(folder, summary, comparison):
    lines = [f"Rewards of {folder}", "", "| reward | mean | std | median | n |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['mean']:.4f} | {s['std']:.4f} | {s['median']:.4f} | {s['n']} |"
              for name, s in summary.items()]
    if comparison:
        trained = comparison.get("trained_rewards")
        lines += ["", f"Against {comparison['compare_to']} ({comparison['pairs']} pairs by prompt and seed)", "",
                  "| reward | role | mean | baseline | delta | stderr | win | tie | loss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        roles = {name: "unknown" if trained is None else "trained" if name in trained else "held out"
                 for name in comparison["rewards"]}
        lines += [f"| {name} | {roles[name]} | {c['mean']:.4f} | {c['baseline_mean']:.4f} | {c['mean_delta']:+.4f} "
                  f"| {c['stderr']:.4f} | {c['win_rate']:.1%} | {c['tie_rate']:.1%} | {c['loss_rate']:.1%} |"
                  for name, c in sorted(comparison["rewards"].items(), key=lambda item: roles[item[0]] != "trained")]
        if comparison.get("drift"):
            rows = {**comparison["drift"], **({"diversity across seeds": comparison["diversity"]}
                                               if comparison.get("diversity") else {})}
            lines += ["", "Drift (pixel statistics per image; diversity per prompt: "
                      f"{comparison.get('diversity_measure', 'pixels')})", "",
                      "| statistic | mean | baseline | delta | stderr |", "|---|---|---|---|---|"]
            lines += [f"| {name} | {d['mean']:.4f} | {d['baseline_mean']:.4f} | {d['delta']:+.4f} | {d['stderr']:.4f} |"
                      for name, d in rows.items()]
    return "\n".join(lines) + "\n"


def plot_histograms(path, labels, folder, values, other=None, other_values=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.2), squeeze=False)
    for axis, (name, label) in zip(axes[0], labels.items()):
        axis.hist(values[name], bins=20, alpha=0.6, label=os.path.basename(folder.rstrip("/")))
        if other_values:
            axis.hist(other_values[name], bins=20, alpha=0.6, label=os.path.basename(other.rstrip("/")))
        axis.set_title(label)
        axis.set_xlabel("score")
    axes[0][0].set_ylabel("images")
    axes[0][0].legend()
    figure.tight_layout()
    cu.write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=100))
    plt.close(figure)


def generate_eval_images(jobs, state):
    """Model mode: for each job (its prompts, its --output_dir) one image per prompt and seed, with the seeds of
    generate_candidates.py's variant 0. Every folder is checked before the pipeline loads, once for all of them."""
    plans = []
    for args in jobs:
        prompts = cg.load_prompts(args)
        cg.resolve_sampling_settings(args)
        settings = {**cg.generation_settings(args), "prompts_source": args.prompts_file or args.dataset_name,
                    "num_prompts": len(prompts), "prompts_sha256": cu.sha256_of(prompts)}
        plans.append((args, prompts, settings, cg.check_generation_folder(args.output_dir, settings, args.overwrite)))
    pipe = cp.load_pipeline(jobs[0], state.device)
    for args, prompts, settings, start_over in plans:
        cg.start_generation_folder(args.output_dir, settings, pipe, args, start_over, state)
        planned = cg.plan_images([(prompt, [prompt]) for prompt in prompts], args.num_images_per_prompt, args.seed)
        cg.generate_images(pipe, planned, args.output_dir, args, state)
    del pipe
    gc.collect()


def diversity_measure(args):
    """(how diversity is measured, the reward whose image embeddings measure it or None)."""
    embedding = next((name for name in cm.IMAGE_EMBEDDINGS if name in args.reward_names), None)
    if embedding:
        return f"1 - cosine of {embedding}'s image embeddings", embedding
    return f"mean absolute pixel difference at {cdr.DIVERSITY_SIZE} px", None


def report(args, scored, started, embedder=None):
    """One folder's summary, its comparison with --compare_to and its histograms, written beside its images;
    `embedder`: see drift_comparison."""
    names = args.reward_names
    folder = args.images_dir or args.output_dir
    rows, table = scored[folder]
    other_rows, other_table = scored[args.compare_to] if args.compare_to else (None, None)
    check_scores(folder, rows, table, names)
    if other_rows:
        check_scores(args.compare_to, other_rows, other_table, names)
    summary = summarize(rows, table, names)
    comparison = compare(rows, table, other_rows, other_table, names, folder, args.compare_to) if other_rows else None
    if comparison:
        comparison["trained_rewards"] = trained_rewards(folder)
        comparison["drift"], comparison["diversity"] = drift_comparison(rows, other_rows, folder, args.compare_to,
                                                                        embedder)
        comparison["diversity_measure"] = diversity_measure(args)[0]
        comparison["hacking_signs"] = cdr.hacking_signs(comparison["rewards"], comparison["trained_rewards"] or [],
                                                        comparison["drift"], comparison["diversity"])
    cu.write_json_atomic(os.path.join(folder, "rewards_summary.json"), {"rewards": summary, "comparison": comparison})
    text = markdown(folder, summary, comparison)
    cu.write_text_atomic(os.path.join(folder, "rewards_summary.md"), text)
    values = {name: [table[row["file_name"]][name] for row in rows] for name in names}
    other_values = ({name: [other_table[row["file_name"]][name] for row in other_rows] for name in names}
                    if other_rows else None)
    labels = role_labels(names, comparison["trained_rewards"] if comparison else None)
    plot_histograms(os.path.join(folder, "rewards_hist.png"), labels, folder, values, args.compare_to, other_values)
    print(text)
    print(f"{len(rows)} images scored with {', '.join(names)} in {time.time() - started:.0f} s: "
          f"{os.path.join(folder, cr.REWARDS_FILE)}, rewards_summary.json/.md, rewards_hist.png")
    if comparison and comparison["hacking_signs"] and not args.benchmark:  # a benchmark warns once, on its average
        warn_of_hacking(comparison["hacking_signs"])
    return summary, comparison


def warn_of_hacking(signs):
    print(f"reward hacking suspected: {'; '.join(signs)} (README: Troubleshooting)")


def part_prompts(args, part):
    """Model mode: the prompt flags that read one part of the benchmark."""
    benchmark = BENCHMARKS[args.benchmark]
    if benchmark["source"] == "dataset":
        return {"dataset_name": args.benchmark_prompts or benchmark["default"], "prompt_column": benchmark["column"]}
    if not args.benchmark_prompts:
        cu.fail(f"--benchmark {args.benchmark} needs --benchmark_prompts, the folder of HPDv2's benchmark files: "
                "hf download ymhao/HPDv2 benchmark/ --repo-type dataset --local-dir hpdv2, then "
                "--benchmark_prompts hpdv2/benchmark")
    path = os.path.join(args.benchmark_prompts, part + ".json")
    if not os.path.isfile(path):
        cu.fail(f"--benchmark_prompts {args.benchmark_prompts}: no {part}.json in it; --benchmark {args.benchmark} "
                f"reads {', '.join(p + '.json' for p in benchmark['parts'])} (HPDv2's benchmark/ folder)")
    return {"prompts_file": path}


def benchmark_parts(args):
    """The benchmark's folder and [(part, the arguments that evaluate it)]: one subfolder per part."""
    parts = []
    for part in BENCHMARKS[args.benchmark]["parts"]:
        changes = {"images_dir": args.images_dir and os.path.join(args.images_dir, part),
                   "output_dir": os.path.join(args.output_dir, part),
                   "compare_to": args.compare_to and os.path.join(args.compare_to, part)}
        for folder in (changes["images_dir"], changes["compare_to"]):
            if folder and not os.path.isdir(folder):
                cu.fail(f"{folder} does not exist: {os.path.dirname(folder)} is not a --benchmark {args.benchmark} "
                        f"folder (one subfolder per part: {', '.join(BENCHMARKS[args.benchmark]['parts'])})")
        if not args.images_dir:
            changes.update(part_prompts(args, part))
        parts.append((part, argparse.Namespace(**{**vars(args), **changes})))
    return args.images_dir or args.output_dir, parts


def benchmark_table(results):
    """Per reward, per part and averaged over the parts (each part weighs the same): the model's mean, and against
    the baseline its mean, the mean delta, its standard error and the win rate, on the paired images."""
    table = {"parts": {}, "average": {}}
    for part, (summary, comparison) in results.items():
        # n: the images the part's numbers come from (with a baseline, those paired with one of its images)
        table["parts"][part] = {"n": comparison["pairs"] if comparison else next(iter(summary.values()))["n"],
                                "rewards": {}}
        for name, stats in summary.items():
            row = {"mean": stats["mean"]}
            if comparison:
                paired = comparison["rewards"][name]
                row = {key: paired[key] for key in ("mean", "baseline_mean", "mean_delta", "stderr", "win_rate")}
            table["parts"][part]["rewards"][name] = row
    parts = list(table["parts"].values())
    for name in parts[0]["rewards"]:
        table["average"][name] = average_of([part["rewards"][name] for part in parts])
    comparisons = [comparison for _, comparison in results.values() if comparison]
    if comparisons:  # the rewards' roles, and the drift and diversity averaged like the rewards
        table["trained_rewards"] = comparisons[0]["trained_rewards"]
        table["drift"] = {name: average_of([c["drift"][name] for c in comparisons]) for name in cdr.STATISTICS}
        diversity = [c["diversity"] for c in comparisons if c["diversity"]]
        table["diversity"] = average_of(diversity) if len(diversity) == len(comparisons) else None
        table["diversity_measure"] = comparisons[0]["diversity_measure"]
        for name, row in table["average"].items():
            row["n"] = sum(part["n"] for part in parts)
        table["hacking_signs"] = cdr.hacking_signs(table["average"], table["trained_rewards"] or [], table["drift"],
                                                   table["diversity"])
    return table


def average_of(rows):
    """The parts' rows averaged, each part weighing the same; the standard error of that average (the parts are
    independent samples), and the pairs in all."""
    average = {key: statistics.fmean(row[key] for row in rows) for key in rows[0] if key not in ("stderr", "n")}
    if "stderr" in rows[0]:
        average["stderr"] = math.sqrt(sum(row["stderr"] ** 2 for row in rows)) / len(rows)
    if "n" in rows[0]:
        average["n"] = sum(row["n"] for row in rows)
    return average


def shown(name, value, form=".4g"):
    return format(value * (100 if name in SHOWN_X100 else 1), form)


def shown_delta(name, row):
    return f"{shown(name, row['mean_delta'], '+.3g')} +- {shown(name, row['stderr'], '.2g')}"


def role_labels(names, trained):
    """The rewards, those the model was trained on first, each labelled with its role when known."""
    if trained is None:
        return {name: LABELS.get(name, name) for name in names}
    ordered = sorted(names, key=lambda name: name not in trained)
    return {name: f"{LABELS.get(name, name)} ({'trained' if name in trained else 'held out'})" for name in ordered}


def benchmark_markdown(args, folder, table):
    labels = role_labels(table["average"], table.get("trained_rewards"))
    names = list(labels)
    parts = table["parts"]
    baseline = args.compare_to
    counts = sorted({part["n"] for part in parts.values()})
    lines = [f"# {args.benchmark} benchmark: {folder}" + (f" against {baseline}" if baseline else ""), "",
             f"{len(parts)} part(s) ({', '.join(parts)}), {'/'.join(map(str, counts))} images each; the average "
             "weighs each part the same." + (" HPSv2 scores x100." if SHOWN_X100 & set(names) else ""), "",
             "| model | " + " | ".join(labels.values()) + " |",
             "|---" * (len(names) + 1) + "|"]
    average = table["average"]
    if baseline:
        lines.append(f"| {baseline} | " + " | ".join(shown(n, average[n]["baseline_mean"]) for n in names) + " |")
    lines.append(f"| {folder} | " + " | ".join(shown(n, average[n]["mean"]) for n in names) + " |")
    if baseline:
        lines.append("| delta +- s.e. | " + " | ".join(shown_delta(n, average[n]) for n in names) + " |")
        lines.append("| win rate | " + " | ".join(f"{average[n]['win_rate']:.1%}" for n in names) + " |")
    if table.get("drift"):
        rows = {**table["drift"], **({"diversity across seeds": table["diversity"]} if table["diversity"] else {})}
        lines += ["", f"Drift, averaged over the parts (diversity: {table['diversity_measure']})", "",
                  "| statistic | baseline | model | delta +- s.e. |", "|---|---|---|---|"]
        lines += [f"| {name} | {row['baseline_mean']:.4f} | {row['mean']:.4f} | {row['delta']:+.4f} +- "
                  f"{row['stderr']:.4f} |" for name, row in rows.items()]
    if table.get("hacking_signs"):
        lines += ["", f"**Reward hacking suspected:** {'; '.join(table['hacking_signs'])} (README: Troubleshooting)"]
    if len(parts) > 1:
        for name in names:
            lines += ["", f"{labels[name]} per part", "",
                      "| part | " + (f"{baseline} | {folder} | delta +- s.e. | win |" if baseline else f"{folder} |"),
                      "|---" * (5 if baseline else 2) + "|"]
            for part, row in [*((p, parts[p]["rewards"][name]) for p in parts), ("average", average[name])]:
                cells = [shown(name, row["mean"])]
                if baseline:
                    cells = [shown(name, row["baseline_mean"]), *cells, shown_delta(name, row),
                             f"{row['win_rate']:.1%}"]
                lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_benchmark(path, args, folder, table):
    """One panel per reward: the mean per part and averaged, this model beside the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = role_labels(table["average"], table.get("trained_rewards"))
    names = list(labels)
    groups = [*table["parts"], "average"] if len(table["parts"]) > 1 else list(table["parts"])
    rows = {**{part: table["parts"][part]["rewards"] for part in table["parts"]}, "average": table["average"]}
    figure, axes = plt.subplots(1, len(names), figsize=(1.2 * len(groups) * len(names) + 2, 3.4), squeeze=False)
    positions = range(len(groups))
    for axis, name in zip(axes[0], names):
        scale = 100 if name in SHOWN_X100 else 1
        bars = [(os.path.basename(folder.rstrip("/")), "mean")]
        if args.compare_to:
            bars.insert(0, (os.path.basename(args.compare_to.rstrip("/")), "baseline_mean"))
        width = 0.8 / len(bars)
        for i, (label, key) in enumerate(bars):
            heights = [rows[group][name][key] * scale for group in groups]
            errors = ([rows[group][name]["stderr"] * scale for group in groups] if key == "mean" and args.compare_to
                      else None)
            axis.bar([p + (i - (len(bars) - 1) / 2) * width for p in positions], heights, width, yerr=errors,
                     label=label, capsize=3)
        axis.set_xticks(list(positions), groups, rotation=30, ha="right")
        axis.set_title(labels[name] + (" (x100)" if scale == 100 else ""))
        low = min(rows[g][name][k] * scale for g in groups for _, k in bars)
        high = max(rows[g][name][k] * scale for g in groups for _, k in bars)
        margin = (high - low) * 0.5 or abs(high) * 0.05 or 1
        axis.set_ylim(low - margin, high + margin)  # the differences, not the distance from zero
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{args.benchmark} benchmark" + (" (error bars: s.e. of the delta)" if args.compare_to else ""))
    figure.tight_layout()
    cu.write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=100))
    plt.close(figure)


def main(args):
    state = cu.process_state()
    started = time.time()
    folder, parts = benchmark_parts(args) if args.benchmark else (None, [(None, args)])
    jobs = [job for _, job in parts]
    for job in jobs:
        if job.compare_to:
            cr.read_folder(job.compare_to, job.caption_column)  # refuse a bad baseline before any work
    if not args.images_dir:
        generate_eval_images(jobs, state)
    folders = [job.images_dir or job.output_dir for job in jobs] + [job.compare_to for job in jobs if job.compare_to]
    scored = cr.score_folders(folders, args.reward_names, args, state, args.caption_column, args.overwrite)
    if not state.is_main_process:
        return
    embedding = diversity_measure(args)[1]
    embedder = functools.cache(lambda: cm.load_reward(embedding, args, state.device)) if embedding else None
    results = {part: report(job, scored, started, embedder) for part, job in parts}
    if not args.benchmark:
        return
    table = benchmark_table(results)
    base = os.path.join(folder, f"benchmark_{args.benchmark}")
    cu.write_json_atomic(base + ".json", {"benchmark": args.benchmark, "model": folder, "baseline": args.compare_to,
                                          "shown_x100": sorted(SHOWN_X100 & set(args.reward_names)), **table})
    text = benchmark_markdown(args, folder, table)
    cu.write_text_atomic(base + ".md", text)
    plot_benchmark(base + ".png", args, folder, table)
    print(text)
    print(f"the {args.benchmark} benchmark report: {base}.md/.json/.png")
    if table.get("hacking_signs"):
        warn_of_hacking(table["hacking_signs"])


if __name__ == "__main__":
    args = parse_args()
    with cu.write_faults_in_one_line(args.images_dir or args.output_dir or "the output folder"):
        main(args)
