#!/usr/bin/env python
"""CRAFT against plain SFT and Diffusion-DPO on the same candidates, and CRAFT in rounds: the paper's "converges
11-220x faster than preference optimisation", checked on the demo's testbed.

    python benchmarks/bench_methods.py --seeds 0 1 2 --output_dir /tmp/methods

The testbed is tools/run_demo.py's: models/tiny-shapes-sd15, 24 training prompts x (original + 3 rewrites) x 2 seeds
of candidates scored by `color` and `jpeg`, LoRAs on the UNet and the text encoder (rank 8, batch 8). From the same
candidates of each seed, crf_filter.py makes the three training sets:

  CRAFT          --mode dominance: the rewrites that beat the original on color AND jpeg, advantage weights
  plain SFT      --mode none: every candidate, weight 1 (the paper's unfiltered ablation)
  Diffusion-DPO  --mode pairs: each prompt's best image against its worst; train_craft_sd15.py --loss dpo

and CRAFT in --rounds rounds at the same total steps: round 1 trains on the CRAFT set; round k+1 draws fresh prompts
(the same colour-shape pairs at another place, none of them held out), generates candidates with round k's LoRA,
filters them the same way and trains on from that LoRA (--init_lora); rounds use CRAFT's learning rate.

First each method's learning rate is chosen by a small sweep (--learning_rates, on --sweep_seed, which is none of
--seeds: the choice is not tuned on the runs reported), the highest held-out `color` gain at the last step; when the
best rate is an end of the grid, the grid grows by a factor 4 past it (twice at most). Then for each of --seeds
every method trains with its chosen rate, and the LoRA of every checkpoint in --eval_steps is evaluated on held-out
prompts against the base, on the same (prompt, seed) pairs (a rounds run: each round's LoRA). Reported: the `color`
and `jpeg` gains and the held-out `place` reward's (the filter never sees it), and the change of diversity across
seeds relative to the base (mean over seeds; s.e. = the spread of the seeds' values / sqrt(seeds), which holds both
the training noise and the evaluation's) against optimizer steps, images seen and training seconds (steps x the
median seconds per step over seeds); the steps and seconds each method needs to reach CRAFT's final `color` gain
("not reached" if no checkpoint does); and the seconds the later rounds spend making their candidates. Writes
methods.md, methods.json and methods.png in --output_dir; a rerun reuses every finished stage. About 1.5 hours on 2
CPU cores at the defaults.
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
REWARDS = ("color", "jpeg")  # the filter's
HELD_OUT = ("place",)  # evaluated, never filtered on
ROUND_PLACES = (0, 1, 3, 4)  # round k's training prompts: run_demo.prompt_sets' place offset (the held-out one is 2)


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
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="the methods to run; CRAFT among them (its final gain is the target the others are "
                             "timed to)")
    parser.add_argument("--rounds", type=int, nargs="*",
                        help="CRAFT also in this many rounds (2-4), at the last of --eval_steps in all (default: "
                             "2 and 4, those of them that divide it)")
    parser.add_argument("--model", default=run_demo.MODEL)
    args = parser.parse_args(argv)
    args.eval_steps = sorted(set(args.eval_steps))
    if args.rounds is None:
        args.rounds = [rounds for rounds in (2, 4) if args.eval_steps[-1] % rounds == 0]
    if "CRAFT" not in args.methods:
        parser.error("--methods must include CRAFT: the others are measured against its final gain")
    for rounds in args.rounds:
        if not 2 <= rounds <= len(ROUND_PLACES) or args.eval_steps[-1] % rounds:
            parser.error(f"--rounds {rounds}: give 2 to {len(ROUND_PLACES)} rounds that divide the last of "
                         f"--eval_steps ({args.eval_steps[-1]})")
    if args.sweep_seed in args.seeds and len(args.learning_rates) > 1:
        parser.error("--sweep_seed must be none of --seeds: the learning rates are not chosen on the runs reported")
    return args


def sampling(args, seed):
    return ["--num_inference_steps", args.num_inference_steps, "--guidance_scale", 3, "--seed", seed,
            "--batch_size", 16]


def make_candidates(args, seed, folder, round_index, lora=None):
    """A round's training prompts, their rewrites, and candidates (from `lora` when given) scored by REWARDS in
    `folder`/candidates; reused when complete."""
    path = lambda *parts: os.path.join(folder, *parts)  # noqa: E731
    train_prompts = run_demo.prompt_sets(args.num_prompts, ROUND_PLACES[round_index])[0]
    with open(path("train_prompts.txt"), "w") as f:
        f.write("\n".join(train_prompts) + "\n")
    with open(path("rewrites.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in run_demo.colour_rewrites(train_prompts))
    scores = path("candidates", "rewards.jsonl")
    expected = args.num_prompts * 4 * args.num_images_per_prompt  # prompts x (original + 3 rewrites) x seeds
    rows = cu.read_jsonl(scores) if os.path.isfile(scores) else []
    if not (len(rows) == expected and all(reward in row for row in rows for reward in REWARDS)):
        where = f"seed {seed}" + (f", round {round_index + 1}" if round_index else "")
        run_demo.step(f"{where}: candidates", "generate_candidates.py", "--pretrained_model_name_or_path",
                      args.model, *(["--lora_path", lora] if lora else []), "--prompts_file", path("train_prompts.txt"),
                      "--num_variants", 3, "--expansion", "file", "--expansion_file", path("rewrites.jsonl"),
                      "--num_images_per_prompt", args.num_images_per_prompt, "--output_dir", path("candidates"),
                      *sampling(args, seed))
        run_demo.step(f"{where}: rewards", "eval_rewards.py", "--images_dir", path("candidates"), "--rewards",
                      ",".join(REWARDS))


def prepare(args, seed):
    """The seed's prompts, candidates, rewards, the three training sets and the base model's held-out images."""
    folder = os.path.join(args.output_dir, f"seed-{seed}")
    path = lambda *parts: os.path.join(folder, *parts)  # noqa: E731
    os.makedirs(folder, exist_ok=True)
    make_candidates(args, seed, folder, 0)
    for method, (name, filter_flags, _, _) in METHODS.items():
        if not os.path.isfile(path(name, "metadata.jsonl")):
            run_demo.step(f"seed {seed}: the {method} training set", "crf_filter.py", "--candidates_dir",
                          path("candidates"), "--output_dir", path(name), "--filter_rewards", ",".join(REWARDS),
                          *filter_flags)
    with open(path("heldout_prompts.txt"), "w") as f:
        f.write("\n".join(run_demo.prompt_sets(args.num_prompts)[1]) + "\n")
    heldout = ["--prompts_file", path("heldout_prompts.txt"), "--num_images_per_prompt", args.eval_images_per_prompt,
               *sampling(args, seed), "--rewards", ",".join(REWARDS + HELD_OUT)]
    if not os.path.isfile(path("eval_base", "rewards_summary.json")):
        run_demo.step(f"seed {seed}: the base model on held-out prompts", "eval_rewards.py",
                      "--pretrained_model_name_or_path", args.model, "--output_dir", path("eval_base"), *heldout,
                      "--overwrite")
    return folder, heldout


def train(args, seed, title, training_set, out, learning_rate, steps, *flags):
    """A LoRA on the UNet and the text encoder (the demo's settings), unless `out` holds a finished one; -> its
    seconds per step."""
    if not os.path.isfile(os.path.join(out, "training_config.json")):
        run_demo.step(title, "train_craft_sd15.py", "--pretrained_model_name_or_path", args.model, "--train_data_dir",
                      training_set, "--output_dir", out, "--use_lora", "--train_text_encoder", "--rank", 8,
                      "--resolution", 64, "--train_batch_size", 8, "--max_train_steps", steps, "--learning_rate",
                      learning_rate, "--lr_warmup_steps", 5, "--seed", seed, "--report_to", "none", "--center_crop",
                      "--resume_from_checkpoint", "latest", *flags)
    with open(os.path.join(out, "training_config.json")) as f:
        return json.load(f)["data"]["seconds_per_step"]


def evaluate(args, prepared, title, lora, out):
    """The LoRA on the held-out prompts against the base, unless done: {reward: comparison}, and "diversity": the
    change of diversity across seeds relative to the base's (when there are several seeds)."""
    folder, heldout = prepared
    summary = os.path.join(out, "rewards_summary.json")
    if not os.path.isfile(summary):
        run_demo.step(title, "eval_rewards.py", "--pretrained_model_name_or_path", args.model, "--lora_path", lora,
                      "--output_dir", out, "--compare_to", os.path.join(folder, "eval_base"), *heldout, "--overwrite")
    with open(summary) as f:
        comparison = json.load(f)["comparison"]
    result = dict(comparison["rewards"])
    if comparison.get("diversity"):
        diversity = comparison["diversity"]
        result["diversity"] = {"mean_delta": diversity["delta"] / diversity["baseline_mean"],
                               "stderr": diversity["stderr"] / diversity["baseline_mean"]}
    return result


def train_and_evaluate(args, prepared, seed, method, learning_rate, steps):
    """Train one method on the seed's set (`prepared`: prepare's answer), checkpoints at `steps`;
    -> ({step: {reward: comparison with the base}}, seconds per step)."""
    folder, _ = prepared
    name, _, trainer_flags, _ = METHODS[method]
    out = os.path.join(folder, f"train-{name}-lr{learning_rate:g}")
    seconds_per_step = train(args, seed, f"seed {seed}: {method}, lr {learning_rate:g}", os.path.join(folder, name),
                             out, learning_rate, steps[-1], "--checkpointing_steps", math.gcd(*steps), *trainer_flags)
    curve = {step: evaluate(args, prepared, f"seed {seed}: {method} at step {step}, held out",
                            os.path.join(out, f"checkpoint-{step}"), os.path.join(out, f"eval-{step}"))
             for step in steps}
    return curve, seconds_per_step


def train_in_rounds(args, prepared, seed, rounds, learning_rate):
    """CRAFT in `rounds` rounds of equal steps, the last of --eval_steps in all: round 1 on the seed's CRAFT set,
    round k+1 on candidates of fresh prompts made with round k's LoRA and filtered the same way, trained on from that
    LoRA. -> ({step: comparison of the round ending there}, seconds per step, seconds spent on the later rounds'
    candidates)."""
    folder, _ = prepared
    steps = args.eval_steps[-1] // rounds
    curve, seconds_per_step, candidate_seconds, lora = {}, [], 0.0, None
    for index in range(rounds):
        work = os.path.join(folder, f"rounds{rounds}-lr{learning_rate:g}", f"round-{index + 1}")
        where = f"seed {seed}: CRAFT round {index + 1} of {rounds}"
        training_set = os.path.join(folder, "craft")
        if lora:  # the round's own candidates, timed once
            training_set, timing = os.path.join(work, "filtered"), os.path.join(work, "candidate_seconds.json")
            if not os.path.isfile(timing):
                started = time.time()
                os.makedirs(work, exist_ok=True)
                make_candidates(args, seed, work, index, lora)
                run_demo.step(f"{where}: its training set", "crf_filter.py", "--candidates_dir",
                              os.path.join(work, "candidates"), "--output_dir", training_set, "--filter_rewards",
                              ",".join(REWARDS), *METHODS["CRAFT"][1], "--overwrite")
                cu.write_json_atomic(timing, {"seconds": time.time() - started})
            with open(timing) as f:
                candidate_seconds += json.load(f)["seconds"]
        model = os.path.join(work, "model")
        seconds_per_step.append(train(args, seed, where, training_set, model, learning_rate, steps,
                                      "--checkpointing_steps", steps, *(["--init_lora", lora] if lora else [])))
        curve[(index + 1) * steps] = evaluate(args, prepared, f"{where}, held out", model, os.path.join(work, "eval"))
        lora = model
    return curve, statistics.median(seconds_per_step), candidate_seconds


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


def kind(method):
    """The METHODS entry a method's name starts with ("CRAFT, 2 rounds" -> "CRAFT")."""
    return method.split(",")[0]


def summarise(runs, batch_size=8):
    """runs: method -> seed -> (curve, seconds per step, seconds of the later rounds' candidates) -> per method: mean
    curves of each reward (and of diversity, where measured), median seconds, and the reach of CRAFT's final color
    gain."""
    results = {}
    for method, by_seed in runs.items():
        seeds = sorted(by_seed)
        steps = sorted(by_seed[seeds[0]][0])
        curves = {}
        for name in (*REWARDS, *HELD_OUT, "diversity"):
            if all(name in by_seed[seed][0][step] for seed in seeds for step in steps):
                cells = {step: [by_seed[seed][0][step][name] for seed in seeds] for step in steps}
                curves[name] = {step: mean_and_stderr([c["mean_delta"] for c in cells[step]],
                                                      [c["stderr"] for c in cells[step]]) for step in steps}
        # timings: the median over seeds (a run slowed by other work on the machine does not move it)
        results[method] = {"curves": curves, "seconds_per_step": statistics.median(by_seed[s][1] for s in seeds),
                           "candidate_seconds": statistics.median(by_seed[s][2] for s in seeds),
                           "images_per_step": batch_size * METHODS[kind(method)][3]}
    target = results["CRAFT"]["curves"]["color"][max(results["CRAFT"]["curves"]["color"])][0]
    for result in results.values():
        step = steps_to_reach({s: v[0] for s, v in result["curves"]["color"].items()}, target)
        result["reach"] = None if step is None else {"steps": step, "images": step * result["images_per_step"],
                                                     "seconds": step * result["seconds_per_step"]}
    return results, target


def markdown(results, target, chosen, seeds, swept):
    steps = sorted({step for result in results.values() for step in result["curves"]["color"]})
    lines = []
    if swept:
        rates = sorted({rate for finals in swept.values() for rate in finals})
        lines += ["The learning-rate sweep (final held-out `color` gain, sweep seed):", "",
                  "| method | " + " | ".join(f"lr {rate:g}" for rate in rates) + " |", "|---|" + "---|" * len(rates)]
        lines += [f"| {method} | " + " | ".join(f"{finals[rate]:+.3f}" if rate in finals else "" for rate in rates)
                  + " |" for method, finals in swept.items()]
        lines.append("")
    lines += [f"Held-out gain against the base (mean over seeds {', '.join(map(str, seeds))} +- s.e.), by optimizer "
              "step (a rounds run: at the end of each round); `place` is held out from the filter, diversity is the "
              "relative change of diversity across seeds; learning rates chosen by the sweep: "
              + ", ".join(f"{m} {r:g}" for m, r in chosen.items()) + ".",
              "", "| method | reward | " + " | ".join(f"step {s}" for s in steps) + " |",
              "|---|---|" + "---|" * len(steps)]
    for method, result in results.items():
        for name, curve in result["curves"].items():
            cells = [f"{curve[s][0]:+.3f} +- {curve[s][1]:.3f}" if s in curve else "" for s in steps]
            lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
    lines += ["", f"To reach CRAFT's final `color` gain ({target:+.3f}):", "",
              "| method | steps | images seen | training seconds | s per step |", "|---|---|---|---|---|"]
    for method, result in results.items():
        reach = result["reach"]
        cells = ["not reached"] * 3 if reach is None else \
            [str(reach["steps"]), str(reach["images"]), f"{reach['seconds']:.0f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {result['seconds_per_step']:.3f} |")
    names = [name for name in (*REWARDS, *HELD_OUT, "diversity") if name in results["CRAFT"]["curves"]]
    lines += ["", "At the end of each run, by the seconds it took (training; the later rounds also make candidates):",
              "", "| method | steps | training seconds | candidate seconds | " + " | ".join(names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for method, result in results.items():
        last = max(result["curves"]["color"])
        cells = [f"{result['curves'][n][last][0]:+.3f} +- {result['curves'][n][last][1]:.3f}"
                 if n in result["curves"] else "" for n in names]
        lines.append(f"| {method} | {last} | {last * result['seconds_per_step']:.0f} | "
                     f"{result['candidate_seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("color", "optimizer steps", False), ("color", "training seconds", True),
              (HELD_OUT[0], "optimizer steps", False), ("diversity", "optimizer steps", False)]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for axis, (name, x_label, by_seconds) in zip(axes, panels):
        for method, result in results.items():
            if name not in result["curves"]:
                continue
            steps = sorted(result["curves"][name])
            means, errors = zip(*(result["curves"][name][s] for s in steps))
            x = [s * result["seconds_per_step"] if by_seconds else s for s in steps]
            axis.errorbar(x, means, yerr=errors, marker="o", capsize=3, label=method)
        axis.axhline(0, color="grey", linewidth=0.8)
        title = "diversity across seeds, change" if name == "diversity" else f"held-out {name} gain"
        axis.set(title=title, xlabel=x_label)
        if axis.get_legend_handles_labels()[0]:  # diversity is measured with several seeds per prompt only
            axis.legend(fontsize=8)
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
    chosen, swept = {method: args.learning_rates[0] for method in args.methods}, {}
    if len(args.learning_rates) > 1:
        prepared = prepare(args, args.sweep_seed)
        for method in args.methods:
            chosen[method], swept[method] = sweep(args, prepared, method)
            print(f"{method}: final color gain by learning rate {swept[method]}; chosen {chosen[method]:g}", flush=True)
    prepared = {seed: prepare(args, seed) for seed in args.seeds}
    runs = {method: {seed: (*train_and_evaluate(args, prepared[seed], seed, method, chosen[method], args.eval_steps),
                            0.0) for seed in args.seeds} for method in args.methods}
    for rounds in args.rounds:
        runs[f"CRAFT, {rounds} rounds"] = {seed: train_in_rounds(args, prepared[seed], seed, rounds, chosen["CRAFT"])
                                           for seed in args.seeds}
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
