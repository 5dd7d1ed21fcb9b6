"""train_craft_flux_lora.py on the zoo's tiny FLUX.1-dev-style pipeline (guidance embedding, CLIP + T5, a VAE with
FLUX's shift and scale): the flow-matching CRAFT loss by hand, exact resume, two processes, the LoRA file in
FluxPipeline, and models of the wrong family refused in one line naming the right script."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import craft_outputs as co
import craft_utils as cu
from conftest import TWO_PROCESSES, run_script
from make_tiny_models import make_pairs_set, make_training_set
from train_craft_flux_lora import ATTENTION
from test_train_sd15 import center_crop_pixels, tensorboard_scalars


def train(zoo, data, out, *flags, **run):
    return run_script("train_craft_flux_lora.py", "--pretrained_model_name_or_path", zoo / "flux", "--train_data_dir",
                      data, "--output_dir", out, "--resolution", 64, "--train_batch_size", 2, "--report_to", "none",
                      "--max_sequence_length", 16, "--seed", 7, *flags, **run)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_set(tmp_path_factory.mktemp("data") / "filtered")


def test_first_step_loss_is_the_flow_matching_craft_formula_by_hand(zoo, data, tmp_path):
    """The loss logged at step 1 against the formula computed here from each sample's seed: caption dropout, the
    posterior sample shifted and scaled, noise, a logit-normal sigma, x_t = (1 - s) x0 + s noise, the velocity target
    noise - x0, the guidance embedding, the pipeline's own text encoding and packing; times the CRAFT weight."""
    from diffusers import FluxPipeline

    out = tmp_path / "out"
    train(zoo, data, out, "--max_train_steps", 1, "--train_batch_size", 4, "--center_crop",
          "--proportion_empty_prompts", 0.5, "--weighting_scheme", "logit_normal", "--logit_mean", 0.3,
          "--guidance_scale", 2.5, "--report_to", "tensorboard")
    logged = tensorboard_scalars(out, "loss")[1]

    pipe = FluxPipeline.from_pretrained(zoo / "flux")  # a new LoRA's up-weights are 0: the base transformer
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
            dist = vae.encode(center_crop_pixels(data / row["file_name"])).latent_dist
            x0 = (dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=draws) - 0.1159) * 0.3611
            noise = torch.randn(x0.shape[1:], generator=draws)[None]
            u = torch.sigmoid(0.3 + torch.randn((), generator=draws))
            sigma = 1 - int(u * 1000) / 1000  # the training schedule: sigma = t / 1000, t = 1000 ... 1
            noisy = (1 - sigma) * x0 + sigma * noise
            embeds, pooled, text_ids = pipe.encode_prompt("" if dropped[-1] else row["text"], prompt_2=None,
                                                          max_sequence_length=16)
            _, channels, height, width = x0.shape
            pred = pipe.transformer(
                hidden_states=pipe._pack_latents(noisy, 1, channels, height, width), timestep=torch.tensor([sigma]),
                guidance=torch.tensor([2.5]), pooled_projections=pooled, encoder_hidden_states=embeds,
                txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(1, height // 2, width // 2, "cpu",
                                                                         torch.float32)).sample
            pred = pipe._unpack_latents(pred, 64, 64, pipe.vae_scale_factor)
        terms.append(row["weight"] * ((pred - (noise - x0)) ** 2).mean().item())
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
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k or "lora.up" in k) > 1e-4  # it trained
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    result = train(zoo, data, tmp_path / "ddp", *flags, "--train_batch_size", 1, launcher=TWO_PROCESSES)
    assert "6 steps of 1 x 1 x 2 images" in result.stdout + result.stderr
    two = load_file(tmp_path / "ddp" / co.LORA_FILE)
    assert max((a[k] - two[k]).abs().max().item() for k in a) < 1e-5  # float32 summation order only


def test_lora_loads_into_flux_pipeline_and_changes_its_images(zoo, data, tmp_path):
    from diffusers import FluxPipeline

    out = tmp_path / "lora"
    train(zoo, data, out, "--max_train_steps", 20, "--learning_rate", 1e-2, "--rank", 8, "--validation_prompt",
          "a red square", "--num_validation_images", 2, "--validation_inference_steps", 3, "--validation_steps", 20,
          "--lora_alpha", 4, "--output_kohya_format", "--lora_target_modules", ATTENTION + ",proj_mlp")
    lora = load_file(out / co.LORA_FILE)
    assert all(".lora_A." in k or ".lora_B." in k for k in lora)  # peft's names, as diffusers' FLUX examples save
    check_kohya(load_file(out / co.KOHYA_FILE), lora, 4 / 8, tmp_path)
    card = (out / "README.md").read_text()
    assert (out / "validation" / "step-000020.png").exists() and "# CRAFT LoRA of" in card
    assert "license: other" in card  # FLUX.1-dev's own licence, not an open one
    pipe = FluxPipeline.from_pretrained(zoo / "flux")

    def image():
        return torch.from_numpy(pipe("a red square", height=64, width=64, num_inference_steps=3, guidance_scale=3.5,
                                     max_sequence_length=16, output_type="np",
                                     generator=torch.Generator().manual_seed(0)).images[0])

    before = image()
    pipe.load_lora_weights(out, weight_name=co.LORA_FILE)
    assert (image() - before).abs().mean() > 1e-3
    assert set(pipe.transformer.transformer_blocks[0].attn.to_q.scaling.values()) == {4 / 8}  # --lora_alpha kept

    # eval_rewards.py's model mode: the tuned FLUX model against the base on the same prompts and seeds
    (tmp_path / "prompts.txt").write_text("a red square\na blue square\n")
    sampling = ["--pretrained_model_name_or_path", zoo / "flux", "--prompts_file", tmp_path / "prompts.txt",
                "--num_images_per_prompt", 1, "--num_inference_steps", 2, "--height", 64, "--width", 64,
                "--max_sequence_length", 16, "--rewards", "jpeg"]
    run_script("eval_rewards.py", *sampling, "--output_dir", tmp_path / "eval_base")
    run_script("eval_rewards.py", *sampling, "--lora_path", out, "--output_dir", tmp_path / "eval_lora",
               "--compare_to", tmp_path / "eval_base")
    summary = json.loads((tmp_path / "eval_lora" / "rewards_summary.json").read_text())
    assert summary["comparison"]["pairs"] == 2 and summary["comparison"]["rewards"]["jpeg"]["mean_delta"] != 0


# bitsandbytes' 4-bit layers run on CPUs; diffusers' quantizer refuses a machine without a GPU, so this launcher
# lifts that one check and runs the script unchanged
LIFT_GPU_CHECK = (sys.executable, "-c", "import runpy, sys; from diffusers.quantizers.bitsandbytes import "
                  "bnb_quantizer; bnb_quantizer.BnB4BitDiffusersQuantizer.validate_environment = lambda *a, **k: None;"
                  " sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_nf4_base_trains_its_lora_on_4_bit_weights(zoo, data, tmp_path):
    """--quantize_base nf4 through the script's own path (diffusers' BitsAndBytesConfig, peft's k-bit preparation,
    LoRAs on bitsandbytes' Linear4bit): its first loss is the full-precision run's up to the quantization error
    (close, not equal), the LoRA trains, and its file loads into the unquantized FluxPipeline."""
    from diffusers import FluxPipeline

    flags = ("--max_train_steps", 3, "--learning_rate", 1e-2, "--report_to", "tensorboard")
    train(zoo, data, tmp_path / "full", *flags)
    train(zoo, data, tmp_path / "nf4", *flags, "--quantize_base", "nf4", launcher=LIFT_GPU_CHECK)
    full, nf4 = tensorboard_scalars(tmp_path / "full", "loss")[1], tensorboard_scalars(tmp_path / "nf4", "loss")[1]
    assert full != nf4 and abs(nf4 - full) < 0.1 * full
    lora = load_file(tmp_path / "nf4" / co.LORA_FILE)
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-4
    pipe = FluxPipeline.from_pretrained(zoo / "flux")
    pipe.load_lora_weights(tmp_path / "nf4")


def test_kohya_names_of_the_default_targets_leave_the_mlp_rows_of_linear1_zero(zoo, tmp_path):
    """The default targets train the single blocks' q, k and v but not their MLP input, which BFL fuses with them
    into linear1: its up-projection is theirs, block-diagonal, over zero rows for the MLP."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    from train_craft_flux_lora import kohya_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(zoo / "flux", subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian",
                                       target_modules=ATTENTION.split(",")))
    torch.manual_seed(0)
    for name, weight in transformer.named_parameters():
        if "lora_B" in name:
            weight.data.normal_()  # a new LoRA's up-weights are 0
    lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer).items()}
    kohya = kohya_state_dict(transformer, 2 / 4)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"][48:].abs().max() == 0  # the MLP's 64 rows
    check_kohya(kohya, lora, 2 / 4, tmp_path)


def check_kohya(kohya, lora, scale, tmp_path):
    """Each kohya module's delta, up @ down * alpha / rank, is the diffusers LoRA's deltas (B @ A * scale) of the
    projections fused into it, stacked in BFL's order (q, k, v, MLP), zeros for a projection without a LoRA;
    every diffusers LoRA is in exactly one; the double blocks' fused q/k/v split back exactly in diffusers' reader."""
    from diffusers import FluxPipeline

    hidden, mlp = 16, 64  # the zoo's FLUX: 2 heads x 8, MLP ratio 4
    fused = {"double_blocks_0_img_attn_qkv": [("attn.to_q", hidden), ("attn.to_k", hidden), ("attn.to_v", hidden)],
             "double_blocks_0_txt_attn_qkv": [("attn.add_q_proj", hidden), ("attn.add_k_proj", hidden),
                                              ("attn.add_v_proj", hidden)],
             "double_blocks_0_img_attn_proj": [("attn.to_out.0", hidden)],
             "double_blocks_0_txt_attn_proj": [("attn.to_add_out", hidden)],
             "single_blocks_0_linear1": [("attn.to_q", hidden), ("attn.to_k", hidden), ("attn.to_v", hidden),
                                         ("proj_mlp", mlp)]}
    assert {k.split(".")[0] for k in kohya} == {f"lora_unet_{name}" for name in fused}
    seen = []
    for name, parts in fused.items():
        key = f"lora_unet_{name}"
        down, up = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"]
        delta = up @ down * kohya[f"{key}.alpha"].item() / down.shape[0]
        block = "transformer.transformer_blocks.0." if name.startswith("double") else \
            "transformer.single_transformer_blocks.0."
        expected = []
        for part, rows in parts:
            if f"{block}{part}.lora_A.weight" in lora:
                expected.append(lora[f"{block}{part}.lora_B.weight"] @ lora[f"{block}{part}.lora_A.weight"] * scale)
                seen.append(block + part)
            else:
                expected.append(torch.zeros(rows, down.shape[1]))
        assert delta.shape == (sum(rows for _, rows in parts), hidden)
        assert torch.allclose(delta, torch.cat(expected), atol=1e-7) and delta.abs().max() > 1e-4
    assert sorted(seen) == sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    # diffusers' kohya reader fixes FLUX.1's real sizes for the single blocks' linear1; the double blocks' it splits
    # back by their zero pattern into the very LoRAs trained, alpha / rank folded into A
    double = {k: v for k, v in kohya.items() if "double_blocks" in k}
    save_file(double, tmp_path / "double_blocks_kohya.safetensors")
    read_back = FluxPipeline.lora_state_dict(tmp_path / "double_blocks_kohya.safetensors")
    assert len(read_back) == 16
    assert all(torch.allclose(v, lora[k] * (scale if "lora_A" in k else 1)) for k, v in read_back.items())


@pytest.mark.parametrize("case", ["sdxl_to_flux", "flux_to_sdxl", "flux_to_sd15", "snr_gamma", "resolution",
                                  "quantize_on_cpu", "kohya"])
def test_bad_input_is_one_clear_error(zoo, data, tmp_path, case):
    script, model, extra = "train_craft_flux_lora.py", "flux", []
    expected = {
        "sdxl_to_flux": "sdxl is a StableDiffusionXLPipeline; train_craft_flux_lora.py trains FluxPipeline: use "
                        "train_craft_sdxl_lora.py",
        "flux_to_sdxl": "flux is a FluxPipeline; train_craft_sdxl_lora.py trains StableDiffusionXLPipeline: use "
                        "train_craft_flux_lora.py",
        "flux_to_sd15": "flux is a FluxPipeline; train_craft_sd15.py trains StableDiffusionPipeline: use "
                        "train_craft_flux_lora.py",
        "snr_gamma": "unrecognized arguments: --snr_gamma 5",  # a DDPM flag: the SD scripts have it
        "resolution": "--resolution 70 must be a multiple of 4 for this model (VAE x 2x2 packing)",
        "quantize_on_cpu": "--quantize_base nf4 needs a GPU: diffusers says 'No GPU found. A GPU is needed for "
                           "quantization.'; leave it out on the CPU",
        "kohya": "--output_kohya_format: kohya has no FLUX.1 name for the LoRA on norm_out.linear (from "
                 "--lora_target_modules); leave that module out or the flag off",
    }[case]
    if case == "sdxl_to_flux":
        model = "sdxl"
    elif case in ("flux_to_sdxl", "flux_to_sd15"):
        script = {"flux_to_sdxl": "train_craft_sdxl_lora.py", "flux_to_sd15": "train_craft_sd15.py"}[case]
    elif case == "snr_gamma":
        extra = ["--snr_gamma", "5"]
    elif case == "resolution":
        extra = ["--resolution", "70"]
    elif case == "kohya":
        extra = ["--output_kohya_format", "--lora_target_modules", "to_q,norm_out.linear"]
    else:
        if torch.cuda.is_available():
            pytest.skip("a GPU is here: nf4 loads")
        extra = ["--quantize_base", "nf4"]
    result = run_script(script, "--pretrained_model_name_or_path", zoo / model, "--train_data_dir", data,
                        "--output_dir", tmp_path / "out", "--max_train_steps", 1, *extra, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_dpo_on_velocities_by_hand_and_beta_0_leaves_the_lora_unchanged(zoo, tmp_path):
    """--loss dpo: step 1 is log 2 (the new LoRA is the base); the loss logged at step 2 against the formula
    computed here with checkpoint-1's LoRA as the model and the base as the reference: both images of each pair with
    one noise and one sigma, the squared velocity errors; implicit_acc logged. With beta 0 nothing moves."""
    import math

    import torch.nn.functional as F
    from diffusers import FluxPipeline

    from test_train_sd15 import dpo_inside

    pairs = make_pairs_set(tmp_path / "pairs")
    flags = ("--loss", "dpo", "--beta_dpo", 500, "--learning_rate", 3e-3, "--max_train_steps", 2,
             "--checkpointing_steps", 1, "--center_crop", "--report_to", "tensorboard")
    train(zoo, pairs, tmp_path / "dpo", *flags)
    logged = tensorboard_scalars(tmp_path / "dpo", "loss")
    assert logged[1] == pytest.approx(math.log(2), abs=1e-6) and abs(logged[2] - math.log(2)) > 1e-4

    base, tuned = FluxPipeline.from_pretrained(zoo / "flux"), FluxPipeline.from_pretrained(zoo / "flux")
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
                dist = base.vae.encode(center_crop_pixels(pairs / row[column])).latent_dist
                sample = dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=draws)
                images.append((sample - 0.1159) * 0.3611)
            noise = torch.randn(images[0].shape[1:], generator=draws)[None]
            sigma = 1 - int(torch.rand((), generator=draws) * 1000) / 1000  # --weighting_scheme none: uniform
            embeds, pooled, text_ids = base.encode_prompt(row["text"], prompt_2=None, max_sequence_length=16)
            _, channels, height, width = noise.shape
            ids = base._prepare_latent_image_ids(1, height // 2, width // 2, "cpu", torch.float32)
            errors = [[((pipe._unpack_latents(pipe.transformer(
                hidden_states=pipe._pack_latents((1 - sigma) * x0 + sigma * noise, 1, channels, height, width),
                timestep=torch.tensor([sigma]), guidance=torch.tensor([3.5]), pooled_projections=pooled,
                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids).sample, 64, 64, pipe.vae_scale_factor)
                - (noise - x0)) ** 2).mean().item() for x0 in images] for pipe in (tuned, base)]
        insides.append(dpo_inside(*errors, 500))
        terms.append(-F.logsigmoid(torch.tensor(insides[-1], dtype=torch.float64)).item())
    assert logged[2] == pytest.approx(sum(terms) / 2, rel=1e-4)
    # the share of pairs where the model prefers the preferred image more than the base does; none at step 1
    assert tensorboard_scalars(tmp_path / "dpo", "implicit_acc") == {1: 0.0, 2: sum(i > 0 for i in insides) / 2}

    train(zoo, pairs, tmp_path / "beta0", "--loss", "dpo", "--beta_dpo", 0, "--adam_weight_decay", 0,
          "--max_train_steps", 2, "--learning_rate", 1e-2)
    up = {k: v for k, v in load_file(tmp_path / "beta0" / co.LORA_FILE).items() if "lora_B" in k}
    assert up and all(torch.all(v == 0) for v in up.values())  # a new LoRA's up-weights are 0, and stay so
