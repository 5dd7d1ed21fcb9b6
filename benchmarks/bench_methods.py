#!/usr/bin/env python
"""CRAFT against plain SFT and Diffusion-DPO on the same candidates: the paper's "converges 11-220x faster than
preference optimisation", checked on the demo's testbed.

    python benchmarks/bench_methods.py --seeds 0 1 2 --output_dir /tmp/methods

The testbed is tools/run_demo.py's: models/tiny-shapes-sd15, 24 training prompts x (original + 3 rewrites) x 2 seeds
of candidates scored by `color` and `jpeg`, LoRAs on the UNet and the text encoder (rank 8, batch 8). From the same
candidates of each seed, crf_filter.py makes the three training sets:

  CRAFT          --mode dominance: the rewrites that beat the original on color AND jpeg, advantage weights
  plain SFT      --mode none: every candidate, weight 1 (the paper's unfiltered ablation)
  Diffusion-DPO  --mode pairs: each prompt's best image against its worst; train_craft_sd15.py --loss dpo

First each method's learning rate is chosen by a small sweep (--learning_rates, on --sweep_seed, which is none of
--seeds: the choice is not tuned on the runs reported), the highest held-out `color` gain at the last step; when the
best rate is an end of the grid, the grid grows by a factor 4 past it (twice at most). Then for
each of --seeds every method trains with its chosen rate, and the LoRA of every checkpoint in --eval_steps is
evaluated on held-out prompts against the base, on the same (prompt, seed) pairs. Reported: the `color` and `jpeg`
gains (mean over seeds; s.e. = the spread of the seeds' gains / sqrt(seeds), which holds both the training noise and
the evaluation's) against optimizer steps, images seen and wall seconds, and the steps and seconds each method
needs to reach CRAFT's final `color` gain ("not reached" if no checkpoint does). Writes methods.md, methods.json and
methods.png in --output_dir; a rerun reuses every finished stage. About 45 minutes on 2 CPU cores at the defaults.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, REPO)
import craft_utils as cu  # noqa: E402
import run_demo  # noqa: E402

METHODS = {  # name -> (folder, crf_filter.py flags, extra trainer flags, images per training sample)
    "CRAFT": ("craft", ["--mode", "dominance"], [], 1),
    "plain SFT": ("sft", ["--mode", "none"], [], 1),
    "Diffusion-DPO": ("dpo", ["--mode", "pairs"], ["--loss", "dpo"], 2),
}
REWARDS = ("color", "jpeg")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="methods_runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep_seed", type=int, default=100, help="the seed the learning rates are chosen on")
    parser.add_argument("--learning_rates", type=float, nargs="+", default=[5e-4, 2e-3, 8e-3],
                        help="swept for every method; one value skips the sweep")
    parser.add_argument("--eval_steps", type=int, nargs="+", default=[50, 100, 200, 400],
                        help="checkpoints evaluated; the last is the length of every run")
    parser.add_argument("--num_prompts", type=int, default=24, help="training prompts (and as many held out)")
    parser.add_argument("--num_images_per_prompt", type=int, default=2, help="candidate seeds per prompt text")
    parser.add_argument("--eval_images_per_prompt", type=int, default=6)
    parser.add_argument("--num_inference_steps", type=int, default=15)
    parser.add_argument("--model", default=run_demo.MODEL)
    args = parser.parse_args(argv)
    args.eval_steps = sorted(set(args.eval_steps))
    if args.sweep_seed in args.seeds and len(args.learning_rates) > 1:
        parser.error("--sweep_seed must be none of --seeds: the learning rates are not chosen on the runs reported")
    return args


def prepare(args, seed):
    """The seed's prompts, candidates, rewards, the three training sets and the base model's held-out images."""
    folder = os.path.join(args.output_dir, f"seed-{seed}")
    path = lambda *parts: os.path.join(folder, *parts)  # noqa: E731
    os.makedirs(folder, exist_ok=True)
    train_prompts, heldout_prompts = run_demo.prompt_sets(args.num_prompts)
    for name, prompts in (("train_prompts.txt", train_prompts), ("heldout_prompts.txt", heldout_prompts)):
        with open(path(name), "w") as f:
            f.write("\n".join(prompts) + "\n")
    with open(path("rewrites.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in run_demo.colour_rewrites(train_prompts))
    sampling = ["--num_inference_steps", args.num_inference_steps, "--guidance_scale", 3, "--seed", seed,
                "--batch_size", 16]
    scores = path("candidates", "rewards.jsonl")
    expected = args.num_prompts * 4 * args.num_images_per_prompt  # prompts x (original + 3 rewrites) x seeds
    rows = cu.read_jsonl(scores) if os.path.isfile(scores) else []
    if not (len(rows) == expected and all(reward in row for row in rows for reward in REWARDS)):
        run_demo.step(f"seed {seed}: candidates", "generate_candidates.py", "--pretrained_model_name_or_path",
                      args.model, "--prompts_file", path("train_prompts.txt"), "--num_variants", 3, "--expansion",
                      "file", "--expansion_file", path("rewrites.jsonl"), "--num_images_per_prompt",
                      args.num_images_per_prompt, "--output_dir", path("candidates"), *sampling)
        run_demo.step(f"seed {seed}: rewards", "eval_rewards.py", "--images_dir", path("candidates"), "--rewards",
                      ",".join(REWARDS))
    for method, (name, filter_flags, _, _) in METHODS.items():
        if not os.path.isfile(path(name, "metadata.jsonl")):
            run_demo.step(f"seed {seed}: the {method} training set", "crf_filter.py", "--candidates_dir",
                          path("candidates"), "--output_dir", path(name), "--filter_rewards", ",".join(REWARDS),
                          *filter_flags)
    heldout = ["--prompts_file", path("heldout_prompts.txt"), "--num_images_per_prompt", args.eval_images_per_prompt,
               *sampling, "--rewards", ",".join(REWARDS)]
    if not os.path.isfile(path("eval_base", "rewards_summary.json")):
        run_demo.step(f"seed {seed}: the base model on held-out prompts", "eval_rewards.py",
                      "--pretrained_model_name_or_path", args.model, "--output_dir", path("eval_base"), *heldout,
                      "--overwrite")
    return folder, heldout


def train_and_evaluate(args, prepared, seed, method, learning_rate, steps):
    """Train one method on the seed's set (`prepared`: prepare's answer), checkpoints at `steps`;
    -> ({step: {reward: comparison with the base}}, seconds per step)."""
    folder, heldout = prepared
    name, _, trainer_flags, _ = METHODS[method]
    out = os.path.join(folder, f"train-{name}-lr{learning_rate:g}")
    checkpoint_every = math.gcd(*steps)
    if not os.path.isfile(os.path.join(out, "training_config.json")):
        run_demo.step(f"seed {seed}: {method}, lr {learning_rate:g}", "train_craft_sd15.py",
                      "--pretrained_model_name_or_path", args.model, "--train_data_dir", os.path.join(folder, name),
                      "--output_dir", out, "--use_lora", "--train_text_encoder", "--rank", 8, "--resolution", 64,
                      "--train_batch_size", 8, "--max_train_steps", steps[-1], "--learning_rate", learning_rate,
                      "--lr_warmup_steps", 5, "--seed", seed, "--report_to", "none", "--center_crop",
                      "--checkpointing_steps", checkpoint_every, "--resume_from_checkpoint", "latest", *trainer_flags)
    with open(os.path.join(out, "training_config.json")) as f:
        seconds_per_step = json.load(f)["data"]["seconds_per_step"]
    curve = {}
    for step in steps:
        evaluated = os.path.join(out, f"eval-{step}")
        summary = os.path.join(evaluated, "rewards_summary.json")
        if not os.path.isfile(summary):
            run_demo.step(f"seed {seed}: {method} at step {step}, held out", "eval_rewards.py",
                          "--pretrained_model_name_or_path", args.model, "--lora_path",
                          os.path.join(out, f"checkpoint-{step}"), "--output_dir", evaluated, "--compare_to",
                          os.path.join(folder, "eval_base"), *heldout, "--overwrite")
        with open(summary) as f:
            curve[step] = json.load(f)["comparison"]["rewards"]
    return curve, seconds_per_step


def best_learning_rate(finals):
    """{learning rate: final color gain} -> the rate of the highest gain (the smaller rate on a tie)."""
    return max(sorted(finals), key=lambda rate: finals[rate])


def sweep(args, prepared, method, extensions=2):
    """The method's final color gain at each of --learning_rates on the sweep seed; while the best rate is the
    grid's lowest or highest, the grid grows by a factor 4 past it (at most `extensions` times), so the rate chosen
    is a peak, not an edge. -> (chosen rate, {rate: final color gain})."""
    last, finals, todo = args.eval_steps[-1], {}, sorted(args.learning_rates)
    for extension in range(extensions + 1):
        for rate in todo:
            finals[rate] = train_and_evaluate(args, prepared, args.sweep_seed, method, rate, [last])[0][last][
                "color"]["mean_delta"]
        best, rates = best_learning_rate(finals), sorted(finals)
        if rates[0] < best < rates[-1] or extension == extensions:
            return best, finals
        todo = [best / 4 if best == rates[0] else best * 4]


def mean_and_stderr(values, stderrs):
    """Over seeds: the mean, and the seeds' spread / sqrt(K); one seed: its own evaluation s.e."""
    if len(values) == 1:
        return values[0], stderrs[0]
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def steps_to_reach(curve, target):
    """The first evaluated step whose gain is at least `target`; None if none is."""
    return next((step for step in sorted(curve) if curve[step] >= target), None)


def summarise(runs, batch_size=8):
    """runs: method -> seed -> (curve, seconds per step) -> per method: mean curves and the reach of CRAFT's gain."""
    results = {}
    for method, by_seed in runs.items():
        steps = sorted(next(iter(by_seed.values()))[0])
        curves = {reward: {} for reward in REWARDS}
        for reward in REWARDS:
            for step in steps:
                cells = [by_seed[seed][0][step][reward] for seed in sorted(by_seed)]
                curves[reward][step] = mean_and_stderr([c["mean_delta"] for c in cells], [c["stderr"] for c in cells])
        results[method] = {"curves": curves, "seconds_per_step": statistics.fmean(s for _, s in by_seed.values()),
                           "images_per_step": batch_size * METHODS[method][3]}
    target = results["CRAFT"]["curves"]["color"][max(results["CRAFT"]["curves"]["color"])][0]
    for result in results.values():
        step = steps_to_reach({s: v[0] for s, v in result["curves"]["color"].items()}, target)
        result["reach"] = None if step is None else {"steps": step, "images": step * result["images_per_step"],
                                                     "seconds": step * result["seconds_per_step"]}
    return results, target


def markdown(results, target, chosen, seeds, swept):
    steps = sorted(results["CRAFT"]["curves"]["color"])
    lines = []
    if swept:
        rates = sorted({rate for finals in swept.values() for rate in finals})
        lines += ["The learning-rate sweep (final held-out `color` gain, sweep seed):", "",
                  "| method | " + " | ".join(f"lr {rate:g}" for rate in rates) + " |", "|---|" + "---|" * len(rates)]
        lines += [f"| {method} | " + " | ".join(f"{finals[rate]:+.3f}" if rate in finals else "" for rate in rates)
                  + " |" for method, finals in swept.items()]
        lines.append("")
    lines += [f"Held-out gain against the base (mean over seeds {', '.join(map(str, seeds))} +- s.e.), by optimizer "
             "step; learning rates chosen by the sweep: " + ", ".join(f"{m} {r:g}" for m, r in chosen.items()) + ".",
             "", "| method | reward | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for method, result in results.items():
        for reward in REWARDS:
            cells = [f"{m:+.3f} +- {e:.3f}" for m, e in (result["curves"][reward][s] for s in steps)]
            lines.append(f"| {method} | {reward} | " + " | ".join(cells) + " |")
    lines += ["", f"To reach CRAFT's final `color` gain ({target:+.3f}):", "",
              "| method | steps | images seen | wall seconds (2 CPU cores) | s per step |", "|---|---|---|---|---|"]
    for method, result in results.items():
        reach = result["reach"]
        cells = ["not reached"] * 3 if reach is None else \
            [str(reach["steps"]), str(reach["images"]), f"{reach['seconds']:.0f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {result['seconds_per_step']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, result in results.items():
        for axis, reward, x_of in ((axes[0], "color", lambda s: s), (axes[1], "jpeg", lambda s: s),
                                   (axes[2], "color", lambda s, r=result: s * r["seconds_per_step"])):
            steps = sorted(result["curves"][reward])
            means, errors = zip(*(result["curves"][reward][s] for s in steps))
            axis.errorbar([x_of(s) for s in steps], means, yerr=errors, marker="o", capsize=3, label=method)
    for axis, title, x_label in ((axes[0], "held-out color gain", "optimizer steps"),
                                 (axes[1], "held-out jpeg gain", "optimizer steps"),
                                 (axes[2], "held-out color gain", "training seconds (2 CPU cores)")):
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set(title=title, xlabel=x_label)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_settings(args):
    """What the reused stages depend on: a rerun in the same --output_dir must have the same."""
    return {name: getattr(args, name) for name in ("model", "num_prompts", "num_images_per_prompt",
                                                   "eval_images_per_prompt", "num_inference_steps", "eval_steps")}


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    recorded = os.path.join(args.output_dir, "settings.json")
    if os.path.isfile(recorded):
        with open(recorded) as f:
            changed = sorted(k for k, v in json.load(f).items() if run_settings(args).get(k) != v)
        if changed:
            raise SystemExit(f"error: {args.output_dir} holds runs made with other settings ({', '.join(changed)}); "
                             "rerun with the same ones to reuse them, or choose another --output_dir")
    else:
        cu.write_json_atomic(recorded, run_settings(args))
    chosen, swept = {method: args.learning_rates[0] for method in METHODS}, {}
    if len(args.learning_rates) > 1:
        prepared = prepare(args, args.sweep_seed)
        for method in METHODS:
            chosen[method], swept[method] = sweep(args, prepared, method)
            print(f"{method}: final color gain by learning rate {swept[method]}; chosen {chosen[method]:g}", flush=True)
    prepared = {seed: prepare(args, seed) for seed in args.seeds}
    runs = {method: {seed: train_and_evaluate(args, prepared[seed], seed, method, chosen[method], args.eval_steps)
                     for seed in args.seeds} for method in METHODS}
    results, target = summarise(runs)
    table = markdown(results, target, chosen, args.seeds, swept)
    cu.write_text_atomic(os.path.join(args.output_dir, "methods.md"), table)
    cu.write_json_atomic(os.path.join(args.output_dir, "methods.json"), {
        "learning_rates": chosen, "sweep": swept, "target": target, "results": results, "seeds": args.seeds,
        "settings": run_settings(args)})
    plot(results, os.path.join(args.output_dir, "methods.png"))
    print(table)
    print(f"finished in {time.time() - started:.0f} s; methods.md, methods.json, methods.png in {args.output_dir}")
    return results


if __name__ == "__main__":
    main()
