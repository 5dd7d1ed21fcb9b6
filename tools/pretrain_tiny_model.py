#!/usr/bin/env python
"""Pretrain the demo's tiny text-to-image model on coloured shapes that it draws itself.

A random tiny pipeline turns every latent into the same noise, so no reward can move on it. This script trains an
SD1.5-style pipeline (64x64 images, 16x16 latents) from scratch: first the VAE on the drawings, then the UNet
together with the tiny CLIP text encoder on their latents (10% empty captions keep classifier-free guidance
working), then the VAE decoder alone. The text encoder trains here because a frozen random one binds colour words to
colours very slowly (the paper's fine-tunes keep it frozen; the demo's gives it a LoRA).

The captions are made like web-scale data, so that the model has what CRAFT fixes in real ones: half are short, "a
{colour} {shape} {place}", and name a wrong colour 55% of the time (`--short_caption_noise`), as alt-text is noisy;
the other half are detailed, repeat the colour ("a red red circle on the left", "a red circle on the left, red") and
are always right, as recaptioned data is. So, like Stable Diffusion, the model follows detailed prompts better than
short ones (`color` at guidance 3 on the demo's prompts: 0.36 to 0.47 for the short prompt, 0.60 to 0.75 for its
detailed forms, over three `make demo` seeds), and rewrites of a short prompt find the images it seldom gets right.
A model pretrained on clean captions drew the named colour 0.8 of the time, and no fine-tune on its own images,
CRAFT's or plain SFT, reliably raised that (README).

The decoder stage is for self-training: a fine-tune on the model's own images learns their re-encoded latents, so
what one VAE round trip loses (encode with a posterior sample, as the fine-tunes do, then decode) lands in the tuned
model. In an earlier version of this model a round trip kept 0.89 of the drawings' `color` (yellows turned orange)
without it, 0.98 with it (0.94 in this one, whose latents are 4x smaller). The encoder stays frozen there, so the
latent space the UNet learned does not move. Seeded: the same command on the same machine writes the same weights.

    python tools/pretrain_tiny_model.py /tmp/m --vae_steps 5 --unet_steps 5 --decoder_steps 5  # a quick check

The shipped models/tiny-shapes-sd15 is this script's defaults, run on 2 CPU cores (42 minutes):

    python tools/pretrain_tiny_model.py models/tiny-shapes-sd15
"""

import argparse
import math
import os
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from craft_reward_models import NAMED_COLOURS, NAMED_PLACES  # noqa: E402
from make_tiny_models import clip_text_config, make_clip_tokenizer, tiny_scheduler  # noqa: E402

COLOURS = NAMED_COLOURS
SHAPES = ("circle", "square", "triangle", "star")
DECODER_STEPS, DECODER_LR = 800, 1e-3
SHORT_CAPTION_NOISE = 0.55
PLACES = NAMED_PLACES


def draw(colour, shape, place, rng):
    """One 64x64 drawing: a shape of the named colour at the named place (jittered), on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    pen = ImageDraw.Draw(image)
    x, y = PLACES[place]
    x, y, r = x + rng.randint(-3, 3), y + rng.randint(-3, 3), rng.randint(9, 13)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        pen.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "triangle":
        pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:
        points = [(x + (r if i % 2 == 0 else r / 2.2) * math.sin(i * math.pi / 5),
                   y - (r if i % 2 == 0 else r / 2.2) * math.cos(i * math.pi / 5)) for i in range(10)]
        pen.polygon(points, fill=fill)
    return image


def detailed_captions(prompt):
    """The detailed forms of a short caption "a {colour} {shape} {place}": they repeat its colour."""
    colour = prompt.split()[1]
    stressed = prompt.replace(f" {colour} ", f" {colour} {colour} ", 1)
    return [stressed, f"{prompt}, {colour}", f"{stressed}, {colour}"]


def caption(colour, shape, place, rng, short_caption_noise):
    """Half the captions are short and, like web alt-text, name a wrong colour `short_caption_noise` of the time;
    the other half are detailed and always right (as recaptioned data is)."""
    if rng.random() < 0.5:
        if rng.random() < short_caption_noise:
            colour = rng.choice([c for c in COLOURS if c != colour])
        return f"a {colour} {shape} {place}"
    return rng.choice(detailed_captions(f"a {colour} {shape} {place}"))


def batch_of(size, rng, short_caption_noise=0.0):
    """Pixels in [-1, 1] and captions for `size` random drawings."""
    images, captions = [], []
    for _ in range(size):
        colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(PLACES))
        images.append(torch.from_numpy(np.asarray(draw(colour, shape, place, rng))))
        captions.append(caption(colour, shape, place, rng, short_caption_noise))
    pixels = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def train_vae(vae, steps, batch_size, device, rng, log):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0)
    for step in range(steps):
        pixels, _ = batch_of(batch_size, rng)
        pixels = pixels.to(device)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: reconstruction MSE {loss.item():.4f}")
    if not steps:
        return
    with torch.no_grad():  # scale latents to unit variance, as SD's scaling_factor does
        latents = vae.encode(batch_of(256, rng)[0].to(device)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))


def train_decoder(vae, steps, batch_size, device, rng, log):
    vae.requires_grad_(False)
    vae.post_quant_conv.requires_grad_(True)
    vae.decoder.requires_grad_(True)
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=DECODER_LR, weight_decay=0)
    for step in range(steps):
        pixels, _ = batch_of(batch_size, rng)
        pixels = pixels.to(device)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample()
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, pixels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step}: reconstruction MSE {loss.item():.4f}")
    vae.requires_grad_(False)


def train_unet(unet, vae, text_encoder, tokenizer, scheduler, steps, batch_size, short_caption_noise, device, rng,
               log):
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(
        math.pi * s / max(steps, 1))))
    generator = torch.Generator().manual_seed(rng.randint(0, 2**31))
    for step in range(steps):
        pixels, captions = batch_of(batch_size, rng, short_caption_noise)
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(pixels.to(device)).latent_dist.sample(generator=None) * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = text_encoder(ids.to(device))[0]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator).to(device)
        prediction = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--vae_steps", type=int, default=300)
    parser.add_argument("--unet_steps", type=int, default=2500)
    parser.add_argument("--decoder_steps", type=int, default=DECODER_STEPS)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--short_caption_noise", type=float, default=SHORT_CAPTION_NOISE,
                        help="share of the short captions that name a wrong colour")
    parser.add_argument("--init_from", help="start from this pipeline's weights instead of random ones")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    if args.init_from:
        start = StableDiffusionPipeline.from_pretrained(args.init_from)
        tokenizer, text_encoder, vae, unet = start.tokenizer, start.text_encoder, start.vae, start.unet
        scheduler = start.scheduler
    else:
        tokenizer = make_clip_tokenizer(os.path.join(args.output_dir, "tokenizer"))
        text_encoder = CLIPTextModel(clip_text_config(len(tokenizer)))
        # Three VAE levels (64x64 pixels -> 16x16 latents): a quarter of the UNet's work per step of a 2-level one.
        vae = AutoencoderKL(
            block_out_channels=(32, 64, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
            norm_num_groups=32)
        scheduler = tiny_scheduler()
    text_encoder, vae, unet = text_encoder.to(device).train(), vae.to(device).train(), unet.to(device).train()
    train_vae(vae, args.vae_steps, args.batch_size, device, rng, log)
    vae.eval().requires_grad_(False)
    train_unet(unet, vae, text_encoder, tokenizer, scheduler, args.unet_steps, args.batch_size,
               args.short_caption_noise, device, rng, log)
    train_decoder(vae, args.decoder_steps, args.batch_size, device, rng, log)
    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.to("cpu").save_pretrained(args.output_dir)
    log(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
