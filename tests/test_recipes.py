"""The recipes in examples/recipes/ run every stage at the paper's settings. Here they run as written, with the tiny
zoo swapped in through the variables they read and the sizes shrunk, so their commands cannot rot."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import craft_utils as cu
from conftest import REPO, run_script, subprocess_env
from make_tiny_models import reward_flags

# recipe: (zoo model, final file, learning rate, the filter level it runs at here). The two SDXL recipes are given
# one OUT, as a user running both would to share candidates: the second reuses the candidates, their scores and the
# base's evaluation, and trains at another level.
RECIPES = {
    "sd15_full_finetune": ("sd15", "model_index.json", 5e-5, "hpsv2.1,pickscore,aesthetic"),
    "sdxl_paper": ("sdxl", "pytorch_lora_weights.safetensors", 1e-4, "hpsv2.1,pickscore,aesthetic"),
    "sdxl_lora_16gb": ("sdxl", "pytorch_lora_weights.safetensors", 1e-4, "hpsv2.1"),
    "zimage_lora_16gb": ("zimage", "pytorch_lora_weights.safetensors", 1e-4, "hpsv2.1"),
    "flux2_klein_lora_16gb": ("flux2_klein", "pytorch_lora_weights.safetensors", 1e-4, "hpsv2.1"),
}
# what the tiny models need besides: no NF4 on a CPU, short captions, and klein's tokens kept few
TINY = {"zimage": {"QUANTIZE": "", "MAX_SEQUENCE_LENGTH": "32"},
        "flux2_klein": {"QUANTIZE": "", "MAX_SEQUENCE_LENGTH": "32", "RESOLUTION": "32"}}
PARTI_TOO = "sdxl_lora_16gb"  # the recipe run with both of the paper's benchmarks (the others: HPSv2 only)
STYLES = ["anime", "concept-art", "paintings", "photo"]
PROMPTS = ["a red circle", "a blue star at night", "a green square on the left", "a yellow house", "a cat"]
MORE_PROMPTS = ["a purple cat", "an orange tree", "a red boat", "a blue moon"]  # train.json's: enough for two rounds
# `hf download` as the recipes call it, faked: records its arguments, copies the files a real download would bring
FAKE_HF = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_HF_LOG"
while [ $# -gt 0 ]; do [ "$1" = --local-dir ] && dest=$2; shift; done
mkdir -p "$dest" && cp -r "$FAKE_HF_FILES"/train.json "$FAKE_HF_FILES"/benchmark "$dest"/
"""


@pytest.fixture(scope="module")
def hpdv2(tmp_path_factory):
    """HPDv2's files as the recipes download them: train.json (one record per compared pair, prompts repeat) and
    benchmark/<style>.json (arrays of prompts); and a local PartiPrompts-like dataset."""
    folder = tmp_path_factory.mktemp("hpdv2")
    records = [{"prompt": prompt, "image_path": [f"{i}-0.jpg", f"{i}-1.jpg"], "human_preference": [1, 0]}
               for i, prompt in enumerate(PROMPTS + PROMPTS[:2] + MORE_PROMPTS)]
    (folder / "train.json").write_text(json.dumps(records))
    (folder / "benchmark").mkdir()
    for style in STYLES:
        (folder / "benchmark" / f"{style}.json").write_text(json.dumps([f"{p}, {style}" for p in PROMPTS[:2]]))
    (folder / "parti").mkdir()
    (folder / "parti" / "prompts.csv").write_text("Prompt,Category\na red circle,Basic\na blue star,Basic\n")
    (folder / "bin").mkdir()
    (folder / "bin" / "hf").write_text(FAKE_HF)
    (folder / "bin" / "hf").chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    return {model: tmp_path_factory.mktemp(model) for model in ("sd15", "sdxl", "zimage", "flux2_klein")}


def run_recipe(recipe, zoo, hpdv2, workdir, check=True, **extra):
    model, _, _, level = RECIPES[recipe]
    env = subprocess_env()
    env["PATH"] = os.pathsep.join([str(hpdv2 / "bin"), os.path.dirname(sys.executable), env["PATH"]])
    env.update(BASE_MODEL=str(zoo / model), VAE=str(zoo / "sdxl" / "vae"), HPDV2=str(workdir / "hpdv2"),
               FAKE_HF_FILES=str(hpdv2), FAKE_HF_LOG=str(workdir / "hf.log"), OUT=f"craft_run/{model}",
               EXPANSION_MODEL=str(zoo / "expander"), REWARD_FLAGS=" ".join(reward_flags(zoo)), LAUNCH="python",
               NUM_PROMPTS="4", NUM_VARIANTS="2", INFERENCE_STEPS="2", GENERATION_BATCH_SIZE="8",
               RESOLUTION="64", TRAIN_BATCH_SIZE="2", GRADIENT_ACCUMULATION="2", MAX_TRAIN_STEPS="2",
               MIXED_PRECISION="no", REWARD_PRECISION="no", EVAL_PROMPTS_PER_PART="1", EVAL_REWARDS="hpsv2.1,jpeg",
               PARTI_PROMPTS=str(hpdv2 / "parti"), BENCHMARKS="hpsv2 parti" if recipe == PARTI_TOO else "hpsv2",
               FILTER_REWARDS=level)
    env.update(TINY.get(model, {}))
    env.update(extra)
    result = subprocess.run(["bash", os.path.join(REPO, "examples", "recipes", recipe + ".sh")], cwd=workdir,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0 or not check, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_runs_every_stage(recipe, zoo, hpdv2, workdirs):
    model, final_file, learning_rate, level = RECIPES[recipe]
    workdir = workdirs[model]
    out, folder_level = workdir / "craft_run" / model, level.replace(",", "+")
    base_images = {p: p.stat().st_mtime_ns for p in (out / "eval" / "base").rglob("*.png") if p.name[0].isdigit()}
    result = run_recipe(recipe, zoo, hpdv2, workdir)
    candidates = cu.read_jsonl(out / "candidates" / "metadata.jsonl")
    assert len(candidates) == 4 * 3 * 2  # prompts x (prompt + 2 rewrites) x seeds
    assert {r["original_prompt"] for r in candidates} <= set(PROMPTS + MORE_PROMPTS)  # train.json's prompt field
    scores = cu.read_jsonl(out / "candidates" / "rewards.jsonl")
    assert all(set(level.split(",")) <= set(row) for row in scores)
    crf = json.loads((out / f"filtered-{folder_level}" / "crf_report.json").read_text())
    assert crf["settings"]["filter_rewards"] == level
    if base_images:  # the other SDXL recipe's candidates and base images were reused, not made again
        assert "(0 made now" in result.stdout
        assert {p: p.stat().st_mtime_ns for p in base_images} == base_images
    else:  # HPDv2 downloaded once, its train.json and benchmark/ in one call
        assert (workdir / "hf.log").read_text() == \
            f"download ymhao/HPDv2 train.json benchmark/ --repo-type dataset --local-dir {workdir / 'hpdv2'}\n"
    assert (out / f"model-{folder_level}" / final_file).is_file()
    config = json.loads((out / f"model-{folder_level}" / "training_config.json").read_text())["args"]
    assert (config["learning_rate"], config["gradient_accumulation_steps"]) == (learning_rate, 2)
    report = json.loads((out / "eval" / f"craft-{folder_level}" / "benchmark_hpsv2.json").read_text())
    assert list(report["parts"]) == STYLES and report["baseline"] == f"craft_run/{model}/eval/base"
    assert (out / "eval" / f"craft-{folder_level}" / "benchmark_hpsv2.md").is_file()
    if recipe == PARTI_TOO:
        parti = json.loads((out / "eval" / f"craft-{folder_level}" / "benchmark_parti.json").read_text())
        assert list(parti["parts"]) == ["parti"] and parti["parts"]["parti"]["n"] == 1

    if recipe == "sd15_full_finetune":  # a rerun reuses every finished stage and changes nothing...
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}
        result = run_recipe(recipe, zoo, hpdv2, workdir)
        assert "(0 made now" in result.stdout
        after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}
        assert after == before
        # ...and a finished model is not passed off as one trained with other settings
        result = run_recipe(recipe, zoo, hpdv2, workdir, check=False, MAX_TRAIN_STEPS="3")
        assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == (
            f"error: craft_run/sd15/model-{folder_level} was trained with other settings "
            f"(craft_run/sd15/model-{folder_level}.trained_with.txt); set another OUT")


# LAUNCH for the rounds test: python, but the first generation from a LoRA (round 2's) is killed after its first batch
KILL_ROUND_TWO_ONCE = """#!/usr/bin/env bash
if [[ "$1" == */generate_candidates.py && " $* " == *" --lora_path "* && ! -e "$KILL_MARK" ]]; then
  touch "$KILL_MARK"
  CRAFT_KILL_AT=images_written#1 exec python "$@"
fi
exec python "$@"
"""


def test_rounds_go_on_from_the_last_model_and_equal_the_stages_run_by_hand(zoo, hpdv2, workdirs, tmp_path):
    """After the SDXL LoRA recipe's round (test above), ROUNDS=2 adds a second round: killed while generating, then
    rerun, it equals the four stages run by hand from round 1's LoRA on the next prompts of the list."""
    workdir = workdirs["sdxl"]
    out = workdir / "craft_run" / "sdxl"
    first = out / "model-hpsv2.1"
    if not (first / "pytorch_lora_weights.safetensors").is_file():
        pytest.skip("needs test_recipe_runs_every_stage[sdxl_lora_16gb] first (the same worker runs this file)")
    (tmp_path / "launch.sh").write_text(KILL_ROUND_TWO_ONCE)
    killed = run_recipe("sdxl_lora_16gb", zoo, hpdv2, workdir, check=False, ROUNDS="2", BENCHMARKS="hpsv2",
                        LAUNCH=f"bash {tmp_path / 'launch.sh'}", KILL_MARK=str(tmp_path / "killed"))
    second = out / "round2-hpsv2.1"
    assert killed.returncode != 0 and 0 < len(list((second / "candidates").glob("*.png"))) < 24
    result = run_recipe("sdxl_lora_16gb", zoo, hpdv2, workdir, ROUNDS="2", BENCHMARKS="hpsv2")
    assert "==== round 2 of 2, from craft_run/sdxl/model-hpsv2.1" in result.stdout

    # by hand: round 1's LoRA makes the candidates of the 4 prompts after round 1's, scored, filtered, trained on
    hand = tmp_path / "by_hand"
    vae, prompts = str(zoo / "sdxl" / "vae"), workdir / "hpdv2" / "train.json"
    run_script("generate_candidates.py", "--pretrained_model_name_or_path", zoo / "sdxl", "--lora_path", first,
               "--num_inference_steps", 2, "--guidance_scale", 5.0, "--mixed_precision", "no", "--batch_size", 8,
               "--pretrained_vae_model_name_or_path", vae, "--prompts_file", prompts, "--prompt_column", "prompt",
               "--max_prompts", 4, "--skip_prompts", 4, "--shuffle_prompts", "--num_variants", 2, "--expansion", "llm",
               "--expansion_model", zoo / "expander", "--num_images_per_prompt", 2, "--seed", 0,
               "--output_dir", hand / "candidates")
    run_script("eval_rewards.py", "--images_dir", hand / "candidates", "--rewards", "hpsv2.1", "--reward_precision",
               "no", *reward_flags(zoo))
    run_script("crf_filter.py", "--candidates_dir", hand / "candidates", "--output_dir", hand / "filtered",
               "--filter_rewards", "hpsv2.1")
    run_script("train_craft_sdxl_lora.py", "--pretrained_model_name_or_path", zoo / "sdxl", "--init_lora", first,
               "--train_data_dir", hand / "filtered", "--output_dir", hand / "model", "--seed", 0,
               "--pretrained_vae_model_name_or_path", vae, "--resolution", 64, "--rank", 16, "--train_batch_size", 2,
               "--gradient_accumulation_steps", 2, "--max_train_steps", 2, "--learning_rate", 1e-4,
               "--lr_scheduler", "constant", "--lr_warmup_steps", 0, "--use_8bit_adam", "--gradient_checkpointing",
               "--mixed_precision", "no", "--checkpointing_steps", 50, "--checkpoints_total_limit", 2,
               "--output_kohya_format", "--report_to", "tensorboard")

    made = cu.read_jsonl(second / "candidates" / "metadata.jsonl")
    assert made == cu.read_jsonl(hand / "candidates" / "metadata.jsonl") and len(made) == 24
    round_one = {row["original_prompt"] for row in cu.read_jsonl(out / "candidates" / "metadata.jsonl")}
    assert not round_one & {row["original_prompt"] for row in made}  # fresh prompts
    for row in made:
        assert (second / "candidates" / row["file_name"]).read_bytes() == \
            (hand / "candidates" / row["file_name"]).read_bytes()
    assert (second / "candidates" / "rewards.jsonl").read_text() == (hand / "candidates" / "rewards.jsonl").read_text()
    kept = [{k: v for k, v in row.items() if k != "source_file"} for row in
            cu.read_jsonl(second / "filtered" / "metadata.jsonl")]
    assert kept == [{k: v for k, v in row.items() if k != "source_file"}
                    for row in cu.read_jsonl(hand / "filtered" / "metadata.jsonl")]
    lora = [load_file(folder / "pytorch_lora_weights.safetensors") for folder in (second / "model", hand / "model")]
    assert lora[0].keys() == lora[1].keys() and all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])
    assert json.loads((second / "model" / "training_config.json").read_text())["args"]["init_lora"] == \
        "craft_run/sdxl/model-hpsv2.1"

    # the rounds compared: what each round's folders hold
    rounds = json.loads((out / "eval" / "rounds-hpsv2.1" / "rounds.json").read_text())["rounds"]
    assert [row["model"] for row in rounds] == ["craft_run/sdxl/model-hpsv2.1", "craft_run/sdxl/round2-hpsv2.1/model"]
    assert (rounds[1]["candidates"], rounds[1]["kept"]) == (24, len(kept))
    assert rounds[1]["candidate_seconds"] == int((second / "candidates.seconds").read_text())
    for number, evaluation in ((0, "craft-hpsv2.1"), (1, "craft-hpsv2.1-round2")):
        report = json.loads((out / "eval" / evaluation / "benchmark_hpsv2.json").read_text())
        assert rounds[number]["benchmarks"]["hpsv2"]["average"] == report["average"]
        assert report["trained_rewards"] == ["hpsv2.1"]
    table = (out / "eval" / "rounds-hpsv2.1" / "rounds.md").read_text()
    assert "| hpsv2.1 x100 (trained) | jpeg (held out) |" in table and "## hpsv2" in table
    assert (out / "eval" / "rounds-hpsv2.1" / "rounds.png").is_file()


def test_rounds_table_by_hand(tmp_path):
    """rounds_table.py on folders written by hand: each round's counts, seconds, gains, diversity and drift, and the
    warnings; a missing report is one line naming it."""
    sys.path.insert(0, os.path.join(REPO, "examples", "recipes"))
    import craft_drift as cdr
    import rounds_table

    def delta(value, stderr=0.01, baseline=0.5):
        return {"mean": baseline + value, "baseline_mean": baseline, "delta": value, "stderr": stderr, "n": 8}

    rounds = []
    for number, (gain, held_out, diversity) in enumerate(((0.02, 0.01, -0.01), (0.05, -0.04, -0.2)), start=1):
        folder = tmp_path / f"round{number}"
        for part in ("filtered", "model", "eval"):
            (folder / part).mkdir(parents=True)
        cu.write_json_atomic(folder / "filtered" / "crf_report.json", {"candidates": 96, "kept": 10 + number})
        cu.write_json_atomic(folder / "model" / "training_config.json", {"data": {"steps": 50, "seconds": 12.3}})
        (folder / "candidates.seconds").write_text(f"{100 * number}\n")
        average = {"hpsv2.1": {"mean_delta": gain, "stderr": 0.005}, "clip": {"mean_delta": held_out, "stderr": 0.01}}
        signs = ["held-out clip fell -0.0400 +- 0.0100"] if held_out < 0 else []
        cu.write_json_atomic(folder / "eval" / "benchmark_hpsv2.json", {
            "baseline": "base", "average": average, "trained_rewards": ["hpsv2.1"], "shown_x100": ["hpsv2.1"],
            "drift": {name: delta(0.0) for name in cdr.STATISTICS}, "diversity": delta(diversity),
            "diversity_measure": "1 - cosine of clip's image embeddings", "hacking_signs": signs})
        rounds += ["--round", *(str(folder / part) for part in ("candidates", "filtered", "model", "eval"))]
    rounds_table.main(rounds_table.parse_args([*rounds, "--benchmarks", "hpsv2", "--output_dir", str(tmp_path / "t")]))
    table = (tmp_path / "t" / "rounds.md").read_text()
    assert "| 1 | 96 | 11 | 50 | 100 / 12 |" in table and "| 2 | 96 | 12 | 50 | 200 / 12 |" in table
    assert "| round | hpsv2.1 x100 (trained) | clip (held out) | diversity (1 - cosine of clip's image embeddings) |" \
        in table
    assert "| 2 | +5 +- 0.5 | -0.04 +- 0.01 | -0.2 +- 0.01 |" in table  # hpsv2.1 x100; the drift, then the signs
    assert table.rstrip().endswith("| held-out clip fell -0.0400 +- 0.0100 |")
    saved = json.loads((tmp_path / "t" / "rounds.json").read_text())["rounds"]
    assert [row["kept"] for row in saved] == [11, 12] and saved[1]["benchmarks"]["hpsv2"]["diversity"]["delta"] == -0.2
    assert (tmp_path / "t" / "rounds.png").is_file()
    (tmp_path / "round2" / "eval" / "benchmark_hpsv2.json").unlink()
    with pytest.raises(SystemExit, match="benchmark_hpsv2.json is missing: the hpsv2 evaluation; rerun the recipe"):
        rounds_table.main(rounds_table.parse_args([*rounds, "--benchmarks", "hpsv2", "--output_dir",
                                                   str(tmp_path / "t")]))
