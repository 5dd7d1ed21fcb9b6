"""Reward hacking made visible: each pixel statistic and the diversity across seeds against values computed by hand,
the suspicion rules on constructed comparisons, and eval_rewards.py's report and warning on folders built by hand."""

import json

import pytest
from PIL import Image

import craft_drift as cdr
import craft_utils as cu
from conftest import run_script


def checkerboard(size=4):
    image = Image.new("RGB", (size, size), (0, 0, 0))
    for x in range(size):
        for y in range(size):
            if (x + y) % 2:
                image.putpixel((x, y), (255, 255, 255))
    return image


def test_pixel_statistics_by_hand():
    grey = cdr.pixel_stats(Image.new("RGB", (8, 8), (128, 128, 128)))
    assert grey == pytest.approx({"brightness": 128 / 255, "saturation": 0, "colourfulness": 0, "high_frequency": 0})
    red = cdr.pixel_stats(Image.new("RGB", (8, 8), (255, 0, 0)))
    # rg = 255 and yb = 127.5 everywhere: no spread, so M = 0.3 * |(255, 127.5)|
    assert red == pytest.approx({"brightness": 0.299, "saturation": 1.0, "colourfulness": 0.3 * (255 ** 2 + 127.5 ** 2)
                                 ** 0.5, "high_frequency": 0})
    board = cdr.pixel_stats(checkerboard())
    assert board == pytest.approx({"brightness": 0.5, "saturation": 0, "colourfulness": 0, "high_frequency": 1.0})


def test_diversity_across_seeds_by_hand():
    black, white = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 255, 255))
    assert cdr.diversity([black, black.copy()]) == 0  # two seeds, the same image
    assert cdr.diversity([black, white]) == pytest.approx(1.0)
    assert cdr.diversity([black, white, black]) == pytest.approx(2 / 3)  # pairs: 1, 0, 1
    assert cdr.diversity([black]) is None


def test_embedding_diversity_by_hand():
    same, other = [0.6, 0.8], [0.8, -0.6]  # unit vectors, orthogonal
    assert cdr.embedding_diversity([same, same]) == 0
    assert cdr.embedding_diversity([same, other]) == pytest.approx(1.0)
    assert cdr.embedding_diversity([same, other, same]) == pytest.approx(2 / 3)  # 1 - cos: 1, 0, 1
    assert cdr.embedding_diversity([[1.0, 0.0], [-1.0, 0.0]]) == pytest.approx(2.0)  # opposite
    assert cdr.embedding_diversity([same]) is None


def row(delta, stderr, mean=0.5, baseline=0.5):
    return {"mean_delta": delta, "stderr": stderr, "delta": delta, "mean": mean, "baseline_mean": baseline, "n": 20}


def test_hacking_is_suspected_only_beyond_two_standard_errors_and_the_thresholds():
    calm = {name: row(0.0, 0.01) for name in cdr.STATISTICS}
    rewards = {"hpsv2.1": row(0.02, 0.005), "imagereward": row(-0.10, 0.03)}
    signs = cdr.hacking_signs(rewards, ["hpsv2.1"], calm, row(0.0, 0.01))
    assert signs == ["trained hpsv2.1 rose +0.0200", "held-out imagereward fell -0.1000 +- 0.0300"]
    assert cdr.hacking_signs({**rewards, "imagereward": row(-0.05, 0.03)}, ["hpsv2.1"], calm, None) == []  # < 2 s.e.
    assert cdr.hacking_signs({**rewards, "hpsv2.1": row(0.02, 0.02)}, ["hpsv2.1"], calm, None) == []  # no rise
    # 2.5 s.e. over 400 pairs, but 0.125 standard deviations of the deltas (0.004 x 20): a negligible trade-off
    tiny = {**row(-0.01, 0.004), "n": 400}
    assert cdr.hacking_signs({**rewards, "imagereward": tiny}, ["hpsv2.1"], calm, None) == []
    assert cdr.hacking_signs({**rewards, "imagereward": {**tiny, "mean_delta": -0.017}}, ["hpsv2.1"], calm, None) == [
        "trained hpsv2.1 rose +0.0200", "held-out imagereward fell -0.0170 +- 0.0040"]  # 0.2125 standard deviations
    saturated = {**calm, "saturation": row(0.15, 0.02)}
    assert cdr.hacking_signs({}, [], saturated, None) == ["saturation moved +0.150 +- 0.020 (threshold 0.1)"]
    assert cdr.hacking_signs({}, [], {**calm, "saturation": row(0.08, 0.01)}, None) == []  # under its threshold
    same = row(-0.05, 0.01, mean=0.25, baseline=0.30)  # -17% of the base's diversity
    assert cdr.hacking_signs({}, [], calm, same) == [
        "diversity across seeds fell -0.050 +- 0.010 (from 0.300; threshold -10%)"]
    assert cdr.hacking_signs({}, [], calm, row(-0.02, 0.005, mean=0.28, baseline=0.30)) == []  # -7%
    assert cdr.hacking_signs({}, [], calm, {**same, "n": 1}) == []  # one prompt says nothing


def test_a_validation_is_compared_with_the_starting_models_image_by_image():
    import craft_outputs as co

    grey = cdr.pixel_stats(Image.new("RGB", (8, 8), (128, 128, 128)))
    start = {"prompts": ["a", "a", "b", "b"], "stats": [grey] * 4, "diversity": [0.30, 0.32],
             "rewards": {"hpsv2.1": [0.20, 0.21, 0.20, 0.22], "jpeg": [-1.0, -1.1, -0.9, -1.0]}}
    now = {**start, "diversity": [0.10, 0.14],
           "rewards": {"hpsv2.1": [0.30, 0.32, 0.31, 0.32], "jpeg": [-1.5, -1.7, -1.4, -1.6]}}
    signs = co.hacking_signs_since(start, now, ["hpsv2.1"])
    # hpsv2.1 deltas 0.10, 0.11, 0.11, 0.10; jpeg -0.5, -0.6, -0.5, -0.6; diversity -0.20, -0.18
    assert signs[:2] == ["trained hpsv2.1 rose +0.1050", "held-out jpeg fell -0.5500 +- 0.0289"]
    assert signs[2] == "diversity across seeds fell -0.190 +- 0.010 (from 0.310; threshold -10%)"
    assert co.hacking_signs_since(start, {**now, "prompts": ["a", "a", "c", "c"]}, ["hpsv2.1"]) == []  # other prompts
    assert co.hacking_signs_since(start, start, ["hpsv2.1"]) == []
    resumed = {**now, "sampling": {"validation_inference_steps": 8}}  # a resume sampled it otherwise: not comparable
    assert co.hacking_signs_since({**start, "sampling": {"validation_inference_steps": 25}}, resumed, ["hpsv2.1"]) == []


def evaluation_folder(folder, images, scores, lora=None):
    """An eval folder as eval_rewards.py's model mode leaves it: images of 2 prompts x 3 seeds, metadata with text and
    seed, cached rewards, and (with `lora`) the generation settings naming the LoRA."""
    folder.mkdir()
    rows, rewards = [], []
    for index, (image, score) in enumerate(zip(images, scores)):
        name = f"{index:06d}.png"
        image.save(folder / name)
        rows.append({"file_name": name, "text": f"prompt {index // 3}", "seed": index % 3})
        rewards.append({"file_name": name, **score})
    cu.write_jsonl_atomic(folder / "metadata.jsonl", rows)
    cu.write_jsonl_atomic(folder / "rewards.jsonl", rewards)
    if lora:
        cu.write_json_atomic(folder / "generation_config.json", {"settings": {"lora_path": str(lora)}})
    return folder


def test_eval_reports_trained_and_held_out_rewards_drift_and_warns(tmp_path):
    """The tuned model (trained on color, per its LoRA's training_config.json) raised color, lowered the held-out
    jpeg and draws one image whatever the seed: the report groups the rewards by role, shows the drift, and ends with
    the warning; the base against itself stays silent."""
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "training_config.json").write_text(json.dumps({"crf_report": {"settings": {"filter_rewards": "color"}}}))
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    base = evaluation_folder(tmp_path / "base", [Image.new("RGB", (16, 16), c) for c in colours],
                             [{"color": 0.2 + 0.01 * i, "jpeg": -1.0 - 0.01 * i} for i in range(6)])
    tuned = evaluation_folder(tmp_path / "tuned", [Image.new("RGB", (16, 16), (200, 30, 30)) for _ in range(6)],
                              [{"color": 0.6 + 0.01 * i, "jpeg": -2.0 - 0.02 * i} for i in range(6)], lora=lora)
    result = run_script("eval_rewards.py", "--images_dir", tuned, "--rewards", "color,jpeg", "--compare_to", base)
    summary = json.loads((tuned / "rewards_summary.json").read_text())["comparison"]
    assert summary["trained_rewards"] == ["color"]
    assert summary["diversity"]["delta"] < 0 and summary["diversity"]["mean"] == 0
    table = (tuned / "rewards_summary.md").read_text()
    assert "| color | trained |" in table and "| jpeg | held out |" in table and "| diversity across seeds |" in table
    warning = result.stdout.strip().splitlines()[-1]
    assert warning.startswith("reward hacking suspected: trained color rose +0.4000; held-out jpeg fell -1.0250 +- ")
    assert "diversity across seeds fell" in warning

    result = run_script("eval_rewards.py", "--images_dir", base, "--rewards", "color,jpeg", "--compare_to", base)
    assert "reward hacking suspected" not in result.stdout
    assert "| color | unknown |" in (base / "rewards_summary.md").read_text()
