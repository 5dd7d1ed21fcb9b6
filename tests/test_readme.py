"""The README's tiny-model walk-through, run as written, so the README cannot rot."""

import json
import os
import re
import statistics
import subprocess
import sys

from PIL import Image

import craft_utils as cu
from conftest import REPO, subprocess_env

SECTION = "## Every stage by hand, on the tiny models"
FILTER_REWARDS = ("color",)  # the block's crf_filter.py --filter_rewards


def readme_commands():
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"expected one bash block under {SECTION!r}"
    return blocks[0]


def test_tiny_walkthrough_runs_as_written(tmp_path):
    # A working copy of the repository root: the commands use paths relative to it.
    for name in os.listdir(REPO):
        if name.endswith(".py") or name in ("tools", "models"):
            os.symlink(os.path.join(REPO, name), tmp_path / name)
    env = subprocess_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # `python`, `accelerate` of this venv
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_commands()], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    tiny = tmp_path / "tiny"

    candidates = cu.read_jsonl(tiny / "candidates" / "metadata.jsonl")
    assert len(candidates) == 3 * 3 * 2  # prompts x (original + 2 rewrites) x seeds
    scores = {r["file_name"]: r for r in cu.read_jsonl(tiny / "candidates" / "rewards.jsonl")}
    assert set(scores) == {r["file_name"] for r in candidates}
    assert all({"color", "jpeg", "aesthetic"} <= set(s) for s in scores.values())

    # The filter decision and the weights, recomputed by hand: a rewrite is kept when it beats its group's mean
    # original-prompt `color` and its advantage (z of the summed per-group z-scores) is positive.
    def z(values):
        mean, std = statistics.fmean(values), statistics.pstdev(values)
        return [(v - mean) / (std + 1e-8) for v in values]

    expected = {}
    for group in {r["group_id"] for r in candidates}:
        members = [r for r in candidates if r["group_id"] == group]
        group_scores = [scores[r["file_name"]] for r in members]
        totals = [sum(parts) for parts in zip(*(z([s[k] for s in group_scores]) for k in FILTER_REWARDS))]
        reference = {k: statistics.fmean(s[k] for r, s in zip(members, group_scores) if r["variant_id"] == 0)
                     for k in FILTER_REWARDS}
        for r, s, advantage in zip(members, group_scores, z(totals)):
            if r["variant_id"] > 0 and all(s[k] > reference[k] for k in reference) and advantage > 0:
                expected[r["file_name"]] = advantage
    filtered = cu.read_jsonl(tiny / "filtered" / "metadata.jsonl")
    kept = {os.path.basename(r["source_file"]): r["weight"] for r in filtered}
    assert set(kept) == set(expected) and kept
    assert all(abs(kept[f] - expected[f]) < 1e-6 for f in kept)

    assert (tiny / "craft-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tiny / "craft-lora" / "pytorch_lora_weights_kohya.safetensors").is_file()
    assert (tiny / "craft-sdxl-lora" / "pytorch_lora_weights.safetensors").is_file()
    with open(tiny / "eval_craft" / "rewards_summary.json") as f:
        comparison = json.load(f)["comparison"]
    assert comparison["pairs"] == 3 * 2
    assert set(comparison["rewards"]) == {"color", "jpeg"}
    assert Image.open(tiny / "red_circle.png").size == (64, 64)
