"""DEQ fixed points on contractions with known solutions: every solver converges, Anderson and
Broyden in fewer iterations; implicit gradients against the closed form, finite differences and
unrolling (float64); the phantom gradient approaches the implicit one; non-convergence is reported."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import deq

N = 12


def contraction(seed=0, norm=0.9):
    """f(z, W, x) = tanh(W z + x) with ||W||_2 = norm < 1: a contraction (tanh is 1-Lipschitz)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, N))
    w *= norm / np.linalg.norm(w, 2)
    x = rng.standard_normal(N)
    return (lambda z, w, x: jnp.tanh(w @ z + x)), w, x


def linear(seed=0, norm=0.9):
    """f(z, A, x) = A z + x: z* = (I - A)^{-1} x, dz*/dx = (I - A)^{-1}."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((N, N))
    a *= norm / np.linalg.norm(a, 2)
    return (lambda z, a, x: a @ z + x), a, rng.standard_normal(N)


@pytest.mark.parametrize("solver", deq.SOLVERS)
def test_solvers_reach_the_known_fixed_point(solver):
    f, a, x = linear()
    z, stats = jax.jit(lambda a, x: deq.fixed_point_with_stats(f, jnp.zeros(N), a, x, solver=solver, tol=1e-6,
                                                                max_iter=400))(jnp.asarray(a, jnp.float32),
                                                                               jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(z, np.linalg.solve(np.eye(N) - a, x), rtol=1e-4, atol=1e-4)
    assert stats["converged"] == 1.0 and stats["residual"] <= 1e-6


@pytest.mark.parametrize("problem", [linear, contraction])
def test_anderson_and_broyden_need_fewer_iterations(problem):
    f, w, x = problem(norm=0.95)
    iterations = {}
    for solver in deq.SOLVERS:
        z, stats = deq.fixed_point_with_stats(f, jnp.zeros(N), jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32),
                                              solver=solver, tol=1e-5, max_iter=500)
        np.testing.assert_allclose(f(z, w, x), z, atol=1e-4)
        iterations[solver] = int(stats["iterations"])
    assert iterations["anderson"] < iterations["fixed_point"], iterations
    assert iterations["broyden"] < iterations["fixed_point"], iterations


@pytest.mark.parametrize("solver", deq.SOLVERS)
def test_implicit_gradient_matches_closed_form_finite_differences_and_unrolling(solver):
    with jax.enable_x64():
        f, a, x = linear(seed=1)
        a, x = jnp.asarray(a), jnp.asarray(x)
        weights = jnp.asarray(np.random.default_rng(2).standard_normal(N))
        loss = lambda a, x, **kw: jnp.sum(weights * jnp.sin(deq.fixed_point(  # noqa: E731
            f, jnp.zeros(N), a, x, solver=solver, tol=1e-12, max_iter=500, **kw)))
        grad_a, grad_x = jax.grad(loss, argnums=(0, 1))(a, x)
        # closed form: dL/dx = (I - A)^{-T} dL/dz*, dL/dA = (dL/dx) z*^T
        z_star = np.linalg.solve(np.eye(N) - np.asarray(a), np.asarray(x))
        dl_dz = np.asarray(weights) * np.cos(z_star)
        expected_x = np.linalg.solve((np.eye(N) - np.asarray(a)).T, dl_dz)
        np.testing.assert_allclose(grad_x, expected_x, rtol=1e-8)
        np.testing.assert_allclose(grad_a, np.outer(expected_x, z_star), rtol=1e-8)
        eps = 1e-6
        for i in (0, 5):
            bump = jnp.zeros(N).at[i].set(eps)
            numeric = (loss(a, x + bump) - loss(a, x - bump)) / (2 * eps)
            np.testing.assert_allclose(grad_x[i], numeric, rtol=1e-6)
        unrolled = jax.grad(lambda x: jnp.sum(weights * jnp.sin(
            deq.fixed_point(f, jnp.zeros(N), a, x, backward="unroll", max_iter=400))))(x)
        np.testing.assert_allclose(grad_x, unrolled, rtol=1e-8)


def test_phantom_gradient_approaches_the_implicit_one():
    f, w, x = contraction(seed=3, norm=0.8)
    w, x = jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)
    loss = lambda x, **kw: jnp.sum(deq.fixed_point(f, jnp.zeros(N), w, x, tol=1e-7, max_iter=200, **kw) ** 2)  # noqa: E731
    implicit = jax.grad(loss)(x)
    errors = [float(jnp.linalg.norm(jax.grad(lambda x: loss(x, backward="phantom", phantom_steps=k,
                                                                   phantom_damping=1.0))(x) - implicit))
              for k in (1, 3, 10, 40)]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-3 * float(jnp.linalg.norm(implicit))


class FixedPointTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_fixed_point_with_and_without_jit(self):
        """z* = (I - A)^{-1} x by Anderson, and its implicit gradient in x, the same under jit and eagerly."""
        f, a, x = linear(seed=4)
        solve = self.variant(lambda a, x: deq.fixed_point(f, jnp.zeros(N), a, x, tol=1e-6, max_iter=200))
        a32, x32 = jnp.asarray(a, jnp.float32), jnp.asarray(x, jnp.float32)
        chex.assert_trees_all_close(solve(a32, x32), np.linalg.solve(np.eye(N) - a, x), rtol=1e-4, atol=1e-4)
        grad = self.variant(jax.grad(lambda x: jnp.sum(deq.fixed_point(f, jnp.zeros(N), a32, x, tol=1e-6,
                                                                        max_iter=200))))(x32)
        chex.assert_trees_all_close(grad, np.linalg.solve((np.eye(N) - a).T, np.ones(N)), rtol=1e-3, atol=1e-4)


def test_non_convergence_is_reported():
    f, w, x = contraction(norm=0.99)
    _, stats = deq.fixed_point_with_stats(f, jnp.zeros(N), jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32),
                                          solver="fixed_point", tol=1e-9, max_iter=3)
    assert stats["converged"] == 0.0 and stats["iterations"] == 3 and stats["residual"] > 1e-9


def test_works_on_batched_arrays_under_jit_and_vmap():
    f, w, x = contraction()
    xs = jnp.asarray(np.random.default_rng(4).standard_normal((3, N)), jnp.float32)
    solve = jax.jit(jax.vmap(lambda x: deq.fixed_point(f, jnp.zeros(N), jnp.asarray(w, jnp.float32), x)))
    zs = solve(xs)
    np.testing.assert_allclose(jax.vmap(lambda z, x: f(z, w, x))(zs, xs), zs, atol=1e-4)


def test_bad_arguments_are_clear():
    f, w, x = contraction()
    with pytest.raises(ValueError, match="solver='newton' is not one of"):
        deq.fixed_point(f, jnp.zeros(N), w, x, solver="newton")
    with pytest.raises(ValueError, match="backward='adjoint' is not one of"):
        deq.fixed_point(f, jnp.zeros(N), w, x, backward="adjoint")
