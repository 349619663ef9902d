"""Attention patterns (models/attention_patterns.py): the masks against loops over their definitions; a sliding-window
layer against the unwindowed model run on each window alone; cached decoding (the sliding window's ring buffer,
whose size does not grow with the length; the sparse patterns' full cache) against the full pass; the flash kernels
inside the model against the XLA path; training on the 2x2x2 mesh; bad keys refused."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention_patterns, transformer
from models.gqa import GroupedQueryAttention
from tests.conftest import assert_mesh_run_matches_one_device, decode_in_pieces, make_tiny_lm_config, slow

PATTERNS = {
    "sliding": dict(attention_pattern="sliding", attention_window=4),
    "strided": dict(attention_pattern="strided", sparse_stride=3),
    "fixed": dict(attention_pattern="fixed", sparse_stride=4, sparse_summary=2),
}


def _cfg(**overrides):
    keys = dict(vocab_size=23, max_len=32, d_model=24, num_layers=2, d_mlp=40, num_heads=3, num_kv_heads=1, head_dim=8)
    return transformer.TransformerConfig(**{**keys, **overrides})


def _sees(pattern, i, j, window=4, stride=3, summary=2):
    """Child et al.'s definitions, one pair at a time."""
    if j > i:
        return False
    return {"causal": True,
            "sliding": i - j < window,
            "strided": i - j < stride or (i - j) % stride == 0,
            "fixed": j // stride == i // stride or j % stride >= stride - summary}[pattern]


@pytest.mark.parametrize("pattern", ["causal", "sliding", "strided", "fixed"])
def test_masks_follow_their_definitions(pattern):
    cfg = _cfg(attention_pattern=pattern, attention_window=4 * (pattern == "sliding"), sparse_stride=3, sparse_summary=2)
    q_positions, k_positions = np.arange(5, 17), np.array([-3, -1, *range(17)])  # negative: an empty ring slot
    got = attention_patterns.visible(cfg, jnp.asarray(q_positions), jnp.asarray(k_positions))
    want = [[j >= 0 and _sees(pattern, i, j) for j in k_positions] for i in q_positions]
    np.testing.assert_array_equal(got, want)


def test_ring_positions_hold_the_latest_position_of_each_slot():
    for start in range(0, 13):
        want = [max((p for p in range(start) if p % 5 == slot), default=-1) for slot in range(5)]
        got = np.asarray(attention_patterns.ring_positions(start, 5))
        np.testing.assert_array_equal(np.where(got < 0, -1, got), want)


def _model_and_params(cfg, tokens):
    model = transformer.Transformer(cfg)
    return model, nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])


@pytest.mark.slow
@pytest.mark.parametrize("positional", ["rope", slow("alibi")])
def test_a_sliding_window_layer_sees_exactly_its_window(positional):
    """One layer with relative positions: the logits at position i are those of the unwindowed model run on the
    window's tokens alone (i - W, i]."""
    window = 4
    cfg = _cfg(num_layers=1, positional=positional, attention_pattern="sliding", attention_window=window)
    tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, cfg.vocab_size)
    model, params = _model_and_params(cfg, tokens)
    windowed = model.apply({"params": params}, tokens)
    causal = transformer.Transformer(dataclasses.replace(cfg, attention_pattern="causal", attention_window=0))
    last_logits = jax.jit(lambda t: causal.apply({"params": params}, t)[:, -1])  # 4 lengths: 4 compiles
    for i in range(tokens.shape[1]):
        np.testing.assert_allclose(windowed[:, i], last_logits(tokens[:, max(0, i - window + 1):i + 1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern,kv_cache_dtype", [("sliding", "float"), slow("strided", "float"), slow("fixed", "float"),
                                                    slow("sliding", "int8")])
def test_cached_decoding_equals_the_full_pass(pattern, kv_cache_dtype):
    """A 7-token prefill (longer than the 4-slot ring), single tokens, then a 3-token chunk that wraps the ring."""
    cfg = _cfg(**PATTERNS[pattern], kv_cache_dtype=kv_cache_dtype)
    tokens = jax.random.randint(jax.random.key(0), (2, 14), 0, cfg.vocab_size)
    model, params = _model_and_params(cfg, tokens)
    cache = model.init_cache(2, cfg.max_len)
    decoded, _ = decode_in_pieces(model, params, tokens, cache, [7, 1, 1, 1, 1, 3])
    tolerance = 1e-5 if kv_cache_dtype == "float" else 5e-2
    np.testing.assert_allclose(decoded, model.apply({"params": params}, tokens), rtol=tolerance, atol=tolerance)


def test_the_sliding_window_cache_does_not_grow_with_the_length():
    cfg = _cfg(**PATTERNS["sliding"])
    model = transformer.Transformer(cfg)
    for max_len in (32, 4096):
        shapes = {leaf.shape for leaf in jax.tree.leaves(jax.eval_shape(lambda n=max_len: model.init_cache(2, n)))}
        assert shapes == {(cfg.num_layers, 2, 4, 1, 8)}, shapes
    short = dataclasses.replace(cfg, attention_window=64)  # a window longer than the sequences: max_len slots
    assert jax.tree.leaves(transformer.Transformer(short).init_cache(1, 32))[0].shape[2] == 32


@pytest.mark.parametrize("positional", [slow("alibi"), slow("rope")])  # in-model flash: test_lm's pallas mesh
def test_the_flash_kernels_give_the_xla_sliding_window_inside_the_model(positional):
    """Values and parameter gradients; with ALiBi computed inside the kernels from its slopes."""
    cfg = _cfg(**PATTERNS["sliding"], positional=positional)
    tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, cfg.vocab_size)
    model, params = _model_and_params(cfg, tokens)
    flash = transformer.Transformer(dataclasses.replace(cfg, attention_impl="pallas"))

    def loss(model, params):
        return jnp.mean(jax.nn.log_softmax(model.apply({"params": params}, tokens))[..., 0])

    np.testing.assert_allclose(flash.apply({"params": params}, tokens), model.apply({"params": params}, tokens),
                               rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(jax.grad(lambda p: loss(flash, p))(params)),
                         jax.tree.leaves(jax.grad(lambda p: loss(model, p))(params))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("message,overrides", [
    ("model.attention_pattern='sliding' needs model.attention_window >= 1, got 0", dict(attention_pattern="sliding")),
    ("model.attention_window=8 is read only by model.attention_pattern='sliding', not 'causal'",
     dict(attention_window=8)),
    ("model.attention_pattern='strided' needs model.sparse_stride >= 2, got 0", dict(attention_pattern="strided")),
    ("model.sparse_summary=5 must be at most model.sparse_stride=4",
     dict(attention_pattern="fixed", sparse_stride=4, sparse_summary=5)),
    ("model.attention_pattern='fixed' needs model.attention_impl='xla'",
     dict(attention_pattern="fixed", sparse_stride=4, attention_impl="pallas")),
])
def test_bad_pattern_keys_are_refused(message, overrides):
    assert any(message in p for p in GroupedQueryAttention.validate(_cfg(**overrides))), message


@pytest.mark.parametrize("pattern", [slow("sliding")])  # (the sparse masks are the same path: a mask)
def test_trains_with_the_one_device_losses_on_a_2x2x2_mesh(pattern, tmp_path):
    def config():
        c = make_tiny_lm_config()
        c.model.update(**PATTERNS[pattern])
        return c
    assert_mesh_run_matches_one_device(config, tmp_path)


def test_packed_rows_reach_a_cache_only_through_one_of_their_own_length():
    """GQA's guard (the config checks refuse these cases earlier, so only a direct call reaches it): packed rows
    through a cache longer than the pass, or through a sliding window's ring, are refused; through a cache of the
    pass's own length (MoR's shared keys and values) they attend within their documents."""
    import flax.linen as nn

    from models import packing

    x = jax.random.normal(jax.random.key(0), (1, 6, 8))
    segments = packing.make(np.array([[1, 1, 1, 2, 2, 2]]), np.array([[0, 1, 2, 0, 1, 2]]))
    cfg = _cfg(d_model=8, num_heads=2, head_dim=4)
    attention = GroupedQueryAttention(cfg)
    params = nn.meta.unbox(attention.init(jax.random.key(1), x, 0)["params"])
    own = GroupedQueryAttention.init_cache(cfg, 1, 6)
    out, _ = attention.apply({"params": params}, x, 0, own, segments=segments)
    alone, _ = attention.apply({"params": params}, x[:, 3:], 0, GroupedQueryAttention.init_cache(cfg, 1, 3))
    np.testing.assert_allclose(out[:, 3:], alone, rtol=1e-5, atol=1e-5)  # the second document as if alone
    with pytest.raises(ValueError, match="packed rows .* reach a cache only in a full pass through a cache of its own"):
        attention.apply({"params": params}, x, 0, GroupedQueryAttention.init_cache(cfg, 1, 9), segments=segments)
    ring = _cfg(d_model=8, num_heads=2, head_dim=4, attention_pattern="sliding", attention_window=4)
    ring_attention = GroupedQueryAttention(ring)
    with pytest.raises(ValueError, match="not a sliding window's ring"):
        ring_attention.apply({"params": params}, x, 0, GroupedQueryAttention.init_cache(ring, 1, 6),
                             segments=segments)
