"""BitNet b1.58 (models/bitnet.py): the quantisers against NumPy, straight-through gradients, and a forward
pass of the model in which every block matrix takes exactly three values, +-mean|W| and 0, while the
embeddings and the head stay in float."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import bitnet, transformer


def _numpy_bitlinear(x, w):
    """The recipe's BitLinear in float64: a unit-gain RMSNorm of x, then the two quantisers."""
    s = np.mean(np.abs(w)) + bitnet.EPS
    w_q = np.clip(np.round(w / s), -1, 1) * s
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + bitnet.NORM_EPS)
    m = np.max(np.abs(x / rms), axis=-1, keepdims=True) + bitnet.EPS
    x_q = np.clip(np.round(x / rms * 127 / m), -128, 127) * m / 127
    return x_q, w_q, rms


def test_bitlinear_forward_and_straight_through_gradients_against_numpy():
    """Rows of very different scales (the norm makes them quantise alike); the gradient is straight through the
    quantisers and exact through the norm: dx = (u - x~ mean(x~ u)) / rms, u = g W_q^T."""
    rng = np.random.default_rng(0)
    x, w, g = rng.normal(size=(5, 7)), rng.normal(size=(7, 3)) * 0.1, rng.normal(size=(5, 3))
    x *= np.array([0.01, 0.3, 1.0, 4.0, 50.0])[:, None]
    x_q, w_q, rms = _numpy_bitlinear(x, w)
    x32, w32 = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    np.testing.assert_allclose(bitnet.matmul(x32, w32, True), x_q @ w_q, rtol=1e-4, atol=1e-5)
    # Per token over the feature axis, whatever the leading axes (the blocks pass [B, T, D]).
    np.testing.assert_allclose(bitnet.matmul(x32.reshape(5, 1, 7), w32, True), (x_q @ w_q)[:, None], rtol=1e-4,
                               atol=1e-5)
    for product in (lambda a, b: bitnet.matmul(a, b, True),
                    lambda a, b: bitnet.dot_general(a, b, (((1,), (0,)), ((), ())))):
        dx, dw = jax.grad(lambda a, b: jnp.sum(product(a, b) * g), argnums=(0, 1))(x32, w32)
        u, normalised = g @ w_q.T, x / rms
        np.testing.assert_allclose(dx * rms, u - normalised * np.mean(normalised * u, -1, keepdims=True),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dw, x_q.T @ g, rtol=1e-4, atol=1e-5)
    assert len(np.unique(np.asarray(bitnet.ternary(w32)))) == 3


@pytest.mark.slow
def test_every_block_matrix_is_ternary_at_its_mean_absolute_value(monkeypatch):
    seen = []
    original = bitnet.ternary

    def recording(w):
        quantised = original(w)
        jax.debug.callback(lambda a, b: seen.append((np.asarray(a), np.asarray(b))), w, quantised)
        return quantised

    monkeypatch.setattr(bitnet, "ternary", recording)
    cfg = transformer.TransformerConfig(vocab_size=11, max_len=6, d_model=16, num_heads=2, d_mlp=24, num_layers=2,
                                        bitnet=True)
    model = transformer.Transformer(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, size=(2, 6)), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    seen.clear()
    logits = jax.block_until_ready(model.apply(params, tokens))  # the callbacks see each scanned layer's matrices
    assert len(seen) == 2 * 6  # per layer: query, key, value, out, wi, wo; never the embedding or the head
    for w, quantised in seen:
        scale = np.mean(np.abs(w)) + bitnet.EPS
        np.testing.assert_allclose(np.unique(quantised), [-scale, 0.0, scale], rtol=1e-6)
    assert {w.shape for w, _ in seen} == {(16, 16), (16, 24), (24, 16)}
    float_model = transformer.Transformer(cfg.__class__(**{**cfg.__dict__, "bitnet": False}))
    assert not np.allclose(logits, float_model.apply(params, tokens), atol=1e-3)
