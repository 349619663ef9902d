"""The int8 decoding cache (models/kv_cache.py): absmax quantisation against NumPy, and every attention kind
decoding through it close to its float cache."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import blocks, kv_cache, transformer
from tests.conftest import slow


def test_absmax_quantisation_per_token_and_head_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 7)).astype(np.float32) * rng.uniform(0.01, 10, (2, 5, 3, 1)).astype(np.float32)
    x[0, 0, 0] = 0.0  # an all-zero vector stays zero
    q, scale = kv_cache.quantise(jnp.asarray(x))
    assert q.dtype == jnp.int8 and scale.shape == (2, 5, 3)
    want_scale = np.abs(x).max(-1) / 127
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    np.testing.assert_array_equal(q, np.clip(np.round(x / np.where(want_scale == 0, 1, want_scale)[..., None]), -127, 127))
    error = np.abs(np.asarray(kv_cache.dequantise(q, scale)) - x)
    assert (error <= want_scale[..., None] / 2 + 1e-7).all() and error[0, 0, 0].max() == 0
    assert np.abs(np.asarray(q)).max(-1).min() in (0, 127)  # each vector's largest entry maps to +-127


def test_write_then_read_round_trips_within_half_a_step():
    entry = kv_cache.empty((1, 6, 2, 4), jnp.float32, "int8")
    new = jax.random.normal(jax.random.key(0), (1, 2, 2, 4))
    entry = kv_cache.write(entry, new, 3)
    back = kv_cache.read(entry, jnp.float32)
    np.testing.assert_array_equal(back[:, :3], 0.0)
    np.testing.assert_allclose(back[:, 3:5], new, atol=float(jnp.max(jnp.abs(new))) / 254 + 1e-7)


CACHED_KINDS = sorted(set(blocks.ATTENTIONS) - {"linear"})  # linear attention keeps a running sum (refused: int8)


@pytest.mark.parametrize("attention", [a if a == "gqa" else slow(a) for a in CACHED_KINDS])
def test_every_attention_kind_decodes_through_an_int8_cache_close_to_the_float_cache(attention):
    cfg = transformer.TransformerConfig(vocab_size=23, max_len=16, d_model=24, num_layers=2, d_mlp=40, num_heads=3,
                                        num_kv_heads=1, head_dim=8, attention=attention)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, cfg.vocab_size)
    params = nn.meta.unbox(transformer.Transformer(cfg).init(jax.random.key(1), tokens)["params"])

    def decoded(kind):
        model = transformer.Transformer(dataclasses.replace(cfg, kv_cache_dtype=kind))
        decode = jax.jit(lambda t, c, s: model.apply({"params": params}, t, c, s, method=model.decode))
        logits, cache = decode(tokens[:, :5], model.init_cache(2, cfg.max_len), 0)
        pieces = [logits]
        for t in range(5, tokens.shape[1]):
            logits, cache = decode(tokens[:, t:t + 1], cache, t)
            pieces.append(logits)
        return jnp.concatenate(pieces, 1), cache

    float_logits, _ = decoded("float")
    int8_logits, cache = decoded("int8")
    assert {leaf.dtype for leaf in jax.tree.leaves(cache)} == {jnp.dtype(jnp.int8), jnp.dtype(jnp.float32)}
    error = float(jnp.max(jnp.abs(int8_logits - float_logits)))
    assert 0 < error < 0.02 * float(jnp.max(jnp.abs(float_logits))), error  # quantised, and close
