"""The fault-injection suite's long form (slow): kill trials (scripts/tools/fault_injection.py), a disk that fills
up (a file-size limit) during an asynchronous save, and every file of a checkpoint damaged every way
(scripts/tools/corruption_sweep.py)."""

import json
import os
import re
import subprocess
import sys

import pytest

from experiments import restore
from tests.conftest import cpu_env

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GROKKING_FLAGS = ["--config=experiments/configs/grokking.py", "--config.data.p=13", "--config.model.d_model=32",
                  "--config.model.d_mlp=64", "--config.train.log_every=1", "--config.train.eval_every=0",
                  "--config.train.checkpoint_every=2"]


def test_kill_trials_resume_with_nothing_lost(tmp_path):
    out = tmp_path / "trials.json"
    done = subprocess.run([sys.executable, "scripts/tools/fault_injection.py", "--trials=3", "--seed=0", f"--out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = json.loads(out.read_text())["trials"]
    assert len(trials) == 3 and all(t["ok"] for t in trials)
    assert trials[0]["moment"] == "during save 1" and trials[1]["moment"].startswith("during save")
    assert trials[2]["moment"] == "start-up" and any(t["mid_save"] for t in trials)


def _train(workdir, steps, file_size_limit_kib=None):
    """The CLI in a subprocess; with a file-size limit (`ulimit -f`: a file may not grow past it) if given."""
    env = {k: v for k, v in cpu_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}  # no cache writes to fail
    command = [sys.executable, "-m", "experiments.train", *GROKKING_FLAGS, f"--workdir={workdir}",
               f"--config.train.steps={steps}"]
    if file_size_limit_kib:
        command = ["bash", "-c", f'ulimit -f {file_size_limit_kib} && exec "$@"', "train", *command]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_disk_that_fills_up_mid_save_stops_with_one_line_and_keeps_the_previous_step(tmp_path):
    workdir = tmp_path / "run"
    assert _train(workdir, 4).returncode == 0
    full = _train(workdir, 8, file_size_limit_kib=20)  # checkpoint files outgrow 20 KiB; the metrics do not
    # The write fails midway, in orbax's background thread: tensorstore may report its late callbacks first
    # ("Event loop is closed" tracebacks); the run's own report is the one error line, the last.
    lines = full.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert full.returncode == 1 and errors == lines[-1:], full.stderr[-3000:]
    assert "could not write checkpoint step 6" in errors[0] and "the latest good checkpoint is step 4" in errors[0]
    assert "File too large" in errors[0]
    assert not any("experiments/" in line for line in lines)  # no traceback through our code
    assert restore.checkpoint_steps(str(workdir)) == [2, 4]
    assert open(workdir / "metrics.jsonl").read().endswith("\n")
    again = _train(workdir, 8)  # space freed
    assert again.returncode == 0 and "resumed from step 4" in again.stdout, again.stderr[-3000:]


def test_corruption_sweep_every_file_every_damage_resumes_with_nothing_lost():
    done = subprocess.run([sys.executable, "scripts/tools/corruption_sweep.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = re.search(r"(\d+) of (\d+) corrupted-checkpoint cases resumed with nothing lost", done.stdout)
    assert found and found.group(1) == found.group(2), done.stdout[-1500:]
    assert int(found.group(2)) >= 3 * 15  # every file of the step (orbax writes 18 or 19), 3 damages each
