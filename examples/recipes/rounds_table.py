#!/usr/bin/env python
r"""CRAFT in rounds, compared: per round, its candidates and kept images, the seconds it took, and on each benchmark the
trained and held-out rewards' gains over the base, the change of diversity across seeds and the drift of the pixel
statistics. craft_round.sh calls it after the last round; it reads what the stages wrote:

    python examples/recipes/rounds_table.py --benchmarks hpsv2 --output_dir craft_run/eval/rounds-hpsv2.1 \
        --round craft_run/candidates craft_run/filtered-hpsv2.1 craft_run/model-hpsv2.1 craft_run/eval/craft-hpsv2.1 \
        --round ... (one per round, in order)

Writes rounds.md, rounds.json and rounds.png (one row of panels per benchmark: each reward's gain by round, trained
solid and held out dashed; diversity; each drift statistic over its warning threshold) in --output_dir.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import craft_drift as cdr  # noqa: E402
import craft_utils as cu  # noqa: E402


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round", action="append", nargs=4, required=True, dest="rounds",
                        metavar=("CANDIDATES", "FILTERED", "MODEL", "EVAL"),
                        help="one round's folders: its candidates, its training set, its model, its evaluation")
    parser.add_argument("--benchmarks", nargs="+", required=True, help="the benchmarks each EVAL folder holds")
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(input_args)


def read_json(path, what):
    if not os.path.isfile(path):
        cu.fail(f"{path} is missing: {what}; rerun the recipe to finish that round")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def seconds_of(path):
    """The seconds the round script recorded beside a folder, or None."""
    try:
        with open(path + ".seconds", encoding="utf-8") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def round_row(number, candidates, filtered, model, evaluation, benchmarks):
    """What one round made and what its model scores, from the files its stages wrote."""
    report = read_json(os.path.join(filtered, "crf_report.json"), "the filter's report")
    trained = read_json(os.path.join(model, "training_config.json"), "the fine-tune's record")
    row = {"round": number, "model": model, "candidates": report["candidates"], "kept": report["kept"],
           "candidate_seconds": seconds_of(candidates), "training_steps": trained["data"]["steps"],
           "training_seconds": trained["data"]["seconds"], "benchmarks": {}}
    for benchmark in benchmarks:
        table = read_json(os.path.join(evaluation, f"benchmark_{benchmark}.json"), f"the {benchmark} evaluation")
        if not table.get("baseline"):
            cu.fail(f"{evaluation}/benchmark_{benchmark}.json has no baseline: evaluate with --compare_to the base")
        row["benchmarks"][benchmark] = {key: table.get(key) for key in
                                        ("average", "trained_rewards", "drift", "diversity", "diversity_measure",
                                         "hacking_signs", "shown_x100")}
    return row


def signed(value, stderr, scale=1):
    return f"{value * scale:+.4g} +- {stderr * scale:.2g}"


def markdown(rows, benchmarks):
    lines = ["# CRAFT in rounds", "",
             "Each round's model against the base on the same prompts and seeds; round k+1 generated its candidates "
             "with round k's model on fresh prompts and trained on from it. Seconds: generating the candidates / "
             "training (the run that finished each).", "",
             "| round | candidates | kept | training steps | seconds |", "|---|---|---|---|---|"]
    for row in rows:
        made = "n/a" if row["candidate_seconds"] is None else row["candidate_seconds"]
        lines.append(f"| {row['round']} | {row['candidates']} | {row['kept']} | {row['training_steps']} | "
                     f"{made} / {row['training_seconds']:.0f} |")
    for benchmark in benchmarks:
        first = rows[0]["benchmarks"][benchmark]
        trained = first["trained_rewards"]  # None: the model's folder does not say
        names = sorted(first["average"], key=lambda name: name not in (trained or []))
        scale = {name: 100 if name in (first["shown_x100"] or []) else 1 for name in names}
        roles = {name: "unknown" if trained is None else "trained" if name in trained else "held out"
                 for name in names}
        header = [f"{name}{' x100' if scale[name] == 100 else ''} ({roles[name]})" for name in names]
        header += [f"diversity ({first['diversity_measure']})"] if first["diversity"] else []
        header += list(cdr.STATISTICS)
        lines += ["", f"## {benchmark}: gain over the base (delta +- s.e., averaged over the parts)", "",
                  "| round | " + " | ".join(header) + " | reward hacking suspected |", "|---" * (len(header) + 2) + "|"]
        for row in rows:
            result = row["benchmarks"][benchmark]
            average = result["average"]
            cells = [signed(average[n]["mean_delta"], average[n]["stderr"], scale[n]) for n in names]
            if first["diversity"]:
                cells.append(signed(result["diversity"]["delta"], result["diversity"]["stderr"]))
            cells += [signed(result["drift"][s]["delta"], result["drift"][s]["stderr"]) for s in cdr.STATISTICS]
            cells.append("; ".join(result["hacking_signs"] or []) or "no")
            lines.append(f"| {row['round']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, benchmarks, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(benchmarks), 3, figsize=(15, 4 * len(benchmarks)), squeeze=False)
    numbers = [row["round"] for row in rows]
    for (reward_axis, diversity_axis, drift_axis), benchmark in zip(axes, benchmarks):
        results = [row["benchmarks"][benchmark] for row in rows]
        trained = results[0]["trained_rewards"]
        for name in results[0]["average"]:
            role = "unknown" if trained is None else "trained" if name in trained else "held out"
            reward_axis.errorbar(numbers, [r["average"][name]["mean_delta"] for r in results],
                                 yerr=[r["average"][name]["stderr"] for r in results], marker="o", capsize=3,
                                 linestyle="-" if role == "trained" else "--", label=f"{name} ({role})")
        if results[0]["diversity"]:
            diversity_axis.errorbar(numbers, [r["diversity"]["delta"] / r["diversity"]["baseline_mean"]
                                              for r in results],
                                    yerr=[r["diversity"]["stderr"] / r["diversity"]["baseline_mean"] for r in results],
                                    marker="o", capsize=3)
        diversity_axis.axhline(-cdr.DIVERSITY_DROP, color="red", linewidth=0.8, linestyle=":")
        for name in cdr.STATISTICS:
            drift_axis.plot(numbers, [r["drift"][name]["delta"] / cdr.THRESHOLDS[name] for r in results], marker="o",
                            label=name)
        for bound in (-1, 1):
            drift_axis.axhline(bound, color="red", linewidth=0.8, linestyle=":")
        for axis, title in ((reward_axis, f"{benchmark}: gain over the base"),
                            (diversity_axis, "diversity across seeds, relative change"),
                            (drift_axis, "drift / its threshold")):
            axis.axhline(0, color="grey", linewidth=0.8)
            axis.set(title=title, xlabel="round", xticks=numbers)
        reward_axis.legend(fontsize=8)
        drift_axis.legend(fontsize=8)
    figure.tight_layout()
    cu.write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=100))
    plt.close(figure)


def main(args):
    rows = [round_row(number, *folders, args.benchmarks) for number, folders in enumerate(args.rounds, start=1)]
    os.makedirs(args.output_dir, exist_ok=True)
    text = markdown(rows, args.benchmarks)
    cu.write_text_atomic(os.path.join(args.output_dir, "rounds.md"), text)
    cu.write_json_atomic(os.path.join(args.output_dir, "rounds.json"), {"rounds": rows})
    plot(rows, args.benchmarks, os.path.join(args.output_dir, "rounds.png"))
    print(text)
    print(f"the rounds compared: {os.path.join(args.output_dir, 'rounds.md')} (.json, .png)")


if __name__ == "__main__":
    main(parse_args())
