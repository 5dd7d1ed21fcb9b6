"""Bad input a new user runs into, stage by stage: each ends in one line naming the flag, file or row and what to do,
before anything is written, or (where it is harmless) is taken with a note; none is accepted and ignored."""

import json
import os
import shutil

import pytest

import craft_utils as cu
from conftest import run_script
from make_tiny_models import make_training_set
from test_crf_filter import GROUP_0, make_candidates


def last_line(result):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "prompts.txt").write_text("a red cube\na blue ball\n")
    (folder / "nulls.json").write_text(json.dumps(["a red cube", None, "a blue ball"]))
    (folder / "records.json").write_text(json.dumps([{"prompt": "a red cube"}, {"prompt": 42}]))
    (folder / "expansions.jsonl").write_text(json.dumps({"prompt": "a red cube", "variants": ["a red cube, shiny"]})
                                             + "\n")
    return folder


def generate(zoo, out, *flags, check=False):
    return run_script("generate_candidates.py", "--pretrained_model_name_or_path", zoo / "sd15", "--output_dir", out,
                      "--num_images_per_prompt", 1, "--num_variants", 0, "--num_inference_steps", 1, "--height", 64,
                      "--width", 64, *flags, check=check)


GENERATION_CASES = {
    "height_not_a_multiple": (("--height", 63), "error: --height 63 must be a multiple of 8 for StableDiffusionPipeline "
                                                "(its VAE's scale); try 56"),
    "prompt_not_text": (("--prompts_file", "{prompts}/records.json"),
                        "error: {prompts}/records.json, row 2: the prompt 42 is not text; fix that row"),
    "expansion_file_unread": (("--num_variants", 1, "--expansion", "template", "--expansion_file", "x.jsonl"),
                              "--expansion_file is read only with --expansion file and --num_variants > 0; leave it "
                              "out"),
    "max_prompts_0": (("--max_prompts", 0),
                      "error: --max_prompts must be at least 1 (got 0); leave it out to use every prompt"),
}


@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_generation_refuses_in_one_line_before_any_folder(zoo, prompts, tmp_path, case):
    flags, line = GENERATION_CASES[case]
    flags = [str(flag).format(prompts=prompts) for flag in flags]
    if "--prompts_file" not in flags:
        flags += ["--prompts_file", prompts / "prompts.txt"]
    assert last_line(generate(zoo, tmp_path / "out", *flags)).endswith(line.format(prompts=prompts))
    assert not (tmp_path / "out").exists()


def test_generation_folder_faults(zoo, prompts, tmp_path):
    """An --output_dir that is a file; a null prompt left out with a note; a LoRA of another family; a folder whose
    first run made no image takes new settings; eval_rewards.py never takes over (nor --overwrite-deletes) a
    generate_candidates.py folder."""
    (tmp_path / "a_file").write_text("x")
    assert last_line(generate(zoo, tmp_path / "a_file", "--prompts_file", prompts / "prompts.txt")) == (
        f"error: --output_dir {tmp_path / 'a_file'} is a file; give a folder")

    result = generate(zoo, tmp_path / "nulls", "--prompts_file", prompts / "nulls.json", check=True)
    assert f"{prompts / 'nulls.json'}: left out 1 row(s) without a prompt (null)" in result.stderr
    assert [row["text"] for row in cu.read_jsonl(tmp_path / "nulls" / "metadata.jsonl")] == ["a red cube", "a blue ball"]

    lora = make_sdxl_lora(zoo, tmp_path / "sdxl_lora")
    line = last_line(generate(zoo, tmp_path / "lora", "--prompts_file", prompts / "prompts.txt", "--lora_path", lora))
    assert line.startswith(f"error: --lora_path {lora}: StableDiffusionPipeline cannot load it as a LoRA (")
    assert line.endswith("give a LoRA file of this model's family")

    # rewrites for one prompt of two: stopped after the folder was made, before any image
    out = tmp_path / "expanded"
    flags = ("--prompts_file", prompts / "prompts.txt", "--num_variants", 1, "--expansion")
    assert "has 0 variants for the prompt" in last_line(generate(zoo, out, *flags, "file", "--expansion_file",
                                                                 prompts / "expansions.jsonl"))
    (out / "notes.txt").write_text("mine")  # nothing of the pack's to lose, but this file is the user's
    assert last_line(generate(zoo, out, *flags, "template")) == (
        f"error: a run with new settings replaces only what this pack wrote, and {out} also holds notes.txt: move "
        "those away, or choose another --output_dir")
    (out / "notes.txt").unlink()
    result = generate(zoo, out, *flags, "template", check=True)
    assert f"{out}: no image was made with its earlier settings; starting over with these" in result.stdout
    assert len(cu.read_jsonl(out / "metadata.jsonl")) == 4

    before = {name: (out / name).read_bytes() for name in os.listdir(out) if name.endswith(".png")}
    for overwrite in ((), ("--overwrite",)):
        result = run_script("eval_rewards.py", "--pretrained_model_name_or_path", zoo / "sd15", "--prompts_file",
                            prompts / "prompts.txt", "--output_dir", out, "--rewards", "jpeg", "--num_images_per_prompt",
                            1, "--num_inference_steps", 1, "--height", 64, "--width", 64, *overwrite, check=False)
        assert last_line(result) == (f"error: {out} was made by generate_candidates.py; eval_rewards.py writes only "
                                     "into its own folders: choose another --output_dir")
        assert {name: (out / name).read_bytes() for name in os.listdir(out) if name.endswith(".png")} == before


def make_sdxl_lora(zoo, folder):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(zoo / "sdxl")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return folder / "pytorch_lora_weights.safetensors"


def repeat_first_row(folder):
    rows = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("\n".join([*rows, rows[0]]) + "\n")
    return len(rows) + 1


def test_scoring_and_filtering_refuse_in_one_line(tmp_path):
    """A repeated row (counted twice), a group_id that is not a number, the output folder being the input, flags
    that the chosen mode does not read, a weight cap or reward weights that cannot mean anything, a batch of 0."""
    candidates = make_candidates(tmp_path / "candidates", {0: GROUP_0})
    filter_flags = ("crf_filter.py", "--candidates_dir", candidates, "--filter_rewards", "hpsv2.1")
    out = tmp_path / "filtered"
    usage_errors = {
        ("--weight_clip", 0): "error: --weight_clip must be > 0 (got 0.0); leave it out for no cap",
        ("--mode", "topk", "--margin", 3): "error: --margin does not apply to --mode topk; leave it out (it is read by "
                                           "--mode dominance)",
        ("--top_k", 2): "error: --top_k does not apply to --mode dominance; leave it out (it is read by --mode topk)",
        ("--filter_rewards", "hpsv2.1,pickscore", "--reward_weights", "0,0"):
            "error: --reward_weights 0,0: give finite numbers, at least one of them not 0",
    }
    for flags, line in usage_errors.items():
        assert last_line(run_script(*filter_flags, "--output_dir", out, *flags, check=False)).endswith(line)
    assert last_line(run_script(*filter_flags, "--output_dir", candidates, check=False)) == (
        f"error: --output_dir {candidates} is the --candidates_dir itself; give a new folder for the filtered set")
    assert last_line(run_script("eval_rewards.py", "--images_dir", candidates, "--rewards", "jpeg",
                                "--reward_batch_size", 0, check=False)).endswith(
        "argument --reward_batch_size: '0' is not a whole number >= 1")

    rows = cu.read_jsonl(candidates / "metadata.jsonl")
    rows[1]["group_id"] = "zero"
    cu.write_jsonl_atomic(candidates / "metadata.jsonl", rows)
    assert last_line(run_script(*filter_flags, "--output_dir", out, check=False)) == (
        f"error: {candidates / 'metadata.jsonl'}, row 2: group_id 'zero' is not a whole number; fix that row")
    rows[1]["group_id"] = 0
    cu.write_jsonl_atomic(candidates / "metadata.jsonl", rows)
    repeated = repeat_first_row(candidates)
    line = f"error: {candidates / 'metadata.jsonl'}, rows 1 and {repeated}: both name '{rows[0]['file_name']}'; " \
           "remove the repeated row"
    scores = (candidates / "rewards.jsonl").read_bytes()
    assert last_line(run_script(*filter_flags, "--output_dir", out, check=False)) == line
    assert last_line(run_script("eval_rewards.py", "--images_dir", candidates, "--rewards", "jpeg",
                                check=False)) == line
    assert (candidates / "rewards.jsonl").read_bytes() == scores and not out.exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_set(tmp_path_factory.mktemp("data") / "filtered", n=4)


def train(zoo, data, out, *flags, script="train_craft_sd15.py", family="sd15", check=False):
    return run_script(script, "--pretrained_model_name_or_path", zoo / family, "--train_data_dir", data,
                      "--output_dir", out, "--resolution", 64, "--train_batch_size", 2, "--report_to", "none",
                      "--max_train_steps", 2, *flags, check=check)


TRAINING_CASES = {
    "rank_0": (("--use_lora", "--rank", 0), "error: --rank must be at least 1 (got 0)"),
    "unknown_scheduler": (("--lr_scheduler", "cosinus"), "argument --lr_scheduler: invalid choice: 'cosinus'"),
    "tracker_not_installed": (("--report_to", "wandb"), "error: --report_to wandb: wandb is not installed; pip install "
                                                        "wandb, or pass --report_to none"),
    "rewards_without_prompt": (("--validation_rewards", "jpeg"),
                               "error: --validation_rewards scores the validation images: give --validation_prompt too"),
    "kohya_of_a_full_finetune": (("--output_kohya_format",), "error: --output_kohya_format writes a LoRA in kohya's "
                                                             "names; use it with --use_lora"),
}


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_training_flags_refused_in_one_line(zoo, data, tmp_path, case):
    flags, line = TRAINING_CASES[case]
    assert line in last_line(train(zoo, data, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


def test_training_faults(zoo, data, tmp_path):
    """A repeated training row; a diverging run stops at its first NaN loss instead of saving NaN weights as a
    result; a pipeline folder copied without a component; a validation sibling of another family names its flag."""
    repeated = tmp_path / "repeated"
    shutil.copytree(data, repeated)
    count = repeat_first_row(repeated)
    assert last_line(train(zoo, repeated, tmp_path / "out", "--use_lora")) == (
        f"error: {repeated / 'metadata.jsonl'}, rows 1 and {count}: both name '000.png'; remove the repeated row")

    out = tmp_path / "diverged"
    line = last_line(train(zoo, data, out, "--use_lora", "--learning_rate", 1e30, "--max_grad_norm", 0))
    assert line.startswith("error: the loss is nan at step 2: training diverged (--learning_rate 1e+30); lower")
    assert not (out / "pytorch_lora_weights.safetensors").exists()

    broken = tmp_path / "zimage"
    shutil.copytree(zoo / "zimage", broken)
    shutil.rmtree(broken / "text_encoder")
    assert last_line(run_script("train_craft_zimage_lora.py", "--pretrained_model_name_or_path", broken,
                                "--train_data_dir", data, "--output_dir", tmp_path / "z", "--resolution", 32,
                                check=False)) == (
        f"error: {broken / 'text_encoder'}/ is missing: model_index.json names a Qwen3Model there; copy the whole "
        "pipeline folder, or give its Hub id")
    assert last_line(train(zoo, data, tmp_path / "k", "--resolution", 32, "--validation_prompt", "a cube",
                           "--validation_model_name_or_path", zoo / "zimage", script="train_craft_flux2_klein_lora.py",
                           family="flux2_klein")) == (
        f"error: --validation_model_name_or_path {zoo / 'zimage'} is a ZImagePipeline; it must be a Flux2KleinPipeline, "
        "the family train_craft_flux2_klein_lora.py trains")


def test_the_promised_command_names_its_default_model_and_why_it_cannot_be_had(tmp_path):
    """No --pretrained_model_name_or_path: the script's family base model, said in the first line; offline (the
    tests' HF_HUB_OFFLINE=1) and not in the cache, one line says so and what to do, before anything is written."""
    data = make_training_set(tmp_path / "filtered", n=2)
    for script, model in (("train_craft_sdxl_lora.py", "stabilityai/stable-diffusion-xl-base-1.0"),
                          ("train_craft_flux_lora.py", "black-forest-labs/FLUX.1-dev"),
                          ("generate_candidates.py", "stabilityai/stable-diffusion-xl-base-1.0")):
        flags = ("--prompts_file", data / "metadata.jsonl", "--prompt_column", "text") \
            if script == "generate_candidates.py" else ("--train_data_dir", data)
        result = run_script(script, *flags, "--output_dir", tmp_path / "out", check=False)
        assert result.stdout.splitlines()[0] == (
            f"model: {model}, the default (--pretrained_model_name_or_path chooses another)")
        assert last_line(result) == (
            f"error: --pretrained_model_name_or_path {model} is not a local folder, the Hub cannot be reached "
            f"(HF_HUB_OFFLINE is set) and it is not in the cache: download it where there is a network (`hf download "
            f"{model}`), or give a local pipeline folder")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", ["GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError",
                                   "RemoteEntryNotFoundError"])
def test_a_hub_model_that_cannot_be_had_says_why_in_one_line(error):
    from unittest import mock

    import huggingface_hub.errors

    import craft_pipelines as cp

    raised = getattr(huggingface_hub.errors, error)("from the Hub", response=mock.Mock(headers={}, status_code=404))
    with mock.patch("huggingface_hub.hf_hub_download", side_effect=raised), pytest.raises(SystemExit) as stopped:
        cp.read_model_index("owner/model", revision="v2")
    assert str(stopped.value) == "error: --pretrained_model_name_or_path owner/model" + {
        "GatedRepoError": " is gated: accept its licence on https://huggingface.co/owner/model, then log in with "
                          "`hf auth login` (or set HF_TOKEN)",
        "RepositoryNotFoundError": ": no such model on the Hub (or a private one: log in with `hf auth login`); check "
                                   "the id",
        "RevisionNotFoundError": ": no revision 'v2' on the Hub; check --revision",
        "RemoteEntryNotFoundError": " has no model_index.json on the Hub: it is not a diffusers pipeline"}[error]


def test_a_config_value_outside_a_flag_s_choices_is_refused(tmp_path, capsys):
    """A --config file's values skip argparse's choices: they are checked after it, in one line."""
    import train_craft_sd15

    (tmp_path / "recipe.json").write_text(json.dumps({"lr_scheduler": "cosinus"}))
    with pytest.raises(SystemExit):
        train_craft_sd15.parse_args(["--train_data_dir", str(tmp_path), "--config", str(tmp_path / "recipe.json")])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --lr_scheduler 'cosinus': choose from linear, cosine, cosine_with_restarts, polynomial, constant, "
        "constant_with_warmup")
