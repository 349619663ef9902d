"""The short convolution before attention (models/short_conv.py): a NumPy loop, and decoding equal to the full pass
in the transformer and through Coconut's thought loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import coconut, short_conv, transformer


def test_short_conv_is_the_causal_sum_and_carries_its_state():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 7, 5)).astype(np.float32)
    module = short_conv.ShortConv(3)
    params = nn.meta.unbox(module.init(jax.random.key(0), jnp.asarray(h))["params"])
    params["kernel"] = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    got, _ = module.apply({"params": params}, jnp.asarray(h))
    c = np.asarray(params["kernel"], np.float64)
    expected = h.astype(np.float64).copy()
    for t in range(7):
        for j in range(3):
            if t - j >= 0:
                expected[:, t] += c[j] * h[:, t - j]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    empty = short_conv.ShortConv.init_cache(2, 3, 5, jnp.float32)  # a decoding cache starts as these zeros
    first, state = module.apply({"params": params}, jnp.asarray(h[:, :4]), empty)  # the same sequence in two pieces
    second, _ = module.apply({"params": params}, jnp.asarray(h[:, 4:]), state)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), got, rtol=1e-6, atol=1e-6)
    assert empty.shape == state.shape == (2, 2, 5)  # the last width - 1 inputs


def _random_conv_params(params, seed=1):
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if "short_conv" in jax.tree_util.keystr(p) else x,
        params)


@pytest.mark.slow
def test_transformer_with_a_short_conv_decodes_like_its_full_pass():
    cfg = transformer.TransformerConfig(vocab_size=11, max_len=9, d_model=12, num_layers=2, num_heads=3, d_mlp=16,
                                        short_conv=4)
    model = transformer.Transformer(cfg)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 9)), jnp.int32)
    params = _random_conv_params(nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"]))
    full = model.apply({"params": params}, tokens)
    logits, cache = model.apply({"params": params}, tokens[:, :4], model.init_cache(2, 9), 0, method=model.decode)
    pieces = [logits]
    for t in range(4, 9):
        logits, cache = model.apply({"params": params}, tokens[:, t:t + 1], cache, t, method=model.decode)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-4, atol=1e-4)
    zero_conv = jax.tree_util.tree_map_with_path(  # a zero kernel is the plain transformer
        lambda p, x: jnp.zeros_like(x) if "short_conv" in jax.tree_util.keystr(p) else x, params)
    plain = transformer.Transformer(transformer.TransformerConfig(**{**cfg.__dict__, "short_conv": 0}))
    without = {k: v for k, v in zero_conv.items()}
    without["layers"] = {k: v for k, v in zero_conv["layers"].items() if k != "short_conv"}
    np.testing.assert_allclose(model.apply({"params": zero_conv}, tokens), plain.apply({"params": without}, tokens),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_coconut_thought_loop_with_a_short_conv_equals_the_naive_loop():
    """Coconut's segmented pass (prefix, thoughts one by one, rest) against a full causal pass of the same inputs."""
    cfg = coconut.CoconutConfig(vocab_size=10, max_len=8, d_model=12, num_layers=2, num_heads=3, d_mlp=16,
                                short_conv=3, bot_position=2, max_thoughts=0, thought_token=2, pad_token=0,
                                eot_token=3, thoughts="pause")
    tokens = jnp.asarray(np.random.default_rng(3).integers(4, 10, (2, 8)), jnp.int32)
    plain = coconut.Coconut(cfg)
    params = _random_conv_params(nn.meta.unbox(jax.jit(plain.init)(jax.random.key(0), tokens)["params"]))
    segmented = coconut.Coconut(coconut.CoconutConfig(**{**cfg.__dict__, "max_thoughts": 3}))
    np.testing.assert_allclose(segmented.apply({"params": params}, tokens), plain.apply({"params": params}, tokens),
                               rtol=1e-4, atol=1e-4)
