"""experiments/evaluation/length_eval.py: at 1x its loss is the trainer's evaluation loss over the same windows; its buckets
average to its loss; longer lengths run for position-free models; learned positions refuse lengths past their table
in one line; the command writes its JSON and plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.evaluation import length_eval
from experiments.training import metrics_writer, trainer
from tests.conftest import make_tiny_lm_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("length_eval") / "rope"
    config = make_tiny_lm_config(steps=4)
    config.model.positional = "rope"  # (the LM config's are learned, nanoGPT's)
    trainer.train_and_evaluate(config, str(workdir), verbose=False)
    return str(workdir)


@pytest.mark.slow
def test_one_x_is_the_trainers_evaluation_and_longer_lengths_run(rope_run):
    report = length_eval.length_report(rope_run, [1, 3], max_windows=10_000)
    trained = metrics_writer.read(rope_run, "eval")[-1]
    np.testing.assert_allclose(report["factors"]["1"]["loss"], trained["loss"], rtol=1e-5)
    for factor, row in report["factors"].items():
        assert len(row["by_bucket"]) == int(factor)
        np.testing.assert_allclose(np.mean(row["by_bucket"]), row["loss"], rtol=1e-5)  # equal-sized buckets
        assert len(report["curves"][factor]) == int(factor) * report["seq_len"]
    assert report["factors"]["3"]["windows"] == report["factors"]["1"]["windows"] // 3


def test_learned_positions_refuse_lengths_past_their_table():
    config = make_tiny_lm_config()
    config.model.update(positional="learned", max_len=32)
    length_eval.check_lengths(config, [1, 2])
    with pytest.raises(ValueError, match=r"--factors=4 asks for 64 tokens, past the learned position table "
                                         r"\(model.max_len=32\); use factors <= 2"):
        length_eval.check_lengths(config, [1, 4])


@pytest.mark.slow
def test_the_command_writes_its_report_and_plot(rope_run):
    out = subprocess.run([sys.executable, "-m", "experiments.evaluation.length_eval", f"--workdir={rope_run}", "--factors=1,2",
                          "--max_windows=4"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2x (32 tokens, 4 windows)" in out.stdout
    assert json.load(open(os.path.join(rope_run, "length_eval.json")))["factors"]["2"]["windows"] == 4
    assert os.path.getsize(os.path.join(rope_run, "length_eval.png")) > 0
    bad = subprocess.run([sys.executable, "-m", "experiments.evaluation.length_eval", f"--workdir={rope_run}", "--factors=0"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --factors=0 must be >= 1")
