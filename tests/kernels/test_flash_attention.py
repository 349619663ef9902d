"""Flash attention (Pallas, interpret mode) against the reference: values and gradients over awkward
shapes, bfloat16, every output element written, bad arguments refused."""

import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
from models import attention, positions
from tests.conftest import slow

fa = importlib.import_module("kernels_pallas.flash_attention")  # the module (the package exports the function)

SHAPES = [  # batch, len_q, len_k, heads_q, heads_kv, head_dim, causal, block_q, block_k
    pytest.param(1, 100, 100, 4, 1, 64, True, 32, 16, id="not-multiples-gqa4-batch1"),
    pytest.param(2, 37, 90, 4, 1, 128, True, 16, 32, id="lq<lk-causal-d128", marks=pytest.mark.slow),
    pytest.param(1, 90, 37, 8, 2, 64, True, 16, 16, id="lq>lk-causal-first-queries-see-nothing"),
    pytest.param(2, 70, 50, 3, 3, 64, False, 32, 16, id="non-causal-odd-heads"),
    pytest.param(1, 1, 50, 4, 1, 64, True, 16, 16, id="one-query", marks=pytest.mark.slow),
    pytest.param(1, 64, 64, 2, 2, 128, True, 16, 16, id="exact-multiples-4-blocks", marks=pytest.mark.slow),
]


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


def inputs(batch, len_q, len_k, heads_q, heads_kv, head_dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, len_q, heads_q, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, len_k, heads_kv, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, len_k, heads_kv, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, jnp.float32)
    return q, k, v, d_out


def value_and_grads(fn, q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(d_out.astype(out.dtype)))


@pytest.mark.parametrize("batch,len_q,len_k,heads_q,heads_kv,head_dim,causal,block_q,block_k", SHAPES)
def test_matches_the_reference_in_float32(batch, len_q, len_k, heads_q, heads_kv, head_dim, causal, block_q, block_k):
    q, k, v, d_out = inputs(batch, len_q, len_k, heads_q, heads_kv, head_dim)
    flash = functools.partial(kernels_pallas.flash_attention, causal=causal, block_q=block_q, block_k=block_k)
    reference = functools.partial(attention.dot_product_attention, causal=causal)
    got = jax.jit(functools.partial(value_and_grads, flash))(q, k, v, d_out)
    want = jax.jit(functools.partial(value_and_grads, reference))(q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        chex.assert_equal_shape([g, w])
        chex.assert_type(g, w.dtype)
        assert relative_error(g, w) < 1e-5, (name, relative_error(g, w))


@pytest.mark.parametrize("len_q,len_k", [(33, 80), (47, 33), (65, 64), slow(20, 50), slow(50, 63), slow(64, 65),
                                         slow(17, 17)])
def test_causal_offsets_across_block_boundaries(len_q, len_k):
    """Bottom-right causal alignment at offsets len_k - len_q of every residue class that moves a
    block between the masked and unmasked loops (blocks of 16: offsets 30, 47, 13, -14, 1, -1, 0)."""
    q, k, v, d_out = inputs(1, len_q, len_k, 2, 1, 16, seed=len_q * len_k)
    flash = functools.partial(kernels_pallas.flash_attention, causal=True, block_q=16, block_k=16)
    reference = functools.partial(attention.dot_product_attention, causal=True)
    got = jax.jit(functools.partial(value_and_grads, flash))(q, k, v, d_out)
    want = jax.jit(functools.partial(value_and_grads, reference))(q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert relative_error(g, w) < 1e-5, (name, relative_error(g, w))


@pytest.mark.parametrize("len_q,len_k,window,block_q,block_k", [
    (70, 70, 20, 16, 16), (37, 90, 33, 16, 32), slow(90, 37, 5, 16, 16), slow(64, 64, 1, 16, 16),
    slow(50, 50, 64, 16, 16), slow(100, 100, 16, 32, 16)])
def test_sliding_window_matches_the_masked_reference(len_q, len_k, window, block_q, block_k):
    """Windows narrower than a block, of one key, not a multiple of the blocks, wider than the sequence; GQA."""
    q, k, v, d_out = inputs(1, len_q, len_k, 4, 2, 16, seed=window)
    flash = functools.partial(kernels_pallas.flash_attention, causal=True, window=window, block_q=block_q,
                              block_k=block_k)
    reference = functools.partial(attention.causal_attention, window=window)
    got = jax.jit(functools.partial(value_and_grads, flash))(q, k, v, d_out)
    want = jax.jit(functools.partial(value_and_grads, reference))(q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):  # (window 1: dq is 0 up to rounding)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, float(np.max(np.abs(w)))), err_msg=name)


@pytest.mark.parametrize("len_q,len_k,heads_q,heads_kv,window", [(70, 70, 4, 2, 0), slow(37, 90, 3, 1, 0),
                                                                 (50, 50, 6, 2, 16)])
def test_alibi_matches_the_biased_reference(len_q, len_k, heads_q, heads_kv, window):
    """Press et al.'s slopes (3 and 6 heads: not powers of two) inside the kernels against the XLA path with the
    [H, Lq, Lk] bias, with and without a sliding window; values and gradients."""
    q, k, v, d_out = inputs(1, len_q, len_k, heads_q, heads_kv, 16, seed=heads_q)
    slopes = positions.alibi_slopes(heads_q)
    flash = functools.partial(kernels_pallas.flash_attention, causal=True, window=window, alibi_slopes=slopes,
                              block_q=16, block_k=16)
    bias = positions.alibi_bias(heads_q, jnp.arange(len_q) + len_k - len_q, jnp.arange(len_k))
    reference = functools.partial(attention.causal_attention, bias=bias, window=window)
    got = jax.jit(functools.partial(value_and_grads, flash))(q, k, v, d_out)
    want = jax.jit(functools.partial(value_and_grads, reference))(q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * max(1.0, float(np.max(np.abs(w)))), err_msg=name)


def test_a_sliding_window_visits_only_the_blocks_it_sees():
    """At 512 x 512 with a 32-key window and blocks of 16, each query block visits at most 3 key blocks (and each
    key block at most 3 query blocks in the backward), against 16 on average without a window."""
    q = jnp.zeros((1, 512, 1, 16))
    plan = fa.make_plan(q, q, q, causal=True, window=32, sm_scale=None, block_q=16, block_k=16, interpret=True,
                        num_warps=None, num_stages=None, backward_launch=None)
    for block in range(plan.q_blocks):
        first, _, _, end = map(int, fa._key_block_range(block, plan))
        assert 0 < end - first <= 3, (block, first, end)
        first, _, _, end = map(int, fa._query_block_range(block, plan))
        assert 0 < end - first <= 3, (block, first, end)


@pytest.mark.parametrize("batch,len_q,len_k,heads_q,heads_kv,head_dim,causal,block_q,block_k",
                         [SHAPES[0], *(slow(*p.values) for p in (SHAPES[2], SHAPES[3]))])
def test_matches_the_reference_in_bfloat16(batch, len_q, len_k, heads_q, heads_kv, head_dim, causal, block_q, block_k):
    """bfloat16 inputs, float32 accumulation: within 2e-2 of the float32 reference on the same inputs."""
    q, k, v, d_out = inputs(batch, len_q, len_k, heads_q, heads_kv, head_dim, dtype=jnp.bfloat16)
    flash = functools.partial(kernels_pallas.flash_attention, causal=causal, block_q=block_q, block_k=block_k)
    got = jax.jit(functools.partial(value_and_grads, flash))(q, k, v, d_out)
    as_f32 = [t.astype(jnp.float32) for t in (q, k, v)]
    want = value_and_grads(functools.partial(attention.dot_product_attention, causal=causal), *as_f32, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.bfloat16, name
        assert relative_error(g, w) < 2e-2, (name, relative_error(g, w))


def test_sm_scale_and_the_float64_loop():
    """A non-default scale, against the float64 loop the reference itself is tested with."""
    from tests.models.test_attention import attention_loop

    q, k, v, _ = inputs(2, 45, 45, 4, 2, 64)
    out = kernels_pallas.flash_attention(q, k, v, causal=True, sm_scale=0.3, block_q=16, block_k=16)
    np.testing.assert_allclose(out, attention_loop(q, k, v, True, 0.3), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [True, slow(False)])
def test_every_output_element_is_written(causal):
    """Interpret mode fills each kernel output with NaN before the grid runs (pallas' poisoning of
    uninitialised memory); finite outputs, padded rows included, mean every element was written (causal: with ALiBi's
    extra input)."""
    q, k, v, d_out = inputs(1, 75, 50, 4, 2, 64)
    plan = fa.make_plan(q, k, v, causal=causal, alibi=causal, sm_scale=None, block_q=16, block_k=16, interpret=True,
                        num_warps=None, num_stages=None, backward_launch=(32, 32, None, None))
    padded, slopes = fa.pad_inputs(plan, q, k, v), jnp.asarray(positions.alibi_slopes(4))
    out, lse = fa.forward(*padded, slopes, None, plan)
    d_out = jnp.pad(d_out, ((0, 0), (0, plan.padded_q - 75), (0, 0), (0, 0)))
    grads = fa.backward(*padded, slopes, None, out, lse, d_out, plan)
    assert out.shape[1] == plan.padded_q > 75 and grads[1].shape[1] == plan.padded_k > 50
    for name, t in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        assert np.isfinite(np.asarray(t)).all(), name


def test_poisoning_catches_an_unwritten_block():
    """The check above can fail: a kernel that skips a block leaves NaN there."""
    from jax.experimental import pallas as pl

    def copy_but_the_last_block(x_ref, o_ref):
        @pl.when(pl.program_id(0) < pl.num_programs(0) - 1)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((48, 8))
    spec = pl.BlockSpec((16, 8), lambda i: (i, 0))
    out = pl.pallas_call(copy_but_the_last_block, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(3,),
                         in_specs=[spec], out_specs=spec, interpret=True)(x)
    assert np.isfinite(np.asarray(out[:32])).all() and np.isnan(np.asarray(out[32:])).all()


@pytest.mark.parametrize("kwargs,shapes,message", [
    (dict(block_q=48), None, "block_q=48 must be a power of two >= 16"),
    (dict(block_k=8), None, "block_k=8 must be a power of two >= 16"),
    ({}, ((1, 8, 3, 16), (1, 8, 2, 16)), "heads_q=3 is not a multiple of heads_kv=2"),
    ({}, ((1, 8, 2, 16), (1, 8, 2, 32)), "must agree in batch and head_dim"),
])
def test_bad_arguments_are_refused(kwargs, shapes, message):
    q_shape, k_shape = shapes or ((1, 8, 2, 16), (1, 8, 2, 16))
    q, k = jnp.zeros(q_shape), jnp.zeros(k_shape)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kernels_pallas.flash_attention(q, k, k, **kwargs)


@pytest.mark.parametrize("dtype,head_dim", [(jnp.bfloat16, 128), (jnp.float32, 64)])
def test_lowers_for_tpu(monkeypatch, dtype, head_dim):
    """The TPU path (heads-major blocks, lse / delta with a trailing unit dim) passes Pallas' Mosaic
    lowering, block-shape rules included, forward and backward; no TPU is needed to lower (the
    Mosaic compiler itself runs only on one). jax is told the backend is a TPU v5e."""
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5e")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    q = jax.ShapeDtypeStruct((2, 1000, 8, head_dim), dtype)
    k = jax.ShapeDtypeStruct((2, 1000, 2, head_dim), dtype)
    flash = functools.partial(kernels_pallas.flash_attention, causal=True, interpret=False)
    plan = fa.make_plan(q, k, k, causal=True, sm_scale=None, block_q=None, block_k=None, interpret=False,
                        num_warps=None, num_stages=None, backward_launch=None)
    assert plan.heads_major and plan.padded_q == 1024
    forward_backward = jax.jit(lambda q, k, v: jax.vjp(flash, q, k, v)[1](jnp.ones(q.shape, q.dtype)))
    text = forward_backward.trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3  # forward, dK/dV, dQ


def random_segments(rng, batch, length):
    """int32[B, L]: random document lengths 1.. packed from the left, the row's tail padding (0) half the time."""
    ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        start, segment = 0, 1
        end = length - (rng.integers(1, length // 4) if row % 2 else 0)
        while start < end:
            size = int(rng.integers(1, 20))
            ids[row, start:min(start + size, end)] = segment
            start, segment = start + size, segment + 1
    return jnp.asarray(ids)


@pytest.mark.parametrize("window,alibi", [(0, False), slow(7, True), slow(0, True), slow(7, False)])
def test_segment_ids_match_the_masked_reference(window, alibi):
    """Packed rows: query i sees key j only inside its segment (and window), forward and backward, over lengths
    that are not multiples of the blocks, GQA, and documents that start anywhere in a block."""
    q, k, v, d_out = inputs(2, 75, 75, 4, 2, 32)
    ids = random_segments(np.random.default_rng(3), 2, 75)
    slopes = jnp.asarray(positions.alibi_slopes(4)) if alibi else None
    flash = functools.partial(kernels_pallas.flash_attention, causal=True, window=window, alibi_slopes=slopes,
                              segment_ids=ids, block_q=16, block_k=16)
    mask = attention.causal_mask(75, 75, window=window)[None] & (ids[:, :, None] == ids[:, None, :])
    bias = None if slopes is None else positions.alibi_bias(4, jnp.arange(75), jnp.arange(75))
    reference = functools.partial(attention.attend, mask=mask, bias=bias)
    got = jax.jit(functools.partial(value_and_grads, flash))(q, k, v, d_out)
    want = jax.jit(functools.partial(value_and_grads, reference))(q, k, v, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert relative_error(g, w) < 1e-5, (name, relative_error(g, w))
    unsegmented = kernels_pallas.flash_attention(q, k, v, causal=True, window=window, alibi_slopes=slopes)
    assert relative_error(unsegmented, want[0]) > 1e-2  # the segments change the answer
