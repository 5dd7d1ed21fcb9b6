#!/usr/bin/env python
"""Reward scoring throughput: images/s per reward at batch 1 vs --batch_size, in one run; prints the ratio (and, on
a GPU, the peak memory of the batched run, the reward model included).

Rewards load through craft_rewards from files in the real formats: the tiny zoo (--zoo DIR), or the real
architectures with random weights (--real_size; written to a temp folder first: HPSv2.1 = open_clip ViT-H-14,
PickScore = CLIP ViT-H/14, aesthetic and CLIP score = CLIP ViT-L/14, ImageReward = BLIP ViT-L/16 + BERT-base).
Speed does not depend on the weight values.

    python benchmarks/bench_rewards.py --zoo /tmp/zoo                                   # CPU
    python benchmarks/bench_rewards.py --real_size --zoo /tmp/zoo --reward_precision fp16  # GPU
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
import craft_reward_models as cm  # noqa: E402
import craft_rewards as cr  # noqa: E402
import craft_utils as cu  # noqa: E402
from make_tiny_models import make_aesthetic, reward_flags  # noqa: E402

CLIP_L = dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
              vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          patch_size=14), projection_dim=768)
CLIP_H = dict(text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
              vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                          patch_size=14), projection_dim=1024)


def write_clip(folder, sizes, zoo):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    text = dict(sizes["text"], vocab_size=49408, max_position_embeddings=77, projection_dim=sizes["projection_dim"])
    vision = dict(sizes["vision"], image_size=224, projection_dim=sizes["projection_dim"])
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes["projection_dim"])
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor.from_pretrained(os.path.join(zoo, "clip"))
    processor.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(zoo, "clip_tokenizer"))
    processor.save_pretrained(folder)


def real_size_flags(zoo, folder):
    """Write every reward's files at real size; returns the flags that point the rewards at them."""
    import open_clip

    model = open_clip.create_model("ViT-H-14", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, os.path.join(folder, "hps.pt"))
    del model
    write_clip(os.path.join(folder, "clip_h"), CLIP_H, zoo)
    write_clip(os.path.join(folder, "clip_l"), CLIP_L, zoo)
    make_aesthetic(folder)
    med_config = dict(json.load(open(os.path.join(zoo, "imagereward", "med_config.json"))), hidden_size=768,
                      intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=30524,
                      max_position_embeddings=512, encoder_width=1024)
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump(med_config, f)
    tokenizer = os.path.join(zoo, "imagereward", "tokenizer")
    image_reward = cm.build_image_reward(os.path.join(folder, "med_config.json"), tokenizer, (1024, 24, 16))
    torch.save(image_reward.state_dict(), os.path.join(folder, "ImageReward.pt"))
    return ["--hpsv2_checkpoint", os.path.join(folder, "hps.pt"), "--hps_model", "ViT-H-14",
            "--pickscore_model", os.path.join(folder, "clip_h"), "--pickscore_processor", os.path.join(folder, "clip_h"),
            "--aesthetic_checkpoint", os.path.join(folder, "sac+logos+ava1-l14-linearMSE.pth"),
            "--aesthetic_clip_model", os.path.join(folder, "clip_l"), "--clip_model", os.path.join(folder, "clip_l"),
            "--imagereward_checkpoint", os.path.join(folder, "ImageReward.pt"),
            "--imagereward_med_config", os.path.join(folder, "med_config.json"), "--imagereward_tokenizer", tokenizer]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True, help="the tiny zoo (tools/make_tiny_models.py)")
    parser.add_argument("--real_size", action="store_true", help="real architectures, random weights")
    parser.add_argument("--rewards", default="hpsv2.1,pickscore,aesthetic,imagereward,clip,jpeg")
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--reward_precision", choices=sorted(cu.TORCH_DTYPES), default="no")
    parser.add_argument("--image_decode_workers", type=int, default=4,
                        help="also score the images from a folder of PNGs, decoded in turn vs by this many threads")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = tempfile.mkdtemp()
    flags = real_size_flags(args.zoo, workdir) if args.real_size else reward_flags(args.zoo)
    reward_parser = argparse.ArgumentParser()
    cr.add_reward_args(reward_parser)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
              for _ in range(args.num_images)]
    prompts = ["a photo of a red circle on a blue background, highly detailed"] * args.num_images
    name_of_device = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name_of_device}; {'real-size' if args.real_size else 'tiny zoo'} models, "
          f"{args.num_images} images {args.image_size}px, precision {args.reward_precision}")
    print(f"{'reward':12s} {'batch 1 img/s':>14s} {f'batch {args.batch_size} img/s':>16s} {'ratio':>7s}"
          + ("  peak GiB" if device == "cuda" else ""))
    for name in cr.parse_reward_names(args.rewards):
        rates = []
        for batch_size in (1, args.batch_size):
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            reward_args = reward_parser.parse_args(flags + ["--reward_batch_size", str(batch_size),
                                                            "--reward_precision", args.reward_precision])
            reward = cm.load_reward(name, reward_args, device)
            reward(images[:batch_size], prompts[:batch_size])  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            reward(images, prompts)
            if device == "cuda":
                torch.cuda.synchronize()
            rates.append(args.num_images / (time.perf_counter() - started))
            del reward
        peak = f"  {torch.cuda.max_memory_allocated() / 2**30:8.2f}" if device == "cuda" else ""
        print(f"{name:12s} {rates[0]:14.2f} {rates[1]:16.2f} {rates[1] / rates[0]:6.2f}x{peak}", flush=True)
    if args.image_decode_workers:
        from_disk(args, images, prompts, reward_parser, flags, device, workdir)


def from_disk(args, images, prompts, reward_parser, flags, device, workdir):
    """The same images as PNG files in an imagefolder, scored through craft_rewards' own reading path: decoded in
    turn (the way before) vs by --image_decode_workers threads ahead of the reward model, at --batch_size."""
    folder = os.path.join(workdir, "pngs")
    os.makedirs(folder)
    for index, image in enumerate(images):
        image.save(os.path.join(folder, f"{index:05d}.png"))
    cu.write_jsonl_atomic(os.path.join(folder, cu.METADATA), [{"file_name": f"{index:05d}.png", "text": prompt}
                                                              for index, prompt in enumerate(prompts)])
    rows = cr.read_folder(folder, "text")
    batches = [rows[i: i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    print(f"\nfrom {len(rows)} PNG files, batch {args.batch_size}:")
    print(f"{'reward':12s} {'decoded in turn':>16s} {f'{args.image_decode_workers} decode threads':>18s} {'ratio':>7s}")
    for name in cr.parse_reward_names(args.rewards):
        reward = cm.load_reward(name, reward_parser.parse_args(
            flags + ["--reward_batch_size", str(args.batch_size), "--reward_precision", args.reward_precision]), device)
        reward(images[:args.batch_size], prompts[:args.batch_size])  # warm-up
        rates = []
        for workers in (0, args.image_decode_workers):
            started = time.perf_counter()
            for batch, decoded in zip(batches, cr.decoded_ahead(batches, folder, workers)):
                reward(decoded, [row["_text"] for row in batch])
            if device == "cuda":
                torch.cuda.synchronize()
            rates.append(len(rows) / (time.perf_counter() - started))
        print(f"{name:12s} {rates[0]:12.2f} img/s {rates[1]:12.2f} img/s {rates[1] / rates[0]:6.2f}x", flush=True)
        del reward


if __name__ == "__main__":
    main()
