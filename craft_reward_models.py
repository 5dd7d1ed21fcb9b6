"""The reward models, by name. Each factory loads its weights (a Hub id or a local path) and returns
`score(images, prompts)`:

    reward = load_reward("pickscore", args, device)   # args from craft_rewards.add_reward_args
    scores = reward(images, prompts)                  # list of floats, one per (PIL image, prompt)

Adding a reward = one factory decorated with @register("name"). Heavy imports happen inside the factories. A reward
built on an image encoder also gives its score function an `embed_images(images)` (L2-normalised features), which
evaluation uses to measure how different one prompt's images are; those rewards are named in IMAGE_EMBEDDINGS.
Text-conditioned rewards are called with the original prompt, so rewrites and originals answer the same question.
"""

import io
import os

import craft_utils as cu

REWARDS = {}
IMAGE_EMBEDDINGS = ("clip", "hpsv2.1", "hpsv2.0", "pickscore", "aesthetic")  # the preferred first


def register(name):
    def wrap(factory):
        REWARDS[name] = factory
        return factory

    return wrap


def resolve_file(spec, flag):
    """A local file, or 'owner/repo/path/in/repo' downloaded (and cached) from the Hub."""
    if os.path.isfile(spec):
        return spec
    parts = spec.split("/")
    if len(parts) >= 3 and not os.path.isabs(spec):
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
        except Exception as error:  # offline, missing repo or file: the user needs the one line
            reason = str(error).splitlines()[0]
    else:
        reason = "no such file"
    cu.fail(f"{flag} {spec}: not found ({reason}); give a local file, or 'owner/repo/file' on the Hub "
            "(with HF_HUB_OFFLINE=1 only local files work)")


def load_torch_file(path, flag):
    """torch.load with weights_only=True: tensors and plain containers, never code from a pickle."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        cu.fail(f"{flag} {path}: not loadable as weights only ({str(error).splitlines()[0][:200]}); give a file of "
                "tensors (a state dict), e.g. re-save a trusted checkpoint with torch.save(model.state_dict(), path)")


def load_from_pretrained(loader, spec, flag, **kwargs):
    try:
        return loader.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as error:
        cu.fail(f"{flag} {spec}: could not load ({str(error).splitlines()[0]}); give a local folder or a Hub id")


def load_reward(name, args, device):
    """Build one reward; returns a callable (images, prompts) -> list[float] that scores in batches."""
    import torch

    dtype = getattr(torch, cu.TORCH_DTYPES[args.reward_precision])
    score_batch = REWARDS[name](args, device, dtype)

    def score(images, prompts):
        scores = []
        with torch.no_grad():
            for start in range(0, len(images), args.reward_batch_size):
                batch = slice(start, start + args.reward_batch_size)
                scores += [float(s) for s in score_batch(images[batch], prompts[batch])]
        return scores

    if hasattr(score_batch, "embed_images"):
        def embed_images(images):
            with torch.no_grad():
                return torch.cat([score_batch.embed_images(images[start: start + args.reward_batch_size]).float().cpu()
                                  for start in range(0, len(images), args.reward_batch_size)])

        score.embed_images = embed_images
    return score


def _rgb(images):
    return [image.convert("RGB") for image in images]


def _normalized(features):
    return features / features.norm(dim=-1, keepdim=True)


def hps_pixels(image, size):
    """HPSv2's evaluation transform in the order its code applies it: to a float tensor first, then a bicubic
    (antialiased) resize of the longest side to `size`, zero padding to a centred square, CLIP normalisation.
    (Resizing the 8-bit image first, as open_clip's own transform does, moves pixels by up to 24/255 on edges.)"""
    import torchvision.transforms.functional as F
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import InterpolationMode

    pixels = F.to_tensor(image.convert("RGB"))
    height, width = pixels.shape[1:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    if (new_height, new_width) != (height, width):
        pixels = F.resize(pixels, [new_height, new_width], InterpolationMode.BICUBIC, antialias=True)
    pad_height, pad_width = size - new_height, size - new_width
    pixels = F.pad(pixels, [pad_width // 2, pad_height // 2, pad_width - pad_width // 2, pad_height - pad_height // 2])
    return F.normalize(pixels, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def _hps(args, device, dtype, checkpoint_flag):
    """HPSv2: open_clip model + fine-tuned checkpoint; score = cosine of the image and text embeddings."""
    import open_clip
    import torch

    model_name = args.hps_model
    if model_name.endswith(".json"):
        if not os.path.isfile(model_name):
            cu.fail(f"--hps_model {model_name} does not exist")
        open_clip.add_model_config(model_name)
        model_name = os.path.splitext(os.path.basename(model_name))[0]
    checkpoint = resolve_file(getattr(args, checkpoint_flag), "--" + checkpoint_flag)
    model = open_clip.create_model(model_name, pretrained=None)
    state = load_torch_file(checkpoint, "--" + checkpoint_flag)
    if not isinstance(state, dict) or "state_dict" not in state:
        cu.fail(f"--{checkpoint_flag} {checkpoint}: no 'state_dict' in it; is it an HPS_v2*_compressed.pt?")
    model.load_state_dict(state["state_dict"])
    model = model.to(device, dtype).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size

    def embed_images(images):
        pixels = torch.stack([hps_pixels(image, size) for image in images]).to(device, dtype)
        return _normalized(model.encode_image(pixels).float())

    def score(images, prompts):
        text_features = _normalized(model.encode_text(tokenizer(prompts).to(device)).float())
        return (embed_images(images) * text_features).sum(-1).tolist()

    score.embed_images = embed_images
    return score


@register("hpsv2.1")
def hpsv2_1(args, device, dtype):
    return _hps(args, device, dtype, "hpsv2_checkpoint")


@register("hpsv2.0")
def hpsv2_0(args, device, dtype):
    return _hps(args, device, dtype, "hpsv2_0_checkpoint")


def _clip_scorer(model_spec, processor_spec, flag, device, dtype):
    """transformers CLIP: (logit scale, image_features(images), text_features(prompts)), features normalised. The
    scale is read in fp32 before the model is cast: exp() of a bf16 logit_scale is 1% off."""
    from transformers import CLIPModel, CLIPProcessor

    model = load_from_pretrained(CLIPModel, model_spec, flag)
    logit_scale = model.logit_scale.detach().float().exp().item()
    model = model.to(device, dtype).eval()
    processor = load_from_pretrained(CLIPProcessor, processor_spec, flag)

    def image_features(images):
        pixels = processor(images=_rgb(images), return_tensors="pt")["pixel_values"].to(device, dtype)
        return _normalized(model.get_image_features(pixel_values=pixels).pooler_output.float())

    def text_features(prompts):
        tokens = processor(text=prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        return _normalized(model.get_text_features(**tokens.to(device)).pooler_output.float())

    return logit_scale, image_features, text_features


@register("pickscore")
def pickscore(args, device, dtype):
    """PickScore: logit_scale.exp() * cosine, with the PickScore CLIP and the ViT-H-14 processor."""
    processor = args.pickscore_processor
    logit_scale, image_features, text_features = _clip_scorer(args.pickscore_model, processor, "--pickscore_model",
                                                              device, dtype)

    def score(images, prompts):
        return (logit_scale * (image_features(images) * text_features(prompts)).sum(-1)).tolist()

    score.embed_images = image_features
    return score


@register("clip")
def clip_score(args, device, dtype):
    """CLIP score: max(100 * cosine, 0)."""
    _, image_features, text_features = _clip_scorer(args.clip_model, args.clip_model, "--clip_model", device, dtype)

    def score(images, prompts):
        return (100 * (image_features(images) * text_features(prompts)).sum(-1)).clamp(min=0).tolist()

    score.embed_images = image_features
    return score


def aesthetic_mlp():
    """LAION aesthetic predictor v2: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts and no activations."""
    from torch import nn

    class AestheticMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                        nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                        nn.Linear(16, 1))

        def forward(self, embeddings):
            return self.layers(embeddings)

    return AestheticMLP()


@register("aesthetic")
def aesthetic(args, device, dtype):
    """LAION aesthetic score (~1-10): the MLP on the L2-normalised CLIP ViT-L/14 image embedding."""
    _, image_features, _ = _clip_scorer(args.aesthetic_clip_model, args.aesthetic_clip_model,
                                        "--aesthetic_clip_model", device, dtype)
    mlp = aesthetic_mlp()
    checkpoint = resolve_file(args.aesthetic_checkpoint, "--aesthetic_checkpoint")
    mlp.load_state_dict(load_torch_file(checkpoint, "--aesthetic_checkpoint"))
    mlp = mlp.to(device).eval()

    def score(images, prompts):
        return mlp(image_features(images)).squeeze(-1).tolist()

    score.embed_images = image_features
    return score


@register("jpeg")
def jpeg_compressibility(args, device, dtype):
    """Negative JPEG size in kB at quality 95 (DDPO's compressibility reward): no weights, runs anywhere."""

    def score(images, prompts):
        sizes = []
        for image in _rgb(images):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            sizes.append(-buffer.tell() / 1000)
        return sizes

    return score


# The palette of the demo's drawings (tools/pretrain_tiny_model.py draws with it, the "color" reward reads it).
NAMED_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
                 "purple": (140, 60, 180), "orange": (245, 140, 30)}


@register("color")
def colour_match(args, device, dtype):
    """Prompt alignment without weights, for drawings of coloured shapes (the demo): of the image's coloured pixels
    (max - min channel > 60, so white, grey and black do not count), the share whose nearest palette colour is the
    one the prompt names; in [0, 1], 0 when nothing is coloured or the prompt names no palette colour."""
    import numpy as np

    palette = np.array(list(NAMED_COLOURS.values()), dtype=np.float32)
    names = list(NAMED_COLOURS)

    def score(images, prompts):
        scores = []
        for image, prompt in zip(_rgb(images), prompts):
            named = [i for i, name in enumerate(names) if name in prompt.lower().split()]
            pixels = np.asarray(image, dtype=np.float32).reshape(-1, 3)
            coloured = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 60]
            if not named or len(coloured) == 0:
                scores.append(0.0)
                continue
            nearest = np.linalg.norm(coloured[:, None] - palette[None], axis=-1).argmin(axis=1)
            scores.append(float((nearest == named[0]).mean()))
        return scores

    return score


# Where the demo's drawings put their shape, on a 64-pixel canvas (scaled to the image's size when scored).
NAMED_PLACES = {"on the left": (18, 32), "on the right": (46, 32), "at the top": (32, 18), "at the bottom": (32, 46),
                "in the center": (32, 32)}


@register("place")
def place_match(args, device, dtype):
    """Layout without weights, for drawings of coloured shapes (the demo): how close the centre of the image's
    coloured pixels (as `color` counts them) is to the place the prompt names, 1 - distance / (half the image's
    side), clipped at 0; 0 when nothing is coloured or the prompt names no place. The demo keeps it out of the filter:
    a held-out reward."""
    import numpy as np

    def score(images, prompts):
        scores = []
        for image, prompt in zip(_rgb(images), prompts):
            named = [spot for phrase, spot in NAMED_PLACES.items() if phrase in prompt.lower()]
            pixels = np.asarray(image, dtype=np.float32)
            rows, columns = np.nonzero(pixels.max(axis=2) - pixels.min(axis=2) > 60)
            if not named or len(rows) == 0:
                scores.append(0.0)
                continue
            scale = np.array([image.width, image.height]) / 64
            distance = np.hypot(*(np.array([columns.mean(), rows.mean()]) - np.array(named[0]) * scale))
            scores.append(float(max(0.0, 1 - distance / (min(image.width, image.height) / 2))))
        return scores

    return score


def patch_image_reward_for_current_transformers():
    """image-reward 1.5 (2023) was written for transformers 4.2x; put back what transformers 5 moved or removed.

    - apply_chunking_to_forward / prune_linear_layer moved from modeling_utils to pytorch_utils;
    - find_pruneable_heads_and_indices was removed (only head pruning calls it, scoring never does);
    - PreTrainedModel lost invert_attention_mask and get_head_mask, which BLIP's BertModel.forward calls;
    - BertModel.__init__ calls init_weights() before post_init() ran, which transformers 5 no longer allows.
    """
    import torch
    import transformers.modeling_utils as modeling_utils
    from transformers import PreTrainedModel, pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        def find_pruneable_heads_and_indices(*_):
            raise NotImplementedError("head pruning is not supported by the CRAFT ImageReward loader")

        modeling_utils.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices

    from ImageReward.models.BLIP import med

    def invert_attention_mask(self, mask):
        mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]
        mask = mask.to(self.dtype)
        return (1.0 - mask) * torch.finfo(self.dtype).min

    def get_head_mask(self, head_mask, num_hidden_layers):
        if head_mask is not None:
            raise NotImplementedError("head masks are not supported by the CRAFT ImageReward loader")
        return [None] * num_hidden_layers

    med.BertPreTrainedModel.invert_attention_mask = invert_attention_mask
    med.BertPreTrainedModel.get_head_mask = get_head_mask

    def init_weights(self):
        if hasattr(self, "all_tied_weights_keys"):  # post_init has run: the normal initialisation
            PreTrainedModel.init_weights(self)
        else:  # called from BertModel.__init__: run post_init, which sets up and then initialises
            self.post_init()

    med.BertPreTrainedModel.init_weights = init_weights


def build_image_reward(med_config, tokenizer_path, vit_shape):
    """The package's ImageReward model, with BLIP's tokenizer from `tokenizer_path` (not always the Hub) and a ViT
    of `vit_shape` (width, depth, patch size): ViT-L/16 for the real checkpoint, inferred from it by the loader."""
    import importlib

    patch_image_reward_for_current_transformers()
    image_reward_module = importlib.import_module("ImageReward.ImageReward")  # the module, not the class
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    width, depth, patch_size = vit_shape

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        return VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
                                 num_heads=max(1, width // 64)), width

    def init_tokenizer():
        tokenizer = load_from_pretrained(BertTokenizer, tokenizer_path, "--imagereward_tokenizer")
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
        return tokenizer

    blip_pretrain.create_vit, blip_pretrain.init_tokenizer = create_vit, init_tokenizer
    model = image_reward_module.ImageReward(med_config=med_config, device="cpu")
    text_width = model.blip.text_encoder.config.hidden_size
    if text_width != 768:  # the package hard-codes BERT-base's width for the MLP
        model.mlp = image_reward_module.MLP(text_width)
    return model


@register("imagereward")
def imagereward(args, device, dtype):
    """ImageReward: BLIP image-text cross-encoder + MLP, normalised with the package's mean/std."""
    import torch

    checkpoint = resolve_file(args.imagereward_checkpoint, "--imagereward_checkpoint")
    med_config = resolve_file(args.imagereward_med_config, "--imagereward_med_config")
    state = load_torch_file(checkpoint, "--imagereward_checkpoint")
    if "blip.visual_encoder.patch_embed.proj.weight" not in state:
        cu.fail(f"--imagereward_checkpoint {checkpoint}: no BLIP weights in it; is it an ImageReward.pt?")
    patch = state["blip.visual_encoder.patch_embed.proj.weight"]
    depth = len({key.split(".")[3] for key in state if key.startswith("blip.visual_encoder.blocks.")})
    model = build_image_reward(med_config, args.imagereward_tokenizer, (patch.shape[0], depth, patch.shape[-1]))
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing:
        cu.fail(f"--imagereward_checkpoint {checkpoint} lacks {len(missing)} weights (e.g. {missing[0]}); "
                "is it an ImageReward.pt?")
    model = model.to(device, dtype).eval()
    model.device = device

    def score(images, prompts):
        tokens = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                      return_tensors="pt").to(device)
        pixels = torch.stack([model.preprocess(image) for image in _rgb(images)]).to(device, dtype)
        return model.score_gard(tokens.input_ids, tokens.attention_mask, pixels).float().squeeze(-1).tolist()

    return score
