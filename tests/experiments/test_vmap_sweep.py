"""The vmapped sweep: each member trains exactly as the trainer's own step and optimizer would alone;
the phase classifier on hand-made milestones."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import models
from data import algorithmic
from experiments import optimizers, trainer, vmap_sweep
from tests.conftest import make_tiny_config


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
    for i in (0, 5):  # (seed 0, lr 1e-3, wd 0.1) and (seed 1, lr 1e-3, wd 1.0)
        member = members[i]
        opt = config.optimizer.copy_and_resolve_references()
        opt.update(lr=member["lr"])
        opt.adamw.update(weight_decay=member["weight_decay"])
        tx = optimizers.build(opt, steps)
        state = nn.meta.unbox(trainer.init_state(model, tx, examples["inputs"][:1], jax.random.PRNGKey(member["seed"])))
        batch = {**examples, "loss_mask": examples["loss_mask"] * masks[i][:, None]}
        step = jax.jit(functools.partial(trainer.train_step, schedule=optimizers.learning_rate_schedule(opt, steps)))
        for _ in range(steps):
            state, alone = step(state, batch)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=2e-4, atol=2e-6), states.params, state.params)
        np.testing.assert_allclose(metrics["loss"][i], alone["loss"], rtol=1e-5)
    train_acc, test_acc = accuracies(states, examples, masks)
    assert train_acc.shape == test_acc.shape == (len(members),)


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
