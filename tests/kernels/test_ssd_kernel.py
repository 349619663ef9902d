"""The Pallas chunked SSD (interpret mode) against models.ssd: outputs, final states and gradients
of every input over awkward shapes; every kernel output written; bad arguments refused."""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
from models import ssd

ssd_kernels = importlib.import_module("kernels_pallas.ssd_kernels")  # the module (the package exports the function)

SHAPES = [  # batch, length, heads, groups, head_dim, state, chunk
    pytest.param(2, 100, 4, 2, 16, 32, 32, id="length-not-a-multiple-2-groups"),
    pytest.param(1, 50, 3, 1, 8, 16, 16, id="odd-heads-batch1-4-chunks"),
    pytest.param(1, 64, 2, 1, 64, 128, 64, id="one-whole-chunk-mamba-sizes", marks=pytest.mark.slow),
    pytest.param(2, 7, 4, 4, 16, 16, 16, id="shorter-than-a-chunk", marks=pytest.mark.slow),
]


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


def inputs(batch, length, heads, groups, head_dim, state, seed=0):
    """Mamba-2's ranges: dt log-uniform in [1e-3, 0.1], A in [-16, -1]."""
    keys = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    dt = jnp.exp(jax.random.uniform(keys[1], (batch, length, heads), minval=np.log(1e-3), maxval=np.log(0.1)))
    a = -jnp.exp(jax.random.uniform(keys[2], (heads,), maxval=np.log(16.0))) * dt
    b = jax.random.normal(keys[3], (batch, length, groups, state))
    c = jax.random.normal(keys[4], (batch, length, groups, state))
    initial = jax.random.normal(keys[5], (batch, heads, head_dim, state))
    y_weights = jax.random.normal(keys[6], x.shape)
    state_weights = jax.random.normal(keys[7], initial.shape)
    return x, a, b, c, initial, y_weights, state_weights


def outputs_and_grads(fn, x, a, b, c, initial, y_weights, state_weights, chunk):
    def loss(x, a, b, c, initial):
        y, final = fn(x, a, b, c, chunk_size=chunk, initial_state=initial)
        return jnp.sum(y * y_weights) + jnp.sum(final * state_weights), (y, final)

    (_, (y, final)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        x, a, b, c, initial)
    return (y, final, *grads)


@pytest.mark.parametrize("batch,length,heads,groups,head_dim,state,chunk", SHAPES)
def test_matches_the_chunked_reference(batch, length, heads, groups, head_dim, state, chunk):
    args = inputs(batch, length, heads, groups, head_dim, state, seed=length)
    got = outputs_and_grads(kernels_pallas.ssd_chunked, *args, chunk)
    want = outputs_and_grads(ssd.ssd_chunked, *args, chunk)
    for name, g, w in zip(("y", "final_state", "dx", "da", "db", "dc", "d_initial"), got, want):
        chex.assert_equal_shape([g, w])
        assert relative_error(g, w) < 1e-5, (name, relative_error(g, w))


def test_matches_the_recurrence_without_an_initial_state():
    x, a, b, c, *_ = inputs(1, 45, 2, 1, 8, 16)
    y, final = kernels_pallas.ssd_chunked(x, a, b, c, chunk_size=16)
    y_want, final_want = ssd.ssd_sequential(x, a, b, c)
    assert relative_error(y, y_want) < 1e-5 and relative_error(final, final_want) < 1e-5


def test_every_kernel_output_is_written():
    """Interpret mode fills kernel outputs with NaN first; finite results mean every element was written."""
    x, a, b, c, initial, *_ = inputs(1, 48, 2, 1, 8, 16)
    plan = ssd_kernels._Plan(chunk=16, heads_per_group=2, interpret=True)
    cum = jnp.cumsum(a.reshape(1, 3, 16, 2), axis=2)
    rows = cum.transpose(0, 3, 1, 2).reshape(1, 2, 48)
    states = ssd_kernels._chunk_states(x, jnp.exp(-rows), b, plan)
    entering = jnp.broadcast_to(initial[:, None], states.shape)
    y = ssd_kernels._chunk_outputs(x, rows, b, c, entering, plan)
    assert np.isfinite(np.asarray(states)).all() and np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize("kwargs,groups,message", [
    (dict(chunk_size=48), 1, "chunk_size=48 must be a power of two >= 16"),
    (dict(chunk_size=8), 1, "chunk_size=8 must be a power of two >= 16"),
    ({}, 3, "heads=4 is not a multiple of groups=3"),
])
def test_bad_arguments_are_refused(kwargs, groups, message):
    x, a = jnp.zeros((1, 8, 4, 8)), jnp.zeros((1, 8, 4))
    b = jnp.zeros((1, 8, groups, 16))
    with pytest.raises(ValueError, match=message):
        kernels_pallas.ssd_chunked(x, a, b, b, **kwargs)
