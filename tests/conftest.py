import atexit
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download at test time
# One thread per process, in the scripts' runs (as torchrun sets it: float results then do not depend on the process
# count) and in the test processes too, set before torch starts its thread pool: a process forked from one whose
# OpenMP pool ran hangs, and the scripts' runs fork from here (run_script). Two xdist workers keep two cores busy.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def subprocess_env():
    """The environment of the scripts' runs: this process's (set above) and the pack on the module path."""
    return dict(os.environ, PYTHONPATH=REPO)


# Two CPU processes with gloo: accelerate sees MULTI_CPU with 2 ranks (`accelerate launch --cpu` runs one here).
TWO_PROCESSES = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def run_script(script, *args, check=True, launcher=None, kill_at=None, env=None, fresh_interpreter=False):
    """Run one of the pack's scripts the way users do: from the command line, in a process of its own (`python
    script.py ...`, or `launcher` for several processes). A single process is forked from this test process, whose
    imports of torch, diffusers, transformers... are done once (~6 s a process saved); it runs the script as
    `__main__` with the arguments, environment, working directory, random state and streams a new Python would
    have (`run_as_main`). A new Python is started instead with `fresh_interpreter` (the reference run of an equality
    test, so that string hashing differs between the runs compared, as between users' runs) or `env` (variables
    that libraries read when imported). `kill_at` names a craft_utils.fault_point where the process is killed
    (SIGKILL), as a crash or `kill -9` would; `env` adds environment variables."""
    fresh_interpreter = fresh_interpreter or launcher or env
    env = {**subprocess_env(), **(env or {})}
    if kill_at:
        env["CRAFT_KILL_AT"] = kill_at
    if launcher:
        env["ACCELERATE_USE_CPU"] = "1"
    path = os.path.join(REPO, script)
    args = [str(arg) for arg in args]
    if fresh_interpreter:
        result = subprocess.run([*(launcher or [sys.executable]), path, *args], capture_output=True, text=True,
                                env=env, cwd=REPO)
    else:
        result = run_forked(path, args, env)
    if kill_at:
        assert result.returncode == -9, f"{script} was not killed at {kill_at}:\n{result.stderr[-4000:]}"
    elif check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def preload_script_imports():
    """What the scripts import inside main(), imported once here so that forked runs find it loaded."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import open_clip  # noqa: F401
    import peft  # noqa: F401
    import torch
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
    from diffusers.training_utils import EMAModel  # noqa: F401
    from transformers import CLIPModel, CLIPTextModel, T5EncoderModel  # noqa: F401

    torch.set_num_threads(1)


def run_forked(path, args, env):
    """`python path args` with `env` in REPO, in a child forked from this process: stdout/stderr captured at the
    file descriptors (C libraries' output too), exit code or killing signal as subprocess.run reports them."""
    preload_script_imports()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_as_main(path, args, env, out, err)
            finally:  # never back into pytest, whatever happened
                os._exit(code & 0xFF if isinstance(code, int) else 1)
        status = None
        try:
            _, status = os.waitpid(pid, 0)
        finally:
            if status is None:  # the test timed out or was interrupted: the child goes too
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        outputs = []
        for stream in (out, err):
            stream.seek(0)
            outputs.append(stream.read().decode(errors="replace"))
    return subprocess.CompletedProcess([sys.executable, path, *args], os.waitstatus_to_exitcode(status), *outputs)


OWN_FOLDERS = {REPO, *(os.path.join(REPO, folder) for folder in ("tools", "benchmarks", "tests"))}


def run_as_main(path, args, env, out, err):
    """In the forked child: the process state a new `python path args` would have, then the script."""
    import numpy as np
    import torch
    from accelerate.state import AcceleratorState, GradientState

    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                  encoding=sys.__stdout__.encoding, errors=sys.__stdout__.errors)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                  encoding=sys.__stderr__.encoding, errors=sys.__stderr__.errors)
    sys.stdin = open(os.devnull)
    # logging: pytest's capture handlers go (the script's basicConfig must take effect); the libraries' own handlers,
    # made at import, write to this process's stderr instead of pytest's
    logging.root.handlers.clear()
    for logger in logging.Logger.manager.loggerDict.values():
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handler.setStream(sys.stderr)
    warnings.resetwarnings()  # pytest records warnings; a new Python prints them, with its default filters
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line))
    torch.seed()  # random states a new process would have (`random` reseeds itself after a fork)
    np.random.seed()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    sys.argv = [path, *args]
    # the script's folder first and PYTHONPATH, as Python sets them; this process's own additions (tests/, tools/) out
    sys.path = [os.path.dirname(path), *env.get("PYTHONPATH", "").split(os.pathsep),
                *(entry for entry in sys.path if entry and os.path.abspath(entry) not in OWN_FOLDERS)]
    # the pack's own modules are imported afresh from that path (the tests imported and patched some); the
    # libraries stay loaded, which is the point of the fork
    for name, module in list(sys.modules.items()):
        if os.path.dirname(os.path.abspath(getattr(module, "__file__", None) or "/")) in OWN_FOLDERS:
            del sys.modules[name]
    atexit._clear()  # this test process's exit handlers; the script's own run at its exit below
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    code = 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # at exit a new Python waits for the script's non-daemon threads, then runs atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    from make_tiny_models import make_zoo

    path = tmp_path_factory.mktemp("zoo")
    make_zoo(str(path))
    return path

