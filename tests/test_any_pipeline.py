"""Any diffusers text-to-image pipeline through generation, model-mode evaluation and LoRA loading: the zoo's
Z-Image, FLUX.2 [klein] and SD3 (a family no script of the pack trains), whose differences are read from the
pipelines themselves; flags a pipeline cannot take refused before any folder is written; the trainers' family check
asks the scripts (a renamed copy trains its family, a new script beside them is found)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import craft_utils as cu
from conftest import REPO, run_script
from make_tiny_models import make_training_set
from test_generate_candidates import folder_files, generate, write_lines

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle at night"]
# zoo folder -> (pipeline class, flags that keep it tiny, the guidance default of its own __call__ in diffusers)
FAMILIES = {
    "zimage": ("ZImagePipeline", ["--height", 32, "--width", 32], 5.0),
    "flux2_klein": ("Flux2KleinPipeline", ["--height", 16, "--width", 16, "--max_sequence_length", 32], 4.0),
    "sd3": ("StableDiffusion3Pipeline", [], 7.0),  # its native size: the transformer's 32 x the VAE's 1
}
SIZES = {"zimage": 32, "flux2_klein": 16, "sd3": 32}


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def by_hand(pipe, row, family, **call):
    """The image diffusers itself makes for a metadata row, with the settings the folder should have used."""
    size = SIZES[family]
    extra = {"max_sequence_length": 32} if family == "flux2_klein" else {}
    return np.asarray(pipe(prompt=row["text"], generator=torch.Generator().manual_seed(row["seed"]), num_inference_steps=2,
                           guidance_scale=FAMILIES[family][2], height=size, width=size, **extra, **call).images[0],
                      dtype=np.int16)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_candidates_of_any_pipeline_resume_exactly_and_match_diffusers(zoo, tmp_path, family):
    from diffusers import DiffusionPipeline

    pipeline_class, flags, guidance = FAMILIES[family]
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS)
    generate(zoo, prompts, tmp_path / "straight", *flags, model=family, fresh_interpreter=True)
    generate(zoo, prompts, tmp_path / "resumed", *flags, model=family, kill_at="images_written#2")
    assert len(cu.read_jsonl(tmp_path / "resumed" / ".progress" / "images-00000.jsonl")) == 3  # one batch of 3 made
    result = generate(zoo, prompts, tmp_path / "resumed", *flags, model=family)
    assert "(15 made now" in result.stdout  # 18 planned; the first batch was logged, the second's images were not
    assert folder_files(tmp_path / "resumed") == folder_files(tmp_path / "straight")

    rows = cu.read_jsonl(tmp_path / "straight" / "metadata.jsonl")
    assert len(rows) == 3 * 3 * 2  # prompts x (original + 2 rewrites) x 2 seeds
    config = json.loads((tmp_path / "straight" / "generation_config.json").read_text())
    assert config["settings"]["guidance_scale"] == guidance  # the pipeline's own default, recorded
    assert config["resolved"] == {"pipeline_class": pipeline_class, "scheduler": "FlowMatchEulerDiscreteScheduler",
                                  "height": SIZES[family], "width": SIZES[family]}
    pipe = DiffusionPipeline.from_pretrained(zoo / family)
    for row in (rows[0], rows[7]):
        saved = pixels(tmp_path / "straight" / row["file_name"])
        assert saved.shape[:2] == (SIZES[family], SIZES[family])
        assert np.abs(by_hand(pipe, row, family) - saved).max() <= 2  # batched vs single: float rounding only
    assert np.abs(pixels(tmp_path / "straight" / rows[0]["file_name"]) -
                  pixels(tmp_path / "straight" / rows[1]["file_name"])).mean() > 1  # another seed, another image


def make_lora(zoo, family, folder):
    """A LoRA on the transformer's attention in the pipeline class's own file format, with non-zero up-projections
    so that it changes the images."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(zoo / family)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 5)
    type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_mode_evaluation_with_a_lora_against_the_base(zoo, tmp_path, family):
    from diffusers import DiffusionPipeline

    flags = FAMILIES[family][1]
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:2])
    lora = make_lora(zoo, family, tmp_path / "lora")
    common = ["--pretrained_model_name_or_path", zoo / family, "--prompts_file", prompts, "--rewards", "jpeg",
              "--num_inference_steps", 2, *flags]
    run_script("eval_rewards.py", *common, "--output_dir", tmp_path / "base")
    run_script("eval_rewards.py", *common, "--output_dir", tmp_path / "tuned", "--lora_path", lora,
               "--compare_to", tmp_path / "base")
    summary = json.loads((tmp_path / "tuned" / "rewards_summary.json").read_text())
    assert summary["comparison"]["pairs"] == 2 * 2 and summary["rewards"]["jpeg"]["n"] == 4
    settings = json.loads((tmp_path / "tuned" / "generation_config.json").read_text())["settings"]
    assert settings["lora_path"] == str(lora) and settings["guidance_scale"] == FAMILIES[family][2]

    rows = cu.read_jsonl(tmp_path / "tuned" / "metadata.jsonl")
    tuned, base = (pixels(tmp_path / folder / rows[0]["file_name"]) for folder in ("tuned", "base"))
    assert np.abs(tuned - base).max() > 2  # the LoRA was applied (the by-hand check below allows 2 for rounding)
    pipe = DiffusionPipeline.from_pretrained(zoo / family)
    pipe.load_lora_weights(lora)
    assert np.abs(by_hand(pipe, rows[0], family) - tuned).max() <= 2


def not_drivable(zoo, tmp_path, class_name):
    """The zoo's SD1.5 folder, named as another pipeline class in its model_index.json."""
    folder = tmp_path / class_name
    shutil.copytree(zoo / "sd15", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    return folder


@pytest.mark.parametrize("case", ["sequence_length_sd15", "scheduler_zimage", "scheduler_klein", "fuse_qkv_zimage",
                                  "img2img", "unknown_class", "not_a_pipeline"])
def test_what_a_pipeline_cannot_take_is_one_line_before_any_folder(zoo, tmp_path, case):
    model, flags, expected = {
        "sequence_length_sd15": ("sd15", ["--max_sequence_length", 16],
                                 "--max_sequence_length: StableDiffusionPipeline has no max_sequence_length to set; "
                                 "leave the flag out"),
        "scheduler_zimage": ("zimage", ["--scheduler", "ddim"],
                             "--scheduler ddim: ZImagePipeline samples with its FlowMatchEulerDiscreteScheduler, which "
                             "DDIMScheduler cannot replace; leave --scheduler out"),
        "scheduler_klein": ("flux2_klein", ["--scheduler", "euler"],
                            "--scheduler euler: Flux2KleinPipeline samples with its FlowMatchEulerDiscreteScheduler, "
                            "which EulerDiscreteScheduler cannot replace; leave --scheduler out"),
        "fuse_qkv_zimage": ("zimage", ["--fuse_qkv_projections"],
                            "--fuse_qkv_projections: ZImagePipeline's ZImageTransformer2DModel has no "
                            "fuse_qkv_projections; leave the flag out"),
        "img2img": (not_drivable(zoo, tmp_path, "StableDiffusionImg2ImgPipeline"), [],
                    "is a StableDiffusionImg2ImgPipeline, which the pack cannot drive: it generates from prompts alone "
                    "with diffusers' text-to-image pipelines"),
        "unknown_class": (not_drivable(zoo, tmp_path, "MyOwnPipeline"), [],
                          "is a MyOwnPipeline, which diffusers 0.42.1 does not have; upgrade diffusers or give a "
                          "diffusers text-to-image pipeline"),
        "not_a_pipeline": (zoo / "clip", [], "could not read a diffusers pipeline from"),
    }[case]
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:1])
    for script, out in (("generate_candidates.py", tmp_path / "candidates"), ("eval_rewards.py", tmp_path / "eval")):
        result = run_script(script, "--pretrained_model_name_or_path", zoo / model, "--prompts_file", prompts,
                            "--output_dir", out, "--num_inference_steps", 2, *flags, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")
        assert expected in result.stderr.strip().splitlines()[-1]
        assert not out.exists()


def test_an_omitted_guidance_is_the_pipelines_own_and_a_folder_goes_on_with_its_recorded_one(zoo, tmp_path):
    """SDXL's own default is 5.0; a folder made with 7.5 (the pack's earlier default for SDXL) resumes with the same
    command, without the flag, and is never mixed with images at 5.0; --overwrite starts over at the default."""
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:2])
    flags = ["--num_variants", 0, "--num_images_per_prompt", 1]
    generate(zoo, prompts, tmp_path / "new", *flags, model="sdxl")
    assert cu.recorded_settings(tmp_path / "new")["guidance_scale"] == 5.0
    generate(zoo, prompts, tmp_path / "old", *flags, "--guidance_scale", 7.5, model="sdxl")
    before = folder_files(tmp_path / "old")
    result = generate(zoo, prompts, tmp_path / "old", *flags, model="sdxl")
    assert "going on with the guidance_scale 7.5 it was made with (StableDiffusionXLPipeline's own default is 5.0)" \
        in result.stdout and "(0 made now" in result.stdout
    assert folder_files(tmp_path / "old") == before
    generate(zoo, prompts, tmp_path / "old", *flags, "--overwrite", model="sdxl")
    assert cu.recorded_settings(tmp_path / "old")["guidance_scale"] == 5.0
    name = cu.read_jsonl(tmp_path / "new" / "metadata.jsonl")[0]["file_name"]
    assert folder_files(tmp_path / "old")[name] == folder_files(tmp_path / "new")[name]


# The trainers: each names the pipeline class it trains (PIPELINE_CLASS); a copy under any name trains that class
TRAINERS = {  # script -> (its pipeline class, zoo model, its flags, the model card's licence and a family tag)
    "train_craft_sd15.py": ("StableDiffusionPipeline", "sd15", ["--use_lora", "--resolution", 32],
                            "creativeml-openrail-m", "stable-diffusion"),
    "train_craft_sdxl_lora.py": ("StableDiffusionXLPipeline", "sdxl", ["--resolution", 32], "openrail++",
                                 "stable-diffusion-xl"),
    "train_craft_flux_lora.py": ("FluxPipeline", "flux", ["--resolution", 32, "--max_sequence_length", 16], "other",
                                 "flux"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_set(tmp_path_factory.mktemp("data") / "filtered", n=2)


@pytest.mark.parametrize("script", list(TRAINERS))
def test_a_renamed_copy_of_each_trainer_trains_its_family(zoo, data, tmp_path, script):
    from safetensors.torch import load_file

    pipeline_class, model, flags, license, tag = TRAINERS[script]
    copy = tmp_path / "scripts" / "train_my_model.py"
    copy.parent.mkdir()
    shutil.copy(f"{REPO}/{script}", copy)
    common = ["--train_data_dir", data, "--max_train_steps", 1, "--report_to", "none", *flags]
    run_script(str(copy), "--pretrained_model_name_or_path", zoo / model, "--output_dir", tmp_path / "out", *common)
    assert load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"license: {license}\n" in card and f"- {tag}\n" in card

    other = "zimage" if model != "sd15" else "sdxl"
    result = run_script(str(copy), "--pretrained_model_name_or_path", zoo / other, "--output_dir", tmp_path / "x",
                        *common, check=False)
    class_name = {"zimage": "ZImagePipeline", "sdxl": "StableDiffusionXLPipeline"}[other]
    assert result.returncode != 0 and "Traceback" not in result.stderr and not (tmp_path / "x").exists()
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"{other} is a {class_name}; train_my_model.py trains {pipeline_class}, and no script beside it trains "
        f"{class_name}: fork the one closest to it (README: Forking a script for your model)")


def test_the_family_check_finds_the_script_beside_it_that_trains_a_model(zoo, data, tmp_path):
    """No table to edit: a script added beside the others is named for its family; the pack's own scripts name
    each other; a family none of them trains is one line."""
    folder = tmp_path / "scripts"
    folder.mkdir()
    shutil.copy(f"{REPO}/train_craft_sd15.py", folder / "a.py")
    shutil.copy(f"{REPO}/train_craft_sdxl_lora.py", folder / "b.py")
    (folder / "notes.py").write_text("PIPELINE_CLASS = None  # not a trainer\n")
    common = ["--train_data_dir", data, "--output_dir", tmp_path / "x", "--max_train_steps", 1]
    for script, model, expected in (
            (folder / "a.py", "sdxl", "sdxl is a StableDiffusionXLPipeline; a.py trains StableDiffusionPipeline: use "
                                      "b.py"),
            (f"{REPO}/train_craft_sd15.py", "flux", "flux is a FluxPipeline; train_craft_sd15.py trains "
                                                    "StableDiffusionPipeline: use train_craft_flux_lora.py"),
            (f"{REPO}/train_craft_flux_lora.py", "zimage", "zimage is a ZImagePipeline; train_craft_flux_lora.py trains "
                                                           "FluxPipeline, and no script beside it trains ZImagePipeline")):
        result = run_script(str(script), "--pretrained_model_name_or_path", zoo / model, *common, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert expected in result.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "x").exists()
