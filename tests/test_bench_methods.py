"""benchmarks/bench_methods.py, reduced: every stage of CRAFT vs plain SFT vs Diffusion-DPO on the demo's model runs,
and the table, JSON and plot say what the evaluation folders hold. The full-size comparison is in docs/methods.md."""
import json
import math
import os
import sys

import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_methods  # noqa: E402


def test_learning_rate_choice_reach_and_seed_statistics_by_hand():
    assert bench_methods.best_learning_rate({1e-3: 0.1, 4e-3: 0.3, 2e-3: 0.3}) == 2e-3  # a tie: the smaller rate
    assert bench_methods.steps_to_reach({200: 0.15, 50: 0.1, 100: 0.2}, 0.15) == 100
    assert bench_methods.steps_to_reach({50: 0.1, 100: 0.12}, 0.15) is None
    mean, stderr = bench_methods.mean_and_stderr([0.1, 0.2, 0.6], [0.01, 0.02, 0.03])
    assert mean == pytest.approx(0.3) and stderr == pytest.approx(math.sqrt(0.07) / math.sqrt(3))
    assert bench_methods.mean_and_stderr([0.1], [0.02]) == (0.1, 0.02)  # one seed: its evaluation's s.e.


def test_summary_over_seeds_and_steps_by_hand():
    def run(gains, seconds, candidate_seconds=0.0):  # {step: color gain} -> one seed's curve (jpeg gains: half)
        return {step: {"color": {"mean_delta": g, "stderr": 0.01}, "jpeg": {"mean_delta": g / 2, "stderr": 0.01}}
                for step, g in gains.items()}, seconds, candidate_seconds

    runs = {"CRAFT": {0: run({50: 0.10, 100: 0.30}, 0.1), 1: run({50: 0.20, 100: 0.20}, 0.3)},
            "plain SFT": {0: run({50: 0.0, 100: 0.10}, 0.1), 1: run({50: 0.0, 100: 0.20}, 0.1)},
            "Diffusion-DPO": {0: run({50: 0.30, 100: 0.20}, 0.2), 1: run({50: 0.20, 100: 0.40}, 0.4)},
            "CRAFT, 2 rounds": {0: run({50: 0.10, 100: 0.40}, 0.1, 8.0), 1: run({50: 0.30, 100: 0.40}, 0.1, 6.0)}}
    results, target = bench_methods.summarise(runs)
    assert target == pytest.approx(0.25)  # CRAFT's final color gain, mean of 0.30 and 0.20
    mean, stderr = results["CRAFT"]["curves"]["color"][50]
    assert mean == pytest.approx(0.15) and stderr == pytest.approx(0.05)  # stdev(0.1, 0.2) / sqrt(2)
    assert results["CRAFT"]["curves"]["jpeg"][100][0] == pytest.approx(0.125)
    assert results["CRAFT"]["reach"] == pytest.approx({"steps": 100, "images": 800, "seconds": 20.0})
    assert results["plain SFT"]["reach"] is None  # 0.15 at step 100
    # DPO: 0.25 already at step 50; a pair is two images; 0.3 s per step (the median of two: their mean)
    assert results["Diffusion-DPO"]["reach"] == pytest.approx({"steps": 50, "images": 800, "seconds": 15.0})
    # rounds: images of a CRAFT step, the later rounds' candidate seconds averaged over the seeds
    assert results["CRAFT, 2 rounds"]["reach"] == pytest.approx({"steps": 100, "images": 800, "seconds": 10.0})
    assert results["CRAFT, 2 rounds"]["candidate_seconds"] == 7.0 and results["CRAFT"]["candidate_seconds"] == 0.0
    assert "diversity" not in results["CRAFT"]["curves"]  # not measured (one seed per prompt)
    table = bench_methods.markdown(results, target, {"CRAFT": 1e-3}, [0, 1], {})
    assert "| CRAFT, 2 rounds | 100 | 10 | 7 | +0.400 +- 0.000 | +0.200 +- 0.000 |" in table


def test_an_evaluation_reads_the_gains_and_the_relative_change_of_diversity(tmp_path):
    """evaluate() on a finished evaluation folder: the comparison's rewards, and diversity as a share of the base's."""
    folder = tmp_path / "eval"
    folder.mkdir()
    rewards = {"color": {"mean_delta": 0.1, "stderr": 0.02}}
    diversity = {"mean": 0.09, "baseline_mean": 0.12, "delta": -0.03, "stderr": 0.006, "n": 24}
    (folder / "rewards_summary.json").write_text(json.dumps({"comparison": {"rewards": rewards,
                                                                            "diversity": diversity}}))
    result = bench_methods.evaluate(None, (str(tmp_path), []), "unused", "unused", str(folder))
    assert result["color"] == rewards["color"]
    assert result["diversity"] == pytest.approx({"mean_delta": -0.25, "stderr": 0.05})  # -0.03 / 0.12, 0.006 / 0.12


def test_sweep_grows_past_a_winning_edge_of_the_grid(monkeypatch):
    """Gains peaking at lr 1.25e-4, below a grid of 5e-4 .. 8e-3: the sweep tries 1.25e-4, then 3.125e-5, which
    shows 1.25e-4 is the peak; a peak further down stops it after two extensions; a grid whose middle wins stays."""
    tried = []

    def fake_run(peak):
        def run(args, prepared, seed, method, rate, steps):
            tried.append(rate)
            return {steps[-1]: {"color": {"mean_delta": -abs(math.log(rate / peak))}}}, 0.1
        return run

    args = bench_methods.parse_args(["--learning_rates", "5e-4", "2e-3", "8e-3"])
    monkeypatch.setattr(bench_methods, "train_and_evaluate", fake_run(1.25e-4))
    chosen, finals = bench_methods.sweep(args, None, "CRAFT")
    assert tried == [5e-4, 2e-3, 8e-3, 1.25e-4, 3.125e-5] and chosen == pytest.approx(1.25e-4)
    tried.clear()
    monkeypatch.setattr(bench_methods, "train_and_evaluate", fake_run(1e-7))
    chosen, finals = bench_methods.sweep(args, None, "CRAFT")
    assert tried == pytest.approx([5e-4, 2e-3, 8e-3, 1.25e-4, 3.125e-5]) and chosen == pytest.approx(3.125e-5)
    tried.clear()
    monkeypatch.setattr(bench_methods, "train_and_evaluate", fake_run(2e-3))
    assert bench_methods.sweep(args, None, "CRAFT")[0] == 2e-3 and tried == [5e-4, 2e-3, 8e-3]


def test_reduced_comparison_writes_what_the_evaluations_hold(tmp_path, capsys):
    out = tmp_path / "methods"
    flags = ["--output_dir", str(out), "--seeds", "0", "--learning_rates", "2e-3", "--eval_steps", "4",
             "--num_prompts", "6", "--eval_images_per_prompt", "1", "--num_inference_steps", "4", "--rounds", "2"]
    bench_methods.main(flags)
    saved = json.loads((out / "methods.json").read_text())
    assert saved["learning_rates"] == {"CRAFT": 2e-3, "plain SFT": 2e-3, "Diffusion-DPO": 2e-3}
    seed = out / "seed-0"
    pairs = [json.loads(line) for line in (seed / "dpo" / "metadata.jsonl").read_text().splitlines()]
    assert pairs and all("rejected_file_name" in row for row in pairs)
    for method, folder in (("CRAFT", "craft"), ("plain SFT", "sft"), ("Diffusion-DPO", "dpo")):
        run = seed / f"train-{folder}-lr0.002"
        config = json.loads((run / "training_config.json").read_text())
        assert config["args"]["loss"] == ("dpo" if folder == "dpo" else "craft")
        assert config["args"]["train_data_dir"] == str(seed / folder)
        for step in (4,):  # one checkpoint keeps the suite short (several: test_summary_over_seeds_and_steps_by_hand)
            summary = json.loads((run / f"eval-{step}" / "rewards_summary.json").read_text())
            assert summary["comparison"]["pairs"] == 6  # 6 held-out prompts x 1 seed, paired with the base's
            for reward in ("color", "jpeg", "place"):
                mean, stderr = saved["results"][method]["curves"][reward][str(step)]
                compared = summary["comparison"]["rewards"][reward]
                assert (mean, stderr) == (compared["mean_delta"], compared["stderr"])  # one seed: its own s.e.
            assert "diversity" not in saved["results"][method]["curves"]  # one seed per prompt: not measured
    # two rounds of 2 steps: round 2's prompts are fresh (none trained on before, none held out), its candidates come
    # from round 1's LoRA, and it trains on from that LoRA
    rounds = seed / "rounds2-lr0.002"
    first, second = (set((rounds.parent if k == 1 else rounds / "round-2").joinpath("train_prompts.txt")
                         .read_text().split("\n")) - {""} for k in (1, 2))
    heldout = set((seed / "heldout_prompts.txt").read_text().split("\n")) - {""}
    assert len(first) == len(second) == 6 and not first & second and not (first | second) & heldout
    made_with = json.loads((rounds / "round-2" / "candidates" / "generation_config.json").read_text())["settings"]
    assert made_with["lora_path"] == str(rounds / "round-1" / "model")
    config = json.loads((rounds / "round-2" / "model" / "training_config.json").read_text())["args"]
    assert config["init_lora"] == str(rounds / "round-1" / "model") and config["max_train_steps"] == 2
    assert config["train_data_dir"] == str(rounds / "round-2" / "filtered")
    for round_end, folder in ((2, "round-1"), (4, "round-2")):
        summary = json.loads((rounds / folder / "eval" / "rewards_summary.json").read_text())["comparison"]
        assert saved["results"]["CRAFT, 2 rounds"]["curves"]["color"][str(round_end)][0] == \
            summary["rewards"]["color"]["mean_delta"]
    assert saved["results"]["CRAFT, 2 rounds"]["candidate_seconds"] == \
        json.loads((rounds / "round-2" / "candidate_seconds.json").read_text())["seconds"]
    # the reach of CRAFT's final color gain, recomputed from the curves
    target = saved["results"]["CRAFT"]["curves"]["color"]["4"][0]
    assert saved["target"] == target and saved["results"]["CRAFT"]["reach"]["steps"] == 4
    for method, result in saved["results"].items():
        steps = sorted(int(step) for step in result["curves"]["color"])  # a rounds run: each round's end
        reached = [s for s in steps if result["curves"]["color"][str(s)][0] >= target]
        expected = {"steps": reached[0], "images": reached[0] * 8 * (2 if method == "Diffusion-DPO" else 1),
                    "seconds": reached[0] * result["seconds_per_step"]} if reached else None
        assert result["reach"] == (pytest.approx(expected) if expected else None)
    table = (out / "methods.md").read_text()
    # three rewards, the reach row, the final row
    assert table.count("| Diffusion-DPO |") == 5 and "| CRAFT, 2 rounds | place |" in table
    with Image.open(out / "methods.png") as plot:
        assert plot.size == (2000, 400)

    capsys.readouterr()
    bench_methods.main(flags)  # a rerun reuses every finished stage: nothing trains or evaluates again
    printed = capsys.readouterr().out
    assert "== seed 0" not in printed  # no candidates, scores, training sets, training or evaluation
    assert json.loads((out / "methods.json").read_text())["results"] == saved["results"]
    with pytest.raises(SystemExit, match=r"holds runs made with other settings \(num_inference_steps\)"):
        bench_methods.main([*flags, "--num_inference_steps", "3"])  # the stages it would reuse were made with 4 steps
