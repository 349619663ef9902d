"""What keeps a DEQ's fixed point well-conditioned: Jacobian regularisation and weight normalisations.

- Jacobian regularisation (Bai et al. 2021, "Stabilizing Equilibrium Models by Jacobian
  Regularization"): penalise ||J_f(z*)||_F^2 / d, estimated without forming J by Hutchinson's
  identity E_eps ||eps^T J||^2 = ||J||_F^2 for eps ~ N(0, I) (one vector-Jacobian product per sample).
- Spectral normalisation (Miyato et al. 2018): W / sigma_max(W), sigma_max by power iteration with
  the singular vectors held constant, so the gradient is that of W / (u^T W v).
- Weight normalisation (Salimans & Kingma 2016): W = g * V / ||V||, one gain g per output unit,
  the norm taken over the input axes.

A kernel's input axes are the leading axes that its matmul contracts: all but the last for Dense
kernels, but only the first for the attention projections [D, heads, head_dim]; `fan_in_axes`
decides by the parameter's name.
"""

import math

import jax
import jax.numpy as jnp

NORMALISATIONS = ("none", "spectral", "weight")
_OUTPUT_HEADS = ("query", "key", "value")  # [D, heads, head_dim]: contracts axis 0 only


def jacobian_frobenius_sq(f, z, *args, rng, samples: int = 1):
    """Hutchinson estimate of ||df/dz (z)||_F^2 / z.size from `samples` Gaussian probes."""
    _, vjp = jax.vjp(lambda z_: f(z_, *args), z)
    eps = jax.random.normal(rng, (samples, *z.shape), z.dtype)
    return jnp.mean(jax.vmap(lambda e: jnp.sum(vjp(e)[0] ** 2))(eps)) / z.size


def fan_in_axes(name: str, ndim: int) -> int:
    """How many leading axes of a kernel called `name` its matmul contracts."""
    return 1 if name in _OUTPUT_HEADS else ndim - 1


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _as_matrix(path, w):
    k = fan_in_axes(str(getattr(path[-1], "key", "")), w.ndim)
    return w.reshape(math.prod(w.shape[:k]), -1)


def spectral_norm(matrix, iterations: int = 30):
    """sigma_max(matrix) by power iteration from a fixed start; differentiable as u^T W v (u, v constant)."""
    v = jnp.ones(matrix.shape[1], matrix.dtype) / math.sqrt(matrix.shape[1])
    w = jax.lax.stop_gradient(matrix)

    def step(_, v):
        v = w.T @ (w @ v)
        return v / (jnp.linalg.norm(v) + 1e-12)

    v = jax.lax.fori_loop(0, iterations, step, v)
    u = w @ v
    u = u / (jnp.linalg.norm(u) + 1e-12)
    return u @ matrix @ v


def spectral_normalise(params, iterations: int = 30):
    """Every kernel (ndim >= 2) of a parameter tree divided by its spectral norm; vectors unchanged."""
    def normalise(path, w):
        return w / spectral_norm(_as_matrix(path, w), iterations) if w.ndim >= 2 else w
    return jax.tree_util.tree_map_with_path(normalise, params)


def column_norms(params) -> dict:
    """{"path/to/kernel": ||V|| over its input axes, shaped like its output axes} for every kernel (ndim >= 2)."""
    norms = {}
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        if w.ndim >= 2:
            k = fan_in_axes(str(getattr(path[-1], "key", "")), w.ndim)
            norms[_name(path)] = jnp.linalg.norm(_as_matrix(path, w), axis=0).reshape(w.shape[k:])
    return norms


def weight_normalise(params, gains: dict):
    """W = g * V / ||V|| for every kernel, with gains {"path/to/kernel": g} (`column_norms` at initialisation)."""
    norms = column_norms(params)
    return jax.tree_util.tree_map_with_path(
        lambda path, w: w * (gains[_name(path)] / (norms[_name(path)] + 1e-12)) if w.ndim >= 2 else w, params)
