"""Packed rows (models/packing.py): each document's logits inside a packed row equal its logits alone, forward and
backward, for every family and mixer that reads across positions.

The reference is the documents run alone: each in its own row from position 0, right-padded with other tokens
(causal models never read later positions, so the padding changes nothing before it). The packed form puts them
side by side in rows with segment ids and restarting positions, and padding (segment 0) at the end. One
`value_and_grad` per form: logits and the gradient of sum(w * logits) over the documents' positions."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import models
from models import packing
from tests.conftest import slow

LENGTH = 16
DOCUMENTS = ((5, 7, 3), (9, 6))  # per packed row; the rest of each row is padding
VOCAB = 29
TINY = dict(vocab_size=VOCAB, max_len=LENGTH, d_model=16, num_heads=2, num_kv_heads=1, d_mlp=24, num_layers=2)

FAMILIES = {  # name -> (config.model.name, keys beyond TINY)
    "hybrid_ssm_attention": ("hybrid", dict(layer_pattern="SMA", num_layers=3, expand=2, ssm_head_dim=8, ssm_state=4,
                                            conv_width=3, chunk_size=4)),
    "hybrid_every_layer_kind": ("hybrid", dict(layer_pattern="SMAECL", num_layers=6, expand=2, ssm_head_dim=8,
                                               ssm_state=4, conv_width=3, chunk_size=4, num_experts=4, top_k=2,
                                               linear_gate=True, linear_chunk=4)),
    "transformer_pallas_alibi_sliding": ("transformer", dict(attention_impl="pallas", positional="alibi",
                                                             attention_pattern="sliding", attention_window=4)),
    "transformer_xla_alibi_sliding": ("transformer", dict(positional="alibi", attention_pattern="sliding",
                                                          attention_window=4)),
    "transformer_learned_short_conv": ("transformer", dict(positional="learned", short_conv=3)),
    "transformer_sinusoidal_qk_norm": ("transformer", dict(positional="sinusoidal", attention="qk_norm")),
    "transformer_t5_fixed_pattern": ("transformer", dict(positional="t5", attention_pattern="fixed", sparse_stride=4,
                                                         sparse_summary=1)),
    "transformer_early_exit": ("transformer", dict(exit_every=1)),
    "linear_attention_plain": ("transformer", dict(attention="linear", linear_chunk=4)),
    "mla": ("transformer", dict(attention="mla", head_dim=8)),
    "ssd_associative_scan": ("ssd", dict(expand=2, ssm_head_dim=8, ssm_state=4, ssd_impl="associative_scan")),
    "mamba1_sequential": ("mamba", dict(expand=2, ssm_state=4, mamba1_scan="sequential")),
    "moe": ("moe", dict(num_experts=4, top_k=2, router="sigmoid", first_k_dense_replace=1)),
    "deq": ("deq", dict(num_layers=1, solver="fixed_point", tol=1e-7, max_iter=60, backward_max_iter=60)),
    "mod_predictor": ("mod", dict(routing="predictor")),
    "mor_token_router_shared_kv": ("mor", dict(num_layers=3, router="token", kv_sharing="share")),
}
# By default Mamba-2 (chunked), Mamba-1 (associative scan) and GQA with RoPE (XLA) in one hybrid; the hybrid of every
# layer kind (those three, MoE, the short conv and gated linear attention: 34 s of compiles) and the rest are slow.
DEFAULT = ("hybrid_ssm_attention", "transformer_pallas_alibi_sliding", "deq")


def packed_rows(rng):
    """(tokens, segment_ids, positions) [R, T] of the packed rows, and the documents' (row, start, length)."""
    tokens = rng.integers(0, VOCAB, (len(DOCUMENTS), LENGTH)).astype(np.int32)
    segment_ids = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    documents = []
    for row, lengths in enumerate(DOCUMENTS):
        start = 0
        for segment, length in enumerate(lengths, 1):
            segment_ids[row, start:start + length] = segment
            positions[row, start:start + length] = np.arange(length)
            documents.append((row, start, length))
            start += length
    return tokens, segment_ids, positions, documents


def alone_rows(tokens, documents, rng):
    """Each document in its own row from position 0, right-padded with random tokens: [D, T]."""
    rows = rng.integers(0, VOCAB, (len(documents), LENGTH)).astype(np.int32)
    for d, (row, start, length) in enumerate(documents):
        rows[d, :length] = tokens[row, start:start + length]
    return rows


def weighted_sum(model, variables, params, tokens, weights, **packed):
    logits = model.apply({**variables, "params": params}, tokens, **packed)
    return jnp.sum(weights * logits), logits


@pytest.mark.parametrize("family", [f if f in DEFAULT else slow(f) for f in FAMILIES])
def test_packed_documents_equal_documents_alone(family):
    name, keys = FAMILIES[family]
    config = models.MODELS[name][1](**{**TINY, **keys})
    problems = models.MODELS[name][2](ml_collections.ConfigDict(dataclasses.asdict(config)))
    assert not problems, problems
    model = models.MODELS[name][0](config)
    rng = np.random.default_rng(0)
    tokens, segment_ids, positions, documents = packed_rows(rng)
    alone = alone_rows(tokens, documents, rng)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), jnp.asarray(alone)))
    params = variables["params"]
    weights = rng.standard_normal((len(documents), LENGTH, VOCAB)).astype(np.float32)
    for d, (_, _, length) in enumerate(documents):
        weights[d, length:] = 0  # only the document's own positions are compared
    packed_weights = np.zeros((len(DOCUMENTS), LENGTH, VOCAB), np.float32)
    for d, (row, start, length) in enumerate(documents):
        packed_weights[row, start:start + length] = weights[d, :length]

    grad = jax.value_and_grad(weighted_sum, argnums=2, has_aux=True)
    (_, alone_logits), alone_grads = jax.jit(grad, static_argnums=0)(model, variables, params, alone, weights)
    (_, packed_logits), packed_grads = jax.jit(grad, static_argnums=0)(
        model, variables, params, tokens, packed_weights, segment_ids=segment_ids, positions=positions)

    for d, (row, start, length) in enumerate(documents):
        np.testing.assert_allclose(packed_logits[row, start:start + length], alone_logits[d, :length],
                                   rtol=2e-4, atol=2e-4, err_msg=f"document {d} of {family}")
    for (path, a), p in zip(jax.tree_util.tree_flatten_with_path(alone_grads)[0], jax.tree.leaves(packed_grads)):
        scale = max(float(np.max(np.abs(a))), 1e-3)
        np.testing.assert_allclose(p, a, rtol=1e-3, atol=2e-4 * scale, err_msg=jax.tree_util.keystr(path))
    # The comparison can fail: the same packed row without its segment ids mixes the documents.
    mixed = jax.jit(model.apply)(variables, jnp.asarray(tokens))
    row, start, length = documents[1]
    assert not np.allclose(mixed[row, start:start + length], packed_logits[row, start:start + length], atol=1e-3)


def test_segment_helpers_against_numpy():
    ids = np.array([[1, 1, 2, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2]], np.int32)
    segments = packing.Segments(jnp.asarray(ids), jnp.zeros_like(jnp.asarray(ids)))
    np.testing.assert_array_equal(packing.starts(segments), np.concatenate(
        [np.ones((2, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1))
    for lag in (0, 1, 3, 9):
        expected = np.array([[t >= lag and ids[b, t - lag] == ids[b, t] for t in range(8)] for b in range(2)])
        np.testing.assert_array_equal(packing.same_segment_at_lag(segments, lag), expected)
    np.testing.assert_array_equal(packing.same_segment(segments), ids[:, :, None] == ids[:, None, :])
    with pytest.raises(ValueError, match="come together"):
        packing.make(jnp.asarray(ids), None)
