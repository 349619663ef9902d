"""Uniform integer grids and round-to-nearest (RTN) quantization.

A B-bit grid of one output channel (or one group of its inputs) with values v spans [lo, hi] = [min(min v, 0),
max(max v, 0)] (0 always on the grid, as GPTQ's reference quantizer has it), q_max = 2^B - 1:

    asymmetric   scale = (hi - lo) / q_max,   zero = round(-lo / scale)
    symmetric    hi <- max(|lo|, hi), lo <- -hi,   scale = 2 hi / q_max,   zero = (q_max + 1) / 2
    quantize     q = clip(round(v / scale) + zero, 0, q_max),   dequantized  scale (q - zero)

(an all-zero range becomes [-1, 1]). `rtn` quantizes every weight on its channel's or group's grid.
"""

import jax
import jax.numpy as jnp

MAX_BITS = 8


def check(w_shape, bits: int, group_size: int) -> None:
    """ValueError, in one line, for bits or a group size the grid cannot do with weights of `w_shape` [in, out]."""
    if not 2 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits}: integer grids of 2 to {MAX_BITS} bits")
    if group_size != -1 and (group_size < 1 or w_shape[0] % group_size):
        raise ValueError(f"group_size={group_size} does not divide the layer's {w_shape[0]} inputs (-1: one group "
                         "per output channel)")


def grid(values, bits: int, symmetric: bool):
    """(scale [out], zero [out]) of the grid of each column of values [k, out] (the k inputs of one group)."""
    q_max = 2.0**bits - 1
    lo = jnp.minimum(values.min(0), 0.0)
    hi = jnp.maximum(values.max(0), 0.0)
    if symmetric:
        hi = jnp.maximum(-lo, hi)
        lo = jnp.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo, hi = jnp.where(empty, -1.0, lo), jnp.where(empty, 1.0, hi)
    scale = (hi - lo) / q_max
    zero = jnp.full_like(scale, (q_max + 1) / 2) if symmetric else jnp.round(-lo / scale)
    return scale, zero


def quantize(values, scale, zero, bits: int):
    """Values [..., out] rounded onto their column's grid, dequantized."""
    q = jnp.clip(jnp.round(values / scale) + zero, 0, 2.0**bits - 1)
    return scale * (q - zero)


def rtn(w, *, bits: int, group_size: int = -1, symmetric: bool = False, with_grid: bool = False):
    """Round to nearest: each output channel's weights (or each group of `group_size` consecutive inputs of it) on
    their own min-max grid; float32 [in, out] (with_grid: and the grids, as `contiguous_groups` gives them)."""
    check(w.shape, bits, group_size)
    w = jnp.asarray(w, jnp.float32)
    size = w.shape[0] if group_size == -1 else group_size
    groups = w.reshape(w.shape[0] // size, size, w.shape[1])
    scale, zero = jax.vmap(lambda g: grid(g, bits, symmetric))(groups)
    w_hat = quantize(groups, scale[:, None], zero[:, None], bits).reshape(w.shape)
    return (w_hat, contiguous_groups(scale, zero, size)) if with_grid else w_hat


def contiguous_groups(scale, zero, group_size: int) -> dict:
    """The grids of groups of `group_size` consecutive inputs: {"scale", "zero": [groups, out], "group": int32 [in],
    input i's group} (experiments/compression/storage.py stores weights with them)."""
    group = jnp.arange(scale.shape[0] * group_size, dtype=jnp.int32) // group_size
    return {"scale": scale, "zero": zero, "group": group}
