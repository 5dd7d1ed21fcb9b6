"""train_craft_flux2_klein_lora.py on the zoo's tiny FLUX.2 [klein] pipeline (Qwen3 read at layers 9, 18, 27, the
FLUX.2 VAE with batch-norm statistics, the configs of diffusers' own tests): the CRAFT loss by hand, exact resume, two
processes, the LoRA in Flux2KleinPipeline and in generation, and bad input in one line."""

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
    return run_script("train_craft_flux2_klein_lora.py", "--pretrained_model_name_or_path", zoo / "flux2_klein",
                      "--train_data_dir", data, "--output_dir", out, "--resolution", 16, "--train_batch_size", 2,
                      "--report_to", "none", "--max_sequence_length", 32, "--seed", 7, *flags, **run)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_set(tmp_path_factory.mktemp("data") / "filtered")


def test_first_step_loss_is_the_klein_craft_formula_by_hand(zoo, data, tmp_path):
    """The loss logged at step 1 against the formula computed here from each sample's seed: caption dropout, the
    posterior sample patchified 2x2 and normalised by the VAE's batch-norm statistics, noise, a logit-normal sigma,
    x_t = (1 - s) x0 + s noise, the velocity target, the pipeline's own prompt encoding and ids; times the weight."""
    from diffusers import Flux2KleinPipeline

    out = tmp_path / "out"
    train(zoo, data, out, "--max_train_steps", 1, "--train_batch_size", 4, "--center_crop",
          "--proportion_empty_prompts", 0.5, "--weighting_scheme", "logit_normal", "--logit_mean", 0.3,
          "--report_to", "tensorboard")
    logged = tensorboard_scalars(out, "loss")[1]

    pipe = Flux2KleinPipeline.from_pretrained(zoo / "flux2_klein")  # a new LoRA's up-weights are 0: the base
    bn = pipe.vae.bn
    rows = cu.read_jsonl(data / "metadata.jsonl")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cu.derive(7, "order", 0))).tolist()
    terms, dropped = [], []
    for index in order[:4]:
        row = rows[index]
        draws = torch.Generator().manual_seed(cu.derive(7, "sample", 0, index))
        dropped.append(torch.rand((), generator=draws).item() < 0.5)
        with torch.no_grad():
            dist = pipe.vae.encode(center_crop_pixels(data / row["file_name"], 16)).latent_dist
            sample = dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=draws)  # 1 x 1 x 16 x 16
            patches = sample.view(1, 1, 8, 2, 8, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 4, 8, 8)
            x0 = (patches - bn.running_mean.view(1, 4, 1, 1)) / torch.sqrt(bn.running_var.view(1, 4, 1, 1) + 1e-4)
            noise = torch.randn(x0.shape[1:], generator=draws)[None]
            u = torch.sigmoid(0.3 + torch.randn((), generator=draws))
            sigma = 1 - int(u * 1000) / 1000  # the training schedule (shift 1): sigma = t / 1000, t = 1000 ... 1
            noisy = (1 - sigma) * x0 + sigma * noise
            embeds, text_ids = pipe.encode_prompt("" if dropped[-1] else row["text"], max_sequence_length=32)
            pred = pipe.transformer(hidden_states=noisy.reshape(1, 4, 64).permute(0, 2, 1),
                                    timestep=torch.tensor([sigma]), guidance=None, encoder_hidden_states=embeds,
                                    txt_ids=text_ids, img_ids=pipe._prepare_latent_ids(x0)).sample
        target = (noise - x0).reshape(1, 4, 64).permute(0, 2, 1)
        terms.append(row["weight"] * ((pred - target) ** 2).mean().item())
    assert pipe.vae.config.batch_norm_eps == 1e-4 and bn.running_var.min() < 0.9  # the statistics matter here
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


def test_lora_loads_into_klein_pipeline_and_generates_candidates(zoo, data, tmp_path):
    from diffusers import Flux2KleinPipeline

    out = tmp_path / "lora"
    train(zoo, data, out, "--max_train_steps", 20, "--learning_rate", 1e-2, "--rank", 8, "--lora_alpha", 4,
          "--validation_prompt", "a red square", "--num_validation_images", 2, "--validation_inference_steps", 2,
          "--validation_steps", 20)
    lora = load_file(out / co.LORA_FILE)
    assert {k.split(".lora_")[0] for k in lora} == {  # diffusers' klein targets, in the zoo's 1 + 1 blocks
        f"transformer.transformer_blocks.0.attn.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0")} | {
        f"transformer.single_transformer_blocks.0.attn.{name}" for name in ("to_qkv_mlp_proj", "to_out")}
    card = (out / "README.md").read_text()
    assert (out / "validation" / "step-000020.png").exists() and "license: other" in card and "- flux2-klein" in card
    pipe = Flux2KleinPipeline.from_pretrained(zoo / "flux2_klein")

    def image():
        return torch.from_numpy(pipe(prompt="a red square", height=16, width=16, num_inference_steps=2,
                                     output_type="np", max_sequence_length=32,
                                     generator=torch.Generator().manual_seed(0)).images[0])

    before = image()
    pipe.load_lora_weights(out, weight_name=co.LORA_FILE)
    assert (image() - before).abs().mean() > 1e-3
    assert set(pipe.transformer.transformer_blocks[0].attn.to_q.scaling.values()) == {4 / 8}  # --lora_alpha kept

    (tmp_path / "prompts.txt").write_text("a red square\na blue square\n")
    run_script("generate_candidates.py", "--pretrained_model_name_or_path", zoo / "flux2_klein", "--lora_path", out,
               "--prompts_file", tmp_path / "prompts.txt", "--num_variants", 1, "--num_images_per_prompt", 1,
               "--num_inference_steps", 2, "--height", 16, "--width", 16, "--max_sequence_length", 32,
               "--output_dir", tmp_path / "round2")
    assert len(cu.read_jsonl(tmp_path / "round2" / "metadata.jsonl")) == 2 * 2
    assert json.loads((tmp_path / "round2" / "generation_config.json").read_text())["settings"]["lora_path"] == str(out)


@pytest.mark.parametrize("case", ["zimage_model", "flux_script", "flux1_flag", "pairs_folder", "resolution"])
def test_bad_input_is_one_clear_error(zoo, data, tmp_path, case):
    script, model, train_data, extra = "train_craft_flux2_klein_lora.py", "flux2_klein", data, []
    expected = {
        "zimage_model": "zimage is a ZImagePipeline; train_craft_flux2_klein_lora.py trains Flux2KleinPipeline: use "
                        "train_craft_zimage_lora.py",
        "flux_script": "flux2_klein is a Flux2KleinPipeline; train_craft_flux_lora.py trains FluxPipeline: use "
                       "train_craft_flux2_klein_lora.py",
        "flux1_flag": "unrecognized arguments: --guidance_scale 3.5",  # klein has no guidance embedding to train
        "pairs_folder": "holds preference pairs (crf_filter.py --mode pairs): train them with --loss dpo",
        "resolution": "--resolution 15 must be a multiple of 2 for this model (VAE x 2x2 patches)",
    }[case]
    if case == "zimage_model":
        model = "zimage"
    elif case == "flux_script":
        script = "train_craft_flux_lora.py"
    elif case == "flux1_flag":
        extra = ["--guidance_scale", "3.5"]
    elif case == "pairs_folder":
        train_data = make_pairs_set(tmp_path / "pairs")
    else:
        extra = ["--resolution", "15"]
    result = run_script(script, "--pretrained_model_name_or_path", zoo / model, "--train_data_dir", train_data,
                        "--output_dir", tmp_path / "out", "--max_train_steps", 1, *extra, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_nf4_base_trains_its_lora_on_4_bit_weights(zoo, data, tmp_path):
    """--quantize_base nf4 through the script's own path (LoRAs on bitsandbytes' Linear4bit): the first loss is the
    full-precision run's up to the quantization error, the LoRA trains, and its file loads into the unquantized
    pipeline."""
    from diffusers import Flux2KleinPipeline

    flags = ("--max_train_steps", 3, "--learning_rate", 1e-2, "--report_to", "tensorboard")
    train(zoo, data, tmp_path / "full", *flags)
    train(zoo, data, tmp_path / "nf4", *flags, "--quantize_base", "nf4", launcher=LIFT_GPU_CHECK)
    full, nf4 = tensorboard_scalars(tmp_path / "full", "loss")[1], tensorboard_scalars(tmp_path / "nf4", "loss")[1]
    assert full != nf4 and abs(nf4 - full) < 0.1 * full
    lora = load_file(tmp_path / "nf4" / co.LORA_FILE)
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-4
    Flux2KleinPipeline.from_pretrained(zoo / "flux2_klein").load_lora_weights(tmp_path / "nf4")


def test_dpo_on_velocities_by_hand_and_beta_0_leaves_the_lora_unchanged(zoo, tmp_path):
    """--loss dpo: step 1 is log 2 (the new LoRA is the base); the loss logged at step 2 against the formula
    computed here with checkpoint-1's LoRA as the model and the base as the reference: both images of each pair
    patchified and normalised, one noise and one sigma; implicit_acc logged. With beta 0 nothing moves."""
    import math

    import torch.nn.functional as F
    from diffusers import Flux2KleinPipeline

    from test_train_sd15 import dpo_inside

    pairs = make_pairs_set(tmp_path / "pairs")
    flags = ("--loss", "dpo", "--beta_dpo", 500, "--learning_rate", 3e-3, "--max_train_steps", 2,
             "--checkpointing_steps", 1, "--center_crop", "--report_to", "tensorboard")
    train(zoo, pairs, tmp_path / "dpo", *flags)
    logged = tensorboard_scalars(tmp_path / "dpo", "loss")
    assert logged[1] == pytest.approx(math.log(2), abs=1e-6) and abs(logged[2] - math.log(2)) > 1e-4

    base = Flux2KleinPipeline.from_pretrained(zoo / "flux2_klein")
    tuned = Flux2KleinPipeline.from_pretrained(zoo / "flux2_klein")
    tuned.load_lora_weights(tmp_path / "dpo" / "checkpoint-1", weight_name=co.LORA_FILE)
    bn = base.vae.bn
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
                dist = base.vae.encode(center_crop_pixels(pairs / row[column], 16)).latent_dist
                sample = dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=draws)
                patches = sample.view(1, 1, 8, 2, 8, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 4, 8, 8)
                images.append((patches - bn.running_mean.view(1, 4, 1, 1)) /
                              torch.sqrt(bn.running_var.view(1, 4, 1, 1) + 1e-4))
            noise = torch.randn(images[0].shape[1:], generator=draws)[None]
            sigma = 1 - int(torch.rand((), generator=draws) * 1000) / 1000  # --weighting_scheme none: uniform
            embeds, text_ids = base.encode_prompt(row["text"], max_sequence_length=32)
            errors = [[((pipe.transformer(hidden_states=((1 - sigma) * x0 + sigma * noise).reshape(1, 4, 64)
                                          .permute(0, 2, 1), timestep=torch.tensor([sigma]), guidance=None,
                                          encoder_hidden_states=embeds, txt_ids=text_ids,
                                          img_ids=pipe._prepare_latent_ids(x0)).sample
                         - (noise - x0).reshape(1, 4, 64).permute(0, 2, 1)) ** 2).mean().item() for x0 in images]
                      for pipe in (tuned, base)]
        insides.append(dpo_inside(*errors, 500))
        terms.append(-F.logsigmoid(torch.tensor(insides[-1], dtype=torch.float64)).item())
    assert logged[2] == pytest.approx(sum(terms) / 2, rel=1e-4)
    # the share of pairs where the model prefers the preferred image more than the base does; none at step 1
    assert tensorboard_scalars(tmp_path / "dpo", "implicit_acc") == {1: 0.0, 2: sum(i > 0 for i in insides) / 2}

    train(zoo, pairs, tmp_path / "beta0", "--loss", "dpo", "--beta_dpo", 0, "--adam_weight_decay", 0,
          "--max_train_steps", 2, "--learning_rate", 1e-2)
    up = {k: v for k, v in load_file(tmp_path / "beta0" / co.LORA_FILE).items() if "lora_B" in k}
    assert up and all(torch.all(v == 0) for v in up.values())  # a new LoRA's up-weights are 0, and stay so


def test_validation_on_the_distilled_klein_shows_the_lora_as_users_run_it(zoo, data, tmp_path):
    """--validation_model_name_or_path: the grid is the LoRA on a distilled klein (a stand-in: the zoo's pipeline
    with other transformer weights, marked is_distilled, so it samples without classifier-free guidance), exactly
    what diffusers makes from that pipeline with the saved LoRA loaded."""
    import shutil

    import numpy as np
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from PIL import Image

    distilled = tmp_path / "distilled"
    shutil.copytree(zoo / "flux2_klein", distilled)
    transformer = Flux2Transformer2DModel.from_pretrained(distilled, subfolder="transformer")
    torch.manual_seed(3)
    with torch.no_grad():
        for weight in transformer.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    transformer.save_pretrained(distilled / "transformer")
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))

    out = tmp_path / "out"
    train(zoo, data, out, "--max_train_steps", 3, "--learning_rate", 1e-1, "--validation_prompt", "a red square",
          "--num_validation_images", 2, "--validation_inference_steps", 2, "--validation_steps", 3,
          "--validation_model_name_or_path", distilled)
    made = [np.asarray(Image.open(out / "validation" / "step-000003" / f"prompt00-image0{i}.png"), dtype=np.int16)
            for i in range(2)]
    pipe = Flux2KleinPipeline.from_pretrained(distilled)
    assert pipe.config.is_distilled

    def images():
        return [np.asarray(pipe(prompt="a red square", height=16, width=16, num_inference_steps=2,
                                max_sequence_length=32, generator=torch.Generator().manual_seed(
                                    cu.derive(7, "validation", 0, i))).images[0], dtype=np.int16) for i in range(2)]

    without = images()
    pipe.load_lora_weights(out, weight_name=co.LORA_FILE)
    for i, image in enumerate(images()):
        assert np.abs(image - made[i]).max() <= 2 < np.abs(without[i] - made[i]).max()  # the LoRA is in it
