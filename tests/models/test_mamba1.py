"""Mamba-1 (models/mamba1.py): the selective scan and its decoding step against a float64 NumPy loop; the S4D-real
initialisation; Mamba-1, Mamba-2, softmax and linear attention and conv layers in one hybrid pattern decoding like its
full pass; the `mamba` family on the 2x2x2 mesh. (Its logits against transformers' MambaForCausalLM:
tests/experiments/test_import_hf.py.)"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import hybrid, mamba1
from tests.conftest import assert_mesh_run_matches_one_device, make_tiny_lm_config, slow


def _numpy_scan(x, dt, a, b, c, h):
    """h_t = exp(dt_t a) h + dt_t x_t b_t, y_t = h_t c_t, one position and channel at a time in float64."""
    x, dt, a, b, c, h = (np.asarray(t, np.float64).copy() for t in (x, dt, a, b, c, h))
    batch, length, channels = x.shape
    y = np.zeros_like(x)
    for i in range(batch):
        for t in range(length):
            for d in range(channels):
                h[i, d] = np.exp(dt[i, t, d] * a[d]) * h[i, d] + dt[i, t, d] * x[i, t, d] * b[i, t]
                y[i, t, d] = h[i, d] @ c[i, t]
    return y, h


@pytest.mark.parametrize("scan", [mamba1.selective_scan, mamba1.selective_scan_sequential])
def test_the_selective_scan_and_its_step_equal_a_numpy_loop(scan):
    rng = np.random.default_rng(0)
    batch, length, channels, n = 2, 13, 6, 5
    x, b, c = rng.normal(size=(batch, length, channels)), rng.normal(size=(batch, length, n)), rng.normal(size=(batch, length, n))
    dt = np.log1p(np.exp(rng.normal(size=(batch, length, channels))))  # softplus: positive steps
    a = -np.exp(rng.normal(size=(channels, n)))
    h0 = rng.normal(size=(batch, channels, n))
    want_y, want_h = _numpy_scan(x, dt, a, b, c, h0)
    as32 = [jnp.asarray(t, jnp.float32) for t in (x, dt, a, b, c, h0)]
    y, h = scan(*as32)
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h, want_h, rtol=1e-4, atol=1e-4)
    y0, h1 = mamba1.selective_step(as32[0][:, 0], as32[1][:, 0], as32[2], as32[3][:, 0], as32[4][:, 0], as32[5])
    np.testing.assert_allclose(y0, want_y[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h1, _numpy_scan(x[:, :1], dt[:, :1], a, b[:, :1], c[:, :1], h0)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the default suite keeps the sequential scan against the NumPy loop and the model's prefix logits
def test_the_sequential_training_form_has_the_parallel_prefix_gradients():
    """mamba1_scan=sequential changes how the scan runs, not what it computes: the same values and gradients."""
    keys = jax.random.split(jax.random.key(3), 6)
    x, b, c = (jax.random.normal(k, s) for k, s in zip(keys, [(1, 11, 5), (1, 11, 3), (1, 11, 3)]))
    dt, a = jax.nn.softplus(jax.random.normal(keys[3], (1, 11, 5))), -jnp.exp(jax.random.normal(keys[4], (5, 3)))
    h0 = jax.random.normal(keys[5], (1, 5, 3))

    def gradients(scan):
        def loss(*args):
            y, final = scan(*args)
            return jnp.sum(jnp.sin(y)) + jnp.sum(final**2)
        return jax.grad(loss, argnums=range(6))(x, dt, a, b, c, h0)
    for want, got in zip(gradients(mamba1.selective_scan), gradients(mamba1.selective_scan_sequential)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_mamba1_model_with_the_sequential_scan_gives_the_prefix_logits(monkeypatch):
    """The config key reaches the mixer (the recurrence is traced only when it is set): one set of parameters, both
    training forms, equal logits."""
    calls = []
    sequential = mamba1.selective_scan_sequential
    monkeypatch.setattr(mamba1, "selective_scan_sequential", lambda *args: calls.append(1) or sequential(*args))
    cfg = hybrid.MambaConfig(vocab_size=19, max_len=16, d_model=32, num_layers=2, ssm_state=8)
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, 19)
    params = hybrid.HybridLM(cfg).init(jax.random.key(5), tokens)
    prefix = hybrid.HybridLM(cfg).apply(params, tokens)
    assert not calls
    recurrence = hybrid.HybridLM(dataclasses.replace(cfg, mamba1_scan="sequential")).apply(params, tokens)
    assert calls
    np.testing.assert_allclose(recurrence, prefix, rtol=1e-4, atol=1e-5)


def _hybrid(pattern, **overrides):
    return hybrid.HybridConfig(vocab_size=19, max_len=40, d_model=32, num_layers=len(pattern), layer_pattern=pattern,
                               ssm_head_dim=16, ssm_state=8, chunk_size=4, num_heads=4, num_kv_heads=2, d_mlp=48,
                               linear_chunk=4, **overrides)


def test_a_is_initialised_s4d_real_and_dt_in_its_range():
    cfg = hybrid.MambaConfig(vocab_size=19, max_len=16, d_model=32, num_layers=1)
    params = hybrid.HybridLM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    mixer = nn.meta.unbox(params)["periods"]["layer_0_mamba1"]["mixer"]
    np.testing.assert_allclose(-np.exp(mixer["A_log"][0]), -np.arange(1, 17) * np.ones((64, 1)), rtol=1e-6)
    dt = jax.nn.softplus(mixer["dt_bias"])
    assert mixer["A_log"].shape == (1, 64, 16) and float(dt.min()) >= cfg.dt_min * 0.999 and float(dt.max()) <= cfg.dt_max
    assert mixer["dt_proj"].shape == (1, 2, 64)  # dt rank ceil(32 / 16)


@pytest.mark.parametrize("pattern", ["M", slow("MSALC")])
def test_every_mixer_in_one_pattern_decodes_like_its_full_pass(pattern):
    cfg = _hybrid(pattern)
    assert not hybrid.validate(cfg)
    model = hybrid.HybridLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    decode = jax.jit(lambda t, c, s: model.apply({"params": params}, t, c, s, method=model.decode))
    cache, start, pieces = model.init_cache(2, cfg.max_len), 0, []
    for size in (6, 1, 1, 5):
        logits, cache = decode(tokens[:, start:start + size], cache, start)
        pieces.append(logits)
        start += size
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), model.apply({"params": params}, tokens), rtol=1e-4, atol=1e-4)


def test_a_pure_mamba1_stack_does_not_read_the_mamba2_keys():
    assert not hybrid.validate(hybrid.MambaConfig(d_model=24, ssm_head_dim=64))
    assert hybrid.validate(hybrid.HybridConfig(d_model=24, ssm_head_dim=64, layer_pattern="SA"))


@pytest.mark.parametrize("pattern", [slow("M"), slow("MLA")])
def test_trains_with_the_one_device_losses_on_a_2x2x2_mesh(pattern, tmp_path):
    def config():
        c = make_tiny_lm_config()
        with c.unlocked():
            c.model = dataclasses.asdict(hybrid.MambaConfig() if pattern == "M" else hybrid.HybridConfig())
        c.model.update(d_model=32, num_layers=len(pattern) if pattern != "M" else 2, layer_pattern=pattern, ssm_state=8,
                       num_heads=4, num_kv_heads=2, d_mlp=64, linear_chunk=4)
        return c
    assert_mesh_run_matches_one_device(config, tmp_path)


@pytest.mark.parametrize("d_model,dt_rank,expected", [(33, 0, 3), (32, 0, 2), (768, 0, 48), (40, 5, 5)])
def test_dt_rank_defaults_to_the_papers_ceil_of_width_over_16(d_model, dt_rank, expected):
    """0 means ceil(d_model / 16) (Mamba's "auto", which transformers' MambaConfig also uses); the x_proj that makes
    dt, B and C has that many dt columns."""
    cfg = hybrid.MambaConfig(vocab_size=19, max_len=8, d_model=d_model, num_layers=1, ssm_state=4, dt_rank=dt_rank)
    assert cfg.mamba1_dt_rank == expected
