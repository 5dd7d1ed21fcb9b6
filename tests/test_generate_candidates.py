import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import craft_generation as cg
import craft_utils as cu
from conftest import REPO, TWO_PROCESSES, run_script, subprocess_env

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle at night", "a yellow star",
           "a purple circle on a white background", "a small orange square"]
COLUMNS = {"image", "text", "original_prompt", "group_id", "variant_id", "image_index", "seed"}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def generate(zoo, prompts_file, out, *extra, model="sd15", **run):
    return run_script(
        "generate_candidates.py", "--pretrained_model_name_or_path", zoo / model, "--prompts_file", prompts_file,
        "--output_dir", out, "--num_inference_steps", 2, "--num_variants", 2, "--num_images_per_prompt", 2,
        "--batch_size", 3, *extra, **run,
    )


def folder_files(out):
    """Every file of a candidates folder and its bytes (the config's version info included)."""
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, out)] = open(path, "rb").read()
    return files


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory):
    """One uninterrupted single-process run that the resume and multi-process tests must reproduce exactly."""
    base = tmp_path_factory.mktemp("reference")
    prompts = write_lines(base / "prompts.txt", PROMPTS)
    generate(zoo, prompts, base / "out", fresh_interpreter=True)  # other string hashing than the runs it is equal to
    return prompts, base / "out"


def test_sd15_candidates_are_an_imagefolder_with_the_contract_columns(reference):
    from datasets import load_dataset

    _, out = reference
    dataset = load_dataset("imagefolder", data_dir=str(out), split="train")
    assert set(dataset.column_names) == COLUMNS
    assert len(dataset) == len(PROMPTS) * 3 * 2
    expansions = {row["group_id"]: row for row in cu.read_jsonl(out / "expansions.jsonl")}
    for row in dataset:
        group = expansions[row["group_id"]]
        assert row["original_prompt"] == PROMPTS[row["group_id"]] == group["prompt"]
        assert row["text"] == ([group["prompt"]] + group["variants"])[row["variant_id"]]
        assert row["seed"] == cu.derive_seed(0, row["group_id"], row["variant_id"], row["image_index"])
        assert row["image"].size == (64, 64)
    # template rewrites keep the prompt and add detail
    assert all(PROMPTS[g] in v and v != PROMPTS[g] for g, row in expansions.items() for v in row["variants"])
    config = json.loads((out / "generation_config.json").read_text())
    assert config["settings"]["num_inference_steps"] == 2 and config["settings"]["num_prompts"] == len(PROMPTS)
    assert config["resolved"] == {"pipeline_class": "StableDiffusionPipeline", "scheduler": "DDIMScheduler",
                                  "height": 64, "width": 64}
    assert not (out / ".progress").exists()


def test_recorded_text_and_seed_regenerate_the_image_with_plain_diffusers(zoo, reference):
    from diffusers import StableDiffusionPipeline

    _, out = reference
    row = cu.read_jsonl(out / "metadata.jsonl")[7]
    pipe = StableDiffusionPipeline.from_pretrained(zoo / "sd15")
    image = pipe(row["text"], generator=torch.Generator().manual_seed(row["seed"]), num_inference_steps=2,
                 guidance_scale=7.5).images[0]
    saved = np.asarray(Image.open(out / row["file_name"]), dtype=np.int16)
    # batched vs single forward passes differ in float rounding only
    assert np.abs(np.asarray(image, dtype=np.int16) - saved).max() <= 2
    other = cu.read_jsonl(out / "metadata.jsonl")[6]
    assert np.abs(np.asarray(Image.open(out / other["file_name"]), dtype=np.int16) - saved).mean() > 1


def test_kill_and_resume_equals_an_uninterrupted_run(zoo, reference, tmp_path):
    prompts, expected = reference
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(REPO, "generate_candidates.py"), "--pretrained_model_name_or_path",
               str(zoo / "sd15"), "--prompts_file", str(prompts), "--output_dir", str(out),
               "--num_inference_steps", "2", "--num_variants", "2", "--num_images_per_prompt", "2",
               "--batch_size", "3"]
    process = subprocess.Popen(command, env=subprocess_env(), stderr=subprocess.DEVNULL)
    log = out / ".progress" / "images-00000.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    logged = log.read_text().count("\n")
    assert 2 <= logged < len(PROMPTS) * 3 * 2 and not (out / "metadata.jsonl").exists()
    # what a kill mid-write can leave: a torn row and a temp image
    with open(log, "a") as f:
        f.write('{"file_name": "000005_v02_i01.png", "te')
    (out / ".tmp-abc.png").write_bytes(b"half an image")

    result = generate(zoo, prompts, out)
    assert f"{len(PROMPTS) * 3 * 2 - logged} made now" in result.stdout
    assert folder_files(out) == folder_files(expected)


@pytest.mark.parametrize("kill_at", ["images_written#3", "logs_merged"])
def test_killed_at_a_named_point_then_rerun_equals_an_uninterrupted_run(zoo, reference, tmp_path, kill_at):
    """Killed after a batch's images are on disk but before they are logged, or after metadata.jsonl is written
    but before the progress logs are removed: the rerun redoes or duplicates nothing it should not."""
    prompts, expected = reference
    generate(zoo, prompts, tmp_path / "out", kill_at=kill_at)
    generate(zoo, prompts, tmp_path / "out")
    assert folder_files(tmp_path / "out") == folder_files(expected)


def test_killed_overwrite_keeps_the_old_images_until_the_new_run_completes(zoo, reference, tmp_path):
    prompts, expected = reference
    out = tmp_path / "out"
    shutil.copytree(expected, out)
    generate(zoo, prompts, tmp_path / "seed1", "--seed", 1)
    generate(zoo, prompts, out, "--seed", 1, "--overwrite", kill_at="images_written#2")
    assert folder_files(tmp_path / ".out.old") == folder_files(expected)  # the old run, whole, aside
    result = generate(zoo, prompts, out, check=False)  # the old settings without --overwrite: told where it is
    assert result.returncode != 0 and f"the run that one replaces is kept in {tmp_path}/.out.old" in result.stderr
    generate(zoo, prompts, out, "--seed", 1)  # the new settings resume
    assert folder_files(out) == folder_files(tmp_path / "seed1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "seed1"]  # the old one went when the new was done

    # killed again, then the old settings asked for with --overwrite: the run set aside comes back, nothing redone
    generate(zoo, prompts, out, "--overwrite", kill_at="images_written#1")
    result = generate(zoo, prompts, out, "--seed", 1, "--overwrite")
    assert "restored the finished run" in result.stdout and "0 made now" in result.stdout
    assert folder_files(out) == folder_files(tmp_path / "seed1")


def test_two_processes_write_the_same_folder_as_one(zoo, reference, tmp_path):
    prompts, expected = reference
    generate(zoo, prompts, tmp_path / "out", launcher=TWO_PROCESSES)
    assert folder_files(tmp_path / "out") == folder_files(expected)


def test_sdxl_with_llm_expansion_and_rerun_reuses_everything(zoo, tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:2])
    out = tmp_path / "out"
    extra = ("--expansion", "llm", "--expansion_model", zoo / "expander", "--expansion_max_new_tokens", 12,
             "--guidance_scale", 5.0)
    generate(zoo, prompts, out, *extra, model="sdxl")
    expansions = cu.read_jsonl(out / "expansions.jsonl")
    assert [row["prompt"] for row in expansions] == PROMPTS[:2]
    assert all(len(row["variants"]) == 2 and all(v.strip() for v in row["variants"]) for row in expansions)
    assert expansions[0]["variants"][0] != expansions[0]["variants"][1]  # sampled, not greedy copies
    rows = cu.read_jsonl(out / "metadata.jsonl")
    assert {r["text"] for r in rows if r["variant_id"] == 1} == {e["variants"][0] for e in expansions}
    config = json.loads((out / "generation_config.json").read_text())
    assert config["resolved"]["pipeline_class"] == "StableDiffusionXLPipeline"
    before = folder_files(out)
    result = generate(zoo, prompts, out, *extra, model="sdxl")
    assert "(0 made now" in result.stdout
    assert folder_files(out) == before


def test_llm_rewrites_in_a_padded_batch_equal_one_prompt_at_a_time(zoo):
    """Left padding and the attention mask keep a short prompt's rewrites what they are alone (near-greedy)."""
    import generate_candidates

    # a short instruction: the tiny random LM's answer then depends on the prompt
    args = SimpleNamespace(expansion_model=str(zoo / "expander"), mixed_precision="no", seed=0, num_variants=2,
                           expansion_instruction="rewrite", expansion_temperature=1e-4, expansion_max_new_tokens=8)
    tokenizer, model = generate_candidates.load_expander(args, "cpu")
    short, long = PROMPTS[0], PROMPTS[2] + " " + PROMPTS[4]
    batched = generate_candidates.llm_variants([short, long], 0, args, tokenizer, model)
    alone = [generate_candidates.llm_variants([prompt], 0, args, tokenizer, model)[0] for prompt in (short, long)]
    assert batched == alone and batched[0] != batched[1]


def test_llm_rewrites_are_batched_and_equal_across_process_counts_and_kills(zoo, tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:3])
    extra = ("--expansion", "llm", "--expansion_model", zoo / "expander", "--expansion_max_new_tokens", 10,
             "--expansion_batch_size", 2, "--num_images_per_prompt", 1)
    generate(zoo, prompts, tmp_path / "one", *extra)
    generate(zoo, prompts, tmp_path / "two", *extra, launcher=TWO_PROCESSES)  # batch [0, 1] here, [2] there
    generate(zoo, prompts, tmp_path / "killed", *extra, kill_at="expansions_logged")  # after the first batch
    logged = cu.read_jsonl(tmp_path / "killed" / cu.PROGRESS_DIR / "expansions-00000.jsonl")
    assert [row["group_id"] for row in logged] == [0, 1]
    generate(zoo, prompts, tmp_path / "killed", *extra)
    expected = (tmp_path / "one" / "expansions.jsonl").read_text()
    assert [row["prompt"] for row in cu.read_jsonl(tmp_path / "one" / "expansions.jsonl")] == PROMPTS[:3]
    for other in ("two", "killed"):
        assert (tmp_path / other / "expansions.jsonl").read_text() == expected
    assert folder_files(tmp_path / "killed") == folder_files(tmp_path / "one")


def test_file_expansion_uses_the_given_rewrites(zoo, tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:2])
    table = tmp_path / "rewrites.jsonl"
    write_lines(table, [json.dumps({"prompt": p, "variants": [p + ", detailed", p + ", at dawn", "x"]})
                        for p in PROMPTS[:2]])
    generate(zoo, prompts, tmp_path / "out", "--expansion", "file", "--expansion_file", table)
    texts = [r["text"] for r in cu.read_jsonl(tmp_path / "out" / "metadata.jsonl") if r["group_id"] == 1]
    assert texts == [PROMPTS[1]] * 2 + [PROMPTS[1] + ", detailed"] * 2 + [PROMPTS[1] + ", at dawn"] * 2

    write_lines(table, [json.dumps({"prompt": PROMPTS[0], "variants": ["a", "b"]})])
    result = generate(zoo, prompts, tmp_path / "out2", "--expansion", "file", "--expansion_file", table,
                      check=False)
    assert result.returncode != 0
    assert "rewrites.jsonl has 0 variants for the prompt 'a blue square on the left'" in result.stderr


@pytest.mark.parametrize("case", ["missing_file", "empty_file", "unknown_column", "latin1_txt", "latin1_jsonl",
                                  "missing_model", "offload_without_gpu", "sdpa_backend_without_kernel",
                                  "nan_guidance", "zero_steps"])
def test_bad_input_gives_one_clear_error_and_writes_nothing(zoo, tmp_path, case):
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:1])
    model = "sd15"
    extra = ()
    expected = {
        "missing_file": "prompts file {tmp}/nope.txt does not exist",
        "empty_file": "{tmp}/empty.txt holds no prompts",
        "unknown_column": "{tmp}/prompts.jsonl has no column 'prompt' (columns: caption); set --prompt_column",
        "latin1_txt": "{tmp}/latin1.txt is not UTF-8 text (byte 5 is b'\\xe9'); save it as UTF-8",
        "latin1_jsonl": "{tmp}/latin1.jsonl is not UTF-8 text (byte 17 is b'\\xe9'); save it as UTF-8",
        "missing_model": "--pretrained_model_name_or_path {zoo}/missing: no such folder, and not a Hub id "
                         "(owner/name); give a pipeline folder or a Hub id",
        "offload_without_gpu": "--enable_model_cpu_offload / --enable_sequential_cpu_offload move weights between the "
                               "CPU and a GPU; there is no GPU here: leave them out",
        "sdpa_backend_without_kernel": "--sdpa_backend efficient has no kernel for cpu in torch.float32; choose "
                                       "another or leave it out to let torch choose",
        "nan_guidance": "--guidance_scale must be a finite number (got nan)",
        "zero_steps": "--num_inference_steps must be at least 1 (got 0)",
    }[case].format(tmp=tmp_path, zoo=zoo)
    if case == "missing_file":
        prompts = tmp_path / "nope.txt"
    elif case == "empty_file":
        prompts = write_lines(tmp_path / "empty.txt", ["", "  "])
    elif case == "unknown_column":
        prompts = write_lines(tmp_path / "prompts.jsonl", [json.dumps({"caption": "a cat"})])
    elif case == "latin1_txt":
        prompts = tmp_path / "latin1.txt"
        prompts.write_bytes("a café in Paris\n".encode("latin-1"))
    elif case == "latin1_jsonl":
        prompts = tmp_path / "latin1.jsonl"
        prompts.write_bytes('{"prompt": "a café"}\n'.encode("latin-1"))
    elif case in ("offload_without_gpu", "sdpa_backend_without_kernel"):
        if torch.cuda.is_available():
            pytest.skip("a GPU is here: these work")
        extra = ("--enable_model_cpu_offload",) if case == "offload_without_gpu" else ("--sdpa_backend", "efficient")
    elif case in ("nan_guidance", "zero_steps"):
        extra = ("--guidance_scale", "nan") if case == "nan_guidance" else ("--num_inference_steps", 0)
    else:
        model = "missing"
    result = generate(zoo, prompts, tmp_path / "out", *extra, model=model, check=False)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and expected in last_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_other_settings_are_refused_and_overwrite_starts_over(zoo, tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:1])
    out = tmp_path / "out"
    generate(zoo, prompts, out)
    before = folder_files(out)
    result = generate(zoo, prompts, out, "--seed", 1, check=False)
    assert result.returncode != 0
    assert "holds images made with other settings (seed: 0 there, 1 now" in result.stderr
    assert folder_files(out) == before
    generate(zoo, prompts, out, "--seed", 1, "--overwrite")
    assert cu.read_jsonl(out / "metadata.jsonl")[0]["seed"] == cu.derive_seed(1, 0, 0, 0)

    # the same local path holding another model (retrained: a new VAE scaling factor) is other settings too
    retrained = tmp_path / "model"
    shutil.copytree(zoo / "sd15", retrained)
    made = generate(zoo, prompts, tmp_path / "same_path", model=retrained)
    config = json.loads((retrained / "vae" / "config.json").read_text())
    (retrained / "vae" / "config.json").write_text(json.dumps(dict(config, scaling_factor=0.5)))
    result = generate(zoo, prompts, tmp_path / "same_path", model=retrained, check=False)
    assert made.returncode == 0 and result.returncode != 0
    assert "holds images made with other settings (model_configs_sha256: " in result.stderr

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = generate(zoo, prompts, foreign, "--overwrite", check=False)
    assert "is not empty and holds no generation_config.json" in result.stderr
    assert os.listdir(foreign) == ["notes.txt"]


def max_pixel_difference(a, b):
    return max(np.abs(np.asarray(Image.open(a / name), dtype=np.int16) - np.asarray(Image.open(b / name),
                                                                                  dtype=np.int16)).max()
               for name in os.listdir(a) if name.endswith(".png"))


def test_speed_options_keep_the_images_close_and_are_recorded(zoo, tmp_path):
    """Fused q/k/v (a LoRA merged in first), channels-last, VAE slicing and the math SDPA kernel together, and
    torch.compile (5 images in batches of 3: the last batch is padded, so nothing compiles twice) make the default's
    images to within 2/255; the options that change numerics are recorded, and a folder made with them is not
    resumed without."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:5])
    small = ("--num_variants", 0, "--num_images_per_prompt", 1)
    pipe = StableDiffusionPipeline.from_pretrained(zoo / "sd15")
    pipe.unet.add_adapter(LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"]))
    torch.manual_seed(0)
    for name, weight in pipe.unet.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0, 0.2)
    pipe.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    lora = ("--lora_path", tmp_path / "lora")
    options = ("--fuse_qkv_projections", "--channels_last", "--vae_slicing", "--sdpa_backend", "math")

    generate(zoo, prompts, tmp_path / "default", *small)
    generate(zoo, prompts, tmp_path / "lora_default", *small, *lora)
    generate(zoo, prompts, tmp_path / "lora_options", *small, *lora, *options)
    compiled = generate(zoo, prompts, tmp_path / "compiled", *small, "--compile", env={"TORCH_LOGS": "recompiles"},
                        fresh_interpreter=True)  # torch reads TORCH_LOGS when it is imported
    assert "Recompiling" not in compiled.stderr
    assert len(os.listdir(tmp_path / "compiled")) == len(os.listdir(tmp_path / "default"))
    assert max_pixel_difference(tmp_path / "default", tmp_path / "compiled") <= 2
    assert max_pixel_difference(tmp_path / "lora_default", tmp_path / "lora_options") <= 2
    assert max_pixel_difference(tmp_path / "default", tmp_path / "lora_default") > 10  # the LoRA shows

    recorded = {name: json.loads((tmp_path / name / "generation_config.json").read_text())["settings"]
                for name in ("default", "lora_options", "compiled")}
    assert not {"compile", "fuse_qkv_projections", "channels_last", "sdpa_backend", "vae_slicing"} & set(
        recorded["default"])  # a folder made before these options existed resumes as it did
    assert {k: recorded["lora_options"][k] for k in ("fuse_qkv_projections", "channels_last", "vae_slicing",
                                                     "sdpa_backend")} == {
        "fuse_qkv_projections": True, "channels_last": True, "vae_slicing": True, "sdpa_backend": "math"}
    assert recorded["compiled"]["compile"] is True
    result = generate(zoo, prompts, tmp_path / "lora_options", *small, *lora, check=False)
    assert result.returncode != 0
    assert "holds images made with other settings (channels_last: True there, None now" in result.stderr


# ---- helpers, in process ------------------------------------------------------------------------------------


def prompt_args(**overrides):
    defaults = dict(prompts_file=None, dataset_name=None, dataset_split="train", prompt_column="prompt",
                    max_prompts=None, shuffle_prompts=False, skip_prompts=0, seed=0)
    return SimpleNamespace(**{**defaults, **overrides})


def test_load_prompts_from_txt_jsonl_csv(tmp_path):
    txt = write_lines(tmp_path / "p.txt", [" a cat ", "", "a dog", "a cat", "a bird"])
    assert cg.load_prompts(prompt_args(prompts_file=str(txt))) == ["a cat", "a dog", "a bird"]
    jsonl = write_lines(tmp_path / "p.jsonl", [json.dumps({"caption": c}) for c in ["x", "y", "x"]])
    assert cg.load_prompts(prompt_args(prompts_file=str(jsonl), prompt_column="caption")) == ["x", "y"]
    csv_file = write_lines(tmp_path / "p.csv", ["id,prompt", "1,a red cat", '2,"a cat, red"'])
    assert cg.load_prompts(prompt_args(prompts_file=str(csv_file))) == ["a red cat", "a cat, red"]
    for name, text in (("bom.txt", "a cat\na dog\n"), ("bom.jsonl", '{"prompt": "a cat"}\n'),
                       ("bom.csv", "prompt\na cat\n")):  # Windows editors start UTF-8 files with a byte-order mark
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert cg.load_prompts(prompt_args(prompts_file=str(tmp_path / name)))[0] == "a cat"
    # HPSv2's benchmark files are arrays of strings; HPDv2's train.json an array of records, a prompt per compared pair
    (tmp_path / "anime.json").write_text(json.dumps(["a cat", "a dog", "a cat"]))
    assert cg.load_prompts(prompt_args(prompts_file=str(tmp_path / "anime.json"))) == ["a cat", "a dog"]
    records = [{"prompt": "a cat", "human_preference": [1, 0]}, {"prompt": "a dog"}, {"prompt": "a cat"}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    assert cg.load_prompts(prompt_args(prompts_file=str(tmp_path / "train.json"))) == ["a cat", "a dog"]
    for name, content, message in (
            ("object.json", {"prompt": "a cat"}, "holds a JSON dict; a .json prompts file is an array of strings"),
            ("mixed.json", [{"prompt": "a"}, {"caption": "b"}], "mixed.json, row 2 has no column 'prompt' "
                                                                   "(columns: caption); set --prompt_column"),
            ("broken.json", None, "broken.json, line 1: not valid JSON")):
        (tmp_path / name).write_text(json.dumps(content) if content is not None else '["a cat",')
        with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
            cg.load_prompts(prompt_args(prompts_file=str(tmp_path / name)))
    many = write_lines(tmp_path / "many.txt", [f"prompt {i}" for i in range(50)])
    assert cg.load_prompts(prompt_args(prompts_file=str(many), max_prompts=3)) == ["prompt 0", "prompt 1", "prompt 2"]
    shuffled = cg.load_prompts(prompt_args(prompts_file=str(many), max_prompts=5, shuffle_prompts=True))
    assert shuffled == cg.load_prompts(prompt_args(prompts_file=str(many), max_prompts=5, shuffle_prompts=True))
    assert shuffled != ["prompt 0", "prompt 1", "prompt 2", "prompt 3", "prompt 4"] and len(set(shuffled)) == 5
    # rounds: the same seed's shuffle, the next prompts after those an earlier round took, none twice
    rounds = [cg.load_prompts(prompt_args(prompts_file=str(many), max_prompts=5, shuffle_prompts=True,
                                          skip_prompts=5 * k)) for k in range(3)]
    assert rounds[0] == shuffled and len(set(rounds[0] + rounds[1] + rounds[2])) == 15
    assert rounds[1] + rounds[2] == cg.load_prompts(prompt_args(prompts_file=str(many), max_prompts=10,
                                                                shuffle_prompts=True, skip_prompts=5))
    assert cg.load_prompts(prompt_args(prompts_file=str(many), skip_prompts=47)) == ["prompt 47", "prompt 48",
                                                                                       "prompt 49"]
    with pytest.raises(SystemExit, match="many.txt holds 50 distinct prompts: --skip_prompts 50 leaves none"):
        cg.load_prompts(prompt_args(prompts_file=str(many), skip_prompts=50))


def test_load_prompts_from_a_local_dataset(tmp_path):
    (tmp_path / "hub_style").mkdir()
    write_lines(tmp_path / "hub_style" / "train.jsonl", [json.dumps({"prompt": p}) for p in ["u", "v"]])
    assert cg.load_prompts(prompt_args(dataset_name=str(tmp_path / "hub_style"))) == ["u", "v"]
    with pytest.raises(SystemExit, match="has no column 'caption'"):
        cg.load_prompts(prompt_args(dataset_name=str(tmp_path / "hub_style"), prompt_column="caption"))


def test_derive_seed_is_stable_and_distinct():
    # pinned: changing the derivation would silently change every user's candidates
    assert cu.derive_seed(0, 0, 0, 0) == 1835542580
    seeds = {cu.derive_seed(s, g, v, i) for s in range(2) for g in range(20) for v in range(4) for i in range(4)}
    assert len(seeds) == 2 * 20 * 4 * 4 and max(seeds) < 2**31


def test_append_log_drops_a_torn_row_and_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / ".progress" / "log-00000.jsonl"
    log = cu.AppendLog(str(path))
    log.append([{"a": 1}, {"a": 2}])
    log.close()
    with open(path, "a") as f:
        f.write('{"a": 3')
    assert cu.read_jsonl(path, allow_torn_tail=True) == [{"a": 1}, {"a": 2}]
    log = cu.AppendLog(str(path))
    log.append([{"a": 4}])
    log.close()
    assert cu.read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    bad = write_lines(tmp_path / "bad.jsonl", ['{"a": 1}', "{oops", '{"a": 2}'])
    with pytest.raises(SystemExit, match=r"bad.jsonl, line 2: not valid JSON"):
        cu.read_jsonl(bad, allow_torn_tail=True)


def test_flux_candidates_record_flux_defaults_and_plain_diffusers_regenerates_them(zoo, reference, tmp_path):
    """FLUX.1-dev-style pipelines: the pipeline's own guidance default (3.5, the guidance embedding's, where SD1.5's
    classifier-free guidance gets 7.5), --max_sequence_length recorded and used; a flag a pipeline cannot take
    refused in one line."""
    from diffusers import FluxPipeline

    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:2])
    out = tmp_path / "flux"
    generate(zoo, prompts, out, "--height", 64, "--width", 64, "--max_sequence_length", 16, model="flux")
    config = json.loads((out / "generation_config.json").read_text())
    assert (config["settings"]["guidance_scale"], config["settings"]["max_sequence_length"]) == (3.5, 16)
    assert config["resolved"] == {"pipeline_class": "FluxPipeline", "scheduler": "FlowMatchEulerDiscreteScheduler",
                                  "height": 64, "width": 64}
    assert json.loads((reference[1] / "generation_config.json").read_text())["settings"]["guidance_scale"] == 7.5
    rows = cu.read_jsonl(out / "metadata.jsonl")
    assert len(rows) == 2 * 3 * 2
    pipe = FluxPipeline.from_pretrained(zoo / "flux")
    row = rows[4]
    image = pipe(row["text"], generator=torch.Generator().manual_seed(row["seed"]), num_inference_steps=2,
                 guidance_scale=3.5, height=64, width=64, max_sequence_length=16).images[0]
    saved = np.asarray(Image.open(out / row["file_name"]), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - saved).max() <= 2  # batched vs single: float rounding only
    assert np.abs(np.asarray(Image.open(out / rows[5]["file_name"]), dtype=np.int16) - saved).mean() > 1

    for model, flag, expected in (
            ("sd15", ["--max_sequence_length", 16], "--max_sequence_length: StableDiffusionPipeline has no "
                                                    "max_sequence_length to set; leave the flag out"),
            ("flux", ["--scheduler", "ddim"], "--scheduler ddim: FluxPipeline samples with its "
                                              "FlowMatchEulerDiscreteScheduler, which DDIMScheduler cannot replace")):
        result = generate(zoo, prompts, tmp_path / f"refused-{model}", *flag, model=model, check=False)
        assert result.returncode != 0 and expected in result.stderr.strip().splitlines()[-1]
        assert not (tmp_path / f"refused-{model}").exists()
