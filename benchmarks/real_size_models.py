"""SD1.5, SDXL, FLUX.1-dev, Z-Image and FLUX.2 [klein] 4B pipelines at their real sizes with random weights (speed
and memory don't depend on the values).

The architectures are those of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0
(UNet, VAE, CLIP ViT-L/14 text encoder, OpenCLIP ViT-bigG/14 text encoder) and black-forest-labs/FLUX.1-dev
(12B transformer, T5-XXL, CLIP ViT-L/14, the 16-channel VAE), Tongyi-MAI/Z-Image (6.15B single-stream transformer,
Qwen3-4B, FLUX.1's VAE) and black-forest-labs/FLUX.2-klein-base-4B (3.9B transformer, Qwen3-4B, the 32-channel
FLUX.2 VAE); only the tokenizers are the tiny zoo's, which changes nothing in the timing: prompts are padded to 77
(T5, Qwen3: --max_sequence_length) tokens either way.
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


FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              feed_forward_proj="gated-gelu", vocab_size=32128, pad_token_id=0, eos_token_id=1)
FLUX_VAE = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                scaling_factor=0.3611, sample_size=1024)


QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                tie_word_embeddings=True)
ZIMAGE_TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                          n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                          rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
KLEIN_4B_TRANSFORMER = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=3 * 2560, timestep_guidance_channels=256,
                            mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)


def real_size_zimage(qwen_tokenizer, device, dtype):
    """Z-Image's architecture: the 6.15B single-stream transformer, Qwen3-4B, FLUX.1's 16-channel VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    with torch.device(device):
        pipe = ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0),
            vae=AutoencoderKL(**FLUX_VAE).to(dtype), text_encoder=Qwen3Model(Qwen3Config(**QWEN3_4B)).to(dtype),
            tokenizer=qwen_tokenizer, transformer=ZImageTransformer2DModel(**ZIMAGE_TRANSFORMER).to(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def real_size_flux2_klein(qwen_tokenizer, device, dtype):
    """FLUX.2 [klein] base 4B's architecture: the 3.9B transformer, Qwen3-4B, the 32-channel FLUX.2 VAE."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
        Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        pipe = Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
            vae=AutoencoderKLFlux2().to(dtype), text_encoder=Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B)).to(dtype),
            tokenizer=qwen_tokenizer, transformer=Flux2Transformer2DModel(**KLEIN_4B_TRANSFORMER).to(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def real_size_flux(tokenizer, t5_tokenizer, device, dtype):
    """FLUX.1-dev's architecture: ~12B transformer, T5-XXL (4.7B), CLIP ViT-L/14, the 16-channel VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    with torch.device(device):
        pipe = FluxPipeline(
            scheduler=scheduler, vae=AutoencoderKL(**FLUX_VAE).to(dtype),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).to(dtype), tokenizer=tokenizer,
            text_encoder_2=T5EncoderModel(T5Config(**T5_XXL)).to(dtype), tokenizer_2=t5_tokenizer,
            transformer=FluxTransformer2DModel(**FLUX_TRANSFORMER).to(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
