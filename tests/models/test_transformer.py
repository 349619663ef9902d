"""Transformer: shapes and dtypes, causality, logical axis names, KV-cache decoding == full pass."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer
from tests.conftest import slow

VARIANTS = {  # name -> TransformerConfig overrides
    "gqa_rope_rmsnorm_swiglu": dict(num_heads=4, num_kv_heads=2, positional="rope", norm="rmsnorm", activation="swiglu"),
    "mha_learned_layernorm_gelu_tied": dict(num_heads=2, positional="learned", norm="layernorm", activation="gelu",
                                            tie_embeddings=True),
    "mqa_nopos_nonorm_relu_bias": dict(num_heads=3, num_kv_heads=1, head_dim=8, positional="none", norm="none",
                                       activation="relu", mlp_bias=True),
}


def make(overrides, **extra):
    cfg = transformer.TransformerConfig(**{**dict(vocab_size=23, max_len=16, d_model=24, num_layers=2, d_mlp=40),
                                           **overrides, **extra})
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    return cfg, model, params, tokens


class TransformerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_dtypes(self):
        for dtype in ("float32", "bfloat16"):
            cfg, model, params, tokens = make(VARIANTS["gqa_rope_rmsnorm_swiglu"], dtype=dtype)
            logits = self.variant(lambda p, t: model.apply({"params": p}, t))(params, tokens)
            chex.assert_shape(logits, (2, 11, cfg.vocab_size))
            chex.assert_type(logits, jnp.float32)
            chex.assert_tree_all_finite(logits)
            for leaf in jax.tree.leaves(params):
                assert leaf.dtype == jnp.float32  # parameters stay float32 whatever the compute dtype

    def test_causal(self):
        _, model, params, tokens = make(VARIANTS["gqa_rope_rmsnorm_swiglu"])
        changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 23)
        a, b = model.apply({"params": params}, tokens), model.apply({"params": params}, changed)
        np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
        assert not np.allclose(a[:, 7:], b[:, 7:])

    def test_every_parameter_has_logical_axes(self):
        cfg = transformer.TransformerConfig(vocab_size=23, max_len=16, d_model=24, num_layers=2, d_mlp=40,
                                            positional="learned")
        boxed = transformer.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), leaf
            assert len(leaf.names) == leaf.value.ndim
        stacked = boxed["layers"]["mlp"]["wi"]["kernel"]
        assert stacked.names == ("layers", "embed", "mlp") and stacked.value.shape == (2, 24, 40)

    @pytest.mark.slow
    def test_remat_changes_nothing(self):
        overrides = VARIANTS["gqa_rope_rmsnorm_swiglu"]
        _, model, params, tokens = make(overrides)
        loss = lambda m: (lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2))  # noqa: E731
        reference = jax.value_and_grad(loss(model))(params)
        for policy in ("full", "dots"):
            _, remat_model, _, _ = make(overrides, remat=policy)
            chex.assert_trees_all_close(jax.value_and_grad(loss(remat_model))(params), reference, atol=1e-6)

    @pytest.mark.slow
    def test_scan_unroll_changes_nothing(self):
        """Two layers per scan iteration (and the stack fully unrolled) compute the same loss and gradients."""
        overrides = VARIANTS["mha_learned_layernorm_gelu_tied"]
        _, model, params, tokens = make(overrides, num_layers=4)
        loss = lambda m: (lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2))  # noqa: E731
        reference = jax.value_and_grad(loss(model))(params)
        for unroll in (2,):  # 2 layers per iteration of 4 (scan_unroll=num_layers unrolls it all: bench_train)
            _, unrolled, unrolled_params, _ = make(overrides, num_layers=4, scan_unroll=unroll)
            chex.assert_trees_all_equal_shapes(unrolled_params, params)  # the same stacked parameters
            chex.assert_trees_all_close(jax.value_and_grad(loss(unrolled))(params), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", [v if v != "mha_learned_layernorm_gelu_tied" else slow(v) for v in sorted(VARIANTS)])
@pytest.mark.parametrize("prefill", [slow(1), 4])
def test_kv_cache_decode_equals_full_pass(variant, prefill):
    cfg, model, params, tokens = make(VARIANTS[variant])
    full = model.apply({"params": params}, tokens)
    decode = jax.jit(lambda p, t, c, s: model.apply({"params": p}, t, c, s, method=transformer.Transformer.decode))
    cache = model.init_cache(batch=2, max_len=cfg.max_len)
    logits, cache = decode(params, tokens[:, :prefill], cache, 0)
    pieces = [logits]
    for i in range(prefill, tokens.shape[1]):
        logits, cache = decode(params, tokens[:, i:i + 1], cache, i)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("variant", [slow("gqa_rope_rmsnorm_swiglu"), slow("mha_learned_layernorm_gelu_tied"),
                                     slow("mqa_nopos_nonorm_relu_bias")])
def test_pallas_attention_gives_the_xla_logits_gradients_and_decoding(variant):
    """attention_impl="pallas" (flash kernels, interpret mode here): the same logits and parameter
    gradients as the XLA reference, and cached decoding (which uses the reference) still matches it."""
    cfg, model, params, tokens = make(VARIANTS[variant])
    _, flash_model, _, _ = make(VARIANTS[variant], attention_impl="pallas")
    loss = lambda m: (lambda p: jnp.mean(jnp.sin(m.apply({"params": p}, tokens))))  # noqa: E731
    want = jax.jit(jax.value_and_grad(loss(model)))(params)
    got = jax.jit(jax.value_and_grad(loss(flash_model)))(params)
    chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)
    full = flash_model.apply({"params": params}, tokens)
    cache = model.init_cache(batch=2, max_len=cfg.max_len)
    logits, _ = flash_model.apply({"params": params}, tokens[:, :5], cache, 0, method=transformer.Transformer.decode)
    np.testing.assert_allclose(logits, full[:, :5], atol=2e-5, rtol=2e-5)


def test_residual_rms_monitor_is_the_rms_of_each_blocks_output():
    """The training monitor `residual_rms` of block l is sqrt(mean(x_l^2)) of the residual stream it hands on (the
    `residual` site, the scanned blocks stacked on the first axis), computed here in float64."""
    _, model, params, tokens = make(VARIANTS["gqa_rope_rmsnorm_swiglu"])
    _, state = model.apply({"params": params}, tokens, mutable=["monitors", "intermediates"])
    rms = np.asarray(state["monitors"]["layers"]["residual_rms"][0])
    stream = np.float64(state["intermediates"]["layers"]["residual"][0])  # [layers, batch, time, width]
    assert rms.shape == (2,)
    np.testing.assert_allclose(rms, np.sqrt(np.mean(stream ** 2, axis=(1, 2, 3))), rtol=1e-5)
