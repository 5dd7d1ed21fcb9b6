"""Each reward, loaded from the zoo's files in the real formats, equals its formula computed by hand on a model
built in memory (round trip through the saved files), and batching does not change a score."""

import argparse
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import craft_reward_models as cm
import craft_rewards as cr
from make_tiny_models import reward_flags

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle", "a yellow star at night", "a cat"]


def reward_args(zoo, batch_size=16):
    parser = argparse.ArgumentParser()
    cr.add_reward_args(parser)
    return parser.parse_args(reward_flags(zoo) + ["--reward_batch_size", str(batch_size)])


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    wide = Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8))  # not square: HPS pads
    return noise + [wide, Image.new("RGB", (64, 64), (200, 30, 30))]


def official_hps_pixels(image):
    """HPSv2's evaluation transform re-implemented from its steps with plain torch: ToTensor, then the longest side
    to 224 with an antialiased bicubic resize of the float tensor, zero padding centred, OpenAI CLIP normalisation."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    height, width = pixels.shape[1:]
    scale = 224 / max(height, width)
    size = (round(height * scale), round(width * scale))
    pixels = torch.nn.functional.interpolate(pixels[None], size=size, mode="bicubic", align_corners=False,
                                             antialias=True)[0]
    top, left = (224 - size[0]) // 2, (224 - size[1]) // 2
    pixels = torch.nn.functional.pad(pixels, (left, 224 - size[1] - left, top, 224 - size[0] - top))
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    return (pixels - mean[:, None, None]) / std[:, None, None]


def test_hps_preprocessing_resizes_the_float_tensor_as_the_official_code(images):
    rng = np.random.default_rng(1)
    large_wide = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))  # downscaled: antialias matters
    for image in [*images, large_wide]:
        ours = cm.hps_pixels(image, 224)
        assert ours.shape == (3, 224, 224)
        assert torch.allclose(ours, official_hps_pixels(image), atol=1e-5)
    # resizing the 8-bit image first (open_clip's transform) is measurably different on this image
    from open_clip.transform import image_transform

    pil_first = image_transform(224, is_train=False, resize_mode="longest")(large_wide)
    assert (pil_first - official_hps_pixels(large_wide)).abs().max() > 0.02


def test_hps_is_the_cosine_of_open_clip_features(zoo, images):
    import open_clip

    scores = cm.load_reward("hpsv2.1", reward_args(zoo), "cpu")(images, PROMPTS)
    open_clip.add_model_config(str(zoo / "hps" / "tiny-ViT.json"))
    torch.manual_seed(5)  # the zoo's seed: the same weights, built in memory
    model = open_clip.create_model("tiny-ViT", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("tiny-ViT")
    for image, prompt, score in zip(images, PROMPTS, scores):
        with torch.no_grad():
            image_features = model.encode_image(official_hps_pixels(image)[None])[0]
            text_features = model.encode_text(tokenizer([prompt]))[0]
        cosine = torch.dot(image_features, text_features) / (image_features.norm() * text_features.norm())
        assert score == pytest.approx(cosine.item(), abs=1e-5)
    assert len(set(scores)) == len(scores)


def clip_embeddings(model, processor, image, prompt):
    """CLIP image and text embeddings by hand: tower, pooled output, projection."""
    with torch.no_grad():
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        image_embedding = model.visual_projection(pooled)[0]
        tokens = processor(text=[prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        text_embedding = model.text_projection(model.text_model(**tokens).pooler_output)[0]
    return image_embedding, text_embedding


def test_pickscore_and_clip_score_formulas(zoo, images):
    from transformers import CLIPModel, CLIPProcessor

    args = reward_args(zoo)
    pick = cm.load_reward("pickscore", args, "cpu")(images, PROMPTS)
    clip = cm.load_reward("clip", args, "cpu")(images, PROMPTS)
    model = CLIPModel.from_pretrained(zoo / "pickscore" / "model").eval()
    processor = CLIPProcessor.from_pretrained(zoo / "pickscore" / "processor")
    clip_model = CLIPModel.from_pretrained(zoo / "clip").eval()
    clip_processor = CLIPProcessor.from_pretrained(zoo / "clip")
    for image, prompt, pick_score, clip_score in zip(images, PROMPTS, pick, clip):
        a, b = clip_embeddings(model, processor, image, prompt)
        cosine = torch.dot(a, b) / (a.norm() * b.norm())
        assert pick_score == pytest.approx((model.logit_scale.exp() * cosine).item(), abs=1e-4)
        a, b = clip_embeddings(clip_model, clip_processor, image, prompt)
        cosine = torch.dot(a, b) / (a.norm() * b.norm())
        assert clip_score == pytest.approx(max(100 * cosine.item(), 0.0), abs=1e-3)


def test_pickscore_scale_is_exp_of_the_fp32_logit_scale_under_bf16(zoo, images, tmp_path):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(zoo / "pickscore" / "model")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # PickScore's: bf16 rounds it to 4.59375, exp() to 98.86
    model.save_pretrained(tmp_path / "model")
    args = reward_args(zoo)
    args.pickscore_model, args.reward_precision = str(tmp_path / "model"), "bf16"
    scores = cm.load_reward("pickscore", args, "cpu")(images, PROMPTS)
    _, image_features, text_features = cm._clip_scorer(args.pickscore_model, args.pickscore_processor, "--flag",
                                                       "cpu", torch.bfloat16)
    with torch.no_grad():
        cosines = (image_features(images) * text_features(PROMPTS)).sum(-1).tolist()
    assert scores == pytest.approx([100 * c for c in cosines], rel=1e-6)


def test_weights_files_load_without_running_pickled_code(zoo, tmp_path):
    args = reward_args(zoo)
    args.aesthetic_checkpoint = str(tmp_path / "aesthetic.pth")
    torch.save({"layers": argparse.Namespace(a=1)}, args.aesthetic_checkpoint)  # an object, not tensors
    with pytest.raises(SystemExit, match=r"--aesthetic_checkpoint .*aesthetic.pth: not loadable as weights only"):
        cm.load_reward("aesthetic", args, "cpu")


def test_aesthetic_is_the_linear_mlp_on_the_normalised_clip_embedding(zoo, images):
    from transformers import CLIPModel, CLIPProcessor

    scores = cm.load_reward("aesthetic", reward_args(zoo), "cpu")(images, PROMPTS)
    model = CLIPModel.from_pretrained(zoo / "clip").eval()
    processor = CLIPProcessor.from_pretrained(zoo / "clip")
    state = torch.load(zoo / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    for image, score in zip(images, scores):
        x, _ = clip_embeddings(model, processor, image, "")
        x = x / x.norm()
        for layer in (0, 2, 4, 6, 7):  # no activations between the linear layers
            x = state[f"layers.{layer}.weight"] @ x + state[f"layers.{layer}.bias"]
        assert score == pytest.approx(x.item(), abs=1e-5)


def test_imagereward_equals_the_packages_own_scoring_of_an_in_memory_model(zoo, images):
    args = reward_args(zoo, batch_size=2)
    scores = cm.load_reward("imagereward", args, "cpu")(images, PROMPTS)
    torch.manual_seed(9)  # the zoo's seed: the same weights, built in memory
    model = cm.build_image_reward(str(zoo / "imagereward" / "med_config.json"), str(zoo / "imagereward" / "tokenizer"),
                                  vit_shape=(64, 2, 32)).eval()
    with torch.no_grad():
        expected = [model.score(prompt, image) for image, prompt in zip(images, PROMPTS)]  # the package's path
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(np.round(scores, 7))) > 1


def test_jpeg_is_the_negative_size_in_kb(zoo, images):
    scores = cm.load_reward("jpeg", reward_args(zoo), "cpu")(images, PROMPTS)
    for image, score in zip(images, scores):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        assert score == -len(buffer.getvalue()) / 1000
    assert scores[-1] > max(scores[:3]) + 1  # a flat image compresses far better than noise


@pytest.mark.parametrize("name", ["hpsv2.1", "pickscore", "aesthetic", "imagereward", "clip"])
def test_batching_gives_the_same_scores_as_one_by_one(zoo, images, name):
    batched = cm.load_reward(name, reward_args(zoo, batch_size=5), "cpu")(images, PROMPTS)
    single = cm.load_reward(name, reward_args(zoo, batch_size=1), "cpu")(images, PROMPTS)
    assert batched == pytest.approx(single, abs=1e-5)


def test_the_image_encoder_rewards_give_normalised_embeddings(zoo, images):
    for name in cm.REWARDS:
        if name == "imagereward":  # BLIP: an image-text cross-encoder, no image embedding of its own
            continue
        reward = cm.load_reward(name, reward_args(zoo, batch_size=2), "cpu")
        assert hasattr(reward, "embed_images") == (name in cm.IMAGE_EMBEDDINGS), name
        if name in cm.IMAGE_EMBEDDINGS:
            features = reward.embed_images(images[:3])
            assert features.shape[0] == 3 and torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
            assert torch.allclose(features[1], reward.embed_images(images[1:2])[0], atol=1e-5)  # batches as one


def test_unknown_reward_and_missing_weights_are_clear_errors(zoo, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown reward hps; valid: aesthetic, clip, color, hpsv2.0, hpsv2.1"):
        cr.parse_reward_names("hps,jpeg")
    args = reward_args(zoo)
    args.hpsv2_checkpoint = str(tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(SystemExit, match=r"--hpsv2_checkpoint .*HPS_v2.1_compressed.pt: not found \(no such file\)"):
        cm.load_reward("hpsv2.1", args, "cpu")
    args.hpsv2_checkpoint = "xswu/HPSv2/HPS_v2.1_compressed.pt"  # offline: the Hub can't be reached
    with pytest.raises(SystemExit, match=r"with HF_HUB_OFFLINE=1 only local files work"):
        cm.load_reward("hpsv2.1", args, "cpu")


def test_color_is_the_share_of_coloured_pixels_nearest_the_named_colour(zoo):
    image = Image.new("RGB", (10, 10), "white")
    pixels = image.load()
    for i in range(30):
        pixels[i % 10, i // 10] = (225, 45, 35)  # nearest red
    for i in range(10):
        pixels[i, 5] = (60, 90, 200)  # nearest blue
    for i in range(20):
        pixels[i % 10, 7 + i // 10] = (120, 130, 140)  # grey: not coloured, does not count
    score = cm.load_reward("color", reward_args(zoo), "cpu")
    blank = Image.new("RGB", (10, 10), "white")
    assert score([image, image, image, blank], ["a red circle", "a blue star", "a cat", "a red circle"]) == \
        pytest.approx([30 / 40, 10 / 40, 0.0, 0.0])


def test_place_is_how_near_the_coloured_pixels_centre_is_to_the_named_place(zoo):
    def square(size, x, y):
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).rectangle([x - 5, y - 5, x + 5, y + 5], fill=(220, 40, 40))
        ImageDraw.Draw(image).rectangle([0, 0, 3, 3], fill=(128, 128, 128))  # grey: not coloured, does not count
        return image

    score = cm.load_reward("place", reward_args(zoo), "cpu")
    left, big_left = square(64, 18, 32), square(128, 36, 64)  # the centre of "on the left", at 64 and 128 pixels
    blank = Image.new("RGB", (64, 64), "white")
    prompts = ["a red square on the left", "a red square on the right", "a red square at the top", "a red square",
               "a red square on the left", "a red square on the left"]
    # 1 - distance / 32: 0 px; 28 px (46 - 18); the diagonal of 14 px each way; no place named; nothing coloured
    assert score([left, left, left, left, blank, big_left], prompts) == \
        pytest.approx([1.0, 1 - 28 / 32, 1 - (2 * 14 ** 2) ** 0.5 / 32, 0.0, 0.0, 1.0])


def test_images_decoded_ahead_by_threads_come_in_order(tmp_path):
    rows = []
    for i in range(23):
        Image.new("RGB", (8, 8), (i, 2 * i, 0)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "_where": f"row {i + 1}"})
    batches = [rows[start: start + 4] for start in range(0, 23, 4)]
    expected = [[(i, 2 * i, 0) for i in range(start, min(start + 4, 23))] for start in range(0, 23, 4)]
    for workers in (0, 3):  # 3 threads run up to 6 batches ahead of the consumer
        decoded = cr.decoded_ahead(batches, str(tmp_path), workers)
        assert [[image.getpixel((0, 0)) for image in batch] for batch in decoded] == expected
