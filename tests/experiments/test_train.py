"""The trainer end to end on the tiny config: workdir files, exact resume, mesh equivalence,
non-finite loss, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.training import checkpointing, metrics_writer, trainer
from tests.conftest import cpu_env, make_tiny_config, make_tiny_lm_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(config, workdir, devices=None):
    return trainer.train_and_evaluate(config, str(workdir), devices=devices, verbose=False)


def _by_step(workdir, split):
    """{step: event} for one split; a resumed run's later event for a step wins."""
    return {e["step"]: e for e in metrics_writer.read(str(workdir)) if e["split"] == split}


def test_workdir_files(finished_tiny_run):
    tmp_path = finished_tiny_run
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["model"]["vocab_size"] == 14 and resolved["model"]["max_len"] == 3
    events = metrics_writer.read(str(tmp_path))
    train = [e for e in events if e["split"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in events if e["split"] == "eval"] == [3, 6]
    for e in events:
        assert isinstance(e["step"], int)
        assert all(isinstance(v, float) for k, v in e.items() if k not in ("step", "split"))
    assert {"loss", "accuracy", "tokens_per_s", "wall_s", "lr", "grad_norm"} <= set(train[0])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert os.listdir(tmp_path / "tensorboard")


def test_resume_is_exact(finished_tiny_run, tmp_path):
    straight, resumed = finished_tiny_run, tmp_path / "resumed"
    _run(make_tiny_config(steps=3), resumed)
    _run(make_tiny_config(steps=6), resumed)  # restarts from the step-3 checkpoint
    for split in ("train", "eval"):
        a, b = _by_step(straight, split), _by_step(resumed, split)
        assert a.keys() == b.keys()
        for step in a:
            for key in ("loss", "accuracy"):
                assert a[step][key] == b[step][key], (split, step, key)


@pytest.mark.slow
def test_same_losses_on_one_device_and_on_a_2x2x2_mesh(tmp_path):
    config = make_tiny_config()
    _run(config, tmp_path / "one", devices=jax.devices()[:1])
    config.mesh.update(data=2, fsdp=2, tensor=2, expert=1)
    _run(config, tmp_path / "mesh")
    for split in ("train", "eval"):
        a, b = _by_step(tmp_path / "one", split), _by_step(tmp_path / "mesh", split)
        for step in a:
            np.testing.assert_allclose(b[step]["loss"], a[step]["loss"], rtol=2e-5)


def test_state_is_sharded_by_the_rules():
    from experiments.training import sharding
    from models import transformer
    cfg = transformer.TransformerConfig(vocab_size=16, max_len=4, d_model=32, num_heads=4, d_mlp=64)
    mesh = sharding.make_mesh((2, 2, 2, 1), jax.devices())
    boxed = jax.eval_shape(transformer.Transformer(cfg).init, jax.random.key(0), jax.numpy.zeros((1, 4), "int32"))
    specs = jax.tree.map(lambda s: tuple(s.spec), sharding.logical_shardings(boxed, mesh)["params"],
                         is_leaf=lambda x: hasattr(x, "spec"))
    assert specs["embed"]["embedding"] == ("tensor", "fsdp")
    assert specs["layers"]["mlp"]["wi"]["kernel"] == (None, "fsdp", "tensor")
    assert specs["layers"]["attention"]["query"] == (None, "fsdp", "tensor", None)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = make_tiny_config(steps=20)
    config.train.update(checkpoint_every=1)
    config.optimizer.update(lr=1e30, warmup_steps=4)  # step 0 has lr 0, then the weights blow up
    with pytest.raises(trainer.NonFiniteLossError, match=r"loss is (nan|inf) at step \d+") as info:
        _run(config, tmp_path)
    bad_step = int(str(info.value).split(" at step ")[1].split(";")[0])
    mngr = checkpointing.manager(str(tmp_path), keep=100)
    saved = mngr.all_steps()
    assert saved and max(saved) < bad_step
    restored = mngr.restore(max(saved), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    for leaf in jax.tree.leaves(restored.state["params"]):
        assert np.isfinite(np.asarray(leaf)).all()


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/grokking.py",
            f"--workdir={workdir}", "--config.data.p=13", "--config.model.d_model=32", "--config.model.d_mlp=64",
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.checkpoint_every=1000000"]
    env = cpu_env()
    proc = subprocess.Popen(args + ["--config.train.steps=1000000"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and len((workdir / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM: saved a checkpoint at step" in out
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert saved and saved[-1] >= 3
    stop = saved[-1]
    resumed = subprocess.run(args + [f"--config.train.steps={stop + 2}"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stop}" in resumed.stdout
    assert max(_by_step(workdir, "train")) == stop + 2


@pytest.mark.slow
def test_gradient_accumulation_gives_the_full_batch_update_on_the_mesh(tmp_path):
    """k = 2 micro-batches of 8 rows on a 2x2x2 mesh: the losses and parameters of one 16-row batch per step."""
    runs = {}
    for k in (1, 2):
        config = make_tiny_config(steps=4)
        config.train.update(grad_accum_steps=k, eval_every=4, checkpoint_every=4)
        config.mesh.update(data=2, fsdp=2, tensor=2, expert=1)
        _run(config, tmp_path / f"k{k}")
        runs[k] = _by_step(tmp_path / f"k{k}", "train")
    for step in runs[1]:
        np.testing.assert_allclose(runs[2][step]["loss"], runs[1][step]["loss"], rtol=1e-5)
        np.testing.assert_allclose(runs[2][step]["grad_norm"], runs[1][step]["grad_norm"], rtol=1e-4)
    from experiments import restore
    (_, one), (_, two) = [restore.load_variables(restore.load_config(str(tmp_path / f"k{k}")), str(tmp_path / f"k{k}"))
                          for k in (1, 2)]
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grokking", "lm"])
@pytest.mark.parametrize("name", ["lion", "adam", "sgd", "adafactor", "schedule_free_adamw", "muon", "shampoo"])
def test_every_optimizer_trains_through_the_trainer_on_the_mesh(tmp_path, name, kind):  # adamw: everywhere
    config = make_tiny_config(steps=8) if kind == "grokking" else make_tiny_lm_config(steps=8)
    config.optimizer.update(name=name, lr={"lion": 3e-4, "sgd": 0.3, "muon": 0.02}.get(name, 3e-3), decay="weights")
    if name == "schedule_free_adamw":
        config.optimizer.schedule = "constant"
    config.train.update(checkpoint_every=8, eval_every=8)
    config.mesh.update(data=2, fsdp=2, tensor=2, expert=1)
    _run(config, tmp_path)
    losses = [e["loss"] for e in metrics_writer.read(str(tmp_path), "train")]
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


@pytest.mark.slow
def test_ema_is_evaluated_beside_the_weights_and_resumes(tmp_path):
    config = make_tiny_config(steps=6)
    config.train.update(ema_decay=0.9)
    _run(config, tmp_path / "straight")
    half = make_tiny_config(steps=3)
    half.train.update(ema_decay=0.9)
    _run(half, tmp_path / "resumed")
    _run(config, tmp_path / "resumed")
    for run in ("straight", "resumed"):
        assert sorted(_by_step(tmp_path / run, "eval_ema")) == [3, 6]
    a, b = _by_step(tmp_path / "straight", "eval_ema"), _by_step(tmp_path / "resumed", "eval_ema")
    assert a[6]["loss"] == b[6]["loss"]  # the average is checkpointed with the weights
    assert a[6]["loss"] != _by_step(tmp_path / "straight", "eval")[6]["loss"]
