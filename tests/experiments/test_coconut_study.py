"""scripts/studies/coconut_study.py trains, evaluates by generation, and tabulates (a tiny run of one method)."""

import json
import os
import subprocess
import sys

import pytest

from experiments.training import metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_coconut_study_runs_and_reports(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
    tiny = ["model.d_model=16", "model.num_layers=1", "model.num_heads=2", "model.d_mlp=32", "train.steps=3",
            "data.train_examples=64", "data.eval_examples=8", "data.test_examples=8", "data.batch_size=16",
            "data.last_stage=2", "data.min_hops=2", "data.max_hops=2", "data.epochs_per_stage=1"]
    subprocess.run([sys.executable, "scripts/studies/coconut_study.py", "--variants=coconut", "--seeds=3",
                    f"--workdir={tmp_path}", f"--set={','.join(tiny)}"],
                   cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads((tmp_path / "coconut_seed3" / "result.json").read_text())
    assert result["steps"] == 3 and result["thoughts"] == 2.0 and 0.0 <= result["accuracy"] <= 1.0
    table = (tmp_path / "table.md").read_text().splitlines()
    cells = [c.strip() for c in table[2].strip("|").split("|")]  # the row says what result.json measured
    assert cells[0] == "Coconut" and cells[1] == f"{100 * result['accuracy']:.1f} ± 0.0"
    assert cells[3] == f"{100 * result['train_accuracy']:.1f}" and cells[4] == f"{result['tokens']:.1f}"
    assert (tmp_path / "accuracy.png").stat().st_size > 0


@pytest.mark.slow
def test_official_study_scores_the_validation_split_and_rescoring_does_not_retrain(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
    tiny = ["model.d_model=16", "model.num_layers=1", "model.num_heads=2", "model.d_mlp=32", "train.steps=2",
            "data.train_examples=64", "data.batch_size=32", "data.last_stage=1"]
    command = [sys.executable, "scripts/studies/coconut_study.py", "--official", "--variants=nocot", "--seeds=0",
               f"--workdir={tmp_path}", f"--set={','.join(tiny)}"]
    subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    run = tmp_path / "nocot_seed0"
    first = json.loads((run / "result.json").read_text())
    assert first["steps"] == 2 and first["thoughts"] == 0.0
    for size, accuracy in ((500, first["accuracy"]), (300, first["valid_accuracy"])):  # the official splits' sizes
        assert abs(size * accuracy - round(size * accuracy)) < 1e-6
    (run / "result.json").unlink()
    subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
    second = json.loads((run / "result.json").read_text())
    train_events = metrics_writer.read(str(run), "train")
    assert len(train_events) == 1 and second["train_s"] == first["train_s"] == train_events[0]["wall_s"]
    assert second["accuracy"] == first["accuracy"] and second["valid_accuracy"] == first["valid_accuracy"]
    assert "valid accuracy" in (tmp_path / "table.md").read_text().splitlines()[0]
