"""The attention seam (models/blocks.ATTENTIONS): RoPE against a NumPy rotation, every attention kind's cached
decoding against its own full pass, QK-norm attention against a float64 NumPy reference."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import blocks, qk_norm, transformer
from models import positions as rope_positions
from tests.conftest import slow


def numpy_rope(x, positions, theta=10000.0):
    """x [..., L, H, D] rotated pair by pair: (x_i, x_{i+D/2}) by the angle pos * theta^(-2i/D)."""
    half = x.shape[-1] // 2
    angles = np.asarray(positions, np.float64)[:, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class RopeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_rope_against_a_numpy_rotation(self):
        q = np.random.default_rng(0).standard_normal((1, 7, 3, 10)).astype(np.float32)  # [B, L, H, D]
        positions = np.array([0, 1, 2, 5, 9, 17, 40])
        rope = self.variant(lambda x, pos: rope_positions.rotate(x, pos, rope_positions.inverse_frequencies(10, 500.0)))
        rotated = rope(jnp.asarray(q), jnp.asarray(positions))
        chex.assert_trees_all_close(rotated, numpy_rope(q.astype(np.float64), positions, 500.0), rtol=1e-5, atol=1e-5)


def test_rope_is_a_rotation_that_makes_scores_depend_on_relative_position():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 7, 3, 10)).astype(np.float32)  # [B=1, L=7, H=3, D=10]
    positions = np.array([0, 1, 2, 5, 9, 17, 40])
    rotated = np.asarray(rope_positions.rotate(jnp.asarray(q), jnp.asarray(positions),
                                               rope_positions.inverse_frequencies(10, 500.0)))
    np.testing.assert_allclose(rotated, numpy_rope(q.astype(np.float64), positions, 500.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
    # <R_m q, R_n k> depends only on n - m: shifting both positions by 11 leaves every score unchanged.
    def scores(shift):
        inv_freq = rope_positions.inverse_frequencies(10, 10000.0)
        rq = rope_positions.rotate(jnp.asarray(q), jnp.asarray(positions + shift), inv_freq)
        rk = rope_positions.rotate(jnp.asarray(k), jnp.asarray(positions + shift), inv_freq)
        return np.asarray(jnp.einsum("blhd,bmhd->bhlm", rq, rk))
    np.testing.assert_allclose(scores(11), scores(0), rtol=1e-4, atol=1e-4)
    assert not np.allclose(scores(0), np.einsum("blhd,bmhd->bhlm", q, k), atol=1e-2)  # it does rotate


def _model(attention, **overrides):
    cfg = transformer.TransformerConfig(vocab_size=23, max_len=16, d_model=24, num_layers=2, d_mlp=40, num_heads=3,
                                        num_kv_heads=1, head_dim=8, attention=attention, **overrides)
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    return cfg, model, params, tokens


# All slow: gqa's decoding is tests/models/test_transformer.py's, mla's tests/models/test_mla.py's (absorbed by default),
# linear attention's tests/models/test_linear_attention.py's, and qk_norm keeps gqa's cache.
@pytest.mark.parametrize("attention", [slow(a) for a in sorted(blocks.ATTENTIONS)])
def test_every_attention_kind_decodes_like_its_full_pass(attention):
    """A prompt of 5 in one call, then one token at a time, through the kind's own cache (odd head counts)."""
    cfg, model, params, tokens = _model(attention)
    full = model.apply({"params": params}, tokens)
    decode = jax.jit(lambda p, t, c, s: model.apply({"params": p}, t, c, s, method=model.decode), static_argnums=3)
    logits, cache = decode(params, tokens[:, :5], model.init_cache(2, cfg.max_len), 0)
    pieces = [logits]
    for t in range(5, tokens.shape[1]):
        logits, cache = decode(params, tokens[:, t:t + 1], cache, t)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-4, atol=1e-4)


def test_qk_norm_attention_against_numpy():
    """out = softmax(s * RoPE(g_q q/rms(q)) RoPE(g_k k/rms(k))^T + causal) v W_o, GQA with 3 query heads on 1 kv head."""
    cfg = transformer.TransformerConfig(d_model=12, num_heads=3, num_kv_heads=1, head_dim=6, attention="qk_norm")
    module = qk_norm.QKNormAttention(cfg)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 12)).astype(np.float32)
    params = nn.meta.unbox(module.init(jax.random.key(0), jnp.asarray(x), 0)["params"])
    params["query_norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)  # non-trivial scales
    params["key_norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
    got, cache = module.apply({"params": params}, jnp.asarray(x), 0)
    assert cache is None

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x64 = x.astype(np.float64)
    rms_norm = lambda h, g: h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True) + 1e-6) * g  # noqa: E731
    q = rms_norm(np.einsum("bld,dhk->blhk", x64, p["query"]), p["query_norm"]["scale"])
    k = rms_norm(np.einsum("bld,dhk->blhk", x64, p["key"]), p["key_norm"]["scale"])
    v = np.einsum("bld,dhk->blhk", x64, p["value"])
    q, k = numpy_rope(q, np.arange(7)), numpy_rope(k, np.arange(7))
    scores = np.einsum("blhk,bmk->bhlm", q, k[:, :, 0]) / np.sqrt(6)
    scores = np.where(np.tril(np.ones((7, 7), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    heads = np.einsum("bhlm,bmk->blhk", probs, v[:, :, 0])
    expected = np.einsum("blhk,hkd->bld", heads, p["out"])
    chex.assert_trees_all_close(np.asarray(got, np.float64), expected, rtol=1e-4, atol=1e-5)
