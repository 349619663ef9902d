"""The monitors (experiments/training/monitors.py, models' sown "monitors"): per-group norms and ratios against NumPy,
attention entropy against a float64 softmax, and a trainer run that logs and plots them on the mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.training import metrics_writer, monitors, trainer
from models import attention
from tests.conftest import make_tiny_config


def test_parameter_monitors_per_group_against_numpy():
    rng = np.random.default_rng(0)
    tree = lambda: {"embed": {"embedding": rng.normal(size=(5, 3))},  # noqa: E731
                    "layers": {"mlp": {"kernel": rng.normal(size=(2, 3, 4)), "bias": rng.normal(size=(2, 4))}}}
    old, new, grads = tree(), tree(), tree()
    got = monitors.parameter_monitors(*(jax.tree.map(jnp.asarray, t) for t in (old, new, grads)))

    def layer(t, i):
        return np.sqrt(np.sum(t["layers"]["mlp"]["kernel"][i] ** 2) + np.sum(t["layers"]["mlp"]["bias"][i] ** 2))

    diff = jax.tree.map(np.subtract, new, old)
    for i in range(2):
        np.testing.assert_allclose(got[f"monitor/weight_norm/layers/{i}"], layer(old, i), rtol=1e-5)
        np.testing.assert_allclose(got[f"monitor/update_ratio/layers/{i}"], layer(diff, i) / layer(old, i), rtol=1e-5)
        np.testing.assert_allclose(got[f"monitor/grad_norm/layers/{i}"], layer(grads, i), rtol=1e-5)
    np.testing.assert_allclose(got["monitor/weight_norm/embed"], np.linalg.norm(old["embed"]["embedding"]), rtol=1e-5)
    total = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(old)))
    np.testing.assert_allclose(got["monitor/weight_norm"], total, rtol=1e-5)


def test_attention_entropy_against_numpy():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 5, 6, 4)), rng.normal(size=(2, 5, 3, 4))  # 6 query heads over 3 kv heads
    mask = np.tril(np.ones((5, 5), bool))
    got = attention.entropy(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(mask))
    expected = np.zeros(6)
    for h in range(6):
        scores = np.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h // 2]) / 2.0
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        expected[h] = np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.slow  # by default the monitors against NumPy
def test_the_trainer_logs_and_plots_the_monitors_on_the_mesh(tmp_path):
    config = make_tiny_config(steps=2)
    config.train.update(monitors=True, log_every=1, eval_every=2, checkpoint_every=2)
    config.mesh.update(data=2, fsdp=2, tensor=2, expert=1)
    trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    event = metrics_writer.read(str(tmp_path), "train")[-1]
    layers = config.model.num_layers
    for i in range(layers):
        assert 0 < event[f"monitor/layers/mlp/activation_density/{i}"] < 1
        assert event[f"monitor/layers/residual_rms/{i}"] > 0 and event[f"monitor/update_ratio/layers/{i}"] > 0
        for h in range(config.model.num_heads):  # at most log(keys): here length 3
            assert 0 <= event[f"monitor/layers/attention/entropy/{i}/{h}"] <= np.log(3) + 1e-5
    assert (tmp_path / "monitors.png").exists()
