"""conftest.run_script forks the test process to run a script: the run must see what a new `python script.py` sees
and end the way it would, or the other tests could pass where users' runs fail."""

import os
import signal
import textwrap

import craft_utils
from conftest import REPO, run_script

PROBE = """
import os, random, sys, warnings
import numpy as np
import torch
import craft_utils

warnings.warn("a warning a new Python prints")
print(torch.initial_seed(), np.random.random(), random.random(), getattr(craft_utils, "PATCHED", None))
print(os.getcwd(), sys.argv[1:], sys.path[0])
if sys.argv[1] == "exit-text":
    sys.exit("error: said in one line")
if sys.argv[1] == "exit-huge":
    sys.exit(2 ** 31 + 3)
if sys.argv[1] == "raise":
    raise ValueError("not caught")
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def probe(tmp_path, *args, **run):
    script = tmp_path / "probe.py"
    script.write_text("import signal\n" + textwrap.dedent(PROBE))
    return run_script(script, *args, check=False, **run)


def test_a_forked_run_starts_like_a_new_python(tmp_path, monkeypatch):
    monkeypatch.setattr(craft_utils, "PATCHED", True, raising=False)  # the tests' own changes stay here
    runs = [probe(tmp_path, "plain") for _ in range(2)]
    fresh = probe(tmp_path, "plain", fresh_interpreter=True)
    for run in (*runs, fresh):
        assert run.returncode == 0, run.stderr
        assert "UserWarning: a warning a new Python prints" in run.stderr
        seeds, where = run.stdout.splitlines()
        assert seeds.split()[-1] == "None"  # craft_utils imported afresh
        assert where == f"{REPO} ['plain'] {tmp_path}"
    # random states: each run its own, as new processes have (torch, numpy and Python's random, each)
    states = [run.stdout.split()[:3] for run in (*runs, fresh)]
    assert all(len({state[i] for state in states}) == 3 for i in range(3)), states


def test_a_forked_run_ends_as_a_new_python_would(tmp_path):
    parent = os.getpid()
    for how, code, last_line in (("exit-text", 1, "error: said in one line"), ("exit-huge", 3, None),
                                 ("raise", 1, "ValueError: not caught"), ("kill", -signal.SIGKILL, None)):
        forked, fresh = probe(tmp_path, how), probe(tmp_path, how, fresh_interpreter=True)
        assert forked.returncode == fresh.returncode == code, (how, forked.stderr)
        if last_line:
            assert forked.stderr.strip().splitlines()[-1] == fresh.stderr.strip().splitlines()[-1] == last_line
    assert os.getpid() == parent  # no child came back into pytest
