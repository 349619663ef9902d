"""Dropout (models/layers.dropout, attention.attend): the identity without a "dropout" rng, kept entries scaled
by 1 / (1 - rate) with the rest zero (seen through one-hot values), a fresh mask per scanned layer, and in the
trainer: masks from fold_in(rng, step), so a resumed run repeats the straight run bit for bit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.training import metrics_writer, trainer
from models import attention, blocks, transformer
from tests.conftest import make_tiny_config


def test_attention_dropout_keeps_probabilities_scaled_or_zero():
    rng = np.random.default_rng(0)
    batch, length, heads, kv_heads, rate = 2, 16, 4, 2, 0.3
    q = jnp.asarray(rng.normal(size=(batch, length, heads, length)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, length, kv_heads, length)), jnp.float32)
    v = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (batch, length, kv_heads, length))  # out = probabilities
    mask = attention.causal_mask(length, length)
    probabilities = np.asarray(attention.attend(q, k, v, mask))
    dropped = np.asarray(attention.attend(q, k, v, mask, dropout_rate=rate, dropout_rng=jax.random.PRNGKey(1)))
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], probabilities[kept] / (1 - rate), rtol=1e-5)
    visible = np.broadcast_to(np.asarray(mask)[None, :, None, :], dropped.shape)
    assert not kept[~visible].any()
    assert abs(1 - kept[visible].mean() - rate) < 0.05  # ~1,100 visible probabilities


@pytest.mark.slow
def test_the_model_drops_only_with_a_dropout_rng_and_each_layer_draws_its_own_mask():
    cfg = dict(vocab_size=11, max_len=12, d_model=16, num_heads=2, d_mlp=32, num_layers=2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 11, size=(2, 12)), jnp.int32)
    plain = transformer.Transformer(transformer.TransformerConfig(**cfg))
    dropping = transformer.Transformer(transformer.TransformerConfig(
        **cfg, embed_dropout=0.1, attention_dropout=0.2, residual_dropout=0.1))
    params = jax.jit(plain.init)(jax.random.PRNGKey(0), tokens)
    np.testing.assert_array_equal(dropping.apply(params, tokens), plain.apply(params, tokens))
    key_a, key_b = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
    a = dropping.apply(params, tokens, rngs={"dropout": key_a})
    np.testing.assert_array_equal(a, dropping.apply(params, tokens, rngs={"dropout": key_a}))
    assert not np.allclose(a, dropping.apply(params, tokens, rngs={"dropout": key_b}))
    assert not np.allclose(a, plain.apply(params, tokens))

    def sow_dropout_key(next_fun, args, kwargs, context):  # each scanned block records the key it draws
        if context.method_name == "__call__" and isinstance(context.module, blocks.Block):
            key = jax.random.key_data(context.module.make_rng("dropout"))
            context.module.sow("metrics", "dropout_key", key.astype(jnp.float32))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(sow_dropout_key):
        _, written = dropping.apply(params, tokens, rngs={"dropout": key_a}, mutable=["metrics"])
    keys = np.asarray(written["metrics"]["layers"]["dropout_key"][0])  # [layers, 2]
    assert keys.shape[0] == 2 and not np.array_equal(keys[0], keys[1])


@pytest.mark.slow
def test_dropout_resumes_exactly(tmp_path):
    def config(steps):
        c = make_tiny_config(steps=steps)
        c.model.update(embed_dropout=0.1, attention_dropout=0.1, residual_dropout=0.1)
        c.train.update(log_every=1, checkpoint_every=3, eval_every=6)
        return c

    trainer.train_and_evaluate(config(6), str(tmp_path / "straight"), verbose=False)
    trainer.train_and_evaluate(config(3), str(tmp_path / "resumed"), verbose=False)
    trainer.train_and_evaluate(config(6), str(tmp_path / "resumed"), verbose=False)
    straight, resumed = (metrics_writer.read(str(tmp_path / run), "train") for run in ("straight", "resumed"))
    assert [e["loss"] for e in straight] == [e["loss"] for e in resumed]
    without = make_tiny_config(steps=6)
    without.train.update(log_every=1, checkpoint_every=6, eval_every=6)
    trainer.train_and_evaluate(without, str(tmp_path / "without"), verbose=False)
    assert straight[1]["loss"] != metrics_writer.read(str(tmp_path / "without"), "train")[1]["loss"]
