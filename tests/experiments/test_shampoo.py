"""Shampoo (experiments/optim/shampoo.py) against a float64 NumPy loop of its equations on a small quadratic:
parameters of rank 3 and 1, blocks that do not divide the matrix, preconditioners refreshed every 3 steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax

from experiments.optim import optimizers, shampoo
from experiments.configs import base

B1, B2, EPS, BLOCK, EVERY, MATRIX_EPS, LR, WD = 0.9, 0.99, 1e-8, 4, 3, 1e-3, 0.05, 0.1


def _quadratic(rng):
    """loss(w, b) = 0.5 ||A W_mat - C||^2 + 0.5 ||b - d||^2, W of shape [2, 3, 7] viewed as W_mat [6, 7]."""
    a = rng.normal(size=(9, 6))
    a[:, 0] *= 5.0  # ill-conditioned: where a preconditioner matters
    return a, rng.normal(size=(9, 7)), rng.normal(size=(5,))


def _gradients(p, a, c, d):
    w = p["w"].reshape(6, 7)
    return {"w": (a.T @ (a @ w - c)).reshape(2, 3, 7), "b": p["b"] - d}


def _inverse_fourth_root(s):
    eigenvalues, vectors = np.linalg.eigh(s)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    return (vectors * (eigenvalues + MATRIX_EPS * np.linalg.norm(s)) ** -0.25) @ vectors.T


def _numpy_shampoo(p, a, c, d, steps):
    """Shampoo's equations in float64, one block at a time (rows 0:4, 4:6; columns 0:4, 4:7)."""
    p = {k: v.astype(np.float64).copy() for k, v in p.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    row_blocks, col_blocks = [slice(0, 4), slice(4, 6)], [slice(0, 4), slice(4, 7)]
    left = {(i, j): np.zeros((r.stop - r.start,) * 2) for i, r in enumerate(row_blocks) for j, _ in enumerate(col_blocks)}
    right = {(i, j): np.zeros((s.stop - s.start,) * 2) for i, _ in enumerate(row_blocks) for j, s in enumerate(col_blocks)}
    roots, trajectory = {}, []
    for t in range(1, steps + 1):
        g = _gradients(p, a, c, d)
        for k in p:
            mu[k] = B1 * mu[k] + (1 - B1) * g[k]
            nu[k] = B2 * nu[k] + (1 - B2) * g[k] ** 2
        mu_hat = {k: mu[k] / (1 - B1**t) for k in p}
        adam = {k: mu_hat[k] / (np.sqrt(nu[k] / (1 - B2**t)) + EPS) for k in p}
        update = {"b": adam["b"], "w": np.zeros((6, 7))}
        g_w, m_w, adam_w = (x["w"].reshape(6, 7) for x in (g, mu_hat, adam))
        for i, rows in enumerate(row_blocks):
            for j, cols in enumerate(col_blocks):
                gb = g_w[rows, cols]
                left[i, j] = B2 * left[i, j] + (1 - B2) * gb @ gb.T
                right[i, j] = B2 * right[i, j] + (1 - B2) * gb.T @ gb
                if (t - 1) % EVERY == 0:
                    roots[i, j] = _inverse_fourth_root(left[i, j]), _inverse_fourth_root(right[i, j])
                direction = roots[i, j][0] @ m_w[rows, cols] @ roots[i, j][1]
                update["w"][rows, cols] = direction * np.linalg.norm(adam_w[rows, cols]) / np.linalg.norm(direction)
        update["w"] = update["w"].reshape(2, 3, 7)
        for k in p:
            p[k] = p[k] - LR * (update[k] + WD * p[k])
        trajectory.append({k: v.copy() for k, v in p.items()})
    return trajectory


def test_shampoo_follows_its_equations_on_a_quadratic():
    rng = np.random.default_rng(0)
    a, c, d = _quadratic(rng)
    params0 = {"w": rng.normal(size=(2, 3, 7)), "b": rng.normal(size=(5,))}
    opt = base.get_config().optimizer
    opt.update(name="shampoo", lr=LR, warmup_steps=0)
    opt.shampoo.update(b1=B1, b2=B2, eps=EPS, block_size=BLOCK, precondition_every=EVERY, matrix_eps=MATRIX_EPS,
                       weight_decay=WD)
    tx = optimizers.build(opt, 10)
    loss = lambda p: 0.5 * jnp.sum((a @ p["w"].reshape(6, 7) - c) ** 2) + 0.5 * jnp.sum((p["b"] - d) ** 2)  # noqa: E731

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = {k: jnp.asarray(v, jnp.float32) for k, v in params0.items()}
    state, trajectory = tx.init(params), []
    for _ in range(8):
        params, state = step(params, state)
        trajectory.append(params)
    expected = _numpy_shampoo(params0, a, c, d, 8)
    for got, want in zip(trajectory, expected):
        chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
    assert float(loss(trajectory[-1])) < float(loss({k: jnp.asarray(v) for k, v in params0.items()}))


def test_blocks_round_trip_stacked_copies_stay_apart_and_roots_invert():
    x = jnp.arange(2 * 3 * 7, dtype=jnp.float32).reshape(2, 3, 7)
    assert shampoo.block_sizes(x.shape, 4) == (1, 2, 2, 4, 4)  # one [6, 7] matrix
    stacked = shampoo.block_sizes(x.shape, 4, batch_dims=1)  # two [3, 7] matrices (a scanned stack's layers)
    assert stacked == (2, 1, 2, 3, 4)
    for blocks in (shampoo.block_sizes(x.shape, 4), stacked):
        chex.assert_trees_all_equal(shampoo.from_blocks(shampoo.to_blocks(x, blocks), blocks, x.shape), x)
    np.testing.assert_array_equal(shampoo.to_blocks(x, stacked)[1, 0, :3, :4], x[1, :, :4])
    s = np.random.default_rng(1).normal(size=(5, 5))
    s = s @ s.T
    root = np.asarray(shampoo.inverse_fourth_root(jnp.asarray(s, jnp.float32), 1e-9), np.float64)
    np.testing.assert_allclose(np.linalg.matrix_power(root, 4) @ s, np.eye(5), atol=2e-3)


@pytest.mark.slow
def test_stacked_layers_get_their_own_preconditioners():
    """Layer 1 of a stacked [2, 4, 3] parameter steps exactly as the same matrix alone (batch_dims from `layers`)."""
    rng = np.random.default_rng(2)
    stacked = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    grads = [jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32) for _ in range(3)]
    opt = base.get_config().optimizer
    opt.update(name="shampoo", lr=LR, warmup_steps=0)
    opt.shampoo.update(precondition_every=2, matrix_eps=MATRIX_EPS)
    tx = optimizers.build(opt, 10, axis_names={"w": ("layers", "embed", "mlp")})
    alone = optimizers.build(opt, 10)
    state, state_alone = tx.init({"w": stacked}), alone.init({"w": stacked[1]})
    for g in grads:
        update, state = tx.update({"w": g}, state, {"w": stacked})
        update_alone, state_alone = alone.update({"w": g[1]}, state_alone, {"w": stacked[1]})
        np.testing.assert_allclose(update["w"][1], update_alone["w"], rtol=1e-5, atol=1e-7)
