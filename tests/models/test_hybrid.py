"""Mamba-2 and hybrid stacks: decoding with the constant-size state equals the full pass, the
causal conv against a loop, the trainer on a sharded mesh, and config errors."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.training import validation
from models import hybrid, mamba2
from tests.conftest import assert_mesh_run_matches_one_device, make_tiny_lm_config, slow


def make(pattern, num_layers, **overrides):
    cfg = hybrid.HybridConfig(vocab_size=19, max_len=40, d_model=32, num_layers=num_layers, layer_pattern=pattern,
                              ssm_head_dim=16, ssm_state=8, ssm_groups=2, chunk_size=8, num_heads=4, num_kv_heads=2,
                              d_mlp=48, **overrides)
    model = hybrid.HybridLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    return cfg, model, params, tokens


@pytest.mark.parametrize("pattern,num_layers,impl", [
    slow("CSA", 3, "chunked"), ("S", 2, "associative_scan"),
    *[slow(p, n, impl) for p, n, impl in [
        ("SSSA", 4, "chunked"), ("S", 2, "chunked"), ("SA", 2, "chunked"), ("SA", 2, "associative_scan"),
        ("SSSA", 4, "associative_scan"), ("AS", 2, "chunked"), ("AS", 2, "associative_scan"), ("CA", 4, "chunked")]]])
def test_decode_equals_the_full_pass(pattern, num_layers, impl):
    cfg, model, params, tokens = make(pattern, num_layers, ssd_impl=impl)
    full = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)
    chex.assert_shape(full, (2, 21, cfg.vocab_size))
    decode = jax.jit(lambda p, t, c, s: model.apply({"params": p}, t, c, s, method=model.decode))
    cache = model.init_cache(2, 21)
    logits, cache = decode(params, tokens[:, :13], cache, 0)  # a prompt of 13 (not a multiple of the chunk)
    pieces = [logits]
    for t in range(13, 21):  # then one token at a time
        logits, cache = decode(params, tokens[:, t:t + 1], cache, t)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-4, atol=1e-4)
    for i, kind in enumerate(pattern):  # every state is constant in the length but the KV cache
        if kind == "S":
            chex.assert_shape(cache[f"layer_{i}_ssm"]["ssm"], (num_layers // len(pattern), 2, 4, 16, 8))
        if kind == "C":
            chex.assert_shape(cache[f"layer_{i}_conv"]["conv"], (num_layers // len(pattern), 2, 3, 32))


def test_causal_conv_matches_a_loop():
    rng = np.random.default_rng(0)
    inputs, previous = rng.standard_normal((2, 9, 5)), rng.standard_normal((2, 3, 5))
    kernel, bias = rng.standard_normal((4, 5)), rng.standard_normal(5)
    out, last = mamba2.causal_conv(jnp.asarray(inputs), jnp.asarray(previous), jnp.asarray(kernel), jnp.asarray(bias))
    padded = np.concatenate([previous, inputs], axis=1)
    for t in range(9):
        expected = bias + sum(kernel[k] * padded[:, t + k] for k in range(4))
        np.testing.assert_allclose(out[:, t], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, padded[:, -3:], rtol=1e-6)


def test_short_conv_layer_against_numpy():
    """C layer: x + conv(rmsnorm(x)) W_o, the conv over the current and conv_width - 1 previous positions."""
    cfg, model, params, tokens = make("C", 1)
    layer = jax.tree.map(np.asarray, params["periods"]["layer_0_conv"])
    x = np.asarray(params["embed"]["embedding"])[np.asarray(tokens)].astype(np.float64)  # [B, L, D]
    normed = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * layer["norm"]["scale"][0]
    kernel, bias, w_out = layer["conv_kernel"][0], layer["conv_bias"][0], layer["out_proj"][0]
    expected = np.empty_like(x)
    for t in range(x.shape[1]):
        conv = bias + sum(kernel[3 - j] * normed[:, t - j] for j in range(4) if t - j >= 0)
        expected[:, t] = x[:, t] + conv @ w_out
    got = model.apply({"params": params}, tokens, method=lambda m, t: m.stack(m.embed(t), None, 0, None, None)[0])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_parameters_match_the_paper_layout():
    cfg, model, params, _ = make("S", 1)
    mixer = params["periods"]["layer_0_ssm"]["mixer"]
    heads = 2 * 32 // 16
    assert mixer["in_proj"].shape == (1, 32, 2 * 64 + 2 * 2 * 8 + heads)  # z, x, B, C, dt
    assert mixer["conv_kernel"].shape == (1, 4, 64 + 2 * 2 * 8)
    a = -np.exp(np.asarray(mixer["A_log"]))
    assert ((a <= -1.0) & (a >= -16.0)).all()
    dt = np.asarray(jax.nn.softplus(mixer["dt_bias"]))
    assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()


@pytest.mark.parametrize("name,kernels", [slow("ssd", "xla"), slow("hybrid", "xla"), slow("hybrid", "pallas")])
def test_trains_with_the_same_losses_on_one_device_and_a_2x2x2_mesh(name, kernels, tmp_path):
    """The mesh run gives the one-device losses; with kernels="pallas" it runs the Pallas SSD and
    flash-attention kernels per shard against the XLA implementations on one device."""
    def config():
        c = make_tiny_lm_config()
        with c.unlocked():
            c.model = dataclasses.asdict(hybrid.SSDConfig() if name == "ssd" else hybrid.HybridConfig())
        c.model.update(d_model=32, num_layers=3 if name == "hybrid" else 2,
                       layer_pattern="S" if name == "ssd" else "CSA", ssm_head_dim=16,
                       ssm_state=8, chunk_size=8 if kernels == "xla" else 16, num_heads=4, num_kv_heads=2, d_mlp=64)
        return c

    overrides = dict(ssd_impl="pallas", attention_impl="pallas") if kernels == "pallas" else {}
    assert_mesh_run_matches_one_device(config, tmp_path, **overrides)


@pytest.mark.parametrize("override,message", [
    (dict(layer_pattern="SXA"), "model.layer_pattern='SXA' must be a non-empty string of S"),
    (dict(num_layers=3), "model.num_layers=3 must be a multiple of len(model.layer_pattern='SSSA')"),
    (dict(ssm_head_dim=48), "is not divisible by model.ssm_head_dim=48"),
    (dict(ssd_impl="fast"), "model.ssd_impl='fast' is not one of"),
    (dict(ssd_impl="pallas", chunk_size=24), "model.chunk_size=24 must be a power of two >= 16 for model.ssd_impl"),
    (dict(attention_impl="cuda"), "model.attention_impl='cuda' is not one of ['xla', 'pallas']"),
    (dict(num_kv_heads=3), "model.num_kv_heads=3 must divide model.num_heads=4"),
])
def test_bad_hybrid_config_is_one_clear_line(override, message):
    config = make_tiny_lm_config()
    with config.unlocked():
        config.model = dataclasses.asdict(hybrid.HybridConfig())
    config.model.update(**override)
    with pytest.raises(validation.ConfigError) as info:
        validation.validate(config, 8)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("groups", [1, 2])
def test_gated_rms_norm_per_group_against_numpy(groups):
    """mamba_ssm's RMSNormGated (norm_before_gate=False, group_size = d_inner / groups, eps 1e-5)."""
    rng = np.random.default_rng(groups)
    y, z = rng.standard_normal((2, 2, 5, 12))
    scale = rng.uniform(0.5, 2.0, 12)
    got = mamba2.gated_rms_norm(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(scale, jnp.float32),
                                groups, 1e-5)
    gated = y * z / (1 + np.exp(-z))
    expected = np.empty_like(gated)
    for g in range(groups):
        part = slice(g * 12 // groups, (g + 1) * 12 // groups)
        expected[..., part] = gated[..., part] / np.sqrt(np.mean(gated[..., part] ** 2, -1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(got, expected * scale, rtol=1e-5, atol=1e-6)
    if groups > 1:  # per group differs from one norm over all channels
        whole = gated / np.sqrt(np.mean(gated**2, -1, keepdims=True) + 1e-5) * scale
        assert not np.allclose(got, whole, atol=1e-3)


@pytest.mark.parametrize("policy", [slow("full"), slow("dots")])  # the transformer's remat test runs by default
def test_hybrid_remat_changes_nothing(policy):
    """Every layer kind under nn.remat: the same loss and gradients as without."""
    _, model, params, tokens = make("CSA", 3)
    _, remat_model, _, _ = make("CSA", 3, remat=policy)
    loss = lambda m: (lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2))  # noqa: E731
    chex.assert_trees_all_close(jax.value_and_grad(loss(remat_model))(params), jax.value_and_grad(loss(model))(params),
                                rtol=1e-5, atol=1e-6)


def test_jamba_pattern_with_moe_layers_decodes_like_its_full_pass():
    """Pattern "SE": Mamba-2, then attention with the MoE FFN (models/blocks.FFNS["moe"]), routers' state stacked;
    the default suite's decoding of a hybrid's attention and MoE layers (the other patterns' are slow)."""
    cfg, model, params, tokens = make("SE", 2, num_experts=4, top_k=2, d_expert=16, router="softmax")
    assert set(params["periods"]["layer_1_moe"]) == {"attention", "attention_norm", "mlp_norm", "moe"}
    chex.assert_shape(params["periods"]["layer_1_moe"]["moe"]["w_in"], (1, 4, 32, 16))  # [periods, E, D, F]
    full = jax.jit(model.apply)({"params": params}, tokens)
    decode = jax.jit(lambda p, t, c, s: model.apply({"params": p}, t, c, s, method=model.decode), static_argnums=3)
    logits, cache = decode(params, tokens[:, :13], model.init_cache(2, 21), 0)
    rest, _ = decode(params, tokens[:, 13:], cache, 13)
    np.testing.assert_allclose(jnp.concatenate([logits, rest], axis=1), full, rtol=1e-4, atol=1e-4)


def _numpy_mamba2(p, u, cfg, heads_per_group):
    """The mixer's equations (models/mamba2.py's docstring) in float64 NumPy, the SSD as its plain recurrence
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, from a zero state."""
    f = {k: np.asarray(v, np.float64) for k, v in p.items()}

    def silu(v):
        return v / (1 + np.exp(-v))

    batch, length, _ = u.shape
    d_inner, gn = cfg.d_inner, cfg.ssm_groups * cfg.ssm_state
    projected = u @ f["in_proj"]
    z, xbc, dt = projected[..., :d_inner], projected[..., d_inner:d_inner + cfg.conv_dim], projected[..., -cfg.ssm_heads:]
    padded = np.concatenate([np.zeros((batch, cfg.conv_width - 1, cfg.conv_dim)), xbc], 1)
    conv = f["conv_bias"] + sum(f["conv_kernel"][k] * padded[:, k:k + length] for k in range(cfg.conv_width))
    xbc = silu(conv)
    x = xbc[..., :d_inner].reshape(batch, length, cfg.ssm_heads, cfg.ssm_head_dim)
    b = xbc[..., d_inner:d_inner + gn].reshape(batch, length, cfg.ssm_groups, cfg.ssm_state)
    c = xbc[..., d_inner + gn:].reshape(batch, length, cfg.ssm_groups, cfg.ssm_state)
    dt = np.log1p(np.exp(dt + f["dt_bias"]))  # softplus, no clipping at the default limits [0, inf)
    a = -np.exp(f["A_log"])
    y = np.zeros_like(x)
    for i in range(batch):
        for h in range(cfg.ssm_heads):
            g, state = h // heads_per_group, np.zeros((cfg.ssm_head_dim, cfg.ssm_state))
            for t in range(length):
                state = np.exp(dt[i, t, h] * a[h]) * state + dt[i, t, h] * np.outer(x[i, t, h], b[i, t, g])
                y[i, t, h] = state @ c[i, t, g] + f["D"][h] * x[i, t, h]
    gated = (y.reshape(batch, length, d_inner) * silu(z)).reshape(batch, length, cfg.ssm_groups, -1)
    normed = gated / np.sqrt(np.mean(gated**2, -1, keepdims=True) + cfg.ssm_norm_eps)
    return (normed.reshape(batch, length, d_inner) * f["norm"]) @ f["out_proj"]


@pytest.mark.parametrize("impl", ["chunked", "sequential"])
def test_the_mamba2_mixer_against_a_float64_numpy_transcription(impl):
    """Every parameter random (dt_bias, A_log, D, the conv bias, the norm scale), 2 groups of 2 heads, a length
    that is not a multiple of the chunk."""
    cfg = dataclasses.replace(make("S", 1)[0], ssd_impl=impl, ssm_head_dim=8, d_model=16, ssm_state=6, chunk_size=4)
    mixer = mamba2.Mamba2(cfg)
    u = jax.random.normal(jax.random.key(2), (2, 7, cfg.d_model))
    state = mamba2.init_state(cfg, 2)
    params = nn.meta.unbox(jax.jit(mixer.init)(jax.random.key(3), u, state)["params"])
    rng = np.random.default_rng(4)
    params = {k: (v + rng.normal(0, 0.3, v.shape) if k in ("dt_bias", "D", "conv_bias", "norm", "A_log") else v)
              .astype(np.float32) for k, v in params.items()}
    got, _ = jax.jit(mixer.apply)({"params": params}, u, state)
    want = _numpy_mamba2(params, np.asarray(u, np.float64), cfg, cfg.ssm_heads // cfg.ssm_groups)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
