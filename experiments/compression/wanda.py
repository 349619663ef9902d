"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"): prune by the
weight's magnitude times its input feature's norm over calibration tokens, compared within each output,

    score_ij = |w_ij| sqrt(mean_tokens x_i^2),

zeroing for every output j the floor(sparsity x in) inputs of lowest score (or n of every m consecutive inputs).
No weight is updated.
"""

import jax
import jax.numpy as jnp

from experiments.compression.sparsegpt import check_sparsity


def wanda(w, input_sq_norms, *, sparsity: float = 0.5, n_m=None) -> jax.Array:
    """Pruned weights float32 [in, out]; input_sq_norms float [in] (mean of x_i^2 over calibration tokens)."""
    check_sparsity(w.shape, sparsity, n_m)
    if jnp.shape(input_sq_norms) != (w.shape[0],):
        raise ValueError(f"input_sq_norms of shape {tuple(jnp.shape(input_sq_norms))}: one per input, "
                         f"({w.shape[0]},)")
    w = jnp.asarray(w, jnp.float32)
    score = jnp.abs(w) * jnp.sqrt(jnp.asarray(input_sq_norms, jnp.float32))[:, None]
    if n_m is None:
        rank = jnp.argsort(jnp.argsort(score, axis=0, stable=True), axis=0)
        return jnp.where(rank < int(w.shape[0] * sparsity), 0.0, w)
    n, m = n_m
    groups = score.reshape(w.shape[0] // m, m, w.shape[1])
    rank = jnp.argsort(jnp.argsort(groups, axis=1, stable=True), axis=1)
    return jnp.where((rank < n).reshape(w.shape), 0.0, w)
