"""The reference attention against a float64 NumPy loop (docs/interfaces.md)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from models import attention


def attention_loop(q, k, v, causal, sm_scale=None):
    """Float64, one query at a time; queries that see no key give zeros."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    batch, len_q, heads_q, dim = q.shape
    len_k, heads_kv = k.shape[1], k.shape[2]
    scale = dim**-0.5 if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads_q):
            g = h // (heads_q // heads_kv)
            for i in range(len_q):
                visible = np.arange(len_k) <= i + len_k - len_q if causal else np.ones(len_k, bool)
                if not visible.any():
                    continue
                s = k[b, visible, g] @ q[b, i, h] * scale
                p = np.exp(s - s.max())
                out[b, i, h] = p / p.sum() @ v[b, visible, g]
    return out


SHAPES = [  # batch, len_q, len_k, heads_q, heads_kv, head_dim
    (2, 7, 7, 4, 4, 16),
    (1, 5, 9, 8, 2, 8),  # len_q < len_k: bottom-right aligned
    (3, 6, 4, 3, 1, 4),  # len_q > len_k: the first queries see nothing; odd head count
    (1, 1, 13, 4, 1, 32),  # one decode step
]


class AttentionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_float64_loop(self):
        for shape in SHAPES:
            for causal in (True, False):
                batch, len_q, len_k, heads_q, heads_kv, dim = shape
                keys = jax.random.split(jax.random.key(sum(shape)), 3)
                q = jax.random.normal(keys[0], (batch, len_q, heads_q, dim))
                k = jax.random.normal(keys[1], (batch, len_k, heads_kv, dim))
                v = jax.random.normal(keys[2], (batch, len_k, heads_kv, dim))
                fn = self.variant(lambda q, k, v, c=causal: attention.dot_product_attention(q, k, v, causal=c))
                out = fn(q, k, v)
                chex.assert_shape(out, (batch, len_q, heads_q, dim))
                np.testing.assert_allclose(out, attention_loop(q, k, v, causal), atol=2e-6, rtol=2e-5)

    def test_sm_scale(self):
        q, k, v = (jax.random.normal(jax.random.key(i), (1, 4, 2, 8)) for i in range(3))
        out = attention.dot_product_attention(q, k, v, causal=False, sm_scale=0.3)
        np.testing.assert_allclose(out, attention_loop(q, k, v, False, 0.3), atol=2e-6, rtol=2e-5)

    def test_gradients_finite_where_queries_see_nothing(self):
        q, k, v = (jax.random.normal(jax.random.key(i), (1, 6, 2, 4)) for i in range(3))
        grads = jax.grad(lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k[:, :3], v[:, :3]) ** 2),
                         argnums=(0, 1, 2))(q, k, v)
        for g in grads:
            assert np.isfinite(np.asarray(g)).all()


def test_the_pallas_path_gives_the_xla_attention_with_its_default_scale_and_a_narrower_value():
    """causal_attention(impl="pallas") (the flash kernel, interpret mode on CPU) against impl="xla": the default
    1 / sqrt(D) scale, grouped kv heads, and a value width 5 padded to the query width 8 and cut back (a sequence
    of 6, shorter than the widths, so that no axis but the last can stand in for them)."""
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.normal(size=(1, 6, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 6, 2, 5)), jnp.float32)
    np.testing.assert_allclose(attention.causal_attention(q, k, v, "pallas"), attention.causal_attention(q, k, v, "xla"),
                               rtol=1e-4, atol=1e-5)
