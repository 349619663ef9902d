"""The vmapped sweep: each member trains exactly as the trainer's own step and optimizer would alone;
the phase classifier on hand-made milestones."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from data import algorithmic
from experiments.optim import optimizers
from experiments.studies import vmap_sweep
from experiments.training import train_state, trainer
from tests.conftest import make_tiny_config


@pytest.mark.slow
def test_each_vmapped_member_trains_exactly_like_the_trainer_alone():
    config = make_tiny_config()
    config.optimizer.update(warmup_steps=3, schedule="cosine", min_lr_ratio=0.1)
    members = vmap_sweep.member_grid(seeds=[0, 1], lrs=[1e-3, 4e-3], weight_decays=[0.1, 1.0], train_fractions=[0.5])
    steps = 6
    examples = {k: jnp.asarray(v) for k, v in algorithmic.all_examples(13, "a+b").items()}
    masks = jnp.asarray(vmap_sweep.train_masks(13, "a+b", members))
    config = trainer.resolve(config, vmap_sweep._splits_like(config))
    states = vmap_sweep.init_states(config, members, examples["inputs"], steps)
    train, accuracies = vmap_sweep.make_steps(config, steps)
    for _ in range(steps):
        states, metrics = train(states, examples, masks)

    model = models.build(config.model)
    alone_states = {}
    for i in (0, 5):  # (seed 0, lr 1e-3, wd 0.1) and (seed 1, lr 1e-3, wd 1.0)
        member = members[i]
        opt = config.optimizer.copy_and_resolve_references()
        opt.update(lr=member["lr"])
        opt.adamw.update(weight_decay=member["weight_decay"])
        tx = optimizers.build(opt, steps)
        state = nn.meta.unbox(train_state.init_state(model, tx, examples["inputs"][:1], jax.random.PRNGKey(member["seed"])))
        batch = {**examples, "loss_mask": examples["loss_mask"] * masks[i][:, None]}
        step = jax.jit(functools.partial(trainer.train_step, schedule=optimizers.learning_rate_schedule(opt, steps)))
        for _ in range(steps):
            state, alone = step(state, batch)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], states.params), state.params, rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(metrics["loss"][i], alone["loss"], rtol=1e-5)
        alone_states[i] = state
    train_acc, test_acc = accuracies(states, examples, masks)
    for i, state in alone_states.items():  # each member's accuracies, recounted from its stand-alone run
        right = np.asarray(jnp.argmax(model.apply({"params": state.params}, examples["inputs"])[:, -1], -1)
                           == examples["targets"][:, -1])
        train = np.asarray(masks[i]) > 0
        np.testing.assert_allclose(train_acc[i], right[train].mean(), atol=1e-6)
        np.testing.assert_allclose(test_acc[i], right[~train].mean(), atol=1e-6)


def test_train_masks_are_seeded_splits_of_the_right_size():
    members = vmap_sweep.member_grid(seeds=[0, 1], train_fractions=[0.3, 0.5])
    masks = vmap_sweep.train_masks(13, "a+b", members)
    assert masks.sum(1).tolist() == [int(0.3 * 169), int(0.5 * 169)] * 2
    np.testing.assert_array_equal(masks, vmap_sweep.train_masks(13, "a+b", members))
    assert not np.array_equal(masks[0], masks[2])  # another seed, another split


def test_phases_follow_the_90_percent_milestones():
    assert vmap_sweep.classify(None, None, 500) == "confusion"
    assert vmap_sweep.classify(300, None, 500) == "memorisation"
    assert vmap_sweep.classify(300, 2000, 500) == "grokking"
    assert vmap_sweep.classify(300, 700, 500) == "comprehension"
    steps = np.array([10, 20, 30])
    assert vmap_sweep.first_step(steps, [0.5, 0.95, 0.99], 0.9) == 20
    assert vmap_sweep.first_step(steps, [0.5, 0.6, 0.7], 0.9) is None


@pytest.mark.slow
def test_phase_diagram_script_end_to_end(tmp_path):
    """scripts/studies/phase_diagram.py: a 2 x 2 grid, each member's phase the classification of its own milestones."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = ["--lrs=1e-3,1e-2", "--weight_decays=0.1,1", "--steps=40", "--eval_every=10", "--grokking_gap=10",
            "--config.data.p=13", "--config.model.d_model=32", "--config.model.d_mlp=64", f"--workdir={tmp_path}"]
    subprocess.run([sys.executable, "scripts/studies/phase_diagram.py", *args], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    members = json.loads((tmp_path / "members.json").read_text())
    assert sorted((m["lr"], m["weight_decay"]) for m in members) == [(1e-3, 0.1), (1e-3, 1.0), (1e-2, 0.1), (1e-2, 1.0)]
    for m in members:
        assert m["phase"] == vmap_sweep.classify(m["train_90"], m["test_90"], 10)
    assert (tmp_path / "phase_diagram.png").stat().st_size > 0
