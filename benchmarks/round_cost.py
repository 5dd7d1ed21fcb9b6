#!/usr/bin/env python
"""GPU-hours of one CRAFT round at the paper's scale, from measured rates, beside the paper's ~4 H100-hours.

A round: 10,000 prompts x (1 original + K rewrites) x seeds images generated, each scored by the training rewards
(HPSv2.1, PickScore, aesthetic), then the fine-tune (batch 128: 120 steps SD1.5, 200 SDXL). The defaults are the
rates measured on an H100 80GB with real-size random-weight models (docs/benchmarks.md: bench_generation.py at
20 steps bf16, bench_rewards.py fp16 batch 16, bench_training.py batch 1 with checkpointing); pass your own
measurements to price another card or setting.

    python benchmarks/round_cost.py
    python benchmarks/round_cost.py --generation_img_s sdxl=1.9     # the issue's 2x generation target
"""

import argparse

PAPER_GPU_HOURS = 4.0  # the paper's whole-method figure for SDXL, H100-hours
MEASURED = {  # H100 80GB, real-size architectures, random weights (docs/benchmarks.md)
    "generation_img_s": {"sd15": 4.33, "sdxl": 0.93},  # 512 / 1024 px, 20 steps, bf16, batch 8 / 4
    "scoring_img_s": {"hpsv2.1": 189, "pickscore": 259, "aesthetic": 362},  # fp16, batch 16, images in memory
    "training_s_per_image": {"sd15": 0.255, "sdxl": 1.039},  # full FT 8-bit Adam / LoRA r16, batch 1, checkpointing
}
TRAINING_STEPS = {"sd15": 120, "sdxl": 200}  # the paper's, at batch 128


def rates(text, defaults):
    """'sdxl=1.9,sd15=8' over the defaults."""
    values = dict(defaults)
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise SystemExit(f"unknown key {key!r}; one of {', '.join(defaults)}")
        values[key] = float(value)
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_prompts", type=int, default=10_000)
    parser.add_argument("--num_variants", type=int, default=3, help="rewrites per prompt (K)")
    parser.add_argument("--num_images_per_prompt", type=int, default=2, help="seeds per prompt text")
    parser.add_argument("--batch_size", type=int, default=128, help="training images per optimizer step")
    for name in MEASURED:
        parser.add_argument(f"--{name}", help=f"e.g. {','.join(f'{k}={v}' for k, v in MEASURED[name].items())}")
    args = parser.parse_args()

    generation = rates(args.generation_img_s, MEASURED["generation_img_s"])
    scoring = rates(args.scoring_img_s, MEASURED["scoring_img_s"])
    training = rates(args.training_s_per_image, MEASURED["training_s_per_image"])
    images = args.num_prompts * (1 + args.num_variants) * args.num_images_per_prompt
    print(f"one round: {args.num_prompts:,} prompts x {1 + args.num_variants} texts x {args.num_images_per_prompt} "
          f"seeds = {images:,} images; scored by {', '.join(scoring)}; trained at batch {args.batch_size}")
    print(f"{'stage':34s} {'SD1.5 GPU-h':>12s} {'SDXL GPU-h':>12s}")
    hours = {}
    for model in ("sd15", "sdxl"):
        hours[model] = {
            "generation": images / generation[model] / 3600,
            "scoring": images * sum(1 / rate for rate in scoring.values()) / 3600,
            "training": TRAINING_STEPS[model] * args.batch_size * training[model] / 3600,
        }
    for stage in ("generation", "scoring", "training"):
        print(f"{stage:34s} {hours['sd15'][stage]:12.2f} {hours['sdxl'][stage]:12.2f}")
    totals = {model: sum(stages.values()) for model, stages in hours.items()}
    print(f"{'total':34s} {totals['sd15']:12.2f} {totals['sdxl']:12.2f}")
    print(f"{'the paper (whole method, SDXL)':34s} {'':>12s} {PAPER_GPU_HOURS:12.2f}")
    print(f"SDXL: {totals['sdxl'] / PAPER_GPU_HOURS:.1f}x the paper's figure; generation is "
          f"{hours['sdxl']['generation'] / totals['sdxl']:.0%} of it")


if __name__ == "__main__":
    main()
