import json
import math
import os
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import craft_checkpoints as ck
import craft_outputs as co
import craft_data as cd
import craft_training as ct
import craft_utils as cu
from conftest import TWO_PROCESSES, run_script
from make_tiny_models import make_pairs_set, make_training_set


def train(zoo, data, out, *flags, **run):
    return run_script("train_craft_sd15.py", "--pretrained_model_name_or_path", zoo / "sd15", "--train_data_dir", data,
                      "--output_dir", out, "--resolution", 64, "--train_batch_size", 2, "--report_to", "none",
                      "--seed", 3, *flags, **run)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_set(tmp_path_factory.mktemp("data") / "filtered")


def test_per_sample_mse_by_hand_and_a_zero_weight_gives_no_gradient():
    torch.manual_seed(0)
    pred = torch.randn(3, 4, 2, 2, requires_grad=True)
    target = torch.randn(3, 4, 2, 2)
    weights = torch.tensor([2.0, 0.0, 0.5])
    loss = (ct.per_sample_mse(pred, target) * weights).mean()  # the trainers' CRAFT loss line
    by_hand = sum(w * ((p - t) ** 2).sum().item() / 16 for p, t, w in zip(pred.detach(), target, weights.tolist())) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    loss.backward()
    assert torch.all(pred.grad[1] == 0) and pred.grad[0].abs().sum() > 0
    assert torch.allclose(pred.grad[0], 2.0 * 2 * (pred[0] - target[0]).detach() / (16 * 3))


def test_step_in_backward_frees_a_full_buckets_gradients_and_equals_one_optimizer():
    """Buckets of 3 tensors over (used.weight, used.bias, last.weight | last.bias, unused.weight, unused.bias): the
    first steps inside backward and its gradients are gone after it; the second, whose `unused` weights get no
    gradient, is stepped by the lead's step(); after 3 steps both models equal one AdamW's, `unused` untouched."""
    import copy

    torch.manual_seed(0)
    normal_model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 4), "last": torch.nn.Linear(4, 2),
                                        "unused": torch.nn.Linear(4, 4)})
    fused_model, initial = copy.deepcopy(normal_model), copy.deepcopy(normal_model)
    args = SimpleNamespace(learning_rate=0.1, scale_lr=False, use_8bit_adam=False, adam_beta1=0.9, adam_beta2=0.999,
                           adam_weight_decay=0.01, adam_epsilon=1e-8)
    normal = ct.make_optimizer(list(normal_model.parameters()), args, 1)
    fused = ct.StepInBackward(list(fused_model.parameters()), args, 1, bucket_tensors=3)
    assert [len(o.param_groups[0]["params"]) for o in fused.optimizers] == [3, 3]
    for _ in range(3):
        x = torch.randn(5, 4)
        for model, optimizer in ((normal_model, normal), (fused_model, fused.lead)):
            model["last"](model["used"](x)).pow(2).mean().backward()
            if optimizer is fused.lead:
                assert fused_model["used"].weight.grad is None and fused_model["last"].weight.grad is None
                assert fused_model["last"].bias.grad is not None  # its bucket waits for `unused`
            optimizer.step()
            optimizer.zero_grad()
    assert fused_model["last"].bias.grad is None
    for (name, a), b in zip(normal_model.named_parameters(), fused_model.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(fused_model["used"].weight, initial["used"].weight)
    assert not torch.equal(fused_model["last"].bias, initial["last"].bias)
    assert torch.equal(fused_model["unused"].weight, initial["unused"].weight)


def tensorboard_scalars(folder, tag):
    """The scalars the trainer logged under `tag`, by step (accelerate's tensorboard run is logs/craft)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder / "logs" / "craft"))
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def test_first_step_loss_is_the_craft_formula_by_hand(zoo, data, tmp_path):
    """The loss the script logs at step 1 against the formula computed here from each sample's seed: batch order,
    caption dropout, posterior sample, noise, timestep, min-SNR factor and CRAFT weight."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    train(zoo, data, out, "--use_lora", "--max_train_steps", 1, "--train_batch_size", 4, "--center_crop",
          "--snr_gamma", 0.5, "--proportion_empty_prompts", 0.5, "--report_to", "tensorboard")
    logged = tensorboard_scalars(out, "loss")[1]

    pipe = StableDiffusionPipeline.from_pretrained(zoo / "sd15")  # a new LoRA's up-weights are 0: the base UNet
    assert pipe.vae.config.scaling_factor == 0.18215
    alpha_bar = pipe.scheduler.alphas_cumprod
    rows = cu.read_jsonl(data / "metadata.jsonl")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cu.derive(3, "order", 0))).tolist()
    terms, dropped = [], []
    for index in order[:4]:
        row = rows[index]
        draws = torch.Generator().manual_seed(cu.derive(3, "sample", 0, index))
        dropped.append(torch.rand((), generator=draws).item() < 0.5)
        with torch.no_grad():
            dist = pipe.vae.encode(center_crop_pixels(data / row["file_name"])).latent_dist
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=draws)) * 0.18215
            noise = torch.randn(latents.shape[1:], generator=draws)[None]
            t = torch.randint(0, 1000, (), generator=draws).reshape(1)
            ids = pipe.tokenizer(["" if dropped[-1] else row["text"]], padding="max_length", max_length=77,
                                 return_tensors="pt").input_ids
            pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, t), t,
                             encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        snr = (alpha_bar[t] / (1 - alpha_bar[t])).item()
        terms.append(row["weight"] * min(snr, 0.5) / snr * ((pred - noise) ** 2).mean().item())
    assert any(dropped) and not all(dropped)  # both kinds of caption are in the batch
    assert logged == pytest.approx(sum(terms) / 4, rel=1e-4)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs_set(tmp_path_factory.mktemp("pairs") / "pairs")


def test_dpo_loss_is_the_formula_by_hand(zoo, pairs, tmp_path):
    """Diffusion-DPO's loss as logged at steps 1 and 2 against the formula computed here: each pair's preferred and
    rejected images with one noise and timestep, the errors of the model (checkpoint-1's LoRAs, the text encoder's
    too) and of the base (every LoRA off, the text encoder's included)."""
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    train(zoo, pairs, out, "--use_lora", "--train_text_encoder", "--loss", "dpo", "--beta_dpo", 500,
          "--learning_rate", 3e-3, "--max_train_steps", 2, "--checkpointing_steps", 1, "--center_crop",
          "--report_to", "tensorboard")
    logged = tensorboard_scalars(out, "loss")
    assert logged[1] == pytest.approx(math.log(2), abs=1e-6)  # a new LoRA adds 0: the model is its reference

    base = StableDiffusionPipeline.from_pretrained(zoo / "sd15")
    tuned = StableDiffusionPipeline.from_pretrained(zoo / "sd15")
    tuned.load_lora_weights(out / "checkpoint-1", weight_name=co.LORA_FILE)
    rows = cu.read_jsonl(pairs / "metadata.jsonl")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cu.derive(3, "order", 0))).tolist()
    terms, preferred_more = [], []
    for index in order[2:4]:  # the second batch of two
        row = rows[index]
        with torch.no_grad():
            latents, noise, t = pair_draws(base.vae, pairs, row, 3, index)
            ids = base.tokenizer([row["text"]], padding="max_length", max_length=77, return_tensors="pt").input_ids
            errors = {}
            for kind, pipe in (("model", tuned), ("reference", base)):
                text = pipe.text_encoder(ids)[0]
                errors[kind] = [((pipe.unet(base.scheduler.add_noise(x, noise, t), t, encoder_hidden_states=text).sample
                                  - noise) ** 2).mean().item() for x in latents]
        inside = dpo_inside(errors["model"], errors["reference"], 500)
        terms.append(-F.logsigmoid(torch.tensor(inside, dtype=torch.float64)).item())
        preferred_more.append(inside > 0)
    assert abs(logged[2] - math.log(2)) > 1e-3  # the LoRA moved: model and reference differ
    assert logged[2] == pytest.approx(sum(terms) / 2, rel=1e-4)
    # the share of pairs where the model prefers the preferred image more than the base does: none at step 1
    assert tensorboard_scalars(out, "implicit_acc") == {1: 0.0, 2: sum(preferred_more) / 2}


def test_dpo_with_beta_0_gives_no_gradient(zoo, pairs, tmp_path):
    """beta 0: the loss is log 2 whatever the model does, so neither a LoRA (text encoder's too) nor a full
    fine-tune moves (weight decay off: AdamW would shrink the weights without any gradient)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    flags = ("--loss", "dpo", "--beta_dpo", 0, "--adam_weight_decay", 0, "--max_train_steps", 2,
             "--learning_rate", 1e-2)
    train(zoo, pairs, tmp_path / "lora", *flags, "--use_lora", "--train_text_encoder")
    lora = load_file(tmp_path / "lora" / co.LORA_FILE)
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder"}
    up = {k: v for k, v in lora.items() if ".up." in k or "lora_B" in k}  # a new LoRA's up-weights are 0
    assert {k.split(".")[0] for k in up} == {"unet", "text_encoder"} and all(torch.all(v == 0) for v in up.values())
    train(zoo, pairs, tmp_path / "full", *flags)
    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "full", subfolder="unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(zoo / "sd15", subfolder="unet").state_dict()
    assert all(torch.equal(tuned[k], base[k]) for k in base)


def test_dpo_full_fine_tune_resumes_exactly(zoo, pairs, tmp_path):
    """The reference stays the base model after a resume (not the checkpoint's weights); flips and the uncached path
    on the rejected image too. Before the first step the frozen copy is the model: the loss is log 2 (up to the
    rounding by which a forward pass with gradients differs from one without, times beta / 2)."""
    from diffusers import UNet2DConditionModel

    flags = ("--loss", "dpo", "--learning_rate", 1e-3, "--random_flip", "--cache_latents", "no",
             "--checkpointing_steps", 2)
    train(zoo, pairs, tmp_path / "straight", *flags, "--max_train_steps", 4, "--report_to", "tensorboard")
    assert tensorboard_scalars(tmp_path / "straight", "loss")[1] == pytest.approx(math.log(2), abs=1e-3)
    train(zoo, pairs, tmp_path / "halves", *flags, "--max_train_steps", 2)
    train(zoo, pairs, tmp_path / "halves", *flags, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    a, b, base = (UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
                  for folder in (tmp_path / "straight", tmp_path / "halves", zoo / "sd15"))
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4  # it trained
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cached_and_encoded_latents_and_text_are_the_same(zoo, data):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(zoo / "sd15")
    args = SimpleNamespace(dataset_name=None, train_data_dir=str(data), caption_column="text", weight_column="weight",
                           image_column="image", resolution=64, center_crop=False, random_flip=True, seed=3,
                           train_batch_size=2, loss="craft")
    examples, _ = cd.load_examples(args)

    def encode_images(pixels):
        dist = pipe.vae.encode(pixels).latent_dist
        return dist.mean, dist.std

    def encode_captions(captions):
        ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return {"prompt_embeds": pipe.text_encoder(ids.input_ids)[0]}

    cached = cd.Encodings(examples, args, encode_images, encode_captions, cache=True, show_progress=False)
    encoded = cd.Encodings(examples, args, encode_images, encode_captions, cache=False)
    dataset = cd.ImageDataset(examples, args, cached=False)
    dataset.epoch = 1
    batch = cd.collate([dataset[i] for i in (5, 2, 7)])
    assert any(batch["flip"]) and not all(batch["flip"])  # both flips are exercised
    assert batch["weight"].tolist() == [1.75, 1.0, 2.25]  # 0.5 + 0.25 * index
    for a, b in zip(cached.latent_dist(batch), encoded.latent_dist(batch)):
        if isinstance(a, dict):
            assert a == b
        else:
            assert torch.allclose(a, b, atol=1e-5)
    captions = ["", "a red square"]
    assert torch.allclose(cached.text(captions)["prompt_embeds"], encoded.text(captions)["prompt_embeds"], atol=1e-6)


def center_crop_pixels(path, size=64):
    """A training image as the trainer sees it with --center_crop: the short side resized to `size` (bilinear), the
    centre cropped; [-1, 1], batch of one."""
    image = Image.open(path).convert("RGB")
    width, height = (size, int(size * image.height / image.width)) if image.width < image.height else \
        (int(size * image.width / image.height), size)
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def pair_draws(vae, pairs, row, seed, index):
    """A pair's draws as the DPO loop makes them from the sample's seed (epoch 0, caption dropout 0): both images'
    posterior samples (scaled latents, preferred first), then the shared noise and timestep."""
    draws = torch.Generator().manual_seed(cu.derive(seed, "sample", 0, index))
    torch.rand((), generator=draws)  # caption dropout's draw
    latents = []
    for column in ("file_name", "rejected_file_name"):
        dist = vae.encode(center_crop_pixels(pairs / row[column])).latent_dist
        sample = dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=draws)
        latents.append(sample * vae.config.scaling_factor)
    noise = torch.randn(latents[0].shape[1:], generator=draws)[None]
    return latents, noise, torch.randint(0, 1000, (), generator=draws).reshape(1)


def dpo_inside(model_errors, reference_errors, beta):
    """-beta/2 * ((e_w - e_l) - (e_ref_w - e_ref_l)); the pair's loss is -log sigmoid of it."""
    (model_w, model_l), (reference_w, reference_l) = model_errors, reference_errors
    return -0.5 * beta * ((model_w - model_l) - (reference_w - reference_l))


def fixed_batch_loss(pipe, data):
    """Weighted denoising loss of a pipeline on the training images, with fixed noise and timesteps."""
    rows = cu.read_jsonl(data / "metadata.jsonl")
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for row in rows:
        pixels = center_crop_pixels(data / row["file_name"])
        ids = pipe.tokenizer([row["text"]], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            text = pipe.text_encoder(ids)[0]
            for t in (100, 400, 700):
                noise = torch.randn(latents.shape, generator=generator)
                noisy = pipe.scheduler.add_noise(latents, noise, torch.tensor([t]))
                pred = pipe.unet(noisy, torch.tensor([t]), encoder_hidden_states=text).sample
                total += row["weight"] * ((pred - noise) ** 2).mean().item()
    return total / (3 * len(rows))


GENERATE = """
import sys, torch
from diffusers import DiffusionPipeline
model, out, lora_dir, weight_names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
for index, weight_name in enumerate([None, *weight_names]):  # the base, then a fresh pipeline for each LoRA file
    pipe = DiffusionPipeline.from_pretrained(model)
    if weight_name:
        pipe.load_lora_weights(lora_dir, weight_name=weight_name)
    image = pipe("a red square", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    image.save(f"{out}-{index}.png")
"""


def generate_in_new_process(model, out, lora_dir, weight_names):
    """The base model's image, then the image of a fresh pipeline with each LoRA file loaded, from one new Python."""
    import subprocess

    from conftest import subprocess_env

    subprocess.run([sys.executable, "-c", GENERATE, str(model), str(out), str(lora_dir), *weight_names], check=True,
                   env=subprocess_env(), capture_output=True)
    return [np.asarray(Image.open(f"{out}-{index}.png"), dtype=np.int16) for index in range(1 + len(weight_names))]


def test_lora_reduces_the_loss_and_its_files_load_in_fresh_pipelines(zoo, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    result = train(zoo, data, out, "--use_lora", "--rank", 8, "--learning_rate", 1e-2, "--max_train_steps", 40,
                   "--output_kohya_format", "--checkpointing_steps", 1000, "--center_crop")
    assert "8 training images (weights from column 'weight' (sum 11.00))" in result.stdout + result.stderr
    base = StableDiffusionPipeline.from_pretrained(zoo / "sd15")
    before = fixed_batch_loss(base, data)
    base.load_lora_weights(out, weight_name=co.LORA_FILE)
    after = fixed_batch_loss(base, data)
    assert after < 0.95 * before  # attention-only LoRA on a random tiny UNet: a small but clear drop

    reference, *images = generate_in_new_process(zoo / "sd15", tmp_path / "image", out, [co.LORA_FILE, co.KOHYA_FILE])
    for image in images:
        assert np.abs(image - reference).mean() > 1.0
    from safetensors.torch import load_file

    kohya = load_file(out / co.KOHYA_FILE)
    assert all(k.startswith("lora_unet_") for k in kohya) and any(k.endswith(".lora_down.weight") for k in kohya)
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    config = json.loads((out / "training_config.json").read_text())
    assert config["data"]["num_images"] == 8 and config["data"]["latents_cached"] is True
    assert "lora" in (out / "README.md").read_text()


def test_text_encoder_lora_trains_and_loads_into_the_pipelines_text_encoder(zoo, data, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    result = train(zoo, data, out, "--use_lora", "--train_text_encoder", "--learning_rate", 1e-2,
                   "--max_train_steps", 4, "--output_kohya_format", "--checkpointing_steps", 1000, "--rank", 8,
                   "--lora_alpha", 2)
    assert "text encoded each step (the text encoder trains)" in result.stdout + result.stderr
    lora = load_file(out / co.LORA_FILE)
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder"}
    kohya = load_file(out / co.KOHYA_FILE)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te"}  # kohya's SD1.x names
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}
    pipe = StableDiffusionPipeline.from_pretrained(zoo / "sd15")
    ids = pipe.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(out, weight_name=co.LORA_FILE)
        after = pipe.text_encoder(ids)[0]
    assert (after - before).abs().max() > 1e-3
    # --lora_alpha travels in the file's metadata: loaded at scale alpha / rank = 2 / 8, not a loader's default 1
    loaded = (next(m for name, m in pipe.unet.named_modules() if name.endswith("attn1.to_q")),
              next(m for name, m in pipe.text_encoder.named_modules() if name.endswith("self_attn.q_proj")))
    assert [set(module.scaling.values()) for module in loaded] == [{0.25}, {0.25}]
    result = run_script("train_craft_sd15.py", "--pretrained_model_name_or_path", zoo / "sd15", "--train_data_dir",
                        data, "--output_dir", tmp_path / "full", "--train_text_encoder", check=False)
    assert result.returncode != 0 and "use it with --use_lora" in result.stderr


def test_full_fine_tune_with_ema_and_8bit_adam_resumes_exactly(zoo, data, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    flags = ("--max_train_steps", 6, "--checkpointing_steps", 3, "--use_ema", "--use_8bit_adam",
             "--learning_rate", 1e-3, "--random_flip", "--proportion_empty_prompts", 0.2)
    train(zoo, data, tmp_path / "straight", *flags)
    train(zoo, data, tmp_path / "halves", *flags)
    # keep only the step-3 checkpoint, then resume from it (an absolute path) to step 6
    for name in os.listdir(tmp_path / "halves"):
        if name != "checkpoint-3":
            path = tmp_path / "halves" / name
            __import__("shutil").rmtree(path) if path.is_dir() else path.unlink()
    result = train(zoo, data, tmp_path / "halves", *flags, "--resume_from_checkpoint", tmp_path / "halves" /
                   "checkpoint-3")
    assert "resumed from" in result.stdout + result.stderr
    straight = UNet2DConditionModel.from_pretrained(tmp_path / "straight", subfolder="unet").state_dict()
    resumed = UNet2DConditionModel.from_pretrained(tmp_path / "halves", subfolder="unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(zoo / "sd15", subfolder="unet").state_dict()
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
    assert any(not torch.equal(straight[k], base[k]) for k in straight)
    tuned = StableDiffusionPipeline.from_pretrained(tmp_path / "straight")  # a complete pipeline folder
    assert fixed_batch_loss(tuned, data) < 0.8 * fixed_batch_loss(StableDiffusionPipeline.from_pretrained(
        zoo / "sd15"), data)


def test_fused_optimizer_step_equals_the_normal_step_and_resumes_exactly(zoo, data, tmp_path):
    """Adam stepped per weight inside backward (no gradient buffer) trains the very weights the normal step does
    (8-bit Adam, a warm-up schedule), and killed while saving checkpoint-4 then resumed it ends where it would have."""
    from diffusers import UNet2DConditionModel

    flags = ("--max_train_steps", 6, "--checkpointing_steps", 2, "--use_8bit_adam", "--learning_rate", 1e-3,
             "--max_grad_norm", 0, "--lr_scheduler", "linear", "--lr_warmup_steps", 2, "--random_flip")
    train(zoo, data, tmp_path / "normal", *flags)
    train(zoo, data, tmp_path / "fused", *flags, "--fused_optimizer_step")
    train(zoo, data, tmp_path / "killed", *flags, "--fused_optimizer_step", kill_at="checkpoint_written#2")
    train(zoo, data, tmp_path / "killed", *flags, "--fused_optimizer_step", "--resume_from_checkpoint", "latest")
    normal, fused, resumed = (UNet2DConditionModel.from_pretrained(tmp_path / run, subfolder="unet").state_dict()
                              for run in ("normal", "fused", "killed"))
    base = UNet2DConditionModel.from_pretrained(zoo / "sd15", subfolder="unet").state_dict()
    assert sum(not torch.equal(normal[k], base[k]) for k in normal) > 0.9 * len(normal)
    assert all(torch.equal(normal[k], fused[k]) for k in normal)
    assert all(torch.equal(fused[k], resumed[k]) for k in fused)


def test_lora_resume_latest_equals_straight(zoo, data, tmp_path):
    from safetensors.torch import load_file

    flags = ("--use_lora", "--max_train_steps", 4, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1)
    train(zoo, data, tmp_path / "straight", *flags)
    train(zoo, data, tmp_path / "halves", *flags[:-4], "--max_train_steps", 2, "--checkpointing_steps", 2)
    assert (tmp_path / "halves" / "checkpoint-2" / co.LORA_FILE).exists()
    (tmp_path / "halves" / co.LORA_FILE).unlink()
    train(zoo, data, tmp_path / "halves", *flags, "--resume_from_checkpoint", "latest")
    assert sorted(d for d in os.listdir(tmp_path / "halves") if d.startswith("checkpoint")) == ["checkpoint-4"]
    a, b = load_file(tmp_path / "straight" / co.LORA_FILE), load_file(tmp_path / "halves" / co.LORA_FILE)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_across_epochs_and_two_processes_equal_one(zoo, data, tmp_path):
    """8 images in batches of 2 are 4 steps an epoch: stop at step 6, resume to 10; and 2 processes x 1 image
    train what 1 process x 2 images trains (each sample's draws are its own)."""
    from safetensors.torch import load_file

    flags = ("--use_lora", "--learning_rate", 1e-3, "--random_flip", "--proportion_empty_prompts", 0.3)
    train(zoo, data, tmp_path / "straight", *flags, "--max_train_steps", 10, "--checkpointing_steps", 6)
    train(zoo, data, tmp_path / "halves", *flags, "--max_train_steps", 6, "--checkpointing_steps", 6)
    train(zoo, data, tmp_path / "halves", *flags, "--max_train_steps", 10, "--checkpointing_steps", 6,
          "--resume_from_checkpoint", "latest")
    a, b = load_file(tmp_path / "straight" / co.LORA_FILE), load_file(tmp_path / "halves" / co.LORA_FILE)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    result = train(zoo, data, tmp_path / "ddp", *flags, "--max_train_steps", 6, "--train_batch_size", 1,
                   launcher=TWO_PROCESSES)
    assert "6 steps of 1 x 1 x 2 images" in result.stdout + result.stderr
    one = load_file(tmp_path / "halves" / "checkpoint-6" / co.LORA_FILE)
    two = load_file(tmp_path / "ddp" / co.LORA_FILE)
    moved = max((one[k] - load_file(tmp_path / "straight" / co.LORA_FILE)[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # four more steps move the weights by ~4e-3: the tolerance below tells runs apart
    # equal up to float32 summation order (the all-reduce vs one batch): measured 1.4e-6
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


@pytest.fixture(scope="module")
def uninterrupted(zoo, data, tmp_path_factory):
    """The kill tests' flags and the run they must reproduce."""
    flags = ("--use_lora", "--learning_rate", 1e-3, "--max_train_steps", 6, "--checkpointing_steps", 2,
             "--output_kohya_format", "--gradient_accumulation_steps", 2, "--checkpoints_total_limit", 2)
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    train(zoo, data, out, *flags, fresh_interpreter=True)  # other string hashing than the runs it must equal
    return flags, out


@pytest.mark.parametrize("kill_at", ["checkpoint_written", "checkpoint_written#2", "swap_old_aside",
                                     "final_weights_written", "entry_moved"])
def test_killed_run_resumed_with_latest_equals_an_uninterrupted_one(zoo, data, tmp_path, kill_at,
                                                                     uninterrupted):
    """kill -9 while the first or the second checkpoint is being saved or swapped in, or while the final weights
    are saved or moved in: a half-saved file never takes a real name, and `--resume_from_checkpoint latest` ends
    where a run that was never stopped ends (gradient accumulation 2: 2 steps an epoch), with nothing left over."""
    from safetensors.torch import load_file

    flags, straight = uninterrupted
    out = tmp_path / "killed"
    train(zoo, data, out, *flags, kill_at=kill_at)
    whole = {"checkpoint_written": [], "checkpoint_written#2": ["checkpoint-2"], "swap_old_aside": [],
             "final_weights_written": ["checkpoint-4", "checkpoint-6"],
             "entry_moved": ["checkpoint-4", "checkpoint-6"]}[kill_at]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == whole
    assert (out / co.LORA_FILE).exists() == (kill_at == "entry_moved")  # whole if there: moved in one piece
    result = train(zoo, data, out, *flags, "--resume_from_checkpoint", "latest")
    assert ("resumed from" in result.stderr + result.stdout) == (bool(whole) or kill_at == "swap_old_aside")
    for name in (co.LORA_FILE, co.KOHYA_FILE):
        a, b = load_file(straight / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [ck.WRITTEN]  # the record of its files


def test_validation_grids_reward_curve_and_tensorboard(zoo, data, tmp_path):
    out = tmp_path / "out"
    result = train(zoo, data, out, "--use_lora", "--max_train_steps", 4, "--validation_prompt", "a red square",
                   "--validation_prompt", "a blue square", "--num_validation_images", 3, "--validation_steps", 2,
                   "--validation_inference_steps", 2, "--validation_rewards", "jpeg", "--report_to", "tensorboard")
    # step 0: the starting model, which the later validations are compared with
    assert sorted(os.listdir(out / "validation")) == [f"step-00000{step}{kind}" for step in (0, 2, 4)
                                                      for kind in ("", ".json", ".png")]
    # the grid: a label column and 3 seeds of 256 pixels, a header line, 2 prompts with a line of scores under each
    width, height = Image.open(out / "validation" / "step-000004.png").size
    assert width == 4 * 256 and 2 * 256 < height < 2 * 256 + 3 * 40
    # the logged reward is the mean JPEG size of the six images, measured here by hand
    sizes = []
    for name in sorted(os.listdir(out / "validation" / "step-000004")):
        buffer = __import__("io").BytesIO()
        Image.open(out / "validation" / "step-000004" / name).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell())
    assert len(sizes) == 6
    assert tensorboard_scalars(out, "validation/jpeg")[4] == pytest.approx(-sum(sizes) / 6000, rel=1e-6)
    # the drift statistics of the same six images, and their diversity across the 3 seeds of each prompt
    import craft_drift as cdr

    images = [Image.open(out / "validation" / "step-000004" / name)
              for name in sorted(os.listdir(out / "validation" / "step-000004"))]
    saturation = sum(cdr.pixel_stats(image)["saturation"] for image in images) / 6
    assert tensorboard_scalars(out, "drift/saturation")[4] == pytest.approx(saturation, rel=1e-5)
    assert tensorboard_scalars(out, "drift/diversity")[4] == pytest.approx(
        (cdr.diversity(images[:3]) + cdr.diversity(images[3:])) / 2, rel=1e-5)
    record = json.loads((out / "validation" / "step-000004.json").read_text())  # what step 0 is compared with
    assert record["prompts"] == ["a red square"] * 3 + ["a blue square"] * 3
    assert record["rewards"]["jpeg"] == pytest.approx([-size / 1000 for size in sizes])
    assert record["stats"] == [pytest.approx(cdr.pixel_stats(image)) for image in images]
    assert f"step 4: validation/jpeg {-sum(sizes) / 6000:.4f}" in result.stdout + result.stderr
    assert "![validation](validation/step-000004.png)" in (out / "README.md").read_text()


def test_model_card_and_hub_upload_without_network(tmp_path, data):
    import train_craft_sd15

    (data.parent / "report").mkdir(exist_ok=True)
    args = train_craft_sd15.parse_args(["--pretrained_model_name_or_path", "base/model", "--train_data_dir",
                                        str(data), "--output_dir", str(tmp_path / "out"), "--push_to_hub",
                                        "--hub_model_id", "me/craft-sd15", "--use_lora"])
    os.makedirs(args.output_dir)
    co.write_model_card(args, {"num_images": 8, "weights": "w", "steps": 5}, is_lora=True, license="mit",
                        model_tags=["my-family"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: base/model" in card and "- craft" in card and "- lora" in card
    assert "license: mit" in card and "- my-family" in card
    assert 'pipe.load_lora_weights("me/craft-sd15"' in card
    args.loss, args.beta_dpo = "dpo", 2500.0
    co.write_model_card(args, {"num_images": 8, "weights": "w", "steps": 5}, is_lora=True, license="mit",
                        model_tags=[])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# Diffusion-DPO LoRA of base/model" in card and "beta 2500" in card and "- diffusion-dpo" in card
    assert "- craft\n" not in card and "- training pairs: 8" in card
    with mock.patch("huggingface_hub.create_repo") as create_repo, mock.patch("huggingface_hub.upload_folder") as up:
        create_repo.return_value = SimpleNamespace(repo_id="me/craft-sd15")
        assert co.push_to_hub(args) == "me/craft-sd15"
    kwargs = up.call_args.kwargs
    assert kwargs["repo_id"] == "me/craft-sd15" and kwargs["folder_path"] == args.output_dir
    assert "checkpoint-*" in kwargs["ignore_patterns"] and "logs/**" in kwargs["ignore_patterns"]
    with pytest.raises(SystemExit) as stopped:  # offline (the tests' HF_HUB_OFFLINE=1): one line, weights kept
        co.push_to_hub(args)
    assert str(stopped.value).startswith("error: the upload to the Hub (me/craft-sd15) failed (OfflineModeIsEnabled: ")
    assert str(stopped.value).endswith(f"the weights are saved in {args.output_dir}: once online and logged in (`hf "
                                       f"auth login`), upload them with `hf upload me/craft-sd15 {args.output_dir} "
                                       "--exclude 'checkpoint-*/**' --exclude 'logs/**' --exclude '.*'`")


def test_config_file_supplies_defaults_and_flags_win(tmp_path, data, capsys):
    import train_craft_sd15

    (tmp_path / "recipe.toml").write_text('learning_rate = 2e-6\nrank = 16\npretrained_model_name_or_path = "m"\n')
    args = train_craft_sd15.parse_args(["--config", str(tmp_path / "recipe.toml"), "--train_data_dir", str(data),
                                        "--rank", "8", "--output_dir", str(tmp_path / "o")])
    assert (args.learning_rate, args.rank, args.pretrained_model_name_or_path) == (2e-6, 8, "m")
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rat": 1}))
    with pytest.raises(SystemExit, match="unknown key 'learning_rat'"):
        train_craft_sd15.parse_args(["--config", str(tmp_path / "bad.json"), "--train_data_dir", str(data)])
    with pytest.raises(SystemExit):
        train_craft_sd15.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", str(data),
                                     "--hub_token", "x", "--report_to", "wandb"])
    assert "--hub_token with --report_to wandb would expose the token" in capsys.readouterr().err
    with mock.patch.dict(sys.modules, {"bitsandbytes": None}), pytest.raises(SystemExit):
        train_craft_sd15.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", str(data),
                                     "--use_8bit_adam"])
    assert "--use_8bit_adam needs bitsandbytes: pip install bitsandbytes" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_dir", "no_metadata", "no_caption", "corrupt_image", "negative_weight",
                                  "nan_weight", "all_zero", "weight_missing_in_a_row", "misspelled_weight_column",
                                  "output_not_empty", "resume_latest_without_checkpoint", "sdxl_model",
                                  "fused_step_with_clipping", "fused_step_with_lora", "float32_overflow_weight",
                                  "nan_learning_rate", "infinite_noise_offset"])
def test_bad_input_is_one_clear_error(zoo, tmp_path, case):
    data = make_training_set(tmp_path / "data", n=3)
    rows = cu.read_jsonl(data / "metadata.jsonl")
    model, extra = "sd15", []
    expected = {
        "missing_dir": f"--train_data_dir {tmp_path}/nope does not exist",
        "no_metadata": f"{data} has no metadata.jsonl",
        "no_caption": f"{data}/metadata.jsonl, row 2: no 'text' caption",
        "corrupt_image": f"{data}/metadata.jsonl, row 3: cannot read image {data}/002.png",
        "negative_weight": f"{data}/metadata.jsonl, row 1: weight -1.0 must be a finite number >= 0",
        "nan_weight": f"{data}/metadata.jsonl, row 2: weight nan must be a finite number >= 0",
        "float32_overflow_weight": f"{data}/metadata.jsonl, row 2: weight 1e+39 must be a finite number >= 0 (below "
                                   "3.4e38, float32's largest)",
        "nan_learning_rate": "--learning_rate must be a finite number (got nan)",
        "infinite_noise_offset": "--noise_offset must be a finite number (got inf)",
        "all_zero": "every weight is 0, nothing would train",
        "weight_missing_in_a_row": f"{data}/metadata.jsonl, row 2: no 'weight' value, though other rows have one",
        "misspelled_weight_column": f"{data}/metadata.jsonl: no row has a 'wieght' column; name the weight column "
                                    "with --weight_column, or pass --weight_column none",
        "output_not_empty": f"{tmp_path}/out is not empty; pass --overwrite_output_dir",
        "resume_latest_without_checkpoint": f"{tmp_path}/out is not empty and holds no checkpoint-* to resume from; "
                                            "pass --overwrite_output_dir to train anew over it, or choose another",
        "sdxl_model": "sdxl is a StableDiffusionXLPipeline; train_craft_sd15.py trains StableDiffusionPipeline: use "
                      "train_craft_sdxl_lora.py",
        "fused_step_with_clipping": "--fused_optimizer_step steps each weight before the gradient's global norm is "
                                    "known: add --max_grad_norm 0 (no clipping)",
        "fused_step_with_lora": "--fused_optimizer_step saves a full fine-tune's gradient buffer; a LoRA's is small: "
                                "leave it out with --use_lora",
    }[case]
    change = {"no_caption": (1, "text", None), "negative_weight": (0, "weight", -1.0),
              "nan_weight": (1, "weight", float("nan")), "float32_overflow_weight": (1, "weight", 1e39),
              "weight_missing_in_a_row": (1, "weight", None)}
    if case == "missing_dir":
        data = tmp_path / "nope"
    elif case == "no_metadata":
        (data / "metadata.jsonl").unlink()
    elif case == "corrupt_image":
        (data / "002.png").write_bytes(b"not a png")
    elif case in ("output_not_empty", "resume_latest_without_checkpoint"):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")  # e.g. a finished LoRA
        if case == "resume_latest_without_checkpoint":
            extra.append("--resume_from_checkpoint=latest")
    elif case == "sdxl_model":
        model = "sdxl"
    elif case.startswith("fused_step"):
        extra += ["--fused_optimizer_step", *(["--use_lora", "--max_grad_norm", "0"] if "lora" in case else [])]
    elif case == "misspelled_weight_column":
        extra.append("--weight_column=wieght")
    elif case in ("nan_learning_rate", "infinite_noise_offset"):
        extra += ["--learning_rate", "nan"] if case == "nan_learning_rate" else ["--noise_offset", "inf"]
    elif case == "all_zero":
        cu.write_jsonl_atomic(data / "metadata.jsonl", [{**row, "weight": 0.0} for row in rows])
    else:
        index, column, value = change[case]
        rows[index][column] = value
        if value is None:
            del rows[index][column]
        cu.write_jsonl_atomic(data / "metadata.jsonl", rows)
    result = run_script("train_craft_sd15.py", "--pretrained_model_name_or_path", zoo / model, "--train_data_dir",
                        data, "--output_dir", tmp_path / "out", "--max_train_steps", 1, *extra, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
    if case in ("output_not_empty", "resume_latest_without_checkpoint"):
        assert os.listdir(tmp_path / "out") == ["keep.txt"]


@pytest.mark.parametrize("case", ["dpo_on_the_craft_set", "craft_on_pairs", "no_rejected_in_a_row",
                                  "corrupt_rejected_image", "snr_gamma", "negative_beta"])
def test_bad_dpo_input_is_one_clear_error(zoo, tmp_path, case):
    data = make_pairs_set(tmp_path / "pairs", n=3)
    extra = ["--loss", "dpo"]
    expected = {
        "dpo_on_the_craft_set": f"{tmp_path}/craft/metadata.jsonl, row 1: no 'rejected_file_name' (the rejected "
                                "image): --loss dpo trains on preference pairs; make them with crf_filter.py "
                                "--mode pairs",
        "craft_on_pairs": f"{data}/metadata.jsonl holds preference pairs (crf_filter.py --mode pairs): train them with "
                          "--loss dpo, give the CRAFT set (crf_filter.py's default mode), or --weight_column none",
        "negative_beta": "--beta_dpo must be >= 0 (a negative value would reverse the preference)",
        "no_rejected_in_a_row": f"{data}/metadata.jsonl, row 2: no 'rejected_file_name'",
        "corrupt_rejected_image": f"{data}/metadata.jsonl, row 3: cannot read image {data}/002_rejected.png",
        "snr_gamma": "--snr_gamma weights the CRAFT loss's terms; Diffusion-DPO's (--loss dpo) has none",
    }[case]
    if case == "dpo_on_the_craft_set":
        data = make_training_set(tmp_path / "craft", n=3)
    elif case == "craft_on_pairs":
        extra = []
    elif case == "no_rejected_in_a_row":
        rows = cu.read_jsonl(data / "metadata.jsonl")
        del rows[1]["rejected_file_name"]
        cu.write_jsonl_atomic(data / "metadata.jsonl", rows)
    elif case == "corrupt_rejected_image":
        (data / "002_rejected.png").write_bytes(b"not a png")
    elif case == "negative_beta":
        extra += ["--beta_dpo", "-1"]
    else:
        extra += ["--snr_gamma", "5"]
    result = run_script("train_craft_sd15.py", "--pretrained_model_name_or_path", zoo / "sd15", "--train_data_dir",
                        data, "--output_dir", tmp_path / "out", "--max_train_steps", 1, *extra, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
