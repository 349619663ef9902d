"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Minimise ||X W - X Q||^2 over Q on the grid (grid.py), one input i at a time (a row of W [in, out]): quantize it, then
move the not-yet-quantized inputs to absorb its error, with U the inverse Hessian's upper Cholesky factor
(hessian.py):

    q_i = quantize(w_i),   e_i = (w_i - q_i) / U_ii,   w_j <- w_j - U_ij e_i   for j > i.

Lazy batches: within a block of `block_size` inputs the updates touch only the block; the later inputs get the
block's errors at once, W_{after} <- W_{after} - U_{block, after}^T E_block (the same result, fewer memory passes).
Groups: with group_size = G the grid is refitted at every input i with i % G = 0, from the G inputs starting there
as they stand when their block begins. act_order: inputs in order of decreasing H_ii (groups then follow that
order, as the reference's default does), the result put back in the original order.
"""

import functools

import jax
import jax.numpy as jnp

from experiments.compression import grid, hessian as hessians


def gptq(w, hessian, *, bits: int, group_size: int = -1, act_order: bool = False, damp: float = 0.01,
         block_size: int = 128, symmetric: bool = False, with_grid: bool = False):
    """GPTQ-quantized weights, dequantized: float32 [in, out] (module doc); with_grid: and the grids {"scale",
    "zero": [groups, out], "group": int32 [in]}, input i's group counted in the order GPTQ quantizes in (act_order:
    not i // group_size)."""
    grid.check(w.shape, bits, group_size)
    hessians.check(w.shape, jnp.shape(hessian), block_size, damp)
    w, h = jnp.asarray(w, jnp.float32), jnp.asarray(hessian, jnp.float32)
    scale, zero = grid.grid(w, bits, symmetric)  # per channel, from the weights as given
    order = jnp.argsort(-jnp.diagonal(h), stable=True) if act_order else jnp.arange(w.shape[0])
    u, dead = hessians.inverse_cholesky(h[order][:, order], damp)
    w = jnp.where(dead[:, None], 0.0, w[order])
    quantized, scales, zeros = [], [], []
    for start in range(0, w.shape[0], block_size):
        stop = min(start + block_size, w.shape[0])
        q, errors, row_scale, row_zero = _block(w, u, jnp.int32(start), scale, zero, count=stop - start, bits=bits,
                                                group_size=group_size, symmetric=symmetric)  # a group may span blocks
        quantized.append(q)
        scales.append(row_scale)
        zeros.append(row_zero)
        scale, zero = row_scale[-1], row_zero[-1]
        w = w.at[stop:].add(-u[start:stop, stop:].T @ errors)
    back = jnp.argsort(order)  # input i was quantized back[i]-th
    w_hat = jnp.concatenate(quantized)[back]
    if not with_grid:
        return w_hat
    size = w.shape[0] if group_size == -1 else group_size  # the grid of each group is its first row's
    return w_hat, {"scale": jnp.concatenate(scales)[::size], "zero": jnp.concatenate(zeros)[::size],
                   "group": (back // size).astype(jnp.int32)}


@functools.partial(jax.jit, static_argnames=("count", "bits", "group_size", "symmetric"))
def _block(w, u, start, scale, zero, *, count: int, bits: int, group_size: int, symmetric: bool):
    """(the block's quantized rows [count, out], its errors e [count, out], each row's grid: scale, zero [count, out])
    of the `count` inputs from `start`."""
    w_block = jax.lax.dynamic_slice_in_dim(w, start, count)
    u_block = jax.lax.dynamic_slice(u, (start, start), (count, count))

    def step(i, carry):
        w_block, q, errors, scales, zeros, scale, zero = carry
        if group_size != -1:
            refit = (start + i) % group_size == 0
            fitted = grid.grid(jax.lax.dynamic_slice_in_dim(w, start + i, group_size), bits, symmetric)
            scale, zero = jnp.where(refit, fitted[0], scale), jnp.where(refit, fitted[1], zero)
        q_i = grid.quantize(w_block[i], scale, zero, bits)
        e_i = (w_block[i] - q_i) / u_block[i, i]
        w_block = w_block - jnp.outer(u_block[i], e_i)  # U is upper triangular: rows before i are untouched
        return w_block, q.at[i].set(q_i), errors.at[i].set(e_i), scales.at[i].set(scale), zeros.at[i].set(zero), \
            scale, zero

    empty = jnp.zeros_like(w_block)
    _, q, errors, scales, zeros, _, _ = jax.lax.fori_loop(0, count, step, (w_block, empty, empty, empty, empty,
                                                                          scale, zero))
    return q, errors, scales, zeros
