import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import craft_checkpoints as ck
import craft_outputs as co
import craft_data as cd
import craft_utils as cu
from conftest import TWO_PROCESSES, run_script
from make_tiny_models import make_pairs_set, make_training_set
from test_train_sd15 import center_crop_pixels, dpo_inside, generate_in_new_process, pair_draws, tensorboard_scalars


def train(zoo, data, out, *flags, **run):
    return run_script("train_craft_sdxl_lora.py", "--pretrained_model_name_or_path", zoo / "sdxl", "--train_data_dir",
                      data, "--output_dir", out, "--resolution", 64, "--train_batch_size", 2, "--report_to", "none",
                      "--seed", 5, *flags, **run)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_set(tmp_path_factory.mktemp("data") / "filtered")


def test_time_ids_of_a_resized_cropped_flipped_image():
    import train_craft_sdxl_lora

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))  # h 60, w 100
    pixels, original, crop = cd.preprocess(image, 32, center_crop=False, flip=True, crop_seed=7)
    # by hand: shorter side 60 -> 32, so width 100 -> int(32 * 100 / 60) = 53; the crop's left edge is drawn in
    # [0, 53 - 32]; a flip mirrors it to 53 - left - 32
    draw = random.Random(7)
    draw.randint(0, 0)  # the top edge: the resized height is the crop's
    left = draw.randint(0, 21)
    assert original == (60, 100) and crop == (0, 53 - left - 32)
    unflipped, _, same = cd.preprocess(image, 32, center_crop=False, flip=False, crop_seed=7)
    assert same == (0, left) and torch.equal(pixels, unflipped.flip(-1))
    ids = train_craft_sdxl_lora.time_ids({"original_size": [original, (64, 64)], "crop_top_left": [crop, (0, 0)]}, 32)
    assert ids.tolist() == [[60, 100, 0, 21 - left, 32, 32], [64, 64, 0, 0, 32, 32]]


def fixed_batch_loss(pipe, data):
    """Weighted denoising loss on the training images with fixed noise, SDXL conditioning included."""
    rows = cu.read_jsonl(data / "metadata.jsonl")
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for row in rows:
        pixels = center_crop_pixels(data / row["file_name"])
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            embeds, _, pooled, _ = pipe.encode_prompt(row["text"], device="cpu", do_classifier_free_guidance=False)
            cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 80, 0, 8, 64, 64]])}
            for t in (100, 400, 700):
                noise = torch.randn(latents.shape, generator=generator)
                noisy = pipe.scheduler.add_noise(latents, noise, torch.tensor([t]))
                pred = pipe.unet(noisy, torch.tensor([t]), encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
                total += row["weight"] * ((pred - noise) ** 2).mean().item()
    return total / (3 * len(rows))


def test_lora_reduces_the_loss_and_loads_in_a_fresh_sdxl_pipeline(zoo, data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "lora"
    train(zoo, data, out, "--rank", 8, "--learning_rate", 1e-2, "--max_train_steps", 40, "--center_crop",
          "--output_kohya_format", "--checkpointing_steps", 1000)
    pipe = StableDiffusionXLPipeline.from_pretrained(zoo / "sdxl")
    before = fixed_batch_loss(pipe, data)
    pipe.load_lora_weights(out, weight_name=co.LORA_FILE)
    assert fixed_batch_loss(pipe, data) < 0.95 * before
    reference, *images = generate_in_new_process(zoo / "sdxl", tmp_path / "image", out, [co.LORA_FILE, co.KOHYA_FILE])
    for image in images:
        assert np.abs(image - reference).mean() > 1.0
    assert all(k.startswith("lora_unet_") for k in load_file(out / co.KOHYA_FILE))


def test_cached_and_uncached_training_match(zoo, data, tmp_path):
    flags = ("--max_train_steps", 3, "--random_flip", "--proportion_empty_prompts", 0.3)
    train(zoo, data, tmp_path / "cached", *flags, "--cache_latents", "yes")
    result = train(zoo, data, tmp_path / "uncached", *flags, "--cache_latents", "no")
    assert "latents encoded, text encoded each step" in result.stdout + result.stderr
    a, b = load_file(tmp_path / "cached" / co.LORA_FILE), load_file(tmp_path / "uncached" / co.LORA_FILE)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    base = load_file(tmp_path / "cached" / co.LORA_FILE)
    assert any(v.abs().sum() > 0 for k, v in base.items() if "lora.up" in k)  # the LoRA moved from zero


def test_train_text_encoder_killed_and_resumed_equals_straight(zoo, data, tmp_path):
    flags = ("--train_text_encoder", "--max_train_steps", 6, "--checkpointing_steps", 2, "--learning_rate", 1e-3,
             "--gradient_checkpointing", "--output_kohya_format")
    result = train(zoo, data, tmp_path / "straight", *flags)
    assert "text encoded each step (the text encoders train)" in result.stdout + result.stderr
    # kill -9 while checkpoint-4 is being saved (4 steps are an epoch: the resume crosses into the second)
    train(zoo, data, tmp_path / "halves", *flags, kill_at="checkpoint_written#2")
    assert sorted(os.listdir(tmp_path / "halves")) == [".checkpoint-4.partial", ck.WRITTEN, "checkpoint-2"]
    train(zoo, data, tmp_path / "halves", *flags, "--resume_from_checkpoint", "latest")
    a, b = load_file(tmp_path / "straight" / co.LORA_FILE), load_file(tmp_path / "halves" / co.LORA_FILE)
    assert {k.split(".")[0] for k in a} == {"unet", "text_encoder", "text_encoder_2"}
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):  # up-weights start at 0: each part trained
        assert max(v.abs().max().item() for k, v in a.items() if k.startswith(prefix) and ".up." in k) > 1e-4
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    kohya = load_file(tmp_path / "straight" / co.KOHYA_FILE)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}


def test_two_processes_and_model_kind_check(zoo, data, tmp_path):
    flags = ("--max_train_steps", 3, "--learning_rate", 1e-3, "--random_flip", "--train_text_encoder")
    result = train(zoo, data, tmp_path / "ddp", *flags, "--train_batch_size", 1, launcher=TWO_PROCESSES)
    assert "3 steps of 1 x 1 x 2 images" in result.stdout + result.stderr
    train(zoo, data, tmp_path / "one", *flags)  # batch 2 in one process: the same global batch
    two, one = load_file(tmp_path / "ddp" / co.LORA_FILE), load_file(tmp_path / "one" / co.LORA_FILE)
    assert max(v.abs().max().item() for k, v in one.items() if "lora.up" in k) > 1e-3  # the LoRA moved
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5  # float32 summation order only
    result = run_script("train_craft_sdxl_lora.py", "--pretrained_model_name_or_path", zoo / "sd15",
                        "--train_data_dir", data, "--output_dir", tmp_path / "x", check=False)
    assert result.returncode != 0
    assert "sd15 is a StableDiffusionPipeline; train_craft_sdxl_lora.py trains StableDiffusionXLPipeline: use " \
           "train_craft_sd15.py" in result.stderr


def test_dpo_loss_by_hand_and_a_killed_run_resumed_equals_straight(zoo, tmp_path):
    """SDXL's Diffusion-DPO: the loss logged at step 2 against the formula computed here (both images of each pair,
    one noise and timestep, each image's own SDXL conditioning: the rejected ones are 96x72, the preferred 80x64;
    the model = checkpoint-1's LoRA, the reference = the base); then a run killed while checkpoint-2 is saved,
    resumed, ends where the straight run ends."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pairs = make_pairs_set(tmp_path / "pairs", rejected_size=(96, 72))
    flags = ("--loss", "dpo", "--beta_dpo", 500, "--learning_rate", 3e-3, "--max_train_steps", 3,
             "--checkpointing_steps", 1, "--center_crop")
    train(zoo, pairs, tmp_path / "straight", *flags, "--report_to", "tensorboard")
    logged = tensorboard_scalars(tmp_path / "straight", "loss")
    assert logged[1] == pytest.approx(math.log(2), abs=1e-6) and abs(logged[2] - math.log(2)) > 1e-3

    base = StableDiffusionXLPipeline.from_pretrained(zoo / "sdxl")
    tuned = StableDiffusionXLPipeline.from_pretrained(zoo / "sdxl")
    tuned.load_lora_weights(tmp_path / "straight" / "checkpoint-1", weight_name=co.LORA_FILE)
    scheduler = DDPMScheduler.from_pretrained(zoo / "sdxl", subfolder="scheduler")  # the pipeline's is Euler's
    rows = cu.read_jsonl(pairs / "metadata.jsonl")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cu.derive(5, "order", 0))).tolist()
    # resized to a 64 px short side (96x72 -> 85x64), centre-cropped to 64: original (h, w), crop (top, left), target
    time_ids = {"file_name": [64.0, 80, 0, 8, 64, 64], "rejected_file_name": [72.0, 96, 0, 10, 64, 64]}
    terms = []
    for index in order[2:4]:  # the second batch of two
        row = rows[index]
        with torch.no_grad():
            latents, noise, t = pair_draws(base.vae, pairs, row, 5, index)
            embeds, _, pooled, _ = base.encode_prompt(row["text"], device="cpu", do_classifier_free_guidance=False)
            errors = [[((pipe.unet(scheduler.add_noise(x, noise, t), t, encoder_hidden_states=embeds,
                                   added_cond_kwargs={"time_ids": torch.tensor([time_ids[column]]),
                                                      "text_embeds": pooled}).sample - noise) ** 2).mean().item()
                        for x, column in zip(latents, ("file_name", "rejected_file_name"))] for pipe in (tuned, base)]
        inside = dpo_inside(*errors, 500)
        terms.append(-F.logsigmoid(torch.tensor(inside, dtype=torch.float64)).item())
    assert logged[2] == pytest.approx(sum(terms) / 2, rel=1e-4)

    train(zoo, pairs, tmp_path / "halves", *flags, kill_at="checkpoint_written#2")
    train(zoo, pairs, tmp_path / "halves", *flags, "--resume_from_checkpoint", "latest")
    a, b = load_file(tmp_path / "straight" / co.LORA_FILE), load_file(tmp_path / "halves" / co.LORA_FILE)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
