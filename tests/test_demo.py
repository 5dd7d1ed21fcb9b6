import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import craft_utils as cu
from conftest import REPO, run_script

MODEL = os.path.join(REPO, "models", "tiny-shapes-sd15")


def test_pretraining_script_is_seeded_and_writes_a_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    flags = ("--vae_steps", 2, "--unet_steps", 2, "--decoder_steps", 2, "--batch_size", 4)
    for name in ("a", "b"):
        run_script("tools/pretrain_tiny_model.py", tmp_path / name, *flags)
    a, b = (StableDiffusionPipeline.from_pretrained(tmp_path / name) for name in ("a", "b"))
    for module in ("unet", "vae", "text_encoder"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(a, module).state_dict().values(),
                                                     getattr(b, module).state_dict().values())), module
    assert a.vae.config.scaling_factor != 0.18215  # fitted to the drawings' latents


def test_decoder_stage_from_a_pipeline_moves_only_the_decoder(tmp_path):
    from diffusers import StableDiffusionPipeline

    run_script("tools/pretrain_tiny_model.py", tmp_path / "a", "--vae_steps", 2, "--unet_steps", 2,
               "--decoder_steps", 0, "--batch_size", 4)
    run_script("tools/pretrain_tiny_model.py", tmp_path / "b", "--init_from", tmp_path / "a", "--vae_steps", 0,
               "--unet_steps", 0, "--decoder_steps", 2, "--batch_size", 4)
    a, b = (StableDiffusionPipeline.from_pretrained(tmp_path / name) for name in ("a", "b"))
    vae_a, vae_b = a.vae.state_dict(), b.vae.state_dict()
    decoder = [k for k in vae_a if k.startswith(("decoder.", "post_quant_conv."))]
    assert decoder and all(not torch.equal(vae_a[k], vae_b[k]) for k in decoder if k.endswith("weight"))
    # the encoder, so the latent space the UNet learned, and its scaling factor stay as they were
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a if k not in decoder)
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor
    for module in ("unet", "text_encoder"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(a, module).state_dict().values(),
                                                     getattr(b, module).state_dict().values())), module


def test_the_drawings_name_what_they_show():
    import random

    import craft_reward_models as cm
    from pretrain_tiny_model import draw

    score = cm.REWARDS["color"](None, "cpu", None)
    image = draw("blue", "star", "on the left", random.Random(0))
    left, right = image.crop((0, 0, 40, 64)), image.crop((40, 0, 64, 64))  # the star spans x = 5..34 at most
    assert score([image, image], ["a blue star", "a red star"]) == [1.0, 0.0]  # drawn in the palette's own blue
    assert score([left, right], ["a blue star", "a blue star"]) == [1.0, 0.0]  # nothing drawn right of x = 40


def test_short_captions_are_noisy_and_detailed_ones_always_right():
    import random

    from pretrain_tiny_model import caption, detailed_captions

    rng = random.Random(0)
    captions = [caption("red", "circle", "on the left", rng, 0.55) for _ in range(4000)]
    detailed = [c for c in captions if "," in c or "red red" in c]
    short = [c for c in captions if c not in detailed]
    assert set(detailed) == set(detailed_captions("a red circle on the left"))  # every detailed form, all red
    assert abs(len(short) / len(captions) - 0.5) < 0.03
    wrong = [c for c in short if c != "a red circle on the left"]
    assert abs(len(wrong) / len(short) - 0.55) < 0.04
    assert {c.split()[1] for c in wrong} == {"green", "blue", "yellow", "purple", "orange"}
    clean = [caption("red", "circle", "on the left", rng, 0.0) for _ in range(200)]
    assert all(c.split()[1] == "red" for c in clean)


@pytest.mark.skipif(not os.path.isdir(MODEL), reason="the shipped tiny pretrained model is missing")
def test_demo_runs_every_stage_and_writes_every_artefact(tmp_path):
    """The demo at reduced sizes (its full-size gain is measured by benchmarks/bench_demo.py, ~4.5 min a seed)."""
    import run_demo

    out = tmp_path / "demo"
    results, grid = run_demo.main(["--output_dir", str(out), "--num_prompts", "6", "--eval_images_per_prompt", "2",
                                   "--num_inference_steps", "6", "--train_steps", "10"])
    for artefact in ("candidates/rewards.jsonl", "candidates/rewards_hist.png", "filtered/crf_report.json",
                     "filtered/crf_preview.png", "craft-sd15-lora/training_config.json",
                     "sft-sd15-lora/pytorch_lora_weights.safetensors",
                     "craft-sdxl-lora/pytorch_lora_weights.safetensors",
                     "eval_craft/rewards_summary.md", "eval_craft/rewards_hist.png", "demo_results.md"):
        assert (out / artefact).exists(), artefact
    width, height = Image.open(grid).size  # the row labels, then 6 prompts' columns of 160 pixels; 2 labelled rows
    assert width == 160 * (1 + 6) and 2 * 160 < height < 3 * 160
    # the candidates of the first prompt come from the prompt and its three colour-stressing rewrites
    texts = {r["variant_id"]: r["text"] for r in cu.read_jsonl(out / "candidates" / "metadata.jsonl")
             if r["group_id"] == 0}
    assert texts == {0: "a red circle on the left", 1: "a red red circle on the left",
                     2: "a red circle on the left, red", 3: "a red red circle on the left, red"}
    # the LoRAs trained: their up-projections start at zero and are not zero any more, the text encoder's too
    lora = load_file(out / "craft-sd15-lora" / "pytorch_lora_weights.safetensors")
    for part in ("unet", "text_encoder"):
        assert any(t.abs().sum() > 0 for key, t in lora.items() if key.startswith(part) and ".up." in key), part
    for name in ("craft", "sft"):  # both tuned models against the base on the same 6 prompts x 2 seeds
        assert results[name]["pairs"] == 12 and set(results[name]["rewards"]) == {"color", "jpeg", "place"}
        assert results[name]["trained_rewards"] == ["color", "jpeg"]  # place: held out
    for reward, versus in results["craft_vs_sft"]["rewards"].items():  # paired: the mean delta is the means' gap
        gap = results["craft"]["rewards"][reward]["mean"] - results["sft"]["rewards"][reward]["mean"]
        assert versus["mean_delta"] == pytest.approx(gap)
    report = (out / "demo_results.md").read_text()
    assert "CRAFT vs plain SFT, same pairs: color" in report and "| place (held out) |" in report
    saturation = results["craft"]["drift"]["saturation"]  # the drift table shows eval's comparison
    assert f"| saturation | {saturation['baseline_mean']:.4f} | {saturation['mean']:.4f} | " \
           f"{saturation['delta']:+.4f} +- {saturation['stderr']:.4f} |" in report
    assert ("Reward hacking suspected: " in report) == bool(results["craft"]["hacking_signs"])
