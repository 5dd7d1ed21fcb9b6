#!/usr/bin/env python
"""CRAFT stage 7 for SD1.5-family models: advantage-weighted fine-tuning, full UNet or LoRA.

    accelerate launch train_craft_sd15.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --train_data_dir filtered --output_dir craft-sd15 [--use_lora --rank 16] [--use_8bit_adam]

The loss is the standard denoising MSE (epsilon or v-prediction target) per sample, times the sample's weight
(crf_filter.py's advantage, column --weight_column; 1 when the set has none), averaged over the batch:

    L = mean_i [ w_i * s_i * || eps_theta(x_t, t, c_i) - target_i ||^2 / (C H W) ]

with s_i the min-SNR factor under --snr_gamma (else 1). No reference model, no KL: the short schedule and the small
learning rate keep the model close to the base. The paper's SD1.5 recipe: full UNet, AdamW, lr 5e-5, batch 128
(e.g. --train_batch_size 8 --gradient_accumulation_steps 16), 120 steps; the text encoder and VAE stay frozen
(--use_lora --train_text_encoder gives the text encoder a LoRA too).

Output: a full pipeline folder (full fine-tune) or pytorch_lora_weights.safetensors (--use_lora; with
--output_kohya_format also a kohya file), training_config.json, validation grids and a model card.
"""

import argparse

import craft_training as ct
import craft_utils as cu


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ct.add_training_args(parser, resolution=512)
    parser.add_argument("--use_lora", action="store_true", help="train a LoRA instead of the full UNet")
    parser.add_argument("--train_text_encoder", action="store_true",
                        help="with --use_lora: a LoRA on the text encoder too (captions are then encoded every step)")
    parser.add_argument("--use_ema", action="store_true", help="full fine-tune: keep an EMA of the UNet weights")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    args = ct.parse_training_args(parser, input_args)
    if args.use_ema and args.use_lora:
        parser.error("--use_ema applies to full fine-tuning, not --use_lora")
    if args.train_text_encoder and not args.use_lora:
        parser.error("--train_text_encoder adds a LoRA to the text encoder; use it with --use_lora")
    return args


def load_models(args):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"revision": args.revision}
    path = args.pretrained_model_name_or_path
    try:
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **common)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **common)
    except (OSError, ValueError) as error:
        cu.fail(f"could not load an SD1.5-style pipeline from {path} ({str(error).splitlines()[0]})")
    if unet.config.addition_embed_type == "text_time":
        cu.fail(f"{path} is an SDXL model; use train_craft_sdxl_lora.py")
    return scheduler, tokenizer, text_encoder, vae, unet


def main(args):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    accelerator = ct.make_accelerator(args)
    torch.manual_seed(args.seed)  # LoRA's initial weights
    examples, weights_note = ct.load_examples(args)  # every bad row is refused before a model loads
    scheduler, tokenizer, text_encoder, vae, unet = load_models(args)
    for frozen in (text_encoder, vae, unet):
        frozen.requires_grad_(False)
    vae.to(accelerator.device, ct.weight_dtype_of(accelerator))
    if args.use_lora:
        ct.add_lora(unet, args)
        if args.train_text_encoder:
            ct.add_text_encoder_lora((text_encoder,), args)
    else:
        unet.requires_grad_(True)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                   model_config=unet.config) if args.use_ema else None

    def encode_prompts(components, captions):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return {"prompt_embeds": components["text_encoder"](ids.to(accelerator.device))[0]}

    def unet_inputs(text, sizes, latents):
        return {"encoder_hidden_states": text["prompt_embeds"].to(latents.device)}

    seam = ct.ModelSeam(
        pipeline_class=StableDiffusionPipeline, components={"text_encoder": text_encoder, "tokenizer": tokenizer},
        encode_prompts=encode_prompts, unet_inputs=unet_inputs,
        pipeline_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False})
    ct.train(args, accelerator, unet, vae, scheduler, seam, examples, weights_note, ema)


if __name__ == "__main__":
    main(parse_args())
