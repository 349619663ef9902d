"""Multi-head latent attention (models/mla.py): the module against a float64 NumPy reference, the absorbed
decoding against the expanded form, the latent cache's size, the Pallas path, and training on a 2x2x2 mesh."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import mla, transformer
from tests.conftest import assert_mesh_run_matches_one_device, make_tiny_lm_config, slow
from tests.models.test_attention_kinds import numpy_rope

# Awkward widths: 3 heads, d_n=6, d_r=4, d_v=5, r=7 (r + d_r = 11 cached numbers), q_lora_rank 9.
WIDTHS = dict(num_heads=3, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, kv_lora_rank=7)


def _module(**overrides):
    cfg = transformer.TransformerConfig(d_model=16, attention="mla", **{**WIDTHS, **overrides})
    return cfg, mla.MultiHeadLatentAttention(cfg)


def _rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def numpy_mla(p, x, theta, q_lora):
    """float64: the DeepSeek-V2 equations, head by head, causal."""
    b, t, _ = x.shape
    if q_lora:
        q = _rms(x @ p["query_down"], p["query_norm"]["scale"]) @ p["query_up"].reshape(q_lora, -1)
    else:
        q = x @ p["query"].reshape(x.shape[-1], -1)
    heads, d_n, d_r = 3, 6, 4
    q = q.reshape(b, t, heads, d_n + d_r)
    c_kv = _rms(x @ p["kv_down"], p["kv_norm"]["scale"])  # [B, T, r]
    k_rope = numpy_rope((x @ p["key_rope"])[:, :, None], np.arange(t), theta)[:, :, 0]
    q_rope = numpy_rope(q[..., d_n:], np.arange(t), theta)
    out = np.zeros((b, t, heads, 5))
    for h in range(heads):
        k = np.concatenate([c_kv @ p["key_up"][:, h], k_rope], -1)  # [B, T, d_n + d_r]
        v = c_kv @ p["value_up"][:, h]
        qh = np.concatenate([q[:, :, h, :d_n], q_rope[:, :, h]], -1)
        s = np.einsum("btd,bsd->bts", qh, k) / np.sqrt(d_n + d_r)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, h] = np.einsum("bts,bsd->btd", w / w.sum(-1, keepdims=True), v)
    return out.reshape(b, t, -1) @ p["out"].reshape(-1, x.shape[-1])


@pytest.mark.parametrize("q_lora_rank", [slow(0), 9])
def test_mla_against_a_float64_numpy_reference(q_lora_rank):
    cfg, module = _module(q_lora_rank=q_lora_rank, rope_theta=500.0)
    x = np.random.default_rng(0).standard_normal((2, 7, 16)).astype(np.float32)
    params = nn.meta.unbox(module.init(jax.random.key(0), jnp.asarray(x), 0)["params"])
    params["kv_norm"]["scale"] = params["kv_norm"]["scale"] * 1.5  # a non-trivial norm scale
    out, _ = module.apply({"params": params}, jnp.asarray(x), 0)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    np.testing.assert_allclose(out, numpy_mla(p64, x.astype(np.float64), 500.0, q_lora_rank), rtol=2e-4, atol=2e-5)


def test_absorbed_equals_expanded_attention_on_random_inputs():
    """Batch 1, 3 heads, 5 queries over 9 latent positions with a mask, r=7 != d_n=6 != d_v=5."""
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in
              [(1, 5, 3, 6), (1, 5, 3, 4), (1, 9, 7), (1, 9, 4), (7, 3, 6), (7, 3, 5)]]
    mask = jnp.asarray(rng.random((5, 9)) < 0.7).at[:, 0].set(True)
    absorbed = mla.absorbed_attention(*map(jnp.asarray, arrays), mask)
    expanded = mla.expanded_attention(*map(jnp.asarray, arrays), mask)
    np.testing.assert_allclose(absorbed, expanded, rtol=1e-5, atol=1e-5)


def _lm(**overrides):
    cfg = transformer.TransformerConfig(vocab_size=29, max_len=16, d_model=16, num_layers=2, d_mlp=24,
                                        attention="mla", **{**WIDTHS, **overrides})
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    return cfg, model, params, tokens


def test_the_cache_holds_the_latent_and_the_rotary_key_only():
    """Exactly r + d_r = 11 numbers per token per layer, whatever the head count and widths."""
    cfg = transformer.TransformerConfig(d_model=16, num_layers=2, attention="mla", q_lora_rank=9, **WIDTHS)
    cache = transformer.Transformer(cfg).init_cache(2, 16)
    assert {k: v.shape for k, v in cache.items()} == {"latent": (2, 2, 16, 7), "rope_key": (2, 2, 16, 4)}
    assert sum(v.size for v in jax.tree.leaves(cache)) == 2 * 2 * 16 * mla.cache_numbers_per_token(cfg) == 2 * 2 * 16 * 11


@pytest.mark.parametrize("absorb", [True, slow(False)])  # the absorbed form decodes in production
def test_cached_decoding_in_either_form_equals_the_full_pass(absorb):
    """Decoding (prompt of 4, then one token at a time) gives the full pass's logits in the absorbed and the
    naive expanded form, with low-rank queries."""
    cfg, model, params, tokens = _lm(q_lora_rank=9, mla_absorb=absorb)
    decode = jax.jit(lambda p, t, c, s: model.apply({"params": p}, t, c, s, method=model.decode))
    logits, cache = decode(params, tokens[:, :4], model.init_cache(2, cfg.max_len), 0)
    pieces = [logits]
    for t in range(4, tokens.shape[1]):
        logits, cache = decode(params, tokens[:, t:t + 1], cache, t)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), model.apply({"params": params}, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # with the mesh runs below
def test_the_pallas_flash_kernels_give_the_xla_logits():
    """The value width 5 differs from the query/key width 10: padded for the kernel, cut back after."""
    cfg, model, params, tokens = _lm()
    flash = transformer.Transformer(dataclasses.replace(cfg, attention_impl="pallas"))
    np.testing.assert_allclose(flash.apply({"params": params}, tokens), model.apply({"params": params}, tokens),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_parameters_split_heads_over_tensor():
    _, model, _, tokens = _lm(q_lora_rank=9)
    boxed = jax.jit(model.init)(jax.random.key(1), tokens)["params"]["layers"]["attention"]
    assert boxed["key_up"].names == ("layers", "kv_lora", "heads", "head_dim")
    assert boxed["query_up"].names == ("layers", "q_lora", "heads", "head_dim")
    assert boxed["out"].names == ("layers", "heads", "head_dim", "embed")


@pytest.mark.parametrize("impl", [slow("xla"), slow("pallas")])
def test_mla_trains_with_the_one_device_losses_on_a_2x2x2_mesh(impl, tmp_path):
    def config():
        c = make_tiny_lm_config()
        c.model.update(attention="mla", positional="rope", num_heads=4, num_kv_heads=0, q_lora_rank=12, kv_lora_rank=16,
                       qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
        return c
    assert_mesh_run_matches_one_device(config, tmp_path, attention_impl=impl)


@pytest.mark.slow  # a width-256 MLA initialised
def test_every_kernel_starts_lecun_normal_in_its_contracted_axes():
    """std 1 / sqrt(fan_in), fan_in the size of what the kernel contracts: the model width for the down and key-rope
    projections, the latent rank for the up projections, heads x d_v for the output."""
    cfg = transformer.TransformerConfig(d_model=256, attention="mla", num_heads=4, qk_nope_head_dim=32,
                                        qk_rope_head_dim=16, v_head_dim=24, kv_lora_rank=48, q_lora_rank=96)
    params = mla.MultiHeadLatentAttention(cfg).init(jax.random.key(0), jnp.zeros((1, 2, 256)), 0)["params"]
    fan_in = {"query_down": 256, "query_up": 96, "kv_down": 256, "key_rope": 256, "key_up": 48, "value_up": 48,
              "out": 4 * 24}
    for name, fan in fan_in.items():
        w = np.asarray(nn.meta.unbox(params[name]))
        assert np.std(w) == pytest.approx(fan**-0.5, rel=0.08), name


def test_each_up_projection_starts_at_variance_one_over_the_latent_rank():
    """LeCun-normal over the contracted axis alone: the up-projections [rank, heads, width] from the latent start with
    variance 1 / rank, whatever the heads (1 / (rank * heads) if the heads axis were counted as receptive field)."""
    cfg, module = _module(num_heads=8, kv_lora_rank=16, qk_nope_head_dim=16, v_head_dim=16)
    x = jnp.zeros((1, 3, cfg.d_model))
    params = nn.meta.unbox(module.init(jax.random.key(0), x, 0)["params"])
    for name in ("key_up", "value_up"):
        weight = np.float64(params[name])
        assert weight.shape == (16, 8, 16)
        np.testing.assert_allclose(weight.std(), 16 ** -0.5, rtol=0.1)  # 2,048 draws: about 2% standard error
