"""What the README and docs/stages.md show, run as written (the tiny-model walk-through) or parsed by the scripts'
own parsers (the commands for real models), so neither can rot."""

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


def walkthrough_commands():
    with open(os.path.join(REPO, "docs", "stages.md")) as f:
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
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough_commands()], cwd=tmp_path, env=env,
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


def test_the_readme_commands_for_real_models_parse_and_name_each_family_s_base_model():
    """Every command of the README's "Align your model" parses with its script's own parser (an unknown flag or a
    bad value exits there), and the family table names each trainer's own default base model."""
    import importlib
    import shlex

    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Align your model", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", section, re.S)
                for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    scripts = []
    for command in commands:
        script = next(word for word in command if word.endswith(".py"))
        module = importlib.import_module(script[:-3])
        module.parse_args(command[command.index(script) + 1:])
        scripts.append(script)
    assert scripts == ["generate_candidates.py", "eval_rewards.py", "crf_filter.py", "train_craft_sdxl_lora.py",
                       "eval_rewards.py", "eval_rewards.py"]
    for trainer in ("train_craft_sd15", "train_craft_sdxl_lora", "train_craft_flux_lora", "train_craft_zimage_lora",
                    "train_craft_flux2_klein_lora"):
        module = importlib.import_module(trainer)
        assert f"| `{trainer}.py`" in section and f"| `{module.BASE_MODEL}` |" in section
