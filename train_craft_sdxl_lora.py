#!/usr/bin/env python
"""CRAFT stage 7 for SDXL: advantage-weighted LoRA fine-tuning that fits a consumer GPU.

    accelerate launch train_craft_sdxl_lora.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix --train_data_dir filtered \\
      --mixed_precision bf16 --use_8bit_adam --gradient_checkpointing --rank 16 --output_dir craft-sdxl-lora

The loss is train_craft_sd15.py's: per-sample denoising MSE times the sample's CRAFT weight, averaged over the batch.
CRAFT's sets are tiny (~100 images), so latents and both text encoders' embeddings are computed once and the VAE and
text encoders leave the GPU (unlike diffusers' SDXL LoRA script, which re-encodes every step); with
--train_text_encoder the encoders get LoRAs too and the captions are encoded every step. Each sample keeps its own
SDXL micro-conditioning: original size, crop top-left (mirrored by a flip) and target size.

Output: pytorch_lora_weights.safetensors (StableDiffusionXLPipeline.load_lora_weights reads it), with
--output_kohya_format a kohya file for A1111/ComfyUI, training_config.json, validation grids and a model card.
"""

import argparse

import craft_training as ct
import craft_utils as cu


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ct.add_training_args(parser, resolution=1024)
    parser.add_argument("--pretrained_vae_model_name_or_path",
                        help="a VAE that works in fp16 (madebyollin/sdxl-vae-fp16-fix); without it the VAE stays fp32")
    parser.add_argument("--train_text_encoder", action="store_true",
                        help="LoRA on both text encoders too (captions are then encoded every step)")
    parser.set_defaults(learning_rate=1e-4)
    return ct.parse_training_args(parser, input_args)


def text_encoder_class(path, subfolder, revision):
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, subfolder=subfolder, revision=revision)
    return getattr(transformers, config.architectures[0])


def load_models(args):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    try:
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant)
        if unet.config.addition_embed_type != "text_time":
            cu.fail(f"{path} is an SD1.5-style model (no SDXL micro-conditioning); use train_craft_sd15.py")
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=f, revision=revision, use_fast=False)
                      for f in ("tokenizer", "tokenizer_2")]
        encoders = [text_encoder_class(path, f, revision).from_pretrained(path, subfolder=f, revision=revision,
                                                                         variant=variant)
                    for f in ("text_encoder", "text_encoder_2")]
        vae_path = args.pretrained_vae_model_name_or_path or path
        vae = AutoencoderKL.from_pretrained(vae_path, subfolder=None if args.pretrained_vae_model_name_or_path
                                            else "vae", revision=revision, variant=variant)
    except (OSError, ValueError) as error:
        cu.fail(f"could not load an SDXL pipeline from {path} ({str(error).splitlines()[0]})")
    return scheduler, tokenizers, encoders, vae, unet


def time_ids(sizes, resolution):
    """SDXL micro-conditioning, one row per sample: original (h, w), crop top-left (y, x), target (h, w)."""
    import torch

    return torch.tensor([[*original, *crop, resolution, resolution]
                         for original, crop in zip(sizes["original_size"], sizes["crop_top_left"])], dtype=torch.float32)


def main(args):
    import torch
    from diffusers import StableDiffusionXLPipeline

    accelerator = ct.make_accelerator(args)
    torch.manual_seed(args.seed)  # LoRA's initial weights
    examples, weights_note = ct.load_examples(args)  # every bad row is refused before a model loads
    scheduler, (tokenizer, tokenizer_2), (text_encoder, text_encoder_2), vae, unet = load_models(args)
    for frozen in (text_encoder, text_encoder_2, vae, unet):
        frozen.requires_grad_(False)
    # the SDXL VAE overflows in fp16 (NaN, black images): fp32 unless a VAE made for fp16 is given
    vae_dtype = ct.weight_dtype_of(accelerator) if args.pretrained_vae_model_name_or_path else torch.float32
    vae.to(accelerator.device, vae_dtype)
    ct.add_lora(unet, args)
    if args.train_text_encoder:
        ct.add_text_encoder_lora((text_encoder, text_encoder_2), args)

    def encode_prompts(components, captions):
        """Penultimate hidden states of both encoders, concatenated; the pooled embedding of the second."""
        embeds = []
        for tokenizer_, encoder in ((tokenizer, components["text_encoder"]),
                                    (tokenizer_2, components["text_encoder_2"])):
            ids = tokenizer_(captions, padding="max_length", max_length=tokenizer_.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
            output = encoder(ids.to(accelerator.device), output_hidden_states=True)
            embeds.append(output.hidden_states[-2])
        return {"prompt_embeds": torch.cat(embeds, dim=-1), "pooled_prompt_embeds": output[0]}

    def unet_inputs(text, sizes, latents):
        return {"encoder_hidden_states": text["prompt_embeds"].to(latents.device),
                "added_cond_kwargs": {"text_embeds": text["pooled_prompt_embeds"].to(latents.device),
                                      "time_ids": time_ids(sizes, args.resolution).to(latents)}}

    seam = ct.ModelSeam(
        pipeline_class=StableDiffusionXLPipeline,
        components={"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "tokenizer": tokenizer,
                    "tokenizer_2": tokenizer_2},
        encode_prompts=encode_prompts, unet_inputs=unet_inputs)
    ct.train(args, accelerator, unet, vae, scheduler, seam, examples, weights_note)


if __name__ == "__main__":
    main(parse_args())
