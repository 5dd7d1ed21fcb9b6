import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download at test time


def subprocess_env():
    # One thread per process, as torchrun sets it: float results then do not depend on the process count.
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


# Two CPU processes with gloo: accelerate sees MULTI_CPU with 2 ranks (`accelerate launch --cpu` runs one here).
TWO_PROCESSES = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def run_script(script, *args, check=True, launcher=None, kill_at=None, env=None):
    """Run one of the pack's scripts the way users do: a new process, from the command line. `kill_at` names a
    craft_utils.fault_point where the process is killed (SIGKILL), as a crash or `kill -9` would; `env` adds
    environment variables."""
    env = {**subprocess_env(), **(env or {})}
    if kill_at:
        env["CRAFT_KILL_AT"] = kill_at
    if launcher:
        env["ACCELERATE_USE_CPU"] = "1"
    command = list(launcher or [sys.executable])
    result = subprocess.run([*command, os.path.join(REPO, script), *map(str, args)], capture_output=True,
                            text=True, env=env, cwd=REPO)
    if kill_at:
        assert result.returncode == -9, f"{script} was not killed at {kill_at}:\n{result.stderr[-4000:]}"
    elif check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    from make_tiny_models import make_zoo

    path = tmp_path_factory.mktemp("zoo")
    make_zoo(str(path))
    return path

