"""Coconut through the shared trainer: the curriculum's stages, optimizer resets, resume mid-curriculum,
and answer accuracy by batched generation."""

import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import restore
from experiments.evaluation import reasoning_eval
from experiments.training import checkpointing, metrics_writer, trainer
from experiments.configs import coconut_prosqa


def tiny_config(steps: int, variant: str = "coconut"):
    """4 batches per epoch, 1 epoch per stage: stages 0, 1 start at steps 0, 4; the last (2) at step 8."""
    config = coconut_prosqa.get_config(variant)
    config.model.update(d_model=32, num_layers=2, num_heads=2, d_mlp=64)
    config.data.update(train_examples=32, eval_examples=8, test_examples=8, last_stage=2, epochs_per_stage=1,
                       min_hops=2, max_hops=2, branches=1, batch_size=8, eval_batch_size=8)
    config.train.update(steps=steps, log_every=1, eval_every=0, checkpoint_every=4)
    config.optimizer.update(warmup_steps=0)
    config.mesh.update(data=-1)
    return config


def by_step(workdir):
    return {e["step"]: e for e in metrics_writer.read(str(workdir)) if e["split"] == "train"}


def adam_counts(workdir, step):
    """Every `count` leaf of the optimizer state in checkpoint `step` (steps since the last reset)."""
    restored = checkpointing.manager(str(workdir), keep=1, async_save=False).restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    opt_state = restored.state["opt_state"]
    counts = [np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
              if "count" in jax.tree_util.keystr(path)]
    return counts, int(np.asarray(restored.state["stage"]))


@pytest.mark.slow
def test_curriculum_resets_the_optimizer_and_resumes_mid_curriculum(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer.train_and_evaluate(tiny_config(10), str(straight), verbose=False)
    stages = [by_step(straight)[s]["stage"] for s in range(1, 11)]
    assert stages == [0] * 4 + [1] * 4 + [2] * 2
    counts, stage = adam_counts(straight, 10)
    assert stage == 2 and counts and all(int(c) == 2 for c in counts)  # reset at step 8: 2 updates since
    counts, stage = adam_counts(straight, 8)
    assert stage == 1 and all(int(c) == 4 for c in counts)  # saved after stage 1's 4 steps

    trainer.train_and_evaluate(tiny_config(8), str(resumed), verbose=False)  # stops at the stage boundary
    trainer.train_and_evaluate(tiny_config(10), str(resumed), verbose=False)  # resumes: stage 2, fresh Adam
    a, b = by_step(straight), by_step(resumed)
    for step in range(1, 11):
        np.testing.assert_allclose(b[step]["loss"], a[step]["loss"], rtol=1e-6, err_msg=f"step {step}")

    config = restore.load_config(str(straight))
    assert config.model.bot_position > 0 and config.model.max_thoughts == 2
    result = reasoning_eval.evaluate(config, str(straight), batch_size=3)  # 8 problems in batches of 3, 3, 2
    assert 0.0 <= result["accuracy"] <= 1.0 and result["thoughts"] == 2.0
    assert 1.0 <= result["tokens"] <= 8.0


@pytest.mark.slow  # by default the evaluation test; the curriculum runs are slow
def test_chain_of_thought_has_no_curriculum_and_no_thoughts(tmp_path):
    trainer.train_and_evaluate(tiny_config(3, "cot"), str(tmp_path), verbose=False)
    assert [by_step(tmp_path)[s]["stage"] for s in (1, 2, 3)] == [0, 0, 0]
    config = restore.load_config(str(tmp_path))
    assert config.model.max_thoughts == 0
    result = reasoning_eval.evaluate(config, str(tmp_path))
    assert result["thoughts"] == 0.0


@pytest.mark.slow
def test_evaluate_scores_hand_made_generations_batch_by_batch(tmp_path, monkeypatch):
    """reasoning_eval.evaluate with the model's generations replaced by known ones: every third problem
    answered right, the others with the wrong option; batches of 4 over the test split, in order."""
    import data as datasets
    from data import reasoning

    trainer.train_and_evaluate(tiny_config(1, "nocot"), str(tmp_path), verbose=False)
    config = restore.load_config(str(tmp_path))
    problems = datasets.reasoning_problems(config.data, config.seed)["test"]
    vocab = datasets.GENERATORS[config.data.name].VOCABULARY
    served = []

    def generate(model, variables, prompt, *, num_thoughts, num_tokens):
        rows = []
        for i in range(len(served), len(served) + len(prompt)):
            options = [w for w in problems[i].question if w in vocab.ids and w not in problems[i].answer]
            answer = problems[i].answer if i % 3 == 0 else (options[-1],)
            words = ["###", *answer, "<eos>"]
            rows.append(vocab.encode(words) + [reasoning.PAD] * (num_tokens - len(words)))
        served.extend(rows)
        return np.asarray(rows, np.int32)

    monkeypatch.setattr(reasoning_eval.coconut, "generate", generate)
    result = reasoning_eval.evaluate(config, str(tmp_path), batch_size=4)
    assert len(served) == len(problems) == 8
    assert result["accuracy"] == 3 / 8  # problems 0, 3 and 6
    assert result["tokens"] == 3.0 and result["thoughts"] == 0.0


@pytest.mark.slow
def test_a_run_on_the_official_distribution_is_scored_on_the_official_test_split(tmp_path, monkeypatch):
    import data as datasets
    from data import prosqa_official
    from experiments.configs import coconut_prosqa_official

    config = coconut_prosqa_official.get_config("coconut")
    config.model.update(d_model=32, num_layers=1, num_heads=2, d_mlp=64)
    config.data.update(train_examples=16, test_examples=6, eval_examples=8, last_stage=2, batch_size=8,
                       eval_batch_size=8)
    config.train.update(steps=2, log_every=1, eval_every=0, checkpoint_every=2)
    config.mesh.update(data=-1)
    trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    served = []
    generate = reasoning_eval.coconut.generate
    monkeypatch.setattr(reasoning_eval.coconut, "generate", lambda *a, **k: served.append(a[2]) or generate(*a, **k))
    result = reasoning_eval.evaluate(restore.load_config(str(tmp_path)), str(tmp_path), batch_size=4)
    assert result["thoughts"] == 2.0 and 0.0 <= result["accuracy"] <= 1.0
    vocab = datasets.GENERATORS["prosqa_official"].VOCABULARY
    prompts = [" ".join(w for w in vocab.decode(row) if w not in ("<pad>", "<bot>")) for b in served for row in b]
    assert prompts == [" ".join(p.question) for p in prosqa_official.load("test")[:6]]  # the official test split
    probe = subprocess.run([sys.executable, "-m", "experiments.analysis.latent_search", f"--workdir={tmp_path}"],
                           capture_output=True, text=True, check=True)  # latent-search probing on the same split
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert set(result["mass"]) == {"thought_1", "thought_2"} and (tmp_path / "latent_search.png").exists()
    assert all(0.0 <= m["correct"] <= m["frontier"] <= m["reachable"] <= m["graph"] <= 1.0 + 1e-6
               for m in result["mass"].values())


@pytest.mark.slow
def test_the_lookup_diagnostic_trains_a_short_conv_transformer_on_a_mesh_and_scores_through_the_cli(tmp_path):
    """The short-conv transformer through the trainer on the 2x2x2 mesh with the 1-device losses;
    `python -m experiments.evaluation.reasoning_eval` prints the accuracy (here on another seed's 3-fact problems), and refuses
    a run that is not a reasoning task."""

    from experiments.configs import prosqa_lookup
    from tests.conftest import assert_mesh_run_matches_one_device

    def config_fn():
        config = prosqa_lookup.get_config("conv")
        config.model.update(d_model=32, num_heads=2, d_mlp=64)
        config.data.update(train_examples=32, eval_examples=8, test_examples=8, batch_size=8, eval_batch_size=8)
        config.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=4)
        config.optimizer.update(warmup_steps=0, lr=3e-3)
        config.mesh.update(data=-1)
        return config

    assert_mesh_run_matches_one_device(config_fn, tmp_path)
    run = subprocess.run([sys.executable, "-m", "experiments.evaluation.reasoning_eval", f"--workdir={tmp_path / 'one'}",
                          "--set=data.facts=3,seed=9"], capture_output=True, text=True, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["thoughts"] == 0.0 and result["tokens"] > 0
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"data": {"name": "text"}, "model": {"name": "transformer"}}))
    bad = subprocess.run([sys.executable, "-m", "experiments.evaluation.reasoning_eval", f"--workdir={tmp_path / 'lm'}"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "data.name='text', not a reasoning task" in bad.stderr.strip().splitlines()[-1]
