"""The shared layers (models/layers.py) against float64 NumPy: the MLP for every activation with its sown activation
density, both norms, inverted dropout, the embedding and position tables (their init scales and offsets), the
tied and untied logits, and the remat policies by name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers


def _gelu(x):  # the tanh form flax's nn.gelu computes by default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


ACTIVATION = {"relu": lambda x: np.maximum(x, 0), "gelu": _gelu}


@pytest.mark.parametrize("activation,use_bias", [("relu", True), ("gelu", False), ("swiglu", True)])
def test_mlp_and_its_activation_density_against_numpy(activation, use_bias):
    mlp = layers.Mlp(d_mlp=6, activation=activation, use_bias=use_bias)
    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    params = nn.meta.unbox(mlp.init(jax.random.key(1), x)["params"])
    rng = np.random.default_rng(2)  # the biases start at zero: make them matter
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.5, p.shape).astype(np.float32), params)
    got, sown = mlp.apply({"params": params}, x, mutable=["monitors"])
    f = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    tokens = np.asarray(x, np.float64).reshape(-1, 5)
    h = tokens @ f["wi"]["kernel"] + (f["wi"]["bias"] if use_bias else 0)
    if activation == "swiglu":
        gate = tokens @ f["wg"]["kernel"] + f["wg"]["bias"]
        h = gate / (1 + np.exp(-gate)) * h
    else:
        h = ACTIVATION[activation](h)
    out = h @ f["wo"]["kernel"] + (f["wo"]["bias"] if use_bias else 0)
    np.testing.assert_allclose(got, out.reshape(2, 3, 5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sown["monitors"]["activation_density"][0], np.mean(h > 0), rtol=1e-6)
    assert set(params) == ({"wi", "wg", "wo"} if activation == "swiglu" else {"wi", "wo"})


@pytest.mark.parametrize("kind", layers.NORMS)
def test_norms_against_numpy(kind):
    x = np.random.default_rng(3).normal(2.0, 3.0, (2, 4, 6))
    norm = layers.Norm(kind, jnp.float32, eps=0.5)  # an epsilon large enough to show
    params = nn.meta.unbox(norm.init(jax.random.key(0), jnp.asarray(x, jnp.float32))["params"]) if kind != "none" else {}
    params = jax.tree.map(lambda p: p + np.linspace(0.5, 1.5, p.size).astype(np.float32), params)
    got = norm.apply({"params": params}, jnp.asarray(x, jnp.float32)) if kind != "none" else norm(x)
    if kind == "rmsnorm":
        want = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 0.5) * params["scale"]
    elif kind == "layernorm":
        centred = x - x.mean(-1, keepdims=True)
        want = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + 0.5) * params["scale"] + params["bias"]
    else:
        want = x
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class _Dropout(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x):
        return layers.dropout(self, x, self.rate)


def test_inverted_dropout_keeps_one_minus_rate_scaled_up_and_is_off_without_its_rng():
    x = jnp.full((200, 100), 2.0)
    out = np.asarray(_Dropout(0.3).apply({}, x, rngs={"dropout": jax.random.key(0)}))
    kept = out != 0
    np.testing.assert_allclose(out[kept], 2.0 / 0.7, rtol=1e-6)
    assert abs(kept.mean() - 0.7) < 4 * np.sqrt(0.7 * 0.3 / kept.size)  # within 4 standard errors
    np.testing.assert_array_equal(_Dropout(0.3).apply({}, x), x)
    np.testing.assert_array_equal(_Dropout(0.0).apply({}, x, rngs={"dropout": jax.random.key(0)}), x)


class _Tables(nn.Module):
    vocab: int
    d_model: int
    max_len: int

    def setup(self):
        self.embed = layers.token_embedding(self.vocab, self.d_model, jnp.float32)
        self.positions = layers.learned_positions(self, self.max_len, self.d_model)
        self.unembed = layers.unembedding(self.vocab, jnp.float32)

    def __call__(self, tokens, start):
        h = layers.add_positions(self.embed(tokens), self.positions, start)
        return layers.vocab_logits(h, self.embed, None), layers.vocab_logits(h, self.embed, self.unembed)


def test_embedding_tables_positions_and_logits_against_numpy():
    """E and P are normal with std 1/sqrt(D) (measured on 4096 x 64 draws), positions are added from `start`, tied
    logits are h E^T and untied h U."""
    model = _Tables(vocab=4096, d_model=64, max_len=4096)
    tokens = jnp.asarray([[3, 0, 4095], [7, 7, 1]])
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens, 0)["params"])
    for table in (params["embed"]["embedding"], params["position_embedding"]):
        assert abs(np.std(table) - 64**-0.5) < 0.01 * 64**-0.5 and abs(np.mean(table)) < 1e-3
    tied, untied = model.apply({"params": params}, tokens, 5)
    e, p = np.asarray(params["embed"]["embedding"], np.float64), np.asarray(params["position_embedding"], np.float64)
    h = e[np.asarray(tokens)] + p[5:8]
    np.testing.assert_allclose(tied, h @ e.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(untied, h @ np.asarray(params["unembed"]["kernel"], np.float64), rtol=1e-4, atol=1e-5)


def test_remat_policies_by_name():
    assert layers.remat_policy("none") is None
    assert layers.remat_policy("full") is jax.checkpoint_policies.nothing_saveable
    assert layers.remat_policy("dots") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    assert set(layers.REMAT_POLICIES) == {"none", "full", "dots"}
