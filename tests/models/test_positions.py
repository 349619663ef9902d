"""Positional encodings (models/positions.py) against independent references: the formulas in float64 NumPy,
`transformers`' RoPE initialisers (linear, dynamic NTK, YaRN), Bloom's ALiBi and T5's buckets (the latter three
need the `[hf]` extra); attention with a score bias against a NumPy softmax; every option's cached decoding
against its full pass, and training on the 2x2x2 mesh with the 1-device losses."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, positions, transformer
from tests.conftest import assert_mesh_run_matches_one_device, make_tiny_lm_config, slow

rng = np.random.default_rng(0)


def _cfg(**overrides):
    keys = dict(vocab_size=23, max_len=32, d_model=24, num_layers=2, d_mlp=40, num_heads=3, num_kv_heads=1, head_dim=8)
    return transformer.TransformerConfig(**{**keys, **overrides})


def test_sinusoidal_table_against_the_formula():
    pos = np.array([0, 1, 5, 77, 1000])
    table = np.asarray(positions.sinusoidal(jnp.asarray(pos), 10))
    want = np.zeros((len(pos), 10))
    for r, p in enumerate(pos):
        for i in range(5):
            want[r, 2 * i], want[r, 2 * i + 1] = np.sin(p / 10000 ** (2 * i / 10)), np.cos(p / 10000 ** (2 * i / 10))
    np.testing.assert_allclose(table, want, atol=2e-4)  # float32 angles at position 1000


def test_partial_rotary_rotates_pairs_of_the_leading_columns_only():
    x = rng.standard_normal((2, 5, 3, 12)).astype(np.float32)
    pos = np.array([0, 3, 4, 10, 31])
    cfg = _cfg(head_dim=12, rope_fraction=0.5, rope_theta=100.0)  # R = 6: pairs (0, 3), (1, 4), (2, 5)
    got = np.asarray(positions.apply_rope(cfg, jnp.asarray(x), jnp.asarray(pos)))
    want = x.astype(np.float64).copy()
    for t, p in enumerate(pos):
        for i in range(3):
            angle = p * 100.0 ** (-2 * i / 6)
            a, b = x[:, t, :, i], x[:, t, :, i + 3]
            want[:, t, :, i], want[:, t, :, i + 3] = a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[..., 6:], x[..., 6:])


def test_ntk_and_linear_frequencies_against_the_formulas():
    cfg = _cfg(rope_scaling="ntk", rope_factor=4.0, rope_theta=500.0)
    inv_freq, factor = positions.rope_frequencies(cfg, 8)
    np.testing.assert_allclose(inv_freq, (500.0 * 4.0 ** (8 / 6)) ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)
    assert factor == 1.0
    inv_freq, _ = positions.rope_frequencies(dataclasses.replace(cfg, rope_scaling="linear"), 8)
    np.testing.assert_allclose(inv_freq, 500.0 ** (-np.arange(0, 8, 2) / 8) / 4.0, rtol=1e-6)


HF_SCALINGS = [  # (our keys, transformers' rope_parameters, max_position_embeddings, seq_len)
    (dict(rope_scaling="linear", rope_factor=4.0), {"rope_type": "linear", "factor": 4.0}, 64, None),
    (dict(rope_scaling="dynamic", rope_factor=4.0, rope_original_max_len=64), {"rope_type": "dynamic", "factor": 4.0}, 64, 200),
    (dict(rope_scaling="dynamic", rope_factor=4.0, rope_original_max_len=64), {"rope_type": "dynamic", "factor": 4.0}, 64, 40),
    (dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=64),
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256, None),
    (dict(rope_scaling="yarn", rope_factor=2.5, rope_original_max_len=2048, rope_beta_fast=16.0, rope_beta_slow=2.0,
          rope_fraction=0.5),
     {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 2048, "beta_fast": 16, "beta_slow": 2,
      "partial_rotary_factor": 0.5}, 5120, None),
]


@pytest.mark.parametrize("ours,theirs,max_positions,seq_len", HF_SCALINGS)
def test_rope_scalings_equal_transformers(ours, theirs, max_positions, seq_len):
    pytest.importorskip("torch", reason="needs the [hf] extra")
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=max_positions,
                                  rope_parameters={**theirs, "rope_theta": 5000.0})
    want, want_factor = ROPE_INIT_FUNCTIONS[theirs["rope_type"]](hf, "cpu", **({"seq_len": seq_len} if seq_len else {}))
    got, factor = positions.rope_frequencies(_cfg(head_dim=32, rope_theta=5000.0, **ours), 32, seq_len)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=2e-6)
    assert factor == pytest.approx(want_factor, rel=1e-9)
    if ours["rope_scaling"] == "yarn":
        assert factor == pytest.approx(0.1 * math.log(ours["rope_factor"]) + 1)


@pytest.mark.parametrize("heads", [1, 3, 6, 8, 12])
def test_alibi_slopes_equal_blooms(heads):
    pytest.importorskip("torch", reason="needs the [hf] extra")
    torch = pytest.importorskip("torch")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1].numpy()  # slope x position 1
    np.testing.assert_allclose(positions.alibi_slopes(heads), bloom, rtol=1e-6)
    if heads == 8:  # Press et al.: 1/2, 1/4, ..., 1/256
        np.testing.assert_allclose(positions.alibi_slopes(8), 0.5 ** np.arange(1, 9), rtol=1e-6)


def _numpy_t5_bucket(distance, buckets, max_distance):
    n, exact = max(distance, 0), buckets // 2
    if n < exact:
        return n
    return min(exact + int(math.log(n / exact) / math.log(max_distance / exact) * (buckets - exact)), buckets - 1)


def test_t5_buckets_against_a_numpy_loop_and_transformers():
    distance = np.arange(-3, 300)
    got = np.asarray(positions.t5_bucket(jnp.asarray(distance), 32, 128))
    np.testing.assert_array_equal(got, [_numpy_t5_bucket(d, 32, 128) for d in distance])
    torch = pytest.importorskip("torch", reason="needs the [hf] extra")
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from transformers.models.t5.modeling_t5 import T5Attention

    theirs = T5Attention._relative_position_bucket(torch.tensor(-distance), bidirectional=False, num_buckets=32,
                                                   max_distance=128)  # their argument is key - query
    np.testing.assert_array_equal(got, theirs.numpy())


def test_t5_bias_reads_each_heads_bucket_for_each_query_key_pair():
    """b[h, i, j] = table[bucket(q_i - k_j), h] for query and key positions that are not 0..T-1 (a decoding step)."""
    module = positions.T5Bias(8, 6, 3)
    q_positions, k_positions = jnp.arange(4, 7), jnp.arange(0, 7)
    params = module.init(jax.random.key(0), q_positions, k_positions)
    table = np.asarray(jax.random.normal(jax.random.key(1), (8, 3)))
    got = module.apply({"params": {"table": jnp.asarray(table)}}, q_positions, k_positions)
    want = np.stack([[[table[_numpy_t5_bucket(i - j, 8, 6), h] for j in range(7)] for i in range(4, 7)]
                     for h in range(3)])
    assert jax.tree.leaves(params)[0].shape == (8, 3)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_attention_with_a_score_bias_against_numpy():
    """GQA (6 query heads over 2 kv heads), causal, ALiBi's bias: softmax(q k^T / sqrt(d) + bias) v in float64."""
    q, k, v = (rng.standard_normal((2, 7, h, 4)).astype(np.float32) for h in (6, 2, 2))
    pos = jnp.arange(7)
    bias = positions.alibi_bias(6, pos, pos)
    got = attention.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=bias)
    want = np.zeros((2, 7, 6, 4))
    for h in range(6):
        g = h // 3
        scores = np.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, g]).astype(np.float64) / 2.0 + np.asarray(bias[h])
        scores = np.where(np.tril(np.ones((7, 7), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        want[:, :, h] = np.einsum("bqk,bkd->bqd", p / p.sum(-1, keepdims=True), v[:, :, g])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="the flash kernels take no score bias"):
        attention.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), "pallas", bias=bias)


OPTIONS = {  # every position option, with a scaling that changes the logits within 11 tokens
    "alibi": dict(positional="alibi"),
    "t5": dict(positional="t5", t5_buckets=8, t5_max_distance=6),
    "sinusoidal": dict(positional="sinusoidal"),
    "partial_rope": dict(positional="rope", rope_fraction=0.5),
    "yarn": dict(positional="rope", rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=4),
    "ntk": dict(positional="rope", rope_scaling="ntk", rope_factor=4.0),
    "linear": dict(positional="rope", rope_scaling="linear", rope_factor=2.0),
    "none": dict(positional="none"),
}


@pytest.mark.parametrize("option", ["alibi"] + [slow(o) for o in OPTIONS if o != "alibi"])
def test_cached_decoding_equals_the_full_pass(option):
    cfg = _cfg(**OPTIONS[option])
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    if option == "t5":  # zero-initialised: draw the table so that the bias matters
        table = params["layers"]["attention"]["t5_bias"]["table"]
        params["layers"]["attention"]["t5_bias"]["table"] = jax.random.normal(jax.random.key(2), table.shape)
    full = model.apply({"params": params}, tokens)
    decode = jax.jit(lambda t, c, s: model.apply({"params": params}, t, c, s, method=model.decode))
    logits, cache = decode(tokens[:, :5], model.init_cache(2, cfg.max_len), 0)
    pieces = [logits]
    for t in range(5, tokens.shape[1]):
        logits, cache = decode(tokens[:, t:t + 1], cache, t)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=1e-5, atol=1e-5)
    plain = transformer.Transformer(_cfg(positional="none")).apply({"params": params}, tokens) if option != "none" else full
    assert option == "none" or not np.allclose(full, plain, atol=1e-3)  # the option changes the logits


@pytest.mark.slow
def test_dynamic_ntk_decodes_like_the_full_pass_within_the_original_context():
    """Beyond it each key keeps the frequencies of the step that wrote it (as transformers' generation does),
    so only the first `rope_original_max_len` positions must agree; past them the frequencies grow with n."""
    cfg = _cfg(rope_scaling="dynamic", rope_factor=2.0, rope_original_max_len=8)
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (1, 12), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    decode = jax.jit(lambda t, c, s: model.apply({"params": params}, t, c, s, method=model.decode))  # s traced
    cache, pieces = model.init_cache(1, cfg.max_len), []
    for t in range(12):
        logits, cache = decode(tokens[:, t:t + 1], cache, t)
        pieces.append(logits)
    decoded = jnp.concatenate(pieces, 1)
    np.testing.assert_allclose(decoded[:, :8], model.apply({"params": params}, tokens[:, :8]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(decoded[:, 8:], model.apply({"params": params}, tokens)[:, 8:], atol=1e-4)


@pytest.mark.parametrize("message,overrides", [
    ("model.rope_fraction=0.3 of a 8-wide head rotates 2.4 columns; RoPE needs an even number >= 2",
     dict(rope_fraction=0.3)),
    ("model.rope_scaling='yarn' scales RoPE; model.positional='alibi' must be 'rope'",
     dict(positional="alibi", rope_scaling="yarn")),
    ("model.positional='t5' needs model.attention_impl='xla'", dict(positional="t5", attention_impl="pallas")),
    ("model.t5_max_distance=16 must exceed model.t5_buckets // 2 = 16",
     dict(positional="t5", t5_buckets=32, t5_max_distance=16)),
])
def test_bad_position_keys_are_refused(message, overrides):
    from models.gqa import GroupedQueryAttention

    if "t5_max_distance" in overrides:  # what it would give: buckets outside [0, B) or falling with distance
        buckets = np.asarray(positions.t5_bucket(jnp.arange(200), overrides["t5_buckets"], overrides["t5_max_distance"]))
        assert buckets.min() < 0 or np.any(np.diff(buckets) < 0) or buckets.max() >= overrides["t5_buckets"]

    assert any(message in p for p in GroupedQueryAttention.validate(_cfg(**overrides))), message


@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_position_option_is_accepted_as_written(option):
    assert positions.validate(_cfg(**OPTIONS[option])) == []


@pytest.mark.parametrize("positional,d_model,refused", [("sinusoidal", 25, True), ("sinusoidal", 24, False),
                                                         ("learned", 25, False), ("alibi", 25, False)])
def test_only_sinusoidal_positions_need_an_even_width(positional, d_model, refused):
    problems = positions.validate(_cfg(positional=positional, d_model=d_model))
    assert problems == ([f"model.positional='sinusoidal' needs an even model.d_model, got {d_model}"] if refused else [])


@pytest.mark.parametrize("option,impl", [slow("alibi", "pallas"), slow("t5", "xla"), slow("yarn", "xla"),
                                         slow("sinusoidal", "xla")])
def test_trains_with_the_one_device_losses_on_a_2x2x2_mesh(option, impl, tmp_path):
    """ALiBi: the flash kernels per shard (slopes split over heads with them) against XLA on one device."""
    def config():
        c = make_tiny_lm_config()
        c.model.update(**OPTIONS[option])
        return c
    assert_mesh_run_matches_one_device(config, tmp_path, **({"attention_impl": impl} if impl != "xla" else {}))


def test_learned_positions_refuse_sequences_longer_than_their_table():
    model = transformer.Transformer(_cfg(positional="learned", max_len=8))
    with pytest.raises(ValueError, match=r"9 tokens exceed the learned position table \(model.max_len=8\)"):
        model.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))


def test_sinusoidal_positions_are_added_to_the_token_embeddings():
    """The embedding of token t at position i: E[t] + PE(i) / sqrt(d), from a start position (decoding)."""
    cfg = _cfg(positional="sinusoidal")
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    got = model.apply({"params": params}, tokens, start=5, method=model.embed_tokens)
    table = np.asarray(positions.sinusoidal(jnp.arange(5, 12), cfg.d_model))
    want = np.asarray(params["embed"]["embedding"])[np.asarray(tokens)] + table / np.sqrt(cfg.d_model)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
