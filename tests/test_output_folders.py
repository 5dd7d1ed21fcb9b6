"""A trainer's output folder is its own: a checkpoint handed to --resume_from_checkpoint cannot run code, a resume
goes on with the run's own settings only, --overwrite_output_dir replaces only what the pack wrote there, and one
run at a time writes into it."""

import json
import os
import shutil
import sys

import pytest
import torch

from conftest import run_script
from make_tiny_models import make_training_set


def command(zoo, data, out, *flags):
    return ("train_craft_sd15.py", "--pretrained_model_name_or_path", zoo / "sd15", "--train_data_dir", data,
            "--output_dir", out, "--resolution", 64, "--train_batch_size", 2, "--report_to", "none", "--seed", 3, *flags)


def train(zoo, data, out, *flags, **run):
    return run_script(*command(zoo, data, out, *flags), **run)


def last_line(result):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_set(tmp_path_factory.mktemp("data") / "filtered", n=4)


@pytest.fixture(scope="module")
def fused_run(zoo, data, tmp_path_factory):
    """A full fine-tune with Adam inside backward, saved at step 2: its checkpoint holds every kind of state."""
    out = tmp_path_factory.mktemp("fused") / "out"
    train(zoo, data, out, "--fused_optimizer_step", "--max_grad_norm", 0, "--checkpointing_steps", 2,
          "--max_train_steps", 2)
    return out


class RunsCode:
    """Unpickling this runs `touch <marker>`, as a pickle planted in a downloaded checkpoint would run anything."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("planted", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                                     "optimizer_in_backward.bin", "custom_checkpoint_0.pkl"])
def test_a_checkpoint_holding_a_pickle_that_runs_code_is_refused_without_running_it(zoo, data, tmp_path, planted,
                                                                                   fused_run):
    """Every state the resume loads is unpickled with weights_only=True; the fused step's Adam states included (the
    checkpoints of earlier versions kept them in accelerate's custom_checkpoint_0.pkl, which accelerate unpickles
    with weights_only=False)."""
    flags = ("--fused_optimizer_step", "--max_grad_norm", 0, "--checkpointing_steps", 2)
    shutil.copytree(fused_run, tmp_path / "out")
    checkpoint = tmp_path / "out" / "checkpoint-2"
    if planted == "custom_checkpoint_0.pkl":
        os.remove(checkpoint / "optimizer_in_backward.bin")
    marker = tmp_path / "code-ran"
    torch.save(RunsCode(marker), checkpoint / planted)
    result = train(zoo, data, tmp_path / "out", *flags, "--max_train_steps", 3, "--resume_from_checkpoint", "latest",
                   check=False)
    assert last_line(result).startswith(f"error: {checkpoint} holds a file that is not plain weights and states")
    assert not marker.exists()


def tree(folder):
    """Every file under folder -> its bytes."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def test_overwrite_output_dir_replaces_only_what_the_pack_wrote(zoo, data, tmp_path):
    """A folder the trainer did not make (a pipeline someone saved, their README, another tool's checkpoint) is
    refused whole; the pack's own folder is replaced, also one from a version of the pack that kept no record of
    its files (its training_config.json vouches for them); a file the user put beside the pack's is never deleted."""
    flags = ("--use_lora", "--max_train_steps", 2, "--checkpointing_steps", 2)
    foreign = tmp_path / "theirs"
    shutil.copytree(zoo / "sd15", foreign)
    (foreign / "README.md").write_text("my model")
    (foreign / "checkpoint-7").mkdir()
    (foreign / "checkpoint-7" / "optimizer.bin").write_bytes(b"not ours")
    before = tree(foreign)
    result = train(zoo, data, foreign, *flags, "--overwrite_output_dir", check=False)
    assert last_line(result) == (
        f"error: --overwrite_output_dir replaces only what this pack wrote, and {foreign} also holds README.md, "
        "checkpoint-7, model_index.json ...: move those away, or choose another --output_dir")
    assert tree(foreign) == before

    ours = tmp_path / "ours"
    train(zoo, data, ours, *flags)
    assert sorted(os.listdir(ours)) == [".craft_written.json", "README.md", "checkpoint-2",
                                        "pytorch_lora_weights.safetensors", "training_config.json"]
    (ours / "notes.txt").write_text("mine")
    result = train(zoo, data, ours, *flags, "--overwrite_output_dir", check=False)
    assert "also holds notes.txt:" in last_line(result)
    assert (ours / "checkpoint-2").is_dir()
    (ours / "notes.txt").unlink()
    os.remove(ours / ".craft_written.json")  # as an earlier version of the pack left its folders
    first = (ours / "pytorch_lora_weights.safetensors").read_bytes()
    train(zoo, data, ours, "--use_lora", "--max_train_steps", 1, "--overwrite_output_dir", "--learning_rate", 1e-3)
    assert sorted(os.listdir(ours)) == [".craft_written.json", "README.md",
                                        "pytorch_lora_weights.safetensors", "training_config.json"]
    assert (ours / "pytorch_lora_weights.safetensors").read_bytes() != first


def hold(folder):
    """Another process holding folder as a run does (its OS lock); -> the process, to be killed."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; d = os.open(sys.argv[1], os.O_RDONLY);"
                               " fcntl.flock(d, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)", str(folder)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_folder_another_run_writes_stops_in_one_line(zoo, data, tmp_path):
    """A trainer's output folder and a generation folder are held by the run writing them: a second run stops in
    one line and touches nothing; once the first has ended, the second goes on."""
    out = tmp_path / "out"
    train(zoo, data, out, "--use_lora", "--max_train_steps", 2, "--checkpointing_steps", 1)
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
    images = tmp_path / "images"
    generate = ("generate_candidates.py", "--pretrained_model_name_or_path", zoo / "sd15", "--prompts_file",
                tmp_path / "prompts.txt", "--output_dir", images, "--num_images_per_prompt", 1,
                "--num_inference_steps", 1, "--height", 64, "--width", 64)
    run_script(*generate)
    resume = command(zoo, data, out, "--use_lora", "--max_train_steps", 3, "--checkpointing_steps", 1,
                     "--resume_from_checkpoint", "latest")
    for folder, second_run in ((out, resume), (images, generate)):
        before = tree(folder)
        holder = hold(folder)
        try:
            result = run_script(*second_run, check=False)
        finally:
            holder.kill()
            holder.wait()
        assert last_line(result) == (f"error: {folder} is being written by another run right now; wait for it to "
                                     "end, or choose another folder")
        assert tree(folder) == before
        run_script(*second_run)


def test_a_resume_keeps_the_settings_that_define_the_run(zoo, data, tmp_path):
    """Each checkpoint records the run's settings: a resume under another value of one is refused in one line naming
    it, as is a --max_train_steps below the checkpoint's step or a changed training set; what only watches or saves
    the run may change, and a checkpoint of an earlier version (no record) resumes with a note."""
    flags = ("--use_lora", "--checkpointing_steps", 2)
    out = tmp_path / "out"
    train(zoo, data, out, *flags, "--max_train_steps", 2)
    checkpoint = out / "checkpoint-2"
    resume = (*flags, "--resume_from_checkpoint", "latest")
    refused = {
        ("--max_train_steps", 3, "--learning_rate", 2e-4):
            f"error: {checkpoint} was trained with --learning_rate 5e-05 and this run gives 0.0002; resume with the "
            "checkpoint's value, or train anew: drop --resume_from_checkpoint and pass --overwrite_output_dir (or "
            "another --output_dir)",
        ("--max_train_steps", 3, "--gradient_accumulation_steps", 2):
            f"error: {checkpoint} was trained with --gradient_accumulation_steps 1 and this run gives 2; resume with",
        ("--max_train_steps", 3, "--rank", 8): f"error: {checkpoint} was trained with --rank 4 and this run gives 8;",
        ("--max_train_steps", 1): f"error: --max_train_steps 1 is below the step of {checkpoint} (2); give at least 2, "
                                  "or resume from an earlier checkpoint-N",
    }
    for changed, line in refused.items():
        got = last_line(train(zoo, data, out, *resume, *changed, check=False))
        assert got.startswith(line), (got, line)
    rows = (data / "metadata.jsonl").read_text()
    reweighted = [json.loads(line) for line in rows.splitlines()]
    reweighted[0]["weight"] += 1
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in reweighted))
    try:
        result = train(zoo, data, out, *resume, "--max_train_steps", 3, check=False)
    finally:
        (data / "metadata.jsonl").write_text(rows)
    assert last_line(result).startswith(f"error: {checkpoint} was trained with train_metadata_sha256 '")
    os.remove(checkpoint / "run_settings.json")
    result = train(zoo, data, out, *resume, "--max_train_steps", 3, "--validation_steps", 5, "--checkpointing_steps", 3)
    assert f"{checkpoint} records no run settings" in result.stdout
    assert "resumed from" in result.stdout + result.stderr and (out / "checkpoint-3" / "run_settings.json").exists()
    train(zoo, data, out, *resume, "--max_train_steps", 4, "--checkpoints_total_limit", 1)  # changeable flags
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == ["checkpoint-4"]


# Runs a script as `python script.py ...` would, with every file it writes limited to LIMIT bytes (ulimit -f): its
# writes fail as on a full disk, in the libraries' own code paths (PIL, safetensors, torch.save, json).
LIMITED = [sys.executable, "-c", "import resource, runpy, sys; limit = int(sys.argv.pop(1)); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')"]


@pytest.mark.parametrize("stage", ["generate_candidates", "train_craft_sd15"])
def test_a_write_the_system_refuses_ends_in_one_line_and_the_rerun_goes_on(zoo, data, tmp_path, stage):
    out = tmp_path / "out"
    if stage == "generate_candidates":
        (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
        args = ("generate_candidates.py", "--pretrained_model_name_or_path", zoo / "sd15", "--prompts_file",
                tmp_path / "prompts.txt", "--output_dir", out, "--num_images_per_prompt", 2, "--num_variants", 0,
                "--num_inference_steps", 1, "--height", 64, "--width", 64)
    else:
        args = command(zoo, data, out, "--use_lora", "--max_train_steps", 2, "--checkpointing_steps", 1,
                       "--resume_from_checkpoint", "latest")
    result = run_script(*args, launcher=[*LIMITED, "4000"], check=False)
    assert last_line(result).endswith(": a file would pass the size this system allows (ulimit -f); free space or fix "
                                      "the permissions, then rerun the same command: it goes on from what was saved")
    assert not [name for root, _, names in os.walk(out) for name in names if name.startswith(".tmp-")]
    run_script(*args)
    if stage == "generate_candidates":
        assert sorted(name for name in os.listdir(out) if name.endswith(".png")) == [
            "000000_v00_i00.png", "000000_v00_i01.png", "000001_v00_i00.png", "000001_v00_i01.png"]
    else:
        assert sorted(os.listdir(out)) == [".craft_written.json", "README.md", "checkpoint-1", "checkpoint-2",
                                           "pytorch_lora_weights.safetensors", "training_config.json"]


def test_generation_with_a_lora_retrained_at_the_same_path_never_resumes_the_old_folder(zoo, data, tmp_path):
    """The LoRA's hash is a generation setting: the folder made with the old file is refused in one line and kept
    as it was, instead of being counted complete ("0 made now") for the new file."""
    from craft_outputs import LORA_FILE

    train(zoo, data, tmp_path / "first", "--use_lora", "--max_train_steps", 1)
    train(zoo, data, tmp_path / "second", "--use_lora", "--max_train_steps", 1, "--learning_rate", 1e-2)
    lora = tmp_path / "lora.safetensors"
    shutil.copy(tmp_path / "first" / LORA_FILE, lora)
    (tmp_path / "prompts.txt").write_text("a red cube\n")
    images = tmp_path / "images"
    generate = ("generate_candidates.py", "--pretrained_model_name_or_path", zoo / "sd15", "--lora_path", lora,
                "--prompts_file", tmp_path / "prompts.txt", "--output_dir", images, "--num_images_per_prompt", 1,
                "--num_variants", 0, "--num_inference_steps", 1, "--height", 64, "--width", 64)
    run_script(*generate)
    before = tree(images)
    shutil.copy(tmp_path / "second" / LORA_FILE, lora)
    result = run_script(*generate, check=False)
    assert last_line(result).startswith(f"error: {images} holds images made with other settings (lora_sha256: '")
    assert tree(images) == before
    shutil.copy(tmp_path / "first" / LORA_FILE, lora)
    assert "(0 made now" in run_script(*generate).stdout  # the same file: the folder is complete


def test_every_overwrite_replaces_only_what_the_pack_wrote(zoo, tmp_path):
    """crf_filter.py --overwrite and generation's --overwrite refuse a folder of theirs that also holds a file the
    user put there, and keep everything; once it is moved away, they replace the folder."""
    from test_crf_filter import GROUP_0, make_candidates

    candidates = make_candidates(tmp_path / "candidates", {0: GROUP_0})
    filtered = tmp_path / "filtered"
    filter_run = ("crf_filter.py", "--candidates_dir", candidates, "--output_dir", filtered, "--filter_rewards",
                  "hpsv2.1")
    run_script(*filter_run)
    (tmp_path / "prompts.txt").write_text("a red cube\n")
    images = tmp_path / "images"
    generate = ("generate_candidates.py", "--pretrained_model_name_or_path", zoo / "sd15", "--prompts_file",
                tmp_path / "prompts.txt", "--output_dir", images, "--num_images_per_prompt", 1, "--num_variants", 0,
                "--num_inference_steps", 1, "--height", 64, "--width", 64)
    run_script(*generate)
    for folder, rerun in ((filtered, (*filter_run, "--mode", "topk", "--overwrite")),
                          (images, (*generate, "--seed", 5, "--overwrite"))):
        (folder / "notes.txt").write_text("mine")
        before = tree(folder)
        assert last_line(run_script(*rerun, check=False)) == (
            f"error: --overwrite replaces only what this pack wrote, and {folder} also holds notes.txt: move those "
            "away, or choose another --output_dir")
        assert tree(folder) == before
        (folder / "notes.txt").unlink()
        run_script(*rerun)
    assert json.loads((images / "generation_config.json").read_text())["settings"]["seed"] == 5  # replaced
    assert json.loads((filtered / "crf_report.json").read_text())["settings"]["mode"] == "topk"


def test_init_lora_starts_a_run_from_the_previous_round_s_lora(zoo, data, tmp_path):
    """--init_lora loads a LoRA before the first step (at a vanishing learning rate the result is that LoRA), is
    recorded in training_config.json, and one of another rank is refused in one line."""
    from safetensors.torch import load_file

    from craft_outputs import LORA_FILE

    train(zoo, data, tmp_path / "round1", "--use_lora", "--max_train_steps", 2, "--learning_rate", 1e-2)
    previous = tmp_path / "round1" / LORA_FILE
    train(zoo, data, tmp_path / "round2", "--use_lora", "--max_train_steps", 1, "--learning_rate", 1e-12,
          "--init_lora", previous)
    first, second = load_file(previous), load_file(tmp_path / "round2" / LORA_FILE)
    assert first.keys() == second.keys() and any(t.abs().sum() > 0 for k, t in first.items() if ".up." in k)
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)
    config = json.loads((tmp_path / "round2" / "training_config.json").read_text())
    assert config["args"]["init_lora"] == str(previous)
    result = train(zoo, data, tmp_path / "other", "--use_lora", "--rank", 8, "--init_lora", tmp_path / "round1",
                   check=False)
    assert last_line(result).startswith(f"error: --init_lora {tmp_path / 'round1'}: its LoRA does not fit this run's (")
    assert last_line(result).endswith("give the --rank it was trained with")
    result = train(zoo, data, tmp_path / "other", "--use_lora", "--train_text_encoder", "--init_lora", previous,
                   check=False)  # the text encoder's half is missing from it
    assert last_line(result).startswith(f"error: --init_lora {previous}: its LoRA is on other modules than this run's")
