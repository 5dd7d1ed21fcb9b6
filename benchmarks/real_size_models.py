"""SD1.5 and SDXL pipelines at their real sizes with random weights (speed and memory don't depend on the values).

The architectures are those of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0
(UNet, VAE, CLIP ViT-L/14 text encoder, OpenCLIP ViT-bigG/14 text encoder); only the tokenizer is the tiny zoo's,
which changes nothing in the timing: prompts are padded to 77 tokens either way.
"""

import torch

CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def real_size_pipeline(kind, tokenizer, device, dtype):
    """kind: 'sd15' or 'sdxl'. Weights are drawn on the device (fast) and cast to dtype."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    with torch.device(device):
        vae = AutoencoderKL(**VAE, sample_size=512 if kind == "sd15" else 1024)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        if kind == "sd15":
            pipe = StableDiffusionPipeline(
                unet=UNet2DConditionModel(**SD15_UNET), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            pipe = StableDiffusionXLPipeline(
                unet=UNet2DConditionModel(**SDXL_UNET), vae=vae, text_encoder=text_encoder,
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)), tokenizer=tokenizer,
                tokenizer_2=tokenizer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)
