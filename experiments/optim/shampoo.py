"""Shampoo (Gupta et al. 2018; Anil et al. 2020, "Scalable Second Order Optimization for Deep Learning") as an
optax gradient transformation: block-diagonal Kronecker preconditioners, their inverse 4th roots recomputed
every `precondition_every` steps, the direction grafted to Adam's step size per block.

A parameter with two or more axes besides its stacking axes (`layers`, `expert`: each copy on its own) is
viewed as a matrix G [m, n] (every axis but the last merged into rows) and cut into blocks of at most
`block_size` x `block_size` (the edges zero-padded). For each block, at step t:

    L = b2 L + (1 - b2) G G^T             R = b2 R + (1 - b2) G^T G            (statistics: raw gradients)
    mu = b1 mu + (1 - b1) G               nu = b2 nu + (1 - b2) G^2            (Adam's moments, elementwise)
    every `precondition_every` steps (and at the first):  P_L = (L + e I)^(-1/4),  P_R = (R + e I)^(-1/4),
        e = matrix_eps * ||L||_F, resp. ||R||_F  (`inverse_fourth_root`)
    D = P_L mu_hat P_R                    A = mu_hat / (sqrt(nu_hat) + eps)   (mu_hat, nu_hat bias-corrected)
    update = ||A||_F / ||D||_F * D        (grafting: Shampoo's direction, Adam's step size per block)

Vectors and scalars (norm scales, biases) take Adam's step A. The learning rate and decoupled weight decay
are chained after it (experiments/optim/optimizers.py).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ShampooState(NamedTuple):
    count: jax.Array  # int32 steps taken
    mu: optax.Updates  # Adam's first moment, the parameter's shape
    nu: optax.Updates  # Adam's second moment, the parameter's shape
    stats: optax.Updates  # per parameter (L, R) [row blocks, col blocks, bm, bm] / [..., bn, bn], or () for vectors
    roots: optax.Updates  # per parameter (P_L, P_R) likewise


def block_sizes(shape, block_size: int, batch_dims: int = 0) -> tuple[int, int, int, int, int] | None:
    """(copies, row blocks, col blocks, bm, bn) of a parameter of `shape` viewed as `copies` matrices (its first
    `batch_dims` axes, e.g. stacked layers, each their own); None for a vector."""
    if len(shape) - batch_dims < 2:
        return None
    copies, m, n = math.prod(shape[:batch_dims]), math.prod(shape[batch_dims:-1]), shape[-1]
    bm, bn = min(block_size, m), min(block_size, n)
    return copies, -(-m // bm), -(-n // bn), bm, bn


def to_blocks(x, blocks):
    """A parameter-shaped array -> [copies * row blocks, col blocks, bm, bn] (zero-padded at the edges)."""
    copies, rb, cb, bm, bn = blocks
    matrices = x.reshape(copies, -1, x.shape[-1])
    matrices = jnp.pad(matrices, ((0, 0), (0, rb * bm - matrices.shape[1]), (0, cb * bn - matrices.shape[2])))
    return matrices.reshape(copies, rb, bm, cb, bn).transpose(0, 1, 3, 2, 4).reshape(copies * rb, cb, bm, bn)


def from_blocks(b, blocks, shape):
    """The inverse of `to_blocks` (padding dropped)."""
    copies, rb, cb, bm, bn = blocks
    matrices = b.reshape(copies, rb, cb, bm, bn).transpose(0, 1, 3, 2, 4).reshape(copies, rb * bm, cb * bn)
    return matrices[:, :math.prod(shape) // (copies * shape[-1]), :shape[-1]].reshape(shape)


def _frobenius(x):
    """||x||_F of each matrix of x [..., k, l], kept as [..., 1, 1]."""
    return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))


def inverse_fourth_root(stat, matrix_eps: float, tol: float = 1e-6, max_iter: int = 100):
    """(S + e I)^(-1/4) of symmetric PSD matrices [..., k, k], e = matrix_eps * ||S||_F, by the coupled Newton
    iteration (Guo & Higham 2006; what Shampoo runs on accelerators: matmuls only). With A = S + e I,
    z = 5 / (2 ||A||_F), M_0 = z A, H_0 = z^(1/4) I, and  T = (5 I - M) / 4:  M <- T^4 M,  H <- H T,
    until max |M - I| < tol; then H = A^(-1/4). (XLA:CPU's eigendecomposition deadlocks in programs with
    collectives over several devices; these matmuls do not.)"""
    k = stat.shape[-1]
    identity = jnp.eye(k, dtype=stat.dtype)
    a = stat + matrix_eps * jnp.maximum(_frobenius(stat), 1e-30) * identity
    z = 2.5 / _frobenius(a)
    m, h = z * a, z**0.25 * jnp.broadcast_to(identity, a.shape)

    def not_done(carry):
        i, m, _, error = carry
        return (i < max_iter) & (error > tol)

    def newton(carry):
        i, m, h, _ = carry
        t = 1.25 * identity - 0.25 * m
        t2 = t @ t
        m = t2 @ t2 @ m
        return i + 1, m, h @ t, jnp.max(jnp.abs(m - identity))

    return jax.lax.while_loop(not_done, newton, (0, m, h, jnp.asarray(jnp.inf, stat.dtype)))[2]


def scale_by_shampoo(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, block_size: int = 128,
                     precondition_every: int = 10, matrix_eps: float = 1e-6,
                     batch_dims=None) -> optax.GradientTransformation:
    """Shampoo's grafted direction (the module docstring's `update`), before the learning rate. `batch_dims`:
    a tree like the parameters of how many leading axes stack independent copies (None: 0 everywhere)."""

    def copies_axes(params):  # a prefix of the parameters' tree (which may hold boxed, named parameters)
        return jax.tree.map(lambda _: 0, params) if batch_dims is None else batch_dims

    def init(params):
        def stats_of(nb, p):
            blocks = block_sizes(jax.tree.leaves(p)[0].shape, block_size, nb)
            if blocks is None:
                return ()
            copies, rb, cb, bm, bn = blocks
            return (jnp.zeros((copies * rb, cb, bm, bm), jnp.float32),
                    jnp.zeros((copies * rb, cb, bn, bn), jnp.float32))

        stats = jax.tree.map(stats_of, copies_axes(params), params)
        zeros = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731
        return ShampooState(count=jnp.zeros((), jnp.int32), mu=jax.tree.map(zeros, params),
                            nu=jax.tree.map(zeros, params), stats=stats, roots=stats)

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        mu_hat_scale, nu_hat_scale = 1 / (1 - b1**count), 1 / (1 - b2**count)
        refresh = (count - 1) % precondition_every == 0

        def one(nb, g, m, v, stats, roots):
            adam = m * mu_hat_scale / (jnp.sqrt(v * nu_hat_scale) + eps)
            if not stats:
                return adam, (), ()
            blocks = block_sizes(g.shape, block_size, nb)
            g_blocks, m_blocks, adam_blocks = (to_blocks(x, blocks) for x in (g, m * mu_hat_scale, adam))
            left = b2 * stats[0] + (1 - b2) * g_blocks @ jnp.swapaxes(g_blocks, -1, -2)
            right = b2 * stats[1] + (1 - b2) * jnp.swapaxes(g_blocks, -1, -2) @ g_blocks
            roots = jax.lax.cond(refresh, lambda: (inverse_fourth_root(left, matrix_eps),
                                                   inverse_fourth_root(right, matrix_eps)), lambda: roots)
            direction = roots[0] @ m_blocks @ roots[1]
            direction_norm = _frobenius(direction)
            safe_norm = jnp.where(direction_norm > 0, direction_norm, 1.0)
            scale = jnp.where(direction_norm > 0, _frobenius(adam_blocks) / safe_norm, 0.0)
            return from_blocks(direction * scale, blocks, g.shape), (left, right), roots

        dims = copies_axes(grads)
        out = jax.tree.map(one, dims, grads, mu, nu, state.stats, state.roots)  # a tuple of three at each leaf
        treedef = jax.tree.structure(dims)
        flat = treedef.flatten_up_to(out)
        updates = treedef.unflatten([u for u, _, _ in flat])
        stats = treedef.unflatten([s for _, s, _ in flat])
        roots = treedef.unflatten([r for _, _, r in flat])
        return updates, ShampooState(count=count, mu=mu, nu=nu, stats=stats, roots=roots)

    return optax.GradientTransformation(init, update)
