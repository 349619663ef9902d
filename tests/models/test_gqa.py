"""The grouped-query attention layer (models/gqa.py) against a float64 NumPy transcription: projections with their
biases, RoPE, causal softmax attention with query heads sharing key/value heads in groups, the output projection;
and its kernels' LeCun-normal initialisation over the right fan-in."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import gqa, transformer


def _numpy_rope(x, theta):
    """Pairs (x_i, x_{i + Dh/2}) rotated by angle t * theta^(-2i / Dh) at position t; x [B, T, H, Dh]."""
    half = x.shape[-1] // 2
    angles = np.arange(x.shape[1])[:, None] * theta ** (-np.arange(half) * 2 / x.shape[-1])  # [T, Dh/2]
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)


def _numpy_gqa(p, x, heads, kv_heads, theta):
    q = np.einsum("btd,dhk->bthk", x, p["query"]) + p["query_bias"]
    k = np.einsum("btd,dhk->bthk", x, p["key"]) + p["key_bias"]
    v = np.einsum("btd,dhk->bthk", x, p["value"]) + p["value_bias"]
    q, k = _numpy_rope(q, theta), _numpy_rope(k, theta)
    group = heads // kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # query head h reads kv head h // group
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    length = x.shape[1]
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqs,bshk->bqhk", weights, v)
    return np.einsum("bqhk,hkd->bqd", out, p["out"]) + p["out_bias"]


@pytest.fixture(scope="module")
def layer():
    cfg = transformer.TransformerConfig(d_model=24, num_heads=6, num_kv_heads=2, head_dim=8, attention_bias="all",
                                        rope_theta=100.0, max_len=16)
    attention = gqa.GroupedQueryAttention(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 7, 24))
    params = nn.meta.unbox(jax.jit(lambda x: attention.init(jax.random.key(1), x, 0))(x)["params"])
    return cfg, attention, x, params


def test_the_layer_against_a_float64_numpy_transcription(layer):
    """Biases random (they start at zero), 3 query heads per key/value head, head_dim 8 != d_model / heads."""
    cfg, attention, x, params = layer
    rng = np.random.default_rng(2)
    params = {k: v + (rng.normal(0, 0.5, v.shape).astype(np.float32) if k.endswith("_bias") else 0)
              for k, v in params.items()}
    got, _ = jax.jit(lambda p, x: attention.apply({"params": p}, x, 0))(params, x)
    want = _numpy_gqa({k: np.asarray(v, np.float64) for k, v in params.items()}, np.asarray(x, np.float64),
                      6, 2, 100.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_kernels_are_lecun_normal_over_their_fan_in():
    """query / key / value [D, H, Dh]: std 1 / sqrt(D); out [H, Dh, D]: std 1 / sqrt(H Dh) (flax's truncated
    normal, whose std is the target's), measured on a wide layer."""
    cfg = transformer.TransformerConfig(d_model=256, num_heads=8, num_kv_heads=8, head_dim=64)
    shapes = jax.jit(lambda x: gqa.GroupedQueryAttention(cfg).init(jax.random.key(3), x, 0))(jnp.zeros((1, 2, 256)))
    params = nn.meta.unbox(shapes["params"])
    for name, fan_in in (("query", 256), ("key", 256), ("value", 256), ("out", 8 * 64)):
        np.testing.assert_allclose(np.std(params[name]), fan_in**-0.5, rtol=0.02, err_msg=name)
