"""The tiny zoo is in the real on-disk formats: each file loads through the loader users use for the real weights."""

import hashlib
import os

import torch

from make_tiny_models import make_zoo


def test_pipelines_load_as_sd15_and_sdxl(zoo):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    sd15 = DiffusionPipeline.from_pretrained(zoo / "sd15")
    assert type(sd15) is StableDiffusionPipeline and sd15.unet.config.cross_attention_dim == 32
    sdxl = DiffusionPipeline.from_pretrained(zoo / "sdxl")
    assert type(sdxl) is StableDiffusionXLPipeline
    assert isinstance(sdxl.text_encoder_2, CLIPTextModelWithProjection)
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.unet.config.cross_attention_dim == 64  # both encoders' hidden states concatenated


def test_clip_tokenizer_knows_whole_words(zoo):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(zoo / "clip_tokenizer")
    ids = tokenizer("a red circle on a blue background").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + 7  # one token per word
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a red circle on a blue background"
    assert len(tokenizer("zyx").input_ids) == 2 + 3  # unknown words fall back to characters


def test_reward_model_files_load_with_the_real_loaders(zoo):
    import open_clip
    from transformers import CLIPModel, CLIPProcessor

    checkpoint = torch.load(zoo / "hps" / "HPS_v2.1_compressed.pt", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"state_dict"}
    open_clip.add_model_config(str(zoo / "hps" / "tiny-ViT.json"))
    model = open_clip.create_model("tiny-ViT", pretrained=None)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    assert model.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, 32)

    pick = CLIPModel.from_pretrained(zoo / "pickscore" / "model")
    processor = CLIPProcessor.from_pretrained(zoo / "pickscore" / "processor")
    inputs = processor(text=["a red circle"], images=[torch.zeros(3, 64, 64)], return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert pick(**inputs).image_embeds.shape == (1, 32)
    assert CLIPModel.from_pretrained(zoo / "clip").config.projection_dim == 768  # ViT-L/14's embedding size

    state = torch.load(zoo / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", map_location="cpu", weights_only=True)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


def test_expander_has_a_chat_template(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo / "expander")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a red cat"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text.endswith("<|assistant|>") and "a red cat" in text
    assert AutoModelForCausalLM.from_pretrained(zoo / "expander").config.model_type == "llama"


def test_zoo_is_deterministic(zoo, tmp_path):
    make_zoo(str(tmp_path))

    def digests(root):
        out = {}
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        return out

    assert digests(tmp_path) == digests(zoo)
