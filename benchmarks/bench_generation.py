#!/usr/bin/env python
"""Generation throughput: generate_candidates.py's loop vs a plain per-image loop over the same pipeline.

Both make the same images (same prompts, rewrites, seeds, steps, guidance, size) from the same pipeline object in
one run, and both save PNGs; the plain loop is what a user writes by hand: one `pipe(prompt, generator)` call per
image. Prints images/s of each and the ratio (and, on a GPU, the peak memory of our loop).

    python benchmarks/bench_generation.py --pretrained_model_name_or_path ZOO/sd15          # tiny, CPU
    python benchmarks/bench_generation.py --real_size sdxl --mixed_precision bf16 --steps 20  # GPU, random weights
"""

import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import craft_generation as cg  # noqa: E402
import craft_utils as cu  # noqa: E402
from generate_candidates import template_variants  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a small dog on the beach", "a castle on a mountain at night",
           "a portrait of a woman, oil painting", "a robot in a city street", "a boat on the river at sunset",
           "a yellow bird in a tree", "a green dragon in the sky"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", help="a pipeline folder or Hub id")
    parser.add_argument("--real_size", choices=["sd15", "sdxl"], help="real-size random-weight model instead")
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder for --real_size (default: a fresh tiny one)")
    parser.add_argument("--num_prompts", type=int, default=4)
    parser.add_argument("--num_variants", type=int, default=1)
    parser.add_argument("--num_images_per_prompt", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, help="image size (default: the model's native size)")
    parser.add_argument("--mixed_precision", choices=sorted(cu.TORCH_DTYPES), default="no")
    return parser.parse_args()


def main():
    args = parse_args()
    state = cu.process_state()
    dtype = getattr(torch, cu.TORCH_DTYPES[args.mixed_precision])
    if args.real_size:
        from transformers import CLIPTokenizer

        from real_size_models import real_size_pipeline

        if args.tokenizer:
            tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
        else:
            from make_tiny_models import make_clip_tokenizer

            tokenizer = make_clip_tokenizer(tempfile.mkdtemp())
        pipe = real_size_pipeline(args.real_size, tokenizer, state.device, dtype)
        name = f"{args.real_size} real size, random weights"
    else:
        pipe = cg.load_pipeline(SimpleNamespace(
            pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=None, variant=None,
            pretrained_vae_model_name_or_path=None, lora_path=None, scheduler=None,
            mixed_precision=args.mixed_precision), state.device)
        name = args.pretrained_model_name_or_path
    size = args.resolution or cg.native_size(pipe)
    settings = SimpleNamespace(num_variants=args.num_variants, seed=0, batch_size=args.batch_size,
                               num_inference_steps=args.steps, guidance_scale=7.5, height=size, width=size)
    prompts = (PROMPTS * args.num_prompts)[: args.num_prompts]
    groups = [(p, [p] + template_variants(p, g, settings)) for g, p in enumerate(prompts)]
    planned = cu.plan_images(groups, args.num_images_per_prompt, seed=0)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def plain_loop(rows, folder):
        for row in rows:
            image = pipe(row["text"], generator=torch.Generator("cpu").manual_seed(row["seed"]),
                         num_inference_steps=args.steps, guidance_scale=7.5, height=size, width=size).images[0]
            image.save(os.path.join(folder, row["file_name"]))

    with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as plain, \
            tempfile.TemporaryDirectory() as ours:
        plain_loop(planned[:1], warm)  # warm-up: kernels, allocator, caches
        sync()
        started = time.perf_counter()
        plain_loop(planned, plain)
        sync()
        plain_seconds = time.perf_counter() - started
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        cg.generate_images(pipe, planned, ours, settings, state)
        sync()
        ours_seconds = time.perf_counter() - started

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    n = len(planned)
    print(f"model: {name}; device: {device}; {n} images {size}x{size}, {args.steps} steps, "
          f"{args.mixed_precision}, batch {args.batch_size}")
    print(f"plain loop:          {n / plain_seconds:8.3f} img/s")
    print(f"generate_candidates: {n / ours_seconds:8.3f} img/s")
    print(f"ratio (ours / plain): {plain_seconds / ours_seconds:.2f}x")
    if torch.cuda.is_available():
        print(f"peak GPU memory (generate_candidates): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
