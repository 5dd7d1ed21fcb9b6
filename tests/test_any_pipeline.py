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

import craft_generation as cg
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


def renamed(zoo, tmp_path, class_name, model="sd15"):
    """A zoo pipeline folder whose model_index.json names another pipeline class."""
    folder = tmp_path / str(class_name).replace("'", "").replace(" ", "")
    shutil.copytree(zoo / model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    return folder


@pytest.mark.parametrize("case", ["sequence_length_sd15", "scheduler_zimage", "scheduler_klein", "fuse_qkv_zimage",
                                  "img2img", "control", "unknown_class", "custom_class", "not_a_pipeline", "vae_class",
                                  "vae_missing", "not_a_lora"])
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
                            "--fuse_qkv_projections: ZImagePipeline's ZImageTransformer2DModel has no fused attention "
                            "projections; leave the flag out"),
        "img2img": (renamed(zoo, tmp_path, "StableDiffusionImg2ImgPipeline"), [],
                    "is a StableDiffusionImg2ImgPipeline, which the pack cannot drive: it generates from prompts alone "
                    "with diffusers' text-to-image pipelines"),
        "control": (renamed(zoo, tmp_path, "FluxControlPipeline", "flux"), [],  # in diffusers' text-to-image table
                    "is a FluxControlPipeline, which the pack cannot drive: it generates from prompts alone with "
                    "diffusers' text-to-image pipelines (AutoPipelineForText2Image's, without a control or mask image)"),
        "unknown_class": (renamed(zoo, tmp_path, "MyOwnPipeline"), [],
                          "is a MyOwnPipeline, which diffusers 0.42.1 does not have; upgrade diffusers or give a "
                          "diffusers text-to-image pipeline"),
        "custom_class": (renamed(zoo, tmp_path, ["my_pipeline", "MyPipeline"]), [],
                         "/model_index.json names ['my_pipeline', 'MyPipeline'], not one of diffusers' pipeline "
                         "classes"),
        "not_a_pipeline": (zoo / "clip", [], "clip has no model_index.json; give a diffusers pipeline folder or Hub id"),
        "vae_class": ("flux2_klein", ["--pretrained_vae_model_name_or_path", zoo / "sdxl" / "vae"],
                      f"--pretrained_vae_model_name_or_path {zoo}/sdxl/vae is a AutoencoderKL; Flux2KleinPipeline "
                      "takes a AutoencoderKLFlux2: give one of those"),
        "vae_missing": ("sdxl", ["--pretrained_vae_model_name_or_path", zoo / "nope"],
                        f"--pretrained_vae_model_name_or_path: could not read a model from '{zoo}/nope'"),
        "not_a_lora": ("sd15", ["--lora_path", zoo / "sd15" / "unet" / "diffusion_pytorch_model.safetensors"],
                       f"--lora_path {zoo}/sd15/unet/diffusion_pytorch_model.safetensors: StableDiffusionPipeline "
                       "cannot load it as a LoRA"),
    }[case]
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:1])
    for script, out in (("generate_candidates.py", tmp_path / "candidates"), ("eval_rewards.py", tmp_path / "eval")):
        result = run_script(script, "--pretrained_model_name_or_path", zoo / model, "--prompts_file", prompts,
                            "--output_dir", out, "--num_inference_steps", 2, *flags, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")
        assert expected in result.stderr.strip().splitlines()[-1]
        assert not out.exists()


def test_an_omitted_guidance_is_the_pipelines_own_and_never_resumes_a_folder_made_at_another(zoo, tmp_path):
    """SDXL's own default is 5.0. A folder made at 7.5 (the pack's earlier default for SDXL) is not resumed at 5.0:
    one line says how to resume it (the flag) or start over (--overwrite, then at 5.0); --compare_to between folders
    sampled at different guidance says so."""
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:2])
    flags = ["--num_variants", 0, "--num_images_per_prompt", 1]
    generate(zoo, prompts, tmp_path / "new", *flags, model="sdxl")
    assert cg.recorded_settings(tmp_path / "new")["guidance_scale"] == 5.0
    generate(zoo, prompts, tmp_path / "old", *flags, "--guidance_scale", 7.5, model="sdxl")
    before = folder_files(tmp_path / "old")
    result = generate(zoo, prompts, tmp_path / "old", *flags, model="sdxl", check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/old was made at guidance_scale 7.5 and StableDiffusionXLPipeline's own default is 5.0: "
        "pass --guidance_scale 7.5 to resume it, or --overwrite to start over at the default")
    assert folder_files(tmp_path / "old") == before
    assert "(0 made now" in generate(zoo, prompts, tmp_path / "old", *flags, "--guidance_scale", 7.5, model="sdxl").stdout

    result = run_script("eval_rewards.py", "--images_dir", tmp_path / "new", "--compare_to", tmp_path / "old",
                        "--rewards", "jpeg")
    assert f"note: {tmp_path}/new and {tmp_path}/old were sampled with other settings (guidance_scale 5.0 vs 7.5): " \
           "the deltas mix the models' difference with the sampling's" in result.stdout

    generate(zoo, prompts, tmp_path / "old", *flags, "--overwrite", model="sdxl")
    assert cg.recorded_settings(tmp_path / "old")["guidance_scale"] == 5.0
    name = cu.read_jsonl(tmp_path / "new" / "metadata.jsonl")[0]["file_name"]
    assert folder_files(tmp_path / "old")[name] == folder_files(tmp_path / "new")[name]


def test_native_size_is_read_from_each_pipeline(zoo):
    """The pipeline's default latent size or its UNet's, times the VAE's downscaling (2 per VAE block after the
    first); None where the pipeline settles its size inside its call (Z-Image: 1024 there)."""
    import craft_pipelines as cp
    from diffusers import DiffusionPipeline

    expected = {"sd15": 32 * 2, "sdxl": 32 * 2, "flux": 128 * 2, "sd3": 32 * 1, "flux2_klein": 128 * 1,
                "zimage": None}
    assert {model: cp.native_size(DiffusionPipeline.from_pretrained(zoo / model)) for model in expected} == expected


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

    result = run_script(str(copy), "--pretrained_model_name_or_path", zoo / "sd3", "--output_dir", tmp_path / "x",
                        *common, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr and not (tmp_path / "x").exists()
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"sd3 is a StableDiffusion3Pipeline; train_my_model.py trains {pipeline_class}, and no script of the pack "
        "trains StableDiffusion3Pipeline: fork the one closest to it (README: Forking a script for your model)")


def test_the_family_check_finds_the_script_that_trains_a_model(zoo, data, tmp_path):
    """No table to edit: a script added beside the others is named for its family, and so are the pack's own
    scripts for a copy kept elsewhere; an image-to-image pipeline folder trains as its family's text-to-image one."""
    folder = tmp_path / "scripts"
    folder.mkdir()
    shutil.copy(f"{REPO}/train_craft_sd15.py", folder / "a.py")
    shutil.copy(f"{REPO}/train_craft_sdxl_lora.py", folder / "b.py")
    img2img = tmp_path / "sdxl_img2img"
    shutil.copytree(zoo / "sdxl", img2img)
    index = json.loads((img2img / "model_index.json").read_text())
    (img2img / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    common = ["--train_data_dir", data, "--output_dir", tmp_path / "x", "--max_train_steps", 1]
    for script, model, expected in (
            (folder / "a.py", zoo / "sdxl", "sdxl is a StableDiffusionXLPipeline; a.py trains StableDiffusionPipeline: "
                                            "use b.py or " + f"{REPO}/train_craft_sdxl_lora.py"),
            (folder / "a.py", img2img, "sdxl_img2img is a StableDiffusionXLPipeline; a.py trains "
                                       "StableDiffusionPipeline: use b.py or " + f"{REPO}/train_craft_sdxl_lora.py"),
            (f"{REPO}/train_craft_sd15.py", zoo / "flux", "flux is a FluxPipeline; train_craft_sd15.py trains "
                                                          "StableDiffusionPipeline: use train_craft_flux_lora.py"),
            (f"{REPO}/train_craft_flux_lora.py", zoo / "zimage", "zimage is a ZImagePipeline; train_craft_flux_lora.py "
                                                                 "trains FluxPipeline: use train_craft_zimage_lora.py")):
        result = run_script(str(script), "--pretrained_model_name_or_path", model, *common, check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert expected in result.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "x").exists()
    run_script(f"{REPO}/train_craft_sdxl_lora.py", "--pretrained_model_name_or_path", img2img, *common,
               "--resolution", 32, "--report_to", "none")
    assert (tmp_path / "x" / "pytorch_lora_weights.safetensors").is_file()
