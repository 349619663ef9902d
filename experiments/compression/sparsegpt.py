"""SparseGPT (Frantar and Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

GPTQ's updates (gptq.py) with pruning in place of rounding: input by input, a pruned weight's error is spread over
the later inputs, e_i = (w_i - m_i w_i) / U_ii, w_j <- w_j - U_ij e_i (j > i), m the keep mask. The mask is chosen
per block of `block_size` inputs by the OBS saliency w^2 / U_ii^2 (hessian.py): unstructured, exactly
floor(sparsity x block size x out) weights of the block with the lowest saliency (the reference's `<=` threshold
prunes one more); n:m, at every m-th input of the block, for each output the n of the next m inputs with the
lowest saliency as they stand then.

Joint mode (bits = b, SparseGPT section 3.5): every kept weight is also rounded, on its output channel's b-bit grid
(grid.py) fitted to the weights as given, before its error is spread: q_i = quantize(m_i w_i), e_i = (w_i - q_i) /
U_ii (the grid holds 0, so a pruned weight stays 0).
"""

import functools

import jax
import jax.numpy as jnp

from experiments.compression import grid, hessian as hessians


def check_sparsity(w_shape, sparsity: float, n_m, block_size: int | None = None) -> None:
    if n_m is None:
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity={sparsity}: a fraction in [0, 1)")
        return
    n, m = n_m
    if not 0 < n < m:
        raise ValueError(f"n_m={tuple(n_m)}: n zeros in every m inputs needs 0 < n < m (e.g. 2:4)")
    if w_shape[0] % m or (block_size is not None and block_size % m):
        raise ValueError(f"n_m={tuple(n_m)}: m={m} must divide the layer's {w_shape[0]} inputs"
                         + (f" and block_size={block_size}" if block_size is not None else ""))


def sparsegpt(w, hessian, *, sparsity: float = 0.5, n_m=None, damp: float = 0.01, block_size: int = 128,
              bits: int | None = None, symmetric: bool = False, with_grid: bool = False):
    """Pruned and updated weights float32 [in, out] (module doc); with `bits`, also rounded (joint mode); with_grid:
    and the per-channel grids as grid.rtn gives them (None without `bits`; experiments/compression/storage.py)."""
    check_sparsity(w.shape, sparsity, n_m, block_size)
    hessians.check(w.shape, jnp.shape(hessian), block_size, damp)
    if bits is not None:
        grid.check(w.shape, bits, -1)
    w = jnp.asarray(w, jnp.float32)
    scale, zero = grid.grid(w, bits, symmetric) if bits is not None else (None, None)
    u, dead = hessians.inverse_cholesky(hessian, damp)
    w = jnp.where(dead[:, None], 0.0, w)
    pruned = []
    for start in range(0, w.shape[0], block_size):
        stop = min(start + block_size, w.shape[0])
        q, errors = _block(w, u, jnp.int32(start), scale, zero, count=stop - start, sparsity=sparsity,
                           n_m=None if n_m is None else tuple(n_m), bits=bits)
        pruned.append(q)
        w = w.at[stop:].add(-u[start:stop, stop:].T @ errors)
    if not with_grid:
        return jnp.concatenate(pruned)
    return jnp.concatenate(pruned), None if bits is None else grid.contiguous_groups(scale[None], zero[None],
                                                                                      w.shape[0])


def _lowest(saliency, count: int):
    """bool mask of the `count` lowest entries along axis 0 of saliency [k, out] (per column)."""
    return jnp.argsort(jnp.argsort(saliency, axis=0, stable=True), axis=0) < count


@functools.partial(jax.jit, static_argnames=("count", "sparsity", "n_m", "bits"))
def _block(w, u, start, scale, zero, *, count: int, sparsity: float, n_m, bits):
    w_block = jax.lax.dynamic_slice_in_dim(w, start, count)
    u_block = jax.lax.dynamic_slice(u, (start, start), (count, count))
    inverse_diagonal_sq = jnp.diagonal(u_block)[:, None] ** 2
    if n_m is None:
        saliency = (jnp.square(w_block) / inverse_diagonal_sq).reshape(-1)
        pruned = (jnp.argsort(jnp.argsort(saliency, stable=True)) < int(saliency.size * sparsity)).reshape(
            w_block.shape)
    else:
        pruned = jnp.zeros(w_block.shape, bool)

    def step(i, carry):
        w_block, pruned, q, errors = carry
        if n_m is not None:
            n, m = n_m
            window = jax.lax.dynamic_slice_in_dim(jnp.square(w_block) / inverse_diagonal_sq, i, m)
            chosen = jax.lax.dynamic_slice_in_dim(pruned, i, m) | _lowest(window, n)
            pruned = jnp.where(i % m == 0, jax.lax.dynamic_update_slice_in_dim(pruned, chosen, i, 0), pruned)
        q_i = jnp.where(pruned[i], 0.0, w_block[i])
        if bits is not None:
            q_i = grid.quantize(q_i, scale, zero, bits)
        e_i = (w_block[i] - q_i) / u_block[i, i]
        w_block = w_block - jnp.outer(u_block[i], e_i)
        return w_block, pruned, q.at[i].set(q_i), errors.at[i].set(e_i)

    zeros = jnp.zeros_like(w_block)
    _, _, q, errors = jax.lax.fori_loop(0, count, step, (w_block, pruned, zeros, zeros))
    return q, errors
