#!/usr/bin/env python
"""Write the tiny local model zoo: random models in the exact on-disk formats of the real weights.

Tests and the demo load these through the same code paths users take with the real checkpoints, so nothing
downloads. Everything is seeded: the same command writes the same files.

    python tools/make_tiny_models.py OUTDIR

OUTDIR/
  sd15/                       StableDiffusionPipeline folder (64x64 images)
  sdxl/                       StableDiffusionXLPipeline folder (two text encoders, text_time embedding)
  flux/                       FluxPipeline folder (FLUX.1-dev layout: guidance embedding, CLIP + T5, 16x16 latents)
  zimage/                     ZImagePipeline folder (Qwen3 text encoder, 16-channel latents; the configs of diffusers'
                              tests/pipelines/z_image)
  flux2_klein/                Flux2KleinPipeline folder (Qwen3 causal LM read at layers 9, 18, 27; FLUX.2's VAE)
  sd3/                        StableDiffusion3Pipeline folder (two CLIPs + T5): a family no script of the pack trains
  qwen_tokenizer/             Qwen-style tokenizer (WordLevel, <|im_start|> chat template with enable_thinking)
  t5_tokenizer/               T5 (Unigram) tokenizer built from a generated vocab
  clip_tokenizer/             CLIPTokenizer built from a generated vocab
  expander/                   tiny causal LM + tokenizer with a chat template (for --expansion llm)
  hps/                        open_clip checkpoint {"state_dict": ...} like HPS_v2.1_compressed.pt + model config
  pickscore/model, processor  transformers CLIPModel and CLIPProcessor folders (PickScore layout)
  clip/                       CLIPModel + processor folder (openai/clip-vit-large-patch14 layout, 768-d embeds)
  aesthetic/                  LAION aesthetic MLP .pth with the real key layout (layers.{0,2,4,6,7})
  imagereward/                ImageReward.pt + med_config.json + tokenizer/ (BERT), for the image-reward package
"""

import argparse
import json
import os
import sys

import torch

# Words the tokenizers know as whole tokens; everything else falls back to characters.
WORDS = (
    "a an the of in on at with and photo painting drawing picture image portrait landscape city street forest "
    "mountain river sea beach sky sun moon night day morning evening cat dog bird horse car house tree flower "
    "woman man child robot castle dragon boat red green blue yellow orange purple pink black white gray brown "
    "circle square triangle star big small left right top bottom center background highly detailed intricate "
    "sharp focus cinematic lighting dramatic atmosphere professional photograph soft natural light vibrant "
    "colors digital art concept trending artstation oil canvas watercolor golden hour 8k ultra realistic style "
    "wide angle lens bokeh studio masterpiece best quality"
).split()

TEXT_HIDDEN = 32


def bytes_to_unicode():
    """GPT-2/CLIP byte-level alphabet: printable stand-ins for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def clip_vocab_and_merges():
    """A CLIP BPE vocab: byte alphabet (+ end-of-word forms), merges learned on WORDS, special tokens.

    Plain BPE training with ties broken by the pair itself, so the files are the same on every run.
    """
    from collections import Counter

    alphabet = bytes_to_unicode()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    words = [list(word[:-1]) + [word[-1] + "</w>"] for word in sorted(set(WORDS))]
    merges = []
    while True:
        pairs = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.append(best[0] + best[1])
        for word in words:
            i = 0
            while i < len(word) - 1:
                if (word[i], word[i + 1]) == best:
                    word[i: i + 2] = [best[0] + best[1]]
                i += 1
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(dict.fromkeys(vocab))}, merges


def make_clip_tokenizer(out_dir):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def clip_text_config(vocab_size, projection_dim=TEXT_HIDDEN, hidden_size=TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )


def tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def make_sd15(out_dir, tokenizer):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=(2, 4), norm_num_groups=32,
    )
    torch.manual_seed(1)
    vae = tiny_vae()
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(clip_text_config(len(tokenizer)))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=tiny_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)


def make_sdxl(out_dir, tokenizer):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    time_embed_dim = 8
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN,
        cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN, norm_num_groups=32,
    )
    torch.manual_seed(1)
    vae = tiny_vae()
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(clip_text_config(len(tokenizer)))
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(len(tokenizer)))
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, scheduler=scheduler, image_encoder=None, feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out_dir)


def make_t5_tokenizer(out_dir, extra_ids=8):
    """A T5 (Unigram) tokenizer in FLUX.1's tokenizer_2 layout: <pad> </s> <unk>, then WORDS and single characters
    as sentencepiece pieces, then the sentinel <extra_id_N> tokens."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -5.0) for word in sorted(set(WORDS))]
    pieces += [(char, -10.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789,.'-"]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=extra_ids)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(out_dir)
    return T5Tokenizer.from_pretrained(out_dir)


def make_flux(out_dir, tokenizer, t5_tokenizer):
    """A guidance-distilled FLUX.1-dev-style pipeline: transformer (double and single stream blocks, guidance
    embedding), CLIP (pooled) + T5 text encoders, a VAE with FLUX's shift and scaling factors and no quant convs."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    latent_channels = 4  # FLUX.1 has 16; packed 2x2 into tokens of 4x as many channels
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=64,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,  # FLUX.1's
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(clip_text_config(len(tokenizer)))
    torch.manual_seed(3)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's: the shift grows with the image's token count
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.save_pretrained(out_dir)


def make_qwen_tokenizer(out_dir):
    """A Qwen2/3-style fast tokenizer (the real ones come from the Hub): WORDS as whole tokens, Qwen's special tokens,
    and a chat template that renders <|im_start|>role ... <|im_end|> and reads enable_thinking as Qwen3's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
    tokens = specials + sorted(set(WORDS)) + ["user", "assistant", "system", ",", ".", ":", "'", '"']
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def qwen3_config(vocab_size, layers):
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=8, vocab_size=vocab_size, max_position_embeddings=512)


def make_zimage(out_dir, qwen_tokenizer):
    """Z-Image: a single-stream transformer that reads the Qwen3 encoder's second-to-last hidden states (the
    tiny configs of diffusers' own tests), FLUX.1's VAE layout with 16 latent channels, a flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # allocated with torch.empty: fixed, so the files are the same on every run
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], block_out_channels=[32, 64], layers_per_block=1,
        latent_channels=16, norm_num_groups=32, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
    )
    torch.manual_seed(2)
    text_encoder = Qwen3Model(qwen3_config(len(qwen_tokenizer), layers=2))
    ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                   tokenizer=qwen_tokenizer, transformer=transformer).save_pretrained(out_dir)


def make_flux2_klein(out_dir, qwen_tokenizer):
    """FLUX.2 [klein]: a FLUX.2 transformer without guidance embedding (klein samples with classifier-free guidance),
    conditioned on the Qwen3 causal LM's hidden states at layers 9, 18 and 27 stacked (the pipeline's defaults: the
    tiny encoder has 27 layers), FLUX.2's VAE (latents patchified 2x2 into 4 channels)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
        Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
    )
    torch.manual_seed(1)
    text_encoder = Qwen3ForCausalLM(qwen3_config(len(qwen_tokenizer), layers=27))
    torch.manual_seed(2)
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    )
    with torch.no_grad():  # batch-norm statistics of the patchified latents, as a trained VAE has (not 0 and 1)
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 4))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 4))
    Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                       tokenizer=qwen_tokenizer, transformer=transformer).save_pretrained(out_dir)


def make_sd3(out_dir, tokenizer, t5_tokenizer):
    """SD3: an MMDiT over two CLIP encoders (with projections) and T5; 32x32 images by default (the configs of
    diffusers' tests)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=2 * TEXT_HIDDEN, pooled_projection_dim=2 * TEXT_HIDDEN,
        out_channels=4,
    )
    encoders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        encoders.append(CLIPTextModelWithProjection(clip_text_config(len(tokenizer))))
    torch.manual_seed(3)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=2 * TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    torch.manual_seed(4)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoders[0],
        tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer, image_encoder=None, feature_extractor=None,
    ).save_pretrained(out_dir)


def make_expander(out_dir):
    """A random Llama-style chat model; its rewrites are gibberish, but the transformers code path is real."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tokens = specials + sorted(set(WORDS)) + [",", ".", ":", "'", '"']
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer.save_pretrained(out_dir)
    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)


def make_hps(out_dir):
    """open_clip model saved like HPS_v2.1_compressed.pt; the tiny architecture is an open_clip model config."""
    import open_clip

    model_config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 8, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    config_path = os.path.join(out_dir, "tiny-ViT.json")
    with open(config_path, "w") as f:
        json.dump(model_config, f, indent=2)
    open_clip.add_model_config(config_path)
    torch.manual_seed(5)
    model = open_clip.create_model("tiny-ViT", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, os.path.join(out_dir, "HPS_v2.1_compressed.pt"))


def make_clip_model(model_dir, processor_dir, tokenizer, projection_dim, seed):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        patch_size=32, projection_dim=projection_dim,
    )
    text = clip_text_config(len(tokenizer), projection_dim=projection_dim)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(model_dir)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(processor_dir)


def make_aesthetic(out_dir):
    """LAION aesthetic predictor v2: the real MLP shape and key names (Linear layers at 0, 2, 4, 6, 7)."""
    from torch import nn

    torch.manual_seed(7)
    mlp = nn.Sequential(
        nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
        nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )
    state = {f"layers.{key}": value for key, value in mlp.state_dict().items()}
    torch.save(state, os.path.join(out_dir, "sac+logos+ava1-l14-linearMSE.pth"))


def make_image_reward(out_dir):
    """ImageReward.pt (state dict of the package's ImageReward model) + med_config.json + a BERT tokenizer folder."""
    from transformers import BertTokenizer

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from craft_reward_models import build_image_reward

    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    os.makedirs(tokenizer_dir, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + list(",.:'\"") + letters
    vocab += ["##" + letter for letter in letters]
    vocab_file = os.path.join(tokenizer_dir, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("".join(token + "\n" for token in vocab))
    BertTokenizer(vocab_file).save_pretrained(tokenizer_dir)
    med_config = {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 37,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2,
        "encoder_width": 64, "add_cross_attention": True,
    }
    med_config_path = os.path.join(out_dir, "med_config.json")
    with open(med_config_path, "w") as f:
        json.dump(med_config, f, indent=2)
    torch.manual_seed(9)
    model = build_image_reward(med_config_path, tokenizer_dir, vit_shape=(64, 2, 32))
    torch.save(model.state_dict(), os.path.join(out_dir, "ImageReward.pt"))


def make_zoo(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = make_clip_tokenizer(os.path.join(out_dir, "clip_tokenizer"))
    make_sd15(os.path.join(out_dir, "sd15"), tokenizer)
    make_sdxl(os.path.join(out_dir, "sdxl"), tokenizer)
    t5_tokenizer = make_t5_tokenizer(os.path.join(out_dir, "t5_tokenizer"))
    make_flux(os.path.join(out_dir, "flux"), tokenizer, t5_tokenizer)
    qwen_tokenizer = make_qwen_tokenizer(os.path.join(out_dir, "qwen_tokenizer"))
    make_zimage(os.path.join(out_dir, "zimage"), qwen_tokenizer)
    make_flux2_klein(os.path.join(out_dir, "flux2_klein"), qwen_tokenizer)
    make_sd3(os.path.join(out_dir, "sd3"), tokenizer, t5_tokenizer)
    make_expander(os.path.join(out_dir, "expander"))
    for name in ("hps", "aesthetic", "imagereward"):
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    make_hps(os.path.join(out_dir, "hps"))
    make_clip_model(
        os.path.join(out_dir, "pickscore", "model"), os.path.join(out_dir, "pickscore", "processor"), tokenizer,
        projection_dim=32, seed=6,
    )
    clip_dir = os.path.join(out_dir, "clip")
    make_clip_model(clip_dir, clip_dir, tokenizer, projection_dim=768, seed=8)
    make_aesthetic(os.path.join(out_dir, "aesthetic"))
    make_image_reward(os.path.join(out_dir, "imagereward"))


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def make_training_set(folder, n=8, weights=None):
    """A filtered-like imagefolder: coloured squares on white, captions naming the colour, CRAFT weights."""
    from PIL import Image, ImageDraw

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import craft_utils as cu

    folder.mkdir(parents=True)
    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour = names[i % len(names)]
        image = Image.new("RGB", (80, 64), "white")  # not square: resize + crop are exercised
        ImageDraw.Draw(image).rectangle([16 + 4 * i, 12, 56 + 2 * i, 52], fill=COLOURS[colour])
        image.save(folder / f"{i:03d}.png")
        weight = weights[i] if weights else 0.5 + 0.25 * i
        rows.append({"file_name": f"{i:03d}.png", "text": f"a {colour} square", "weight": weight, "group_id": i})
    cu.write_jsonl_atomic(folder / "metadata.jsonl", rows)
    return folder


def make_pairs_set(folder, n=6, rejected_size=(80, 64)):
    """A pairs-like imagefolder (crf_filter.py --mode pairs): per caption, a square of its colour (preferred, 80x64)
    and one of the next colour (rejected, `rejected_size`), as file_name and rejected_file_name."""
    from PIL import Image, ImageDraw

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import craft_utils as cu

    folder.mkdir(parents=True)
    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour, other = names[i % len(names)], names[(i + 1) % len(names)]
        for name, fill, size in ((f"{i:03d}.png", colour, (80, 64)), (f"{i:03d}_rejected.png", other, rejected_size)):
            image = Image.new("RGB", size, "white")
            ImageDraw.Draw(image).rectangle([16 + 4 * i, 12, 56 + 2 * i, 52], fill=COLOURS[fill])
            image.save(folder / name)
        rows.append({"file_name": f"{i:03d}.png", "rejected_file_name": f"{i:03d}_rejected.png",
                     "text": f"a {colour} square", "advantage_gap": 1.0 + i, "group_id": i})
    cu.write_jsonl_atomic(folder / "metadata.jsonl", rows)
    return folder


def reward_flags(zoo):
    """Command-line flags pointing every reward of craft_rewards at this zoo's files."""
    path = lambda *parts: os.path.join(str(zoo), *parts)  # noqa: E731
    return [
        "--hpsv2_checkpoint", path("hps", "HPS_v2.1_compressed.pt"),
        "--hpsv2_0_checkpoint", path("hps", "HPS_v2.1_compressed.pt"), "--hps_model", path("hps", "tiny-ViT.json"),
        "--pickscore_model", path("pickscore", "model"), "--pickscore_processor", path("pickscore", "processor"),
        "--aesthetic_checkpoint", path("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"),
        "--aesthetic_clip_model", path("clip"), "--clip_model", path("clip"),
        "--imagereward_checkpoint", path("imagereward", "ImageReward.pt"),
        "--imagereward_med_config", path("imagereward", "med_config.json"),
        "--imagereward_tokenizer", path("imagereward", "tokenizer"),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="folder to write the zoo into (created if missing)")
    args = parser.parse_args(argv)
    make_zoo(args.output_dir)
    print(f"tiny model zoo written to {args.output_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
