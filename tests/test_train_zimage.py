"""train_craft_zimage_lora.py on the zoo's tiny Z-Image pipeline (Qwen3 encoder, single-stream transformer, the
configs of diffusers' own tests): the CRAFT loss by hand against the pipeline's own prompt encoding, exact resume, two
processes, the LoRA in ZImagePipeline and in generation, and bad input in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

import craft_outputs as co
import craft_utils as cu
from conftest import TWO_PROCESSES, run_script
from make_tiny_models import make_pairs_set, make_training_set
from test_train_flux import LIFT_GPU_CHECK
from test_train_sd15 import center_crop_pixels, tensorboard_scalars


def train(zoo, data, out, *flags, **run):
    return run_script("train_craft_zimage_lora.py", "--pretrained_model_name_or_path", zoo / "zimage",
                      "--train_data_dir", data, "--output_dir", out, "--resolution", 32, "--train_batch_size", 2,
                      "--report_to", "none", "--max_sequence_length", 32, "--seed", 7, *flags, **run)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_set(tmp_path_factory.mktemp("data") / "filtered")


def test_first_step_loss_is_the_z_image_craft_formula_by_hand(zoo, data, tmp_path):
    """The loss logged at step 1 against the formula computed here from each sample's seed: caption dropout, the
    posterior sample shifted and scaled, noise, a logit-normal sigma, x_t = (1 - s) x0 + s noise, the transformer told
    the time as 1 - s and its prediction negated, the pipeline's own prompt encoding; times the CRAFT weight."""
    from diffusers import ZImagePipeline

    out = tmp_path / "out"
    train(zoo, data, out, "--max_train_steps", 1, "--train_batch_size", 4, "--center_crop",
          "--proportion_empty_prompts", 0.5, "--weighting_scheme", "logit_normal", "--logit_mean", 0.3,
          "--report_to", "tensorboard")
    logged = tensorboard_scalars(out, "loss")[1]

    pipe = ZImagePipeline.from_pretrained(zoo / "zimage")  # a new LoRA's up-weights are 0: the base transformer
    vae = pipe.vae
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.1159, 0.3611)
    rows = cu.read_jsonl(data / "metadata.jsonl")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cu.derive(7, "order", 0))).tolist()
    terms, dropped = [], []
    for index in order[:4]:
        row = rows[index]
        draws = torch.Generator().manual_seed(cu.derive(7, "sample", 0, index))
        dropped.append(torch.rand((), generator=draws).item() < 0.5)
        with torch.no_grad():
            dist = vae.encode(center_crop_pixels(data / row["file_name"], 32)).latent_dist
            x0 = (dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=draws) - 0.1159) * 0.3611
            noise = torch.randn(x0.shape[1:], generator=draws)[None]
            u = torch.sigmoid(0.3 + torch.randn((), generator=draws))
            sigma = 1 - int(u * 1000) / 1000  # the training schedule (shift 1): sigma = t / 1000, t = 1000 ... 1
            noisy = (1 - sigma) * x0 + sigma * noise
            features = pipe._encode_prompt(["" if dropped[-1] else row["text"]], "cpu", max_sequence_length=32)
            pred = -pipe.transformer([noisy[0].unsqueeze(1)], torch.tensor([1 - sigma]), features).sample[0][:, 0]
        terms.append(row["weight"] * ((pred - (noise[0] - x0[0])) ** 2).mean().item())
    assert any(dropped) and not all(dropped)  # both kinds of caption are in the batch
    assert logged == pytest.approx(sum(terms) / 4, rel=1e-4)


def test_killed_resumed_and_two_processes_equal_one_straight_run(zoo, data, tmp_path):
    flags = ("--max_train_steps", 6, "--checkpointing_steps", 2, "--learning_rate", 1e-3, "--random_flip",
             "--weighting_scheme", "mode", "--proportion_empty_prompts", 0.3)
    train(zoo, data, tmp_path / "straight", *flags)
    train(zoo, data, tmp_path / "halves", *flags, kill_at="checkpoint_written#2")  # while checkpoint-4 is saved
    train(zoo, data, tmp_path / "halves", *flags, "--resume_from_checkpoint", "latest")
    a, b = load_file(tmp_path / "straight" / co.LORA_FILE), load_file(tmp_path / "halves" / co.LORA_FILE)
    assert all(k.startswith("transformer.") for k in a)
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # it trained
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    result = train(zoo, data, tmp_path / "ddp", *flags, "--train_batch_size", 1, launcher=TWO_PROCESSES)
    assert "6 steps of 1 x 1 x 2 images" in result.stdout + result.stderr
    two = load_file(tmp_path / "ddp" / co.LORA_FILE)
    assert max((a[k] - two[k]).abs().max().item() for k in a) < 1e-5  # float32 summation order only


def test_lora_loads_into_z_image_pipeline_and_generates_candidates(zoo, data, tmp_path):
    from diffusers import ZImagePipeline

    out = tmp_path / "lora"
    train(zoo, data, out, "--max_train_steps", 20, "--learning_rate", 1e-2, "--rank", 8, "--lora_alpha", 4,
          "--validation_prompt", "a red square", "--num_validation_images", 2, "--validation_inference_steps", 2,
          "--validation_steps", 20)
    lora = load_file(out / co.LORA_FILE)
    assert all(".lora_A." in k or ".lora_B." in k for k in lora)
    card = (out / "README.md").read_text()
    assert (out / "validation" / "step-000020.png").exists() and "license: apache-2.0" in card and "- z-image" in card
    pipe = ZImagePipeline.from_pretrained(zoo / "zimage")

    def image():
        return torch.from_numpy(pipe("a red square", height=32, width=32, num_inference_steps=2, output_type="np",
                                     max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images[0])

    before = image()
    pipe.load_lora_weights(out, weight_name=co.LORA_FILE)
    assert (image() - before).abs().mean() > 1e-3
    assert set(pipe.transformer.layers[0].attention.to_q.scaling.values()) == {4 / 8}  # --lora_alpha kept

    # the next round's candidates come from the tuned model
    (tmp_path / "prompts.txt").write_text("a red square\na blue square\n")
    run_script("generate_candidates.py", "--pretrained_model_name_or_path", zoo / "zimage", "--lora_path", out,
               "--prompts_file", tmp_path / "prompts.txt", "--num_variants", 1, "--num_images_per_prompt", 1,
               "--num_inference_steps", 2, "--height", 32, "--width", 32, "--max_sequence_length", 32,
               "--output_dir", tmp_path / "round2")
    assert len(cu.read_jsonl(tmp_path / "round2" / "metadata.jsonl")) == 2 * 2
    assert json.loads((tmp_path / "round2" / "generation_config.json").read_text())["settings"]["lora_path"] == str(out)


@pytest.mark.parametrize("case", ["flux_model", "sd15_script", "ddpm_flag", "pairs_folder", "resolution"])
def test_bad_input_is_one_clear_error(zoo, data, tmp_path, case):
    script, model, train_data, extra = "train_craft_zimage_lora.py", "zimage", data, []
    expected = {
        "flux_model": "flux is a FluxPipeline; train_craft_zimage_lora.py trains ZImagePipeline: use "
                      "train_craft_flux_lora.py",
        "sd15_script": "zimage is a ZImagePipeline; train_craft_sd15.py trains StableDiffusionPipeline: use "
                       "train_craft_zimage_lora.py",
        "ddpm_flag": "unrecognized arguments: --snr_gamma 5",
        "pairs_folder": "holds preference pairs (crf_filter.py --mode pairs): train them with --loss dpo",
        "resolution": "--resolution 30 must be a multiple of 4 for this model (VAE x 2x2 patches)",
    }[case]
    if case == "flux_model":
        model = "flux"
    elif case == "sd15_script":
        script = "train_craft_sd15.py"
    elif case == "ddpm_flag":
        extra = ["--snr_gamma", "5"]
    elif case == "pairs_folder":
        train_data = make_pairs_set(tmp_path / "pairs")
    else:
        extra = ["--resolution", "30"]
    result = run_script(script, "--pretrained_model_name_or_path", zoo / model, "--train_data_dir", train_data,
                        "--output_dir", tmp_path / "out", "--max_train_steps", 1, *extra, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_nf4_base_trains_its_lora_on_4_bit_weights(zoo, data, tmp_path):
    """--quantize_base nf4 through the script's own path (LoRAs on bitsandbytes' Linear4bit): the first loss is the
    full-precision run's up to the quantization error, the LoRA trains, and its file loads into the unquantized
    pipeline."""
    from diffusers import ZImagePipeline

    flags = ("--max_train_steps", 3, "--learning_rate", 1e-2, "--report_to", "tensorboard")
    train(zoo, data, tmp_path / "full", *flags)
    train(zoo, data, tmp_path / "nf4", *flags, "--quantize_base", "nf4", launcher=LIFT_GPU_CHECK)
    full, nf4 = tensorboard_scalars(tmp_path / "full", "loss")[1], tensorboard_scalars(tmp_path / "nf4", "loss")[1]
    assert full != nf4 and abs(nf4 - full) < 0.1 * full
    lora = load_file(tmp_path / "nf4" / co.LORA_FILE)
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-4
    ZImagePipeline.from_pretrained(zoo / "zimage").load_lora_weights(tmp_path / "nf4")


def test_dpo_on_velocities_by_hand_and_beta_0_leaves_the_lora_unchanged(zoo, tmp_path):
    """--loss dpo: step 1 is log 2 (the new LoRA is the base); the loss logged at step 2 against the formula
    computed here with checkpoint-1's LoRA as the model and the base as the reference: both images of each pair with
    one noise and one sigma, Z-Image's negated prediction; implicit_acc logged. With beta 0 nothing moves."""
    import math

    import torch.nn.functional as F
    from diffusers import ZImagePipeline

    from test_train_sd15 import dpo_inside

    pairs = make_pairs_set(tmp_path / "pairs")
    flags = ("--loss", "dpo", "--beta_dpo", 500, "--learning_rate", 3e-3, "--max_train_steps", 2,
             "--checkpointing_steps", 1, "--center_crop", "--report_to", "tensorboard")
    train(zoo, pairs, tmp_path / "dpo", *flags)
    logged = tensorboard_scalars(tmp_path / "dpo", "loss")
    assert logged[1] == pytest.approx(math.log(2), abs=1e-6) and abs(logged[2] - math.log(2)) > 1e-4

    base, tuned = ZImagePipeline.from_pretrained(zoo / "zimage"), ZImagePipeline.from_pretrained(zoo / "zimage")
    tuned.load_lora_weights(tmp_path / "dpo" / "checkpoint-1", weight_name=co.LORA_FILE)
    rows = cu.read_jsonl(pairs / "metadata.jsonl")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cu.derive(7, "order", 0))).tolist()
    terms, insides = [], []
    for index in order[2:4]:  # the second batch of two
        row = rows[index]
        draws = torch.Generator().manual_seed(cu.derive(7, "sample", 0, index))
        torch.rand((), generator=draws)  # caption dropout's draw
        with torch.no_grad():
            images = []
            for column in ("file_name", "rejected_file_name"):
                dist = base.vae.encode(center_crop_pixels(pairs / row[column], 32)).latent_dist
                sample = dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=draws)
                images.append((sample[0] - 0.1159) * 0.3611)
            noise = torch.randn(images[0].shape, generator=draws)
            sigma = 1 - int(torch.rand((), generator=draws) * 1000) / 1000  # --weighting_scheme none: uniform
            features = base._encode_prompt([row["text"]], "cpu", max_sequence_length=32)
            errors = [[((-pipe.transformer([((1 - sigma) * x0 + sigma * noise).unsqueeze(1)],
                                           torch.tensor([1 - sigma]), features).sample[0][:, 0] - (noise - x0)) ** 2)
                        .mean().item() for x0 in images] for pipe in (tuned, base)]
        insides.append(dpo_inside(*errors, 500))
        terms.append(-F.logsigmoid(torch.tensor(insides[-1], dtype=torch.float64)).item())
    assert logged[2] == pytest.approx(sum(terms) / 2, rel=1e-4)
    # the share of pairs where the model prefers the preferred image more than the base does; none at step 1
    assert tensorboard_scalars(tmp_path / "dpo", "implicit_acc") == {1: 0.0, 2: sum(i > 0 for i in insides) / 2}

    train(zoo, pairs, tmp_path / "beta0", "--loss", "dpo", "--beta_dpo", 0, "--adam_weight_decay", 0,
          "--max_train_steps", 2, "--learning_rate", 1e-2)
    up = {k: v for k, v in load_file(tmp_path / "beta0" / co.LORA_FILE).items() if "lora_B" in k}
    assert up and all(torch.all(v == 0) for v in up.values())  # a new LoRA's up-weights are 0, and stay so


def test_validation_on_the_distilled_sibling_shows_the_lora_as_users_run_it(zoo, data, tmp_path):
    """--validation_model_name_or_path: the grid is the LoRA on another pipeline of the family (a stand-in for
    Z-Image-Turbo: the zoo's pipeline with other transformer weights) at --validation_guidance_scale, exactly what
    diffusers makes from that pipeline with the saved LoRA loaded; a model of another family is refused first."""
    import shutil

    import numpy as np
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from PIL import Image

    turbo = tmp_path / "turbo"
    shutil.copytree(zoo / "zimage", turbo)
    transformer = ZImageTransformer2DModel.from_pretrained(turbo, subfolder="transformer")
    torch.manual_seed(3)
    with torch.no_grad():
        for weight in transformer.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    transformer.save_pretrained(turbo / "transformer")

    out = tmp_path / "out"
    flags = ["--max_train_steps", 3, "--learning_rate", 1e-2, "--validation_prompt", "a red square",
             "--num_validation_images", 2, "--validation_inference_steps", 2, "--validation_steps", 3,
             "--validation_guidance_scale", 0]
    train(zoo, data, out, *flags, "--validation_model_name_or_path", turbo)
    made = [np.asarray(Image.open(out / "validation" / "step-000003" / f"prompt00-image0{i}.png"), dtype=np.int16)
            for i in range(2)]
    pipe = ZImagePipeline.from_pretrained(turbo)
    pipe.load_lora_weights(out, weight_name=co.LORA_FILE)
    for i in range(2):
        image = pipe("a red square", height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
                     max_sequence_length=32, generator=torch.Generator().manual_seed(cu.derive(7, "validation", 0, i)))
        assert np.abs(np.asarray(image.images[0], dtype=np.int16) - made[i]).max() <= 2
    train(zoo, data, tmp_path / "on_base", *flags)  # the same LoRA on the base draws other images
    on_base = np.asarray(Image.open(tmp_path / "on_base" / "validation" / "step-000003" / "prompt00-image00.png"),
                         dtype=np.int16)
    assert np.abs(on_base - made[0]).mean() > 1

    result = train(zoo, data, tmp_path / "x", *flags, "--validation_model_name_or_path", zoo / "flux", check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == (
        f"error: --validation_model_name_or_path {zoo / 'flux'} is a FluxPipeline; it must be a ZImagePipeline, the "
        "family train_craft_zimage_lora.py trains") and not (tmp_path / "x").exists()
