#!/usr/bin/env python
"""Generation throughput: generate_candidates.py's loop vs a plain per-image loop, then each speed option.

Every run makes the same images (same prompts, rewrites, seeds, steps, guidance, size) and saves PNGs; the plain loop
is what a user writes by hand: one `pipe(prompt, generator)` call per image. Then each option of the `speed and
memory` flags gets a freshly loaded pipeline (the scripts' own cp.load_pipeline) and the same plan, and the table
shows images/s, the first batch's seconds (where --compile compiles), peak GPU memory, and how far its images are
from the default path's (max pixel difference and PSNR; 0 / inf = bit-identical). The denoiser's FLOPs per image
are counted once with torch's FLOP counter; FLOPs x images/s is the denoiser's achieved TFLOP/s, shown against the
card's dense bf16 peak where the card is known (--peak_tflops for another).

    python benchmarks/bench_generation.py --pretrained_model_name_or_path ZOO/sd15          # tiny, CPU
    python benchmarks/bench_generation.py --real_size sdxl --mixed_precision bf16 --steps 20  # GPU, random weights
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import craft_generation as cg  # noqa: E402
import craft_pipelines as cp  # noqa: E402
import craft_utils as cu  # noqa: E402
from generate_candidates import template_variants  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a small dog on the beach", "a castle on a mountain at night",
           "a portrait of a woman, oil painting", "a robot in a city street", "a boat on the river at sunset",
           "a yellow bird in a tree", "a green dragon in the sky"]
# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets; H100 is the SXM card's (PCIe
# and NVL are lower: pass --peak_tflops)
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "RTX 4090": 165, "L4": 121}
OPTIONS = {  # name -> the flags it sets; "default" is generate_candidates.py without any
    "default": {},
    "compile": {"compile": True},
    "fuse_qkv_projections": {"fuse_qkv_projections": True},
    "channels_last": {"channels_last": True},
    "sdpa_math": {"sdpa_backend": "math"},
    "vae_slicing": {"vae_slicing": True},
    "compile+fuse+channels_last": {"compile": True, "fuse_qkv_projections": True, "channels_last": True},
    "model_cpu_offload": {"enable_model_cpu_offload": True},  # GPU only
    "sequential_cpu_offload": {"enable_sequential_cpu_offload": True},  # GPU only
}


def parse_args(argv=None):
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
    parser.add_argument("--options", default="all",
                        help=f"comma-separated, from {', '.join(OPTIONS)}; 'all' (the offloads on a GPU only), "
                             "'none' for the plain loop and the default path alone")
    parser.add_argument("--peak_tflops", type=float, help="the card's dense bf16 peak, if it is not in the table")
    return parser.parse_args(argv)


def pipeline_folder(args, work, device):
    """A pipeline on disk, so that every option loads it the way the scripts do."""
    if not args.real_size:
        return args.pretrained_model_name_or_path
    from transformers import CLIPTokenizer

    from real_size_models import real_size_pipeline

    if args.tokenizer:
        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    else:
        from make_tiny_models import make_clip_tokenizer

        tokenizer = make_clip_tokenizer(os.path.join(work, "tokenizer"))
    dtype = getattr(torch, cu.TORCH_DTYPES[args.mixed_precision])
    pipe = real_size_pipeline(args.real_size, tokenizer, device, dtype)
    pipe.save_pretrained(os.path.join(work, args.real_size))
    del pipe
    torch.cuda.empty_cache()
    return os.path.join(work, args.real_size)


def generation_args(path, args, **option):
    """generate_candidates.py's generation flags at their defaults (the scripts' own parser), then the run's."""
    parser = argparse.ArgumentParser()
    cg.add_generation_args(parser)
    defaults = vars(parser.parse_args(["--pretrained_model_name_or_path", path]))
    return SimpleNamespace(**{**defaults, "mixed_precision": args.mixed_precision, "num_inference_steps": args.steps,
                              "guidance_scale": 7.5, "batch_size": args.batch_size, "num_variants": args.num_variants,
                              **option})


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def denoiser_flops_per_image(pipe, settings, size):
    """Every denoiser forward of one image (both CFG halves at every step), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    denoiser = cp.denoiser_of(pipe)
    with FlopCounterMode(display=False) as counter:
        pipe(PROMPTS[0], generator=torch.Generator("cpu").manual_seed(0), height=size, width=size,
             num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
             output_type="latent")
    return sum(counter.get_flop_counts()[type(denoiser).__name__].values())


def image_distance(folder, reference):
    """Max absolute pixel difference and PSNR (dB) over the images of two folders."""
    worst, squared, count = 0, 0.0, 0
    for name in sorted(os.listdir(reference)):
        if name.endswith(".png"):
            a = np.asarray(Image.open(os.path.join(folder, name)), dtype=np.float64)
            b = np.asarray(Image.open(os.path.join(reference, name)), dtype=np.float64)
            worst, squared, count = max(worst, int(np.abs(a - b).max())), squared + ((a - b) ** 2).sum(), count + a.size
    mse = squared / count
    return worst, math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def main():
    args = parse_args()
    state = cu.process_state()
    gpu = torch.cuda.is_available()
    names = [name for name in OPTIONS if gpu or "offload" not in name] if args.options == "all" else \
        ["default"] if args.options == "none" else ["default"] + [n for n in args.options.split(",") if n != "default"]
    unknown = [name for name in names if name not in OPTIONS]
    if unknown:
        raise SystemExit(f"--options: unknown {unknown[0]}; choose from {', '.join(OPTIONS)}")
    work = tempfile.mkdtemp()
    path = pipeline_folder(args, work, state.device)
    pipe = cp.load_pipeline(generation_args(path, args), state.device)
    size = args.resolution or cp.native_size(pipe)
    settings = generation_args(path, args, height=size, width=size)
    prompts = (PROMPTS * args.num_prompts)[: args.num_prompts]
    groups = [(p, [p] + template_variants(p, g, settings)) for g, p in enumerate(prompts)]
    planned = cg.plan_images(groups, args.num_images_per_prompt, seed=0)
    warm_up = [dict(row, file_name="warm-" + row["file_name"]) for row in planned[: args.batch_size]]
    flops = denoiser_flops_per_image(pipe, settings, size)

    def plain_loop(rows, folder):
        for row in rows:
            image = pipe(row["text"], generator=torch.Generator("cpu").manual_seed(row["seed"]),
                         num_inference_steps=args.steps, guidance_scale=7.5, height=size, width=size).images[0]
            image.save(os.path.join(folder, row["file_name"]))

    plain = os.path.join(work, "plain")
    os.makedirs(plain)
    plain_loop(planned[:1], plain)  # warm-up: kernels, allocator, caches
    sync()
    started = time.perf_counter()
    plain_loop(planned, plain)
    sync()
    plain_rate = len(planned) / (time.perf_counter() - started)

    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    peak = args.peak_tflops or next((p for card, p in PEAK_TFLOPS.items() if gpu and card in device), None)
    print(f"model: {args.real_size or path}; device: {device}; {len(planned)} images {size}x{size}, {args.steps} "
          f"steps, {args.mixed_precision}, batch {args.batch_size}; denoiser {flops / 1e9:.6g} GFLOP per image")
    print(f"plain loop: {plain_rate:.3f} img/s")
    print(f"{'option':28s} {'img/s':>8s} {'x plain':>8s} {'first batch s':>13s} {'peak GiB':>9s} "
          f"{'denoiser TFLOP/s':>16s} {'of peak':>8s} {'max |px diff|':>13s} {'PSNR dB':>8s}")
    for name in names:
        if name != "default":
            del pipe
            if gpu:
                torch.cuda.empty_cache()
            pipe = cp.load_pipeline(generation_args(path, args, **OPTIONS[name]), state.device)
        run = generation_args(path, args, height=size, width=size, **OPTIONS[name])
        folder = os.path.join(work, name)
        os.makedirs(folder)
        started = time.perf_counter()
        cg.generate_images(pipe, warm_up, folder, run, state)  # --compile compiles here
        sync()
        first_batch = time.perf_counter() - started
        shutil.rmtree(folder)
        os.makedirs(folder)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        cg.generate_images(pipe, planned, folder, run, state)
        sync()
        rate = len(planned) / (time.perf_counter() - started)
        memory = f"{torch.cuda.max_memory_allocated() / 2 ** 30:9.2f}" if gpu else f"{'-':>9s}"
        achieved = flops * rate / 1e12
        share = f"{achieved / peak:8.1%}" if peak else f"{'-':>8s}"
        worst, psnr = image_distance(folder, os.path.join(work, "default"))
        print(f"{name:28s} {rate:8.3f} {rate / plain_rate:7.2f}x {first_batch:13.1f} {memory} {achieved:16.3f} "
              f"{share} {worst:13d} {psnr:8.1f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
