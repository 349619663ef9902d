"""Quantized numerics through qwix (models/quantization.py): weight-only int8 / int4 logits equal the float model's
with every covered kernel rounded by a float64 NumPy transcription of symmetric per-channel quantization (and the
embeddings, output head and attention scores untouched); w8a8 rounds the activations too; quantization-aware
training gives the one-device losses on a data=2, fsdp=2, tensor=2 mesh; bad combinations are one-line errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from tests.conftest import assert_mesh_run_matches_one_device, make_tiny_lm_config, slow


def reference_symmetric(w, bits):
    """w [in, out] rounded per output channel: scale = max|w| / (q_max + 1/2), round to nearest, clipped to
    [-2^(b-1), q_max]."""
    q_max = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(0, keepdims=True) / (q_max + 0.5)
    return np.clip(np.round(w / scale), -q_max - 1, q_max) * scale


# The kernels the tiny model's matmuls multiply, as [in, out] matrices per layer: (collection path, inputs).
KERNELS = [(("attention", name), 16) for name in ("query", "key", "value", "out")] + [
    (("mlp", "wi", "kernel"), 16), (("mlp", "wg", "kernel"), 16), (("mlp", "wo", "kernel"), 24)]


def _per_matrix(params, fn):
    """params with fn(matrix [in, out]) applied to every layer's matrix of every kernel in KERNELS."""
    layers = jax.tree.map(np.asarray, params["layers"])
    for path, inputs in KERNELS:
        node = layers
        for key in path[:-1]:
            node = node[key]
        stacked = np.asarray(node[path[-1]], np.float64)
        node[path[-1]] = np.stack([fn(layer.reshape(inputs, -1)).reshape(layer.shape)
                                   for layer in stacked]).astype(np.float32)
    return {**params, "layers": layers}


@pytest.fixture(scope="module")
def tiny():
    """A GQA + SwiGLU transformer whose every channel's largest magnitude is positive: -(q_max + 1/2), where
    round-half-to-even and float32 division could land either side, never occurs."""
    config = ml_collections.ConfigDict(dict(models.MODELS["transformer"][1]().__dict__))
    config.update(vocab_size=23, max_len=12, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, d_mlp=24,
                  activation="swiglu", tie_embeddings=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 23, (3, 12)))
    model = models.build(config)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:1]))
    flip = lambda w: w * np.where(w.max(0) >= -w.min(0), 1.0, -1.0)  # noqa: E731
    variables = {**variables, "params": _per_matrix(variables["params"], flip)}
    return config, variables, tokens, model.apply(variables, tokens)


@pytest.mark.parametrize("bits", [8, slow(4)])
def test_weight_only_logits_are_the_float_models_with_reference_rounded_kernels(tiny, bits):
    config, variables, tokens, float_logits = tiny
    quantized = models.build(ml_collections.ConfigDict({**config.to_dict(), "quantization": f"int{bits}"}))
    found = quantized.apply(variables, tokens)
    float_model = models.build(config)
    rounded = _per_matrix(variables["params"], lambda w: reference_symmetric(w, bits))
    expected = float_model.apply({**variables, "params": rounded}, tokens)
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(found) - np.asarray(float_logits)).max() > 1e-3  # it did round


def test_decoding_with_a_cache_gives_the_full_pass_logits(tiny):
    """The quantized numerics hold in `decode` too (w8a8's per-token scales: one token at a time is the same)."""
    config, variables, tokens, _ = tiny
    model = models.build(ml_collections.ConfigDict({**config.to_dict(), "quantization": "w8a8"}))
    full = model.apply(variables, tokens)
    decode = jax.jit(lambda v, t, c, s: model.apply(v, t, c, s, method=model.decode))
    logits, cache = decode(variables, tokens[:, :5], model.init_cache(batch=3, max_len=12), 0)
    pieces = [logits]
    for i in range(5, 12):
        logits, cache = decode(variables, tokens[:, i:i + 1], cache, i)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5, rtol=2e-5)


def test_w8a8_rounds_the_activations_too(tiny):
    config, variables, tokens, float_logits = tiny
    logits = {q: np.asarray(models.build(ml_collections.ConfigDict({**config.to_dict(), "quantization": q})).apply(
        variables, tokens)) for q in ("int8", "w8a8")}
    gap = np.abs(logits["w8a8"] - logits["int8"]).max()
    assert 1e-4 < gap < 0.1 * np.abs(np.asarray(float_logits)).max()


@pytest.mark.slow  # two trainer runs; by default the numerics, decoding and refusals above
def test_quantization_aware_training_gives_the_one_device_losses_on_a_mesh(tmp_path):
    def config():
        c = make_tiny_lm_config(steps=3)
        c.model.quantization = "int4"
        return c

    assert_mesh_run_matches_one_device(config, tmp_path)


@pytest.mark.parametrize("fields,message", [
    ({"quantization": "int8", "bitnet": True}, "model.quantization='int8' and model.bitnet=True both quantize"),
    ({"quantization": "int4", "attention": "mla"}, "covers GQA attention .*, not model.attention='mla'"),
])
def test_combinations_it_does_not_cover_are_one_line_errors(fields, message):
    assert any(__import__("re").search(message, p) for p in models.MODELS["transformer"][2](
        models.MODELS["transformer"][1](**fields)))
    ragged = models.MODELS["moe"][2](models.MODELS["moe"][1](quantization="int8", dispatch="ragged"))
    assert any("not model.dispatch='ragged'" in p for p in ragged)
    mor = models.MODELS["mor"][2](models.MODELS["mor"][1](quantization="int8"))
    assert any("covers model.name in transformer, moe, mod, ssd, hybrid, not 'mor'" in p for p in mor)


@pytest.mark.slow  # 7 s of compiles; by default the transformer's weight-only and W8A8 references
def test_moe_experts_round_per_expert_and_the_routing_stays_in_float():
    """An MoE model's int8 logits equal the float model's with attention, every expert (per expert and output
    channel) and the shared expert rounded by the reference, the router and the dispatch/combine left alone."""
    config = ml_collections.ConfigDict(dict(models.MODELS["moe"][1]().__dict__))
    config.update(vocab_size=23, max_len=12, d_model=16, num_layers=2, num_heads=4, d_mlp=24, num_experts=4, top_k=2,
                  d_expert=8)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 23, (3, 12)))
    model = models.build(config)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:1]))
    matrices = {"query": 1, "key": 1, "value": 1, "out": 2, "w_gate": 1, "w_in": 1, "w_out": 1, "kernel": 1}  # in axes

    def per_matrix(fn):
        def one(path, leaf):
            names = [p.key for p in path]
            if names[0] != "layers" or names[-1] not in matrices or "router" in names:
                return leaf
            stacked = np.asarray(leaf, np.float64)
            batch = 2 if names[-1] in ("w_gate", "w_in", "w_out") else 1  # [L, E, in, out] or [L, in..., out...]
            flat = stacked.reshape(stacked.shape[:batch] + (int(np.prod(stacked.shape[batch:batch + matrices[names[-1]]])),
                                                           -1))
            done = np.stack([fn(m) for m in flat.reshape((-1,) + flat.shape[batch:])])
            return done.reshape(stacked.shape).astype(np.float32)
        return jax.tree_util.tree_map_with_path(one, variables["params"])

    flip = lambda w: w * np.where(w.max(0) >= -w.min(0), 1.0, -1.0)  # noqa: E731  (see `tiny`)
    variables = {**variables, "params": per_matrix(flip)}
    found = models.build(ml_collections.ConfigDict({**config.to_dict(), "quantization": "int8"})).apply(variables, tokens)
    params = per_matrix(lambda w: reference_symmetric(w, 8))
    expected = model.apply({**variables, "params": params}, tokens)
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(found) - np.asarray(model.apply(variables, tokens))).max() > 1e-3
