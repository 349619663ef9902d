"""The optimizer table (experiments/optimizers.py): config wiring of AdamW's keys, Grokfast and clipping
against optax and NumPy built by hand; the key groups in the base config and their validation."""

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import optimizers, validation
from experiments.configs import base
from tests.conftest import make_tiny_config


def _updates(tx, grads_seq):
    params = {"w": jnp.ones(4)}
    state, out = tx.init(params), []
    for g in grads_seq:
        update, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        out.append(np.asarray(update["w"]))
    return out


def test_grokfast_and_adamw_keys_reach_optax():
    grads = np.random.default_rng(0).normal(size=(4, 4))
    opt = base.get_config().optimizer
    opt.update(lr=0.1, warmup_steps=0)
    opt.adamw.update(b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.5)
    adamw = optax.adamw(optimizers.learning_rate_schedule(opt, 10), b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.5)
    chex.assert_trees_all_close(_updates(optimizers.build(opt, 10), grads), _updates(adamw, grads), rtol=1e-6)

    opt.grokfast.update(alpha=0.7, lamb=3.0)  # AdamW now sees g + 3 ema(g), the ema started at g_0
    amplified, ema = [], None
    for g in grads:
        ema = g if ema is None else 0.7 * ema + 0.3 * g
        amplified.append(g + 3.0 * ema)
    chex.assert_trees_all_close(_updates(optimizers.build(opt, 10), grads), _updates(adamw, amplified), rtol=1e-5)

    opt.grokfast.lamb, opt.grad_clip = 0.0, 0.5  # clipped to global norm 0.5 before AdamW
    clipped = [g * min(1.0, 0.5 / np.linalg.norm(g)) for g in grads]
    chex.assert_trees_all_close(_updates(optimizers.build(opt, 10), grads), _updates(adamw, clipped), rtol=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("name", "sgd", "optimizer.name='sgd' is not one of ['adamw']"),
    ("adamw.b1", 1.0, "optimizer.adamw.b1=1.0 must lie in [0, 1)"),
    ("grokfast.alpha", -0.1, "optimizer.grokfast.alpha=-0.1 must lie in [0, 1)"),
    ("lr", 0.0, "optimizer.lr=0.0 must be > 0"),
])
def test_bad_optimizer_keys_are_one_line(key, value, message):
    config = make_tiny_config()
    group, _, name = key.rpartition(".")
    (config.optimizer[group] if group else config.optimizer)[name] = value
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config, 8)
    assert message in str(info.value) and "\n" not in str(info.value)
