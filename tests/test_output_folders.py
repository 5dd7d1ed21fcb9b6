"""A trainer's output folder is its own: a checkpoint handed to --resume_from_checkpoint cannot run code, a resume
goes on with the run's own settings only, --overwrite_output_dir replaces only what the pack wrote there, and one
run at a time writes into it."""

import os
import shutil

import pytest
import torch

from conftest import run_script
from make_tiny_models import make_training_set


def train(zoo, data, out, *flags, **run):
    return run_script("train_craft_sd15.py", "--pretrained_model_name_or_path", zoo / "sd15", "--train_data_dir", data,
                      "--output_dir", out, "--resolution", 64, "--train_batch_size", 2, "--report_to", "none",
                      "--seed", 3, *flags, **run)


def last_line(result):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_training_set(tmp_path_factory.mktemp("data") / "filtered", n=4)


class RunsCode:
    """Unpickling this runs `touch <marker>`, as a pickle planted in a downloaded checkpoint would run anything."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("planted", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                                     "optimizer_in_backward.bin", "custom_checkpoint_0.pkl"])
def test_a_checkpoint_holding_a_pickle_that_runs_code_is_refused_without_running_it(zoo, data, tmp_path, planted):
    """Every state the resume loads is unpickled with weights_only=True; the fused step's Adam states included (the
    checkpoints of earlier versions kept them in accelerate's custom_checkpoint_0.pkl, which accelerate unpickles
    with weights_only=False)."""
    flags = ("--fused_optimizer_step", "--max_grad_norm", 0, "--checkpointing_steps", 2)
    train(zoo, data, tmp_path / "out", *flags, "--max_train_steps", 2)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    if planted == "custom_checkpoint_0.pkl":
        os.remove(checkpoint / "optimizer_in_backward.bin")
    marker = tmp_path / "code-ran"
    torch.save(RunsCode(marker), checkpoint / planted)
    result = train(zoo, data, tmp_path / "out", *flags, "--max_train_steps", 3, "--resume_from_checkpoint", "latest",
                   check=False)
    assert last_line(result).startswith(f"error: {checkpoint} holds a file that is not plain weights and states")
    assert not marker.exists()
