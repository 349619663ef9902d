"""Linear attention (models/linear_attention.py), plain and gated: the layer against a float64 NumPy loop over its
recurrence; SSD at a = 0 against linear attention's quadratic (masked-kernel) form, the duality; cached decoding
(a state whose size does not grow with the length) against the full pass, in a transformer and as the hybrid's L
layers beside Mamba-2 and softmax attention; left-padding masks; training on the 2x2x2 mesh; bad keys refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import hybrid, linear_attention, ssd, transformer
from tests.conftest import assert_mesh_run_matches_one_device, decode_in_pieces, make_tiny_lm_config, slow


def _cfg(**overrides):
    keys = dict(vocab_size=23, max_len=32, d_model=24, num_layers=2, d_mlp=40, num_heads=3, num_kv_heads=1, head_dim=8,
                attention="linear", positional="none", linear_chunk=4)
    return transformer.TransformerConfig(**{**keys, **overrides})


def _phi(x):
    return np.where(x > 0, x + 1.0, np.exp(x))


def _numpy_recurrence(q, k, v, log_gate):
    """float64 loop: S_t = g_t S + phi(k_t) v_t^T, z_t = g_t z + phi(k_t), out_t = S^T phi(q_t) / (z . phi(q_t))."""
    q, k, v, g = (np.asarray(t, np.float64) for t in (q, k, v, np.exp(log_gate)))
    batch, length, heads, width = q.shape
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            s, z = np.zeros((width, width)), np.zeros(width)
            for t in range(length):
                s = g[b, t, h] * s + np.outer(_phi(k[b, t, h]), v[b, t, h])
                z = g[b, t, h] * z + _phi(k[b, t, h])
                out[b, t, h] = s.T @ _phi(q[b, t, h]) / (z @ _phi(q[b, t, h]) + linear_attention.EPSILON)
    return out


@pytest.mark.parametrize("gated", [False, True])
def test_the_layer_equals_a_numpy_loop_over_its_recurrence(gated):
    """Odd length (11) over chunks of 4, GQA (3 query heads on 1 kv head), batch 2."""
    cfg = _cfg(linear_gate=gated)
    layer = linear_attention.LinearAttention(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 11, cfg.d_model))
    params = nn.meta.unbox(layer.init(jax.random.key(1), x, 0)["params"])
    if gated:  # a strong, varied decay, so that the gate matters
        params["gate_bias"] = jnp.array([-2.0, 0.0, 2.0])
    out, _ = layer.apply({"params": params}, x, 0)

    def project(name):
        return jnp.einsum("btd,dhe->bthe", x, params[name])

    q, k, v = project("query"), jnp.repeat(project("key"), 3, axis=2), jnp.repeat(project("value"), 3, axis=2)
    log_gate = (jax.nn.log_sigmoid(x @ params["gate"] + params["gate_bias"]) / 16 if gated
                else jnp.zeros((2, 11, 3)))
    heads_out = _numpy_recurrence(q, k, v, log_gate)
    want = np.einsum("bthe,hed->btd", heads_out, np.asarray(params["out"], np.float64))
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


def test_ssd_at_zero_decay_is_linear_attention_in_its_quadratic_form():
    """SSD's chunked scan with a = 0, x = v, b = phi(k), c = phi(q) gives (phi(Q) phi(K)^T * causal mask) V."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 13, 2, 5)) for _ in range(3))
    y, _ = ssd.ssd_chunked(jnp.asarray(v), jnp.zeros((1, 13, 2)), jnp.asarray(linear_attention.feature_map(k)),
                           jnp.asarray(linear_attention.feature_map(q)), chunk_size=4)
    scores = np.einsum("bthe,bshe->bhts", _phi(q), _phi(k)) * np.tril(np.ones((13, 13)))
    np.testing.assert_allclose(y, np.einsum("bhts,bshe->bthe", scores, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(linear_gate=True, positional="rope"), slow(dict())])
def test_cached_decoding_equals_the_full_pass(overrides):
    cfg = _cfg(**overrides)
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 14), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    decoded, _ = decode_in_pieces(model, params, tokens, model.init_cache(2, cfg.max_len), [7, 1, 1, 1, 1, 3])
    np.testing.assert_allclose(decoded, model.apply({"params": params}, tokens), rtol=1e-5, atol=1e-5)
    for max_len in (32, 4096):  # the state's size does not depend on the length
        assert {leaf.shape for leaf in jax.tree.leaves(jax.eval_shape(lambda n=max_len: model.init_cache(2, n)))} == {
            (cfg.num_layers, 2, 3, 9, 8)}


@pytest.mark.slow  # the default suite decodes linear attention in a hybrid through test_mamba1's MSALC
def test_hybrid_with_linear_attention_layers_decodes_like_its_full_pass():
    pattern = "SLA"
    cfg = hybrid.HybridConfig(vocab_size=23, max_len=32, d_model=32, num_layers=len(pattern), layer_pattern=pattern,
                              num_heads=4, ssm_head_dim=16, ssm_state=8, chunk_size=4, d_mlp=48, linear_gate=True,
                              linear_chunk=4)
    assert not hybrid.validate(cfg)
    model = hybrid.HybridLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    assert f"layer_{pattern.index('L')}_linear_attention" in params["periods"]
    decoded, _ = decode_in_pieces(model, params, tokens, model.init_cache(2, cfg.max_len), [5, 1, 1, 6])
    np.testing.assert_allclose(decoded, model.apply({"params": params}, tokens), rtol=1e-4, atol=1e-4)


def test_a_left_padding_mask_hides_the_padded_keys():
    """With the first 3 positions masked, the rest equals the model run on the unpadded tokens (no positions)."""
    cfg = _cfg(num_layers=1)
    layer = linear_attention.LinearAttention(cfg)
    x = jax.random.normal(jax.random.key(0), (1, 9, cfg.d_model))
    params = layer.init(jax.random.key(1), x, 0)["params"]
    key_mask = jnp.arange(9)[None] >= 3
    padded, _ = layer.apply({"params": params}, x, 0, None, key_mask)
    alone, _ = layer.apply({"params": params}, x[:, 3:], 0)
    np.testing.assert_allclose(padded[:, 3:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("message,overrides", [
    ("model.attention='linear' has no score matrix to bias; model.positional='alibi'", dict(positional="alibi")),
    ("model.attention_pattern='sliding' must be 'causal'", dict(attention_pattern="sliding", attention_window=4)),
    ("model.kv_cache_dtype='int8': linear attention decodes from a running sum", dict(kv_cache_dtype="int8")),
])
def test_bad_linear_attention_keys_are_refused(message, overrides):
    assert any(message in p for p in linear_attention.LinearAttention.validate(_cfg(**overrides))), message


@pytest.mark.parametrize("gated", [slow(True)])
def test_trains_with_the_one_device_losses_on_a_2x2x2_mesh(gated, tmp_path):
    def config():
        c = make_tiny_lm_config()
        c.model.update(attention="linear", linear_gate=gated, linear_chunk=4)
        return c
    assert_mesh_run_matches_one_device(config, tmp_path)
