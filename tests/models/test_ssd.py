"""SSD: the sequential, associative-scan and chunked forms against a float64 NumPy recurrence and
the quadratic (attention-like) form, values and gradients, on awkward shapes."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import ssd
from tests.conftest import slow

FORMS = {
    "sequential": ssd.ssd_sequential,
    "associative_scan": ssd.ssd_associative_scan,
    "chunked_16": functools.partial(ssd.ssd_chunked, chunk_size=16),
    "chunked_7": functools.partial(ssd.ssd_chunked, chunk_size=7),
}
# (batch, length, heads, head_dim, groups, state): lengths not multiples of the chunks, batch 1,
# groups < heads, odd sizes.
SHAPES = [(1, 37, 4, 8, 2, 5), (2, 16, 3, 4, 1, 6), (1, 1, 2, 3, 2, 4), (2, 50, 6, 5, 3, 7)]


def random_inputs(shape, seed=0, initial=True, decay_scale=1.0):
    batch, length, heads, head_dim, groups, state = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, length, heads, head_dim))
    a = -decay_scale * rng.exponential(0.5, (batch, length, heads))
    b = rng.standard_normal((batch, length, groups, state))
    c = rng.standard_normal((batch, length, groups, state))
    h0 = rng.standard_normal((batch, heads, head_dim, state)) if initial else None
    return x, a, b, c, h0


def numpy_recurrence(x, a, b, c, h0):
    """float64 loop: H_t = exp(a_t) H_{t-1} + outer(x_t, b_t); y_t = H_t c_t."""
    batch, length, heads, head_dim = x.shape
    ratio = heads // b.shape[2]
    state = np.zeros((batch, heads, head_dim, b.shape[3])) if h0 is None else h0.copy()
    y = np.zeros_like(x)
    for t in range(length):
        for h in range(heads):
            g = h // ratio
            state[:, h] = np.exp(a[:, t, h])[:, None, None] * state[:, h] + x[:, t, h, :, None] * b[:, t, g, None, :]
            y[:, t, h] = np.einsum("bpn,bn->bp", state[:, h], c[:, t, g])
    return y, state


def quadratic_form(x, a, b, c, h0):
    """y = M x + (initial-state term), M[t, s] = (c_t . b_s) exp(a_{s+1} + ... + a_t), in float64."""
    batch, length, heads, head_dim = x.shape
    ratio = heads // b.shape[2]
    y = np.zeros_like(x)
    for h in range(heads):
        g = h // ratio
        cum = np.cumsum(a[:, :, h], axis=1)  # float64 and short: the difference is exact enough
        for t in range(length):
            for s in range(t + 1):
                weight = np.einsum("bn,bn->b", c[:, t, g], b[:, s, g]) * np.exp(cum[:, t] - cum[:, s])
                y[:, t, h] += weight[:, None] * x[:, s, h]
            if h0 is not None:
                y[:, t, h] += np.exp(cum[:, t])[:, None] * np.einsum("bpn,bn->bp", h0[:, h], c[:, t, g])
    return y


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("initial", [True, False])
def test_forms_match_the_float64_recurrence(form, shape, initial):
    x, a, b, c, h0 = random_inputs(shape, seed=sum(shape), initial=initial)
    y_ref, final_ref = numpy_recurrence(x, a, b, c, h0)
    as32 = lambda t: None if t is None else jnp.asarray(t, jnp.float32)  # noqa: E731
    y, final = jax.jit(FORMS[form])(*map(as32, (x, a, b, c)), initial_state=as32(h0))
    chex.assert_shape(y, x.shape)
    chex.assert_shape(final, final_ref.shape)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(final, final_ref, rtol=1e-4, atol=1e-4)


def test_recurrence_reference_equals_quadratic_form():
    x, a, b, c, h0 = random_inputs((2, 13, 4, 3, 2, 5), seed=7)
    np.testing.assert_allclose(numpy_recurrence(x, a, b, c, h0)[0], quadratic_form(x, a, b, c, h0), rtol=1e-10)


@pytest.mark.parametrize("form", ["associative_scan", "chunked_16", "chunked_7"])
def test_gradients_match_the_sequential_form(form):
    x, a, b, c, h0 = (jnp.asarray(t, jnp.float32) for t in random_inputs((2, 37, 4, 6, 2, 5), seed=3))
    weights = jax.random.normal(jax.random.key(0), (2, 37, 4, 6))
    final_weights = jax.random.normal(jax.random.key(1), (2, 4, 6, 5))

    def loss(fn, *args):
        y, final = fn(*args[:4], initial_state=args[4])
        return jnp.sum(y * weights) + jnp.sum(final * final_weights)

    argnums = (0, 1, 2, 3, 4)
    expected = jax.jit(jax.grad(functools.partial(loss, ssd.ssd_sequential), argnums))(x, a, b, c, h0)
    got = jax.jit(jax.grad(functools.partial(loss, FORMS[form]), argnums))(x, a, b, c, h0)
    for name, g, e in zip(("x", "a", "b", "c", "initial_state"), got, expected):
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-4, err_msg=name)


@pytest.mark.parametrize("form", ["sequential", "chunked_4"])
def test_decay_gradient_matches_finite_differences(form):
    """d/da of a nonlinear function of y, in float64, against central differences (chunk 4 of length 6)."""
    scan = ssd.ssd_sequential if form == "sequential" else functools.partial(ssd.ssd_chunked, chunk_size=4)
    x, a, b, c, h0 = random_inputs((1, 6, 2, 3, 1, 4), seed=11)
    with jax.enable_x64():
        args = [jnp.asarray(t, jnp.float64) for t in (x, a, b, c, h0)]
        f = lambda a_: jnp.sum(jnp.sin(scan(args[0], a_, *args[2:4], initial_state=args[4])[0]))  # noqa: E731
        grad = jax.grad(f)(args[1])
        eps = 1e-6
        for index in [(0, 0, 0), (0, 3, 1), (0, 5, 0)]:
            bump = jnp.zeros_like(args[1]).at[index].set(eps)
            numeric = (f(args[1] + bump) - f(args[1] - bump)) / (2 * eps)
            np.testing.assert_allclose(grad[index], numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("form", [slow("associative_scan"), "chunked_16"])
def test_long_sequences_and_strong_decay_stay_finite(form):
    x, a, b, c, _ = (None if t is None else jnp.asarray(t, jnp.float32)
                     for t in random_inputs((1, 4096, 2, 4, 1, 4), seed=5, initial=False, decay_scale=200.0))
    y, final = jax.jit(FORMS[form])(x, a, b, c)
    chex.assert_tree_all_finite((y, final))
    grads = jax.jit(jax.grad(lambda a_: jnp.sum(FORMS[form](x, a_, b, c)[0])))(a)
    chex.assert_tree_all_finite(grads)
    y_seq, _ = jax.jit(ssd.ssd_sequential)(x, a, b, c)
    np.testing.assert_allclose(y, y_seq, rtol=1e-4, atol=1e-4)


def test_segsum_is_exact_where_prefix_differences_cancel():
    a = jnp.full((300,), -1.0, jnp.float32).at[0].set(-1e6)
    out = ssd.segsum(a)
    assert out[5, 3] == -2.0  # a_4 + a_5; cumsum(a)[5] - cumsum(a)[3] loses it to -1e6's rounding
    assert out[2, 5] == -jnp.inf and out[7, 7] == 0.0
