"""The generation and round-cost benchmarks: their figures against values computed here."""

import os
import re
import shlex
import sys

import torch

from conftest import REPO, run_script


def test_round_cost_adds_up_the_stages_by_hand():
    # 3,600 images; 1 img/s (SD1.5) and 0.5 (SDXL) = 1 h and 2 h; three rewards at 3 img/s = 1 h; 120 and 200 steps
    # of 128 images at 3600 / 15360 and 7200 / 25600 s each = 1 h and 2 h
    result = run_script("benchmarks/round_cost.py", "--num_prompts", 3600, "--num_variants", 0,
                        "--num_images_per_prompt", 1, "--generation_img_s", "sd15=1,sdxl=0.5",
                        "--scoring_img_s", "hpsv2.1=3,pickscore=3,aesthetic=3",
                        "--training_s_per_image", f"sd15={3600 / 15360},sdxl={7200 / 25600}")
    rows = {line[:34].strip(): line[34:].split() for line in result.stdout.splitlines()}
    assert rows["generation"] == ["1.00", "2.00"] and rows["scoring"] == ["1.00", "1.00"]
    assert rows["training"] == ["1.00", "2.00"] and rows["total"] == ["3.00", "5.00"]
    assert "SDXL: 1.2x the paper's figure; generation is 40% of it" in result.stdout


def test_bench_generation_counts_the_denoisers_flops_and_compares_each_option(zoo):
    """FLOPs per image = steps x one UNet forward on the CFG batch of 2, counted here; the default path is
    bit-identical to itself and an option's row shows its distance from it."""
    from diffusers import StableDiffusionPipeline
    from torch.utils.flop_counter import FlopCounterMode

    result = run_script("benchmarks/bench_generation.py", "--pretrained_model_name_or_path", zoo / "sd15",
                        "--num_prompts", 2, "--steps", 3, "--batch_size", 4, "--options",
                        "default,fuse_qkv_projections")
    unet = StableDiffusionPipeline.from_pretrained(zoo / "sd15").unet
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        size = unet.config.sample_size  # the latents of the native 64 px image
        unet(torch.randn(2, 4, size, size), torch.tensor([1, 1]), encoder_hidden_states=torch.randn(2, 77, 32))
    printed = float(re.search(r"denoiser ([\d.e+]+) GFLOP per image", result.stdout).group(1))
    assert abs(printed - 3 * counter.get_total_flops() / 1e9) < 1e-5 * printed
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[3:]}
    assert rows["default"][-2:] == ["0", "inf"] and float(rows["default"][1]) > 0
    assert 0 <= int(rows["fuse_qkv_projections"][-2]) <= 2 and float(rows["fuse_qkv_projections"][1]) > 0


def test_the_gpu_benchmarks_script_runs_only_flags_configurations_and_options_that_exist():
    """benchmarks/run_gpu_benchmarks.sh runs on a GPU owner's machine, rarely and within a budget: every benchmark
    command in it must parse with that benchmark's own parser and name options and configurations the benchmark has,
    and the runs' time limits together must fit its default budget."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench_generation
    import bench_rewards
    import bench_training

    text = open(os.path.join(REPO, "benchmarks", "run_gpu_benchmarks.sh")).read().replace("\\\n", " ")
    arrays = {name: value for name, value in re.findall(r"^(\w+)=\((.*)\)$", text, re.M)}
    commands = [shlex.split(re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: arrays[m.group(1)], line))
                for line in re.findall(r"python3 (benchmarks/bench_\w+\.py .*)", text)]
    parsers = {"bench_generation": bench_generation.parse_args, "bench_rewards": bench_rewards.parse_args,
               "bench_training": bench_training.parse_args}
    assert {os.path.basename(c[0])[:-3] for c in commands} == set(parsers) and len(commands) == 8
    for script, *argv in commands:
        args = parsers[os.path.basename(script)[:-3]](argv)  # an unknown flag or value exits here
        if "--options" in argv:
            assert set(args.options.split(",")) <= set(bench_generation.OPTIONS), argv
        if "--configs" in argv:
            names = bench_training.configurations(args.real_size)
            assert all(any(name.startswith(p) for name in names) for p in args.configs.split(",")), argv
    budget = int(re.search(r"\$\{1:-(\d+)\}", text).group(1))
    limits = [int(limit) for limit in re.findall(r'^\s*(?:\[.*\] \|\| )?run "[^"]*" (\d+)', text, re.M)]
    assert len(limits) == 9 and sum(limits) <= budget, (limits, budget)


def test_real_size_z_image_and_klein_have_the_published_sizes(zoo):
    """bench_training's real-size Z-Image and FLUX.2 [klein] 4B, built on the meta device (no memory): the parameter
    counts of the published checkpoints (Z-Image's transformer 6.15B, klein base 4B's 3.88B, Qwen3-4B 4.02B)."""
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from real_size_models import real_size_flux2_klein, real_size_zimage

    tokenizer = PreTrainedTokenizerFast.from_pretrained(zoo / "qwen_tokenizer")
    zimage = real_size_zimage(tokenizer, "meta", torch.bfloat16)
    klein = real_size_flux2_klein(tokenizer, "meta", torch.bfloat16)

    def billions(model):
        return round(sum(p.numel() for p in model.parameters()) / 1e9, 2)

    assert (billions(zimage.transformer), billions(zimage.text_encoder)) == (6.15, 4.02)
    assert (billions(klein.transformer), billions(klein.text_encoder)) == (3.88, 4.02)
    assert (zimage.vae.config.latent_channels, klein.vae.config.latent_channels) == (16, 32)
